"""The Gradio web UI: classify an upload (images: drag and drop; audio: upload or microphone) with the top-k as
labelled bars, example inputs from the run's test split, and a "random test sample" tab (the sample, its true
label, the top-2 predictions). It calls the same Predictor as the REST API, with the same limits."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np

from classforge.core.errors import BadFile
from classforge.data.rundata import run_files
from classforge.runtime.threads import one_torch_thread


def _examples(files: list[tuple[Path, str, str]], per_class: int = 2, max_total: int = 12) -> str | None:
    """Copy a few test files (per_class of each label) into a temporary folder the UI may serve; the data
    folder itself is never exposed to the web server."""
    chosen, count = [], {}
    for path, label, _ in files:
        if count.get(label, 0) < per_class and len(chosen) < max_total:
            chosen.append(path)
            count[label] = count.get(label, 0) + 1
    if not chosen:
        return None
    d = Path(tempfile.mkdtemp(prefix="classforge-examples-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    for i, p in enumerate(chosen):
        shutil.copyfile(p, d / f"{i:02d}_{p.name}")
    return str(d)


def create_ui(predictor, run_dir: str | Path, limits):
    """-> (gr.Blocks, allowed_paths for mount_gradio_app)."""
    import gradio as gr

    run = Path(run_dir)
    task = predictor.spec.task
    labels = predictor.labels
    test_files = run_files(run, ("test",))
    example_dir = _examples(test_files)
    max_k = min(10, len(labels))

    def classify_bytes(data: bytes, k: int) -> tuple[dict[str, float], str]:
        one_torch_thread()
        if len(data) > limits.max_upload_bytes:
            raise gr.Error(f"file too large ({len(data) / 2**20:.1f} MB > {limits.max_upload_mb:g} MB limit)")
        with predictor.batch_slot():
            try:
                x = predictor.preprocess(data)
            except BadFile as e:
                raise gr.Error(f"cannot use this file: {e}") from None
            outputs = predictor.forward_batched(x[None])
        result = predictor.results(outputs, int(k))[0]
        return {t["label"]: t["probability"] for t in result["top_k"]}, unknown_note(result)

    def classify(path: str | None, k: float):
        # `path` is Gradio's own copy of the upload in its cache (Gradio checks it is one), never a user path.
        if not path:
            raise gr.Error("upload a file first" if task == "image" else "upload or record a sound first")
        return classify_bytes(Path(path).read_bytes(), int(k))

    def classify_if_given(path: str | None, k: float):
        return classify(path, k) if path else (None, "")

    def random_sample():
        if not test_files:
            raise gr.Error("the run's test files are not available on this machine")
        path, truth, _ = random.choice(test_files)
        data = path.read_bytes()
        scores, note = classify_bytes(data, 2)
        top = max(scores, key=scores.get)
        verdict = "Correct" if top == truth else f"Wrong (predicted {top})"
        if note:
            verdict += " · answered unknown"
        if task == "audio":
            wave = predictor.load(data)
            shown = (predictor.spec.sample_rate, (np.clip(wave, -1, 1) * 32767).astype(np.int16))
        else:
            shown = predictor.pre.load(data)  # the decoded image (PIL), as the model saw it before cropping
        return shown, truth, scores, f"**{verdict}** · `{path.name}`"

    summary_line = _summary_line(run, predictor)
    with gr.Blocks(title=f"classforge · {run.resolve().name}") as demo:
        gr.Markdown(f"## {run.resolve().name}\n{summary_line}")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    if task == "audio":
                        inp = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Sound (upload or record)")
                    else:
                        inp = gr.Image(type="filepath", sources=["upload", "clipboard"],
                                       label="Image (drag and drop, or click to upload)")
                    k = gr.Slider(1, max_k, value=min(3, max_k), step=1, label="How many labels (top-k)")
                    btn = gr.Button("Submit", variant="primary")
                with gr.Column():
                    answer = gr.Markdown()
                    out = gr.Label(label="Prediction", num_top_classes=max_k)
            if example_dir:
                gr.Examples(examples=sorted(str(p) for p in Path(example_dir).iterdir()), inputs=inp,
                            label="Examples from the test split")
            btn.click(classify, [inp, k], [out, answer], api_name="classify", concurrency_limit=4)
            # predict as soon as a file arrives (upload, paste, recording, an example); Submit re-runs it, e.g.
            # after changing top-k. A cleared input clears the answer instead of raising an error.
            inp.change(classify_if_given, [inp, k], [out, answer], api_name=False, concurrency_limit=4)
        with gr.Tab("Random test sample"):
            gr.Markdown("Draw a file from the run's test split: see it, its true label, and the top-2 predictions.")
            draw = gr.Button("Draw a random test sample", variant="primary")
            with gr.Row():
                if task == "audio":
                    sample = gr.Audio(label="Sample", interactive=False, type="numpy")
                else:
                    sample = gr.Image(label="Sample", interactive=False, type="pil")
                with gr.Column():
                    truth = gr.Textbox(label="True label", interactive=False)
                    top2 = gr.Label(label="Top-2 predictions", num_top_classes=2)
                    verdict = gr.Markdown()
            draw.click(random_sample, None, [sample, truth, top2, verdict], api_name="random_sample",
                       concurrency_limit=4)
    return demo, [example_dir] if example_dir else []


def unknown_note(result: dict) -> str:
    """The line above the probabilities when the answer is "unknown" (gr.Label always heads with its most
    probable class, so the unknown answer is said here); empty otherwise."""
    if not result.get("unknown"):
        return ""
    return (f"### unknown\nThis file is unlike every class the model knows (closest: {result['best_label']}, "
            f"{result['probability']:.2f}). The probabilities below are shares among the known classes only.")


def _summary_line(run: Path, predictor) -> str:
    import json

    s = {}
    if (run / "summary.json").is_file():
        s = json.loads((run / "summary.json").read_text())
    acc = ""
    if s.get("test"):
        t = s["test"]
        acc = f" · test accuracy {t['accuracy']:.1%} (n={t['n']})"
    names = ", ".join(predictor.labels[:12]) + (" …" if len(predictor.labels) > 12 else "")
    return (f"{predictor.spec.task} classifier · {(getattr(predictor, 'meta', {}) or {}).get('backbone', '')} · "
            f"backend {predictor.backend}{acc}  \nLabels: {names}  \nREST API: [/docs](/docs)")

