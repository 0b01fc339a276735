"""Choose a trained small CNN's test-time augmentation (TTA) after training.

`classforge tta RUN` scores every TTA mode of the run's network on the run's own validation split, keeps the most
accurate one (ties go to the cheaper mode) and writes it into RUN/model.json, so `predict`, `evaluate`, `serve` and
`export` all use it from then on. An existing RUN/model.onnx is re-exported (with its parity check), because the
TTA views are part of the exported graph. The test split is only scored when asked (`--test`), to be reported,
never to choose.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from classforge.core.errors import ClassforgeError


def _modes_of(model) -> tuple[str, ...]:
    from classforge.models.small_cnn import TTA_MODES

    bb = model.backbone
    if len(bb.tta_modes) <= 1:
        raise ClassforgeError(f"backbone {type(bb).__name__} has no test-time augmentation modes (the cnn* image "
                              f"backbones have: {', '.join(TTA_MODES)})")
    return bb.tta_modes


def score_modes(run_dir: str | Path, splits: tuple[str, ...] = ("val",), data: str | None = None,
                modes: tuple[str, ...] | None = None, batch_size: int = 512) -> dict:
    """Accuracy and inference images/s of each TTA mode on the run's `splits` (PyTorch fp32, eval mode).

    About `batch_size` views go through the network at once: a mode with V views scores batch_size // V images per
    forward pass, so 18-view modes do not build 9,000-image activations."""
    import torch

    from classforge.core.progress import progress
    from classforge.evaluation.evaluate import split_samples
    from classforge.models.small_cnn import TTA_VIEWS
    from classforge.runtime.predictor import Predictor, load_run_model

    run = Path(run_dir)
    model, _, labels = load_run_model(run)
    known = _modes_of(model)
    if modes and set(modes) - set(known):
        raise ClassforgeError(f"unknown test-time augmentation mode(s) {', '.join(sorted(set(modes) - set(known)))}; "
                              f"the modes are {', '.join(known)}")
    modes = modes or known
    bb = model.backbone
    pred = Predictor(model, bb.spec, labels, fast=False)
    samples, root = split_samples(run, data, splits, hint=", or set a mode without scoring (--mode flip)")
    idx = {c: i for i, c in enumerate(labels)}
    res: dict = {"run": str(run), "data": root, "trained_with": bb.tta, "modes": {m: {} for m in modes}}
    for sp in splits:
        sub = [s for s in samples[sp] if s.label in idx]
        if not sub:
            raise ClassforgeError(f"the run has no {sp} files to score on (split.csv has none, or they are gone "
                                  f"from {root}); train with a validation split or set a mode with --mode MODE")
        x = torch.stack([pred.preprocess(s.path) for s in progress(sub, total=len(sub), desc=f"Decoding {sp}")])
        y = np.array([idx[s.label] for s in sub])
        for mode in modes:
            bb.tta = mode
            t = time.perf_counter()
            step = max(1, batch_size // TTA_VIEWS[mode])
            logits = np.concatenate([pred.split_outputs(pred.forward(x[i:i + step]))[0]
                                     for i in range(0, len(x), step)])
            res["modes"][mode][sp] = {"accuracy": round(float((logits.argmax(1) == y).mean()), 4), "n": len(y),
                                      "images_per_s": round(len(y) / (time.perf_counter() - t))}
    bb.tta = res["trained_with"]
    return res


def choose(res: dict, on: str = "val") -> str:
    """The mode with the best accuracy on `on`; a tie goes to the mode listed first (the cheaper one)."""
    modes = list(res["modes"])
    return max(modes, key=lambda m: (res["modes"][m][on]["accuracy"], -modes.index(m)))


def set_mode(run_dir: str | Path, mode: str) -> dict:
    """Write `mode` into RUN/model.json; re-export model.onnx (and model.int8.onnx) when the run has them."""
    from classforge.models.small_cnn import TTA_MODES

    if mode not in TTA_MODES:
        raise ClassforgeError(f"--mode must be auto or one of {', '.join(TTA_MODES)}, got {mode!r}")
    run = Path(run_dir)
    from classforge.runtime.predictor import load_run_model, update_run_meta

    model, meta, _ = load_run_model(run)
    _modes_of(model)  # refuses backbones without TTA before anything is written
    before = (meta.get("backbone_kwargs") or {}).get("tta", "none")
    update_run_meta(run, backbone_kwargs={"tta": mode})
    info: dict = {"before": before, "mode": mode, "reexported": []}
    if before != mode and (run / "model.onnx").is_file():
        from classforge.deploy.onnx import export_run

        quantize = None
        if (run / "model.int8.onnx").is_file():
            old = json.loads((run / "export.json").read_text()) if (run / "export.json").is_file() else {}
            method = (old.get("int8") or {}).get("method", "")
            quantize = "int8-dynamic" if method.startswith("dynamic") else "int8"
        rep = export_run(run, quantize=quantize)
        info["reexported"] = ["model.onnx"] + (["model.int8.onnx"] if "int8" in rep else [])
        info["onnx_parity_max_abs_diff"] = rep["parity"]["max_abs_diff"]
    return info


def tta_run(run_dir: str | Path, mode: str = "auto", data: str | None = None, test: bool = False) -> dict:
    """Score (mode auto, or --test) and set the run's TTA mode; writes RUN/tta.json."""
    run = Path(run_dir)
    res: dict = {"run": str(run)}
    if mode == "auto" or test:
        res = score_modes(run, ("val", "test") if test else ("val",), data=data)
    chosen = choose(res) if mode == "auto" else mode
    res["chosen"] = chosen
    res["chosen_on"] = "val" if mode == "auto" else "given"
    res.update(set_mode(run, chosen))
    res["date"] = dt.datetime.now().isoformat(timespec="seconds")
    (run / "tta.json").write_text(json.dumps(res, indent=2))
    return res


