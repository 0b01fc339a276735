"""Model card (RUN/README.md, Hugging Face Hub layout: YAML front matter, then Markdown) and `classforge push`.

Everything in the card comes from the run directory (summary.json, model.json, labels.json, config.yaml,
export.json); nothing is invented. What the run cannot know (licence of the data, who may use the model) is
left as an explicit instruction to the author."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

from classforge.core.errors import ClassforgeError

PIPELINE = {"image": "image-classification", "audio": "audio-classification"}
TASK_NAME = {"image": "Image Classification", "audio": "Audio Classification"}
# What `classforge push` uploads by default. report.html, predictions.csv and split.csv name (and the report
# shows) the user's own data files; they stay local unless asked for.
PUSH_FILES = ["README.md", "model.onnx", "model.int8.onnx", "model.safetensors", "model.json", "labels.json",
              "config.yaml", "summary.json", "export.json", "metrics.csv", "per_class.csv", "confusion_matrix.png",
              "curves.png", "reliability.png"]
PRIVATE_FILES = ["report.html", "predictions.csv", "split.csv"]


def _read_json(p: Path) -> dict | list | None:
    return json.loads(p.read_text()) if p.is_file() else None


def front_matter(run: Path) -> dict:
    s = _read_json(run / "summary.json") or {}
    meta = _read_json(run / "model.json") or {}
    task = meta.get("task") or s.get("task", "image")
    exp = _read_json(run / "export.json")
    tags = ["classforge", PIPELINE[task], meta.get("backbone", "unknown"), s.get("strategy", "unknown")]
    if exp:
        tags.append("onnx")
    fm: dict = {"library_name": "classforge", "pipeline_tag": PIPELINE[task], "tags": tags,
                "metrics": ["accuracy", "f1"]}
    if s.get("test"):
        t = s["test"]
        dataset = Path(str(s.get("data") or "data")).name or "data"
        metrics = [{"type": "accuracy", "value": round(t["accuracy"], 4), "name": "Test accuracy"},
                   {"type": "f1", "value": round(t["macro_f1"], 4), "name": "Test macro F1",
                    "args": {"average": "macro"}}]
        fm["model-index"] = [{"name": run.resolve().name, "results": [{
            "task": {"type": PIPELINE[task], "name": TASK_NAME[task]},
            "dataset": {"name": dataset, "type": dataset, "split": "test"},
            "metrics": metrics}]}]
    return fm


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def _round(v) -> list | None:
    return [round(float(x), 4) for x in v] if v else v


def body(run: Path) -> str:
    s = _read_json(run / "summary.json") or {}
    meta = _read_json(run / "model.json") or {}
    labels = _read_json(run / "labels.json") or []
    exp = _read_json(run / "export.json")
    task = meta.get("task") or s.get("task", "image")
    spec = meta.get("spec", {})
    name = run.resolve().name
    data = s.get("data") or "unknown"
    lines = [f"# {name}", "",
             f"A {len(labels)}-class {task} classifier trained with classforge "
             f"({s.get('strategy', '?')} strategy on the `{meta.get('backbone', '?')}` backbone, "
             f"{(s.get('params') or {}).get('total', 0):,} parameters; backbone weights: "
             f"`{meta.get('weights_source', '?')}`).", "",
             "## Labels", "", ", ".join(f"`{c}`" for c in labels), "",
             "## Data", "",
             f"- Source: the folder `{Path(str(data)).name}` (the data itself is not shipped with the model).",
             f"- Split: {(s.get('split') or {}).get('method', '?')}; counts "
             f"{json.dumps((s.get('split') or {}).get('counts', {}))}; seed {(s.get('split') or {}).get('seed', '?')}.",
             f"- Training samples per class: {json.dumps(s.get('samples_per_class', {}))}.",
             f"- Files skipped by validation: {s.get('skipped', 0)}.", "",
             "## Metrics", "",
             "| split | n | accuracy | 95% CI | macro F1 | ECE |", "|---|---|---|---|---|---|"]
    for split in ("test", "val"):
        m = s.get(split)
        if m:
            lo, hi = m.get("accuracy_ci95", [None, None])
            lines.append(f"| {split} | {m['n']} | {_fmt(m['accuracy'], True)} | {_fmt(lo, True)}–{_fmt(hi, True)} | "
                         f"{_fmt(m.get('macro_f1'))} | {_fmt(m.get('ece'))} |")
    lines += ["", "Measured once on the split above; the confidence interval is for accuracy on data like it. "
              "Per-class figures: `per_class.csv`; confusion matrix: `confusion_matrix.png`.", ""]
    if task == "audio":
        inp = (f"mono waveform at {spec.get('sample_rate')} Hz, {spec.get('clip_seconds')} s per clip (longer "
               "clips are cut in the middle, shorter ones zero-padded); the log-mel front end is inside the model")
    else:
        inp = (f"RGB, short side resized to {round(spec.get('size', 224) / spec.get('crop_pct', 1))} px "
               f"({spec.get('interpolation')}), centre crop {spec.get('size')} px, scaled to [0, 1], normalised "
               f"with mean {_round(spec.get('mean'))} and std {_round(spec.get('std'))}; shape (B, 3, {spec.get('size')}, "
               f"{spec.get('size')})")
    extras = "audio,serve" if meta.get("task") == "audio" else "serve"
    lines += ["## How to use", "", "```bash",
              f'pip install "classforge[{extras}]"   # from a classforge wheel or source checkout: '
              f'pip install "/path/to/classforge[{extras}]"',
              f"classforge predict {name} FILE...        # top-3 labels with probabilities",
              f"classforge serve {name}                  # REST API + web UI on http://127.0.0.1:8000", "```", "",
              f"Input: {inp}. Output: logits over the labels above, in `labels.json` order.", ""]
    t = float(meta.get("temperature", 1.0))
    if t != 1.0:
        lines += [f"Calibrated: classforge divides the logits by the temperature T = {t:g} (`model.json`, fitted on "
                  "the validation split by `classforge calibrate`) before the softmax; do the same when you run "
                  "the ONNX file yourself. It never changes the predicted class.", ""]
    tta = (meta.get("backbone_kwargs") or {}).get("tta", "none")
    if tta != "none":
        lines += [f"Test-time augmentation `{tta}` is inside the network (and inside `model.onnx`): each input is "
                  "scored as the mean over its views.", ""]
    if exp:
        p = exp["parity"]
        lines += ["### ONNX", "",
                  f"`model.onnx` (opset {exp['opset']}, free batch axis, input `{exp['input']['name']}`, output "
                  f"`{exp['output']['name']}`) runs with ONNX Runtime alone; labels and preprocessing are also in "
                  f"its metadata (`classforge.labels`, `classforge.spec`). Parity with PyTorch on {p['n']} inputs "
                  f"({p['source']}): max |Δlogit| {p['max_abs_diff']:.1e}, top-1 agreement "
                  f"{p['top1_agreement']:.3f}."]
        if p.get("note"):
            lines.append(f"Note: {p['note']}.")
        if exp.get("int8"):
            q = exp["int8"]
            lines += [f"`{q['file']}` ({q['method']} int8): top-1 agreement with fp32 {q['top1_agreement']:.3f} on "
                      f"{q['n']} inputs."]
        lines.append("")
    lines += ["## Intended use", "",
              f"Classifying {task} inputs like the training data into the {len(labels)} labels above: demos, "
              "prototypes, and as a baseline to compare other models against. The author of the run should state "
              "here who may use it and for what, and the licence of the data and weights.", "",
              "## Limitations", "",
              "- It always answers with one of its labels, also for inputs of none of these classes; a low top "
              "probability is a hint, not a guarantee (see ECE above for how well probabilities are calibrated).",
              f"- Measured on {((s.get('test') or {}).get('n', 0))} test files from the same source as the training "
              "data; accuracy on other cameras, microphones, places or people is unknown until measured "
              "(`classforge evaluate RUN OTHER_DATA`).",
              "- Biases of the training data (class balance, who and what was recorded) carry over to predictions.",
              "- Not for decisions about people, health or safety without an evaluation made for that purpose.", "",
              "## Training", "",
              f"- Strategy `{s.get('strategy', '?')}`; time {((s.get('timing') or {}).get('total_s') or 0):.0f} s; "
              f"environment {json.dumps(s.get('environment', {}))}.",
              "- Full configuration: `config.yaml`; per-epoch metrics: `metrics.csv`.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, license: str | None = None) -> Path:
    """Write RUN/README.md from the run's files and return its path."""
    run = Path(run_dir)
    if not (run / "model.json").is_file():
        raise ClassforgeError(f"{run} is not a classforge run directory (missing model.json)")
    fm = front_matter(run)
    if license is None and (run / "README.md").is_file():  # a refresh keeps the license the card was given
        old = (run / "README.md").read_text(encoding="utf-8")
        if old.startswith("---\n") and "\n---\n" in old[4:]:
            try:
                license = (yaml.safe_load(old[4:old.index("\n---\n", 4)]) or {}).get("license")
            except yaml.YAMLError:
                license = None
    if license:
        fm = {"license": license, **fm}
    text = "---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True) + "---\n\n" + body(run)
    out = run / "README.md"
    out.write_text(text, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------- push
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CLASSFORGE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         include_private_files: bool = False, message: str | None = None) -> str:
    """Upload the run (model card, ONNX/safetensors weights, metadata) to a Hub model repository."""
    run = Path(run_dir)
    if not (run / "model.json").is_file():
        raise ClassforgeError(f"{run} is not a classforge run directory (missing model.json)")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ClassforgeError("push needs huggingface_hub: pip install 'classforge[hf]'") from None
    if not hub_reachable():
        raise ClassforgeError("cannot reach huggingface.co (offline, or HF_HUB_OFFLINE/CLASSFORGE_OFFLINE is set); "
                              "`classforge push` needs the network. The run directory is ready to upload later.")
    if not (run / "README.md").is_file():
        write_model_card(run)
    allow = PUSH_FILES + (PRIVATE_FILES if include_private_files else [])
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(run), repo_id=repo_id, repo_type="model", allow_patterns=allow,
                                 commit_message=message or f"Upload classforge run {run.resolve().name}")
    except Exception as e:  # noqa: BLE001 - auth, network, permissions: one message
        raise ClassforgeError(f"push to {repo_id} failed: {e}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