def add_commands(app) -> None:
    import typer

    @app.command("tta")
    def tta_cmd(
        run_dir: str = typer.Argument(..., help="A run directory of a cnn* image backbone"),
        mode: str = typer.Option("auto", "--mode", help="auto (the most accurate on the run's validation split) "
                                 "| none | flip | flip-shift | flip-shift8 | flip-shift24"),
        data: str = typer.Option(None, "--data", help="The run's data folder, if it moved since training"),
        test: bool = typer.Option(False, "--test", help="Also score the test split (reported only, not used "
                                  "to choose)"),
        threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)"),
    ):
        """Choose the test-time augmentation of a trained small CNN and make predict/evaluate/serve/export use it.

        The modes average the logits over views of each image: none (1 view), flip (+ mirror, 2), flip-shift
        (+ two one-pixel shifts and their mirrors, 6), flip-shift8 (all nine one-pixel positions x mirror, 18),
        flip-shift24 (all 25 positions up to two pixels away x mirror, 50).
        More views cost proportionally more inference time. `auto` scores each on the run's validation split
        and keeps the best; RUN/model.onnx is re-exported when present. Figures go to RUN/tta.json."""
        from rich.table import Table

        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        if threads:
            import torch

            torch.set_num_threads(threads)
        r = _run(tta_run, run_dir, mode=mode, data=data, test=test)
        if r.get("modes"):
            splits = [sp for sp in ("val", "test") if sp in next(iter(r["modes"].values()))]
            t = Table("mode", *[f"{sp} accuracy" for sp in splits], "images/s")
            for m, v in r["modes"].items():
                mark = " ←" if m == r["chosen"] else ""
                t.add_row(m + mark, *[f"{v[sp]['accuracy']:.4f} (n={v[sp]['n']})" for sp in splits],
                          str(v[splits[0]]["images_per_s"]))
            console.print(t)
        how = "chosen on validation" if r["chosen_on"] == "val" else "as given"
        console.print(f"tta: {r['before']} → [green]{r['chosen']}[/] ({how}); written to {Path(run_dir) / 'model.json'}")
        if r["reexported"]:
            console.print(f"re-exported {', '.join(r['reexported'])} (parity max |Δlogit| "
                          f"{r['onnx_parity_max_abs_diff']:.2e})")
        console.print(f"figures: {Path(run_dir) / 'tta.json'}")


def main() -> None:
    """Run as a script: `python benchmarks/cifar10/tta.py --help` (choosing a small CNN's test-time augmentation)."""
    from script import run  # benchmarks/cifar10/script.py

    run(add_commands)


if __name__ == "__main__":
    main()
