"""Command line: each command is a thin wrapper over the public API."""



import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from classforge.models.registry import ClassforgeError  # noqa: E402

app = typer.Typer(
    help="classforge: turn a folder of labelled images or sounds into a trained, evaluated, exported and "
         "served classifier.\n\nTypical flow: inspect DATA -> train DATA --out RUN -> open RUN/report.html -> "
         "predict RUN file.jpg -> export RUN -> serve RUN.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=False)

# Data options shared by inspect / train / compare / search.
DataOpt = typer.Argument(..., help="Folder (one subfolder per class, or train/ val/ test/ splits), or a .zip/.tar.gz")
LabelsCsv = typer.Option(None, "--labels-csv", help="CSV with columns path,label[,group][,split]; paths relative to DATA")
LabelFromName = typer.Option(None, "--label-from-name", help="Regex with a named group 'label' applied to file names, e.g. '^(?P<label>\\d+)_'")
Bins = typer.Option(None, "--bins", help="Bin numeric labels at these edges, e.g. 0,3,10,20 (ages -> 0-3, 3-10, 10-20, 20+)")
Classes = typer.Option(None, "--classes", help="Train on these classes only: a,b,c")
MaxClasses = typer.Option(None, "--max-classes", help="Train on the first N classes only")
GroupBy = typer.Option(None, "--group-by", help="Regex on the relative path; its first group names a group whose files never straddle splits")
MinSize = typer.Option(None, "--min-size", help="Skip images smaller than this many pixels on either side (default 8)")


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def _run(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except ClassforgeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


@app.command()
def inspect(data: str = DataOpt, labels_csv: Optional[str] = LabelsCsv, label_from_name: Optional[str] = LabelFromName,
            bins: Optional[str] = Bins, classes: Optional[str] = Classes, max_classes: Optional[int] = MaxClasses,
            group_by: Optional[str] = GroupBy, min_size: int = typer.Option(8, "--min-size", help="Minimum image side"),
            split: str = typer.Option("0.7,0.2,0.1", help="Fractions train,val,test when DATA has no official split"),
            seed: int = typer.Option(0, help="Seed of the split"),
            as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON")):
    """Show what DATA holds: classes, counts, sizes, formats, bad files and duplicates. Reads only."""
    from classforge.inspect import inspect_data

    res = _run(inspect_data, data, labels_csv=labels_csv, label_from_name=label_from_name, bins=bins, classes=classes,
               max_classes=max_classes, group_by=group_by, min_size=min_size, split=split, seed=seed)
    if as_json:
        print(json.dumps(res["json"], indent=2))
    else:
        res["print"](console)


def _train_options(
    data: Optional[str] = typer.Argument(None, help="Folder (one subfolder per class, or train/ val/ test/ splits), or a .zip/.tar.gz; may be left out when --config names it"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<data>-<backbone>-<strategy>-<time>)"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config (e.g. a run's config.yaml or a search's best.yaml); flags override it"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Registered name (see `classforge backbones`) or any timm model name [auto: efficientnet_lite0 for images, efficientat_mn04 for audio]"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local checkpoint (.safetensors or state-dict .pth) for the backbone; needed offline for hub models"),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Start the backbone from random weights"),
    strategy: Optional[str] = typer.Option(None, "--strategy", "-s", help="auto (default: linear, or scratch for backbones without pretrained weights such as cnn*) | linear (cached embeddings + head) | finetune | two-stage | scratch"),
    labels_csv: Optional[str] = LabelsCsv, label_from_name: Optional[str] = LabelFromName, bins: Optional[str] = Bins,
    classes: Optional[str] = Classes, max_classes: Optional[int] = MaxClasses, group_by: Optional[str] = GroupBy,
    test_groups: Optional[str] = typer.Option(None, "--test-groups", help="Hold out these groups (comma-separated) as the test set"),
    split: Optional[str] = typer.Option(None, "--split", help="train,val,test fractions when DATA has no split [0.7,0.2,0.1]"),
    split_file: Optional[str] = typer.Option(None, "--split-file", help="Re-use a split.csv (e.g. from an earlier run)"),
    resplit: bool = typer.Option(False, "--resplit", help="Ignore DATA's train/val/test folders and split anew (e.g. with --group-by/--test-groups)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the split and training [0]"),
    min_size: Optional[int] = MinSize,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (early stopping may end sooner); default per strategy"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size [32]"),
    lr: Optional[str] = typer.Option(None, "--lr", help="Learning rate, or 'auto' for Lightning's LR finder (plot saved)"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay [0.05]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout before the head [0]"),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing [0]"),
    cutout: Optional[int] = typer.Option(None, "--cutout", help="Images: blank a random N x N square (input pixels; may reach past the border) of every training image, after crop and flip (DeVries & Taylor 2017; 8 or 16 on 32x32 CIFAR). Applies when the network is trained (scratch, finetune), not to cached embeddings [0: off]"),
    progressive_resize: Optional[str] = typer.Option(None, "--progressive-resize", help="Images: train on downscaled images early on, then at full size (fast.ai-style progressive resizing: early epochs cost less, so a --time-budget fits more of them). SIZE:UNTIL[,SIZE:UNTIL...] with UNTIL the fraction of training (steps, or the time budget), e.g. 24:0.5 = 24 px for the first half, full size after. Scratch and finetune training only; validation and the saved model stay at full size [off]"),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="Mixup (Zhang et al. 2018) with this alpha, e.g. 0.2-1: each training input is blended with another from its batch, lam ~ Beta(alpha, alpha), and the loss blends their labels. Images and audio; scratch, finetune and two-stage training, not --strategy linear [0: off]"),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="Images: CutMix (Yun et al. 2019) with this alpha, e.g. 1: a box of about 1 - lam of each training image, lam ~ Beta(alpha, alpha), comes from another image of the batch; labels blend by pixel share. With --mixup too, each mixed batch uses one of the two at even odds [0: off]"),
    mix_prob: Optional[float] = typer.Option(None, "--mix-prob", help="Share of training batches mixed when --mixup or --cutmix is on, above 0 and at most 1 [1]"),
    sam: Optional[float] = typer.Option(None, "--sam", help="Sharpness-aware minimisation (Foret et al. 2021) with this radius, e.g. 0.05: each step takes the gradient at the weights moved uphill by RHO, so training seeks flat minima. Two forward-backward passes per batch (half the images/s; with --time-budget, half the epochs). Scratch, finetune and two-stage training; not --strategy linear [0: off]"),
    ema: Optional[float] = typer.Option(None, "--ema", help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.999) and validate, keep and export the average [0: off]"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early-stopping patience in epochs [5]"),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop training after this long: 90s, 10m, 1h. The LR schedule stretches to the budget (epochs unlimited unless --epochs)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="LR schedule over the run (or the --time-budget): cosine (warm-up + cosine, default) | step (base LR, /10, /100 over 50%/25%/25%; the course's 0.01/0.001/0.0001 with SGD) | onecycle | constant"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="auto (SGD+momentum for --schedule step, else AdamW) | adamw | sgd | muon (the backbone's weight matrices take orthogonalised momentum steps, Jordan et al. 2024, with their norm held fixed: for from-scratch or fine-tuned nets with a BatchNorm after each conv; biases, norms and the head take SGD with --lr)"),
    muon_lr: Optional[float] = typer.Option(None, "--muon-lr", help="--optimizer muon: peak step of each weight matrix as a fraction of its norm, scaled by the schedule like --lr. Chosen on 10-minute CIFAR-10 trials at batch 256: 0.2 diverged, 0.03 and 0.015 trained, 0.015 best on validation [0.015]"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the network for training (pays off only on long runs; measure)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads while training (default: one per core); 1 is far faster when other jobs keep the cores busy (OpenMP threads stall waiting for each other)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | 32-true | bf16-mixed | 16-mixed [auto: bf16 where the CPU has it]"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Trade compute for activation memory"),
    augment: Optional[str] = typer.Option(None, "--augment", help="none | light | strong | cifar (pad + random crop + flip; what light means for small from-scratch inputs) [light]"),
    views: Optional[int] = typer.Option(None, "--views", help="Augmented views per training file for cached embeddings [1]"),
    extract_engine: Optional[str] = typer.Option(None, "--extract-engine", help="How the frozen backbone runs for cached embeddings: auto (torch with bf16 autocast where the CPU has native bf16, or on a GPU; else ONNX Runtime fp32, 2.5x faster than torch fp32 on an AVX2 CPU) | torch | onnx [auto]"),
    eval_engine: Optional[str] = typer.Option(None, "--eval-engine", help="How the trained model is scored on val/test: auto (ONNX Runtime where --extract-engine auto picks it, i.e. CPUs without native bf16; else PyTorch fp32) | torch | onnx. onnx exports RUN/model.onnx (parity-checked against PyTorch), which predict and serve then use too [auto]"),
    augment_to: Optional[int] = typer.Option(None, "--augment-to", help="Audio: write N augmented variants of every training recording to the cache (they inherit its split)"),
    balance: Optional[str] = typer.Option(None, "--balance", help="oversample | weights | 'augment-to N'"),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", help="auto | cpu | gpu | mps (Lightning)"),
    devices: Optional[str] = typer.Option(None, "--devices", help="Number of devices/processes (Lightning) [auto]"),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Nodes for multi-node DDP [1]"),
    dist_strategy: Optional[str] = typer.Option(None, "--dist-strategy", help="Lightning strategy: auto | ddp | fsdp ... [auto]"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="DataLoader workers [0]"),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoints/last.ckpt"),
    clip_seconds: Optional[str] = typer.Option(None, "--clip-seconds", help="Audio clip length in seconds, or 'longest'"),
    background_dir: Optional[str] = typer.Option(None, "--background-dir", help="Audio: folder of background sounds mixed in as augmentation"),
    backbone_arg: Optional[list[str]] = typer.Option(None, "--arg", "-a", help="Backbone argument key=value (repeatable), e.g. -a widths=[16,32,64] -a block=residual"),
    max_params: Optional[int] = typer.Option(None, "--max-params", help="Refuse a model with more parameters (head included)"),
    fit_budget: bool = typer.Option(False, "--fit-budget", help="With --max-params: scale a cnn* backbone's widths to fit instead of refusing"),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="Classical ops applied at train and predict time, in order. Images: autocontrast, equalize, gamma=0.8, blur=1.0, bilateral, nlmeans. Audio: lowpass=HZ (band-limit, as a recording at 2*HZ samples/s), bits=N (N-bit quantisation)"),
    track: Optional[str] = typer.Option(None, "--track", help="Also log the run to an experiment tracker: mlflow"),
    track_uri: Optional[str] = typer.Option(None, "--track-uri", help="MLflow tracking URI [sqlite:///mlflow.db, artifacts in ./mlruns]"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config key: --set key=value (repeatable)"),
):
    return locals()


def build_config(opts: dict):
    from classforge.config import TrainConfig, load_yaml

    opts = dict(opts)
    cfg = TrainConfig.load(opts.pop("config")) if opts.get("config") else TrainConfig()
    if opts.pop("no_pretrained", False):
        opts["pretrained"] = False
    if opts.pop("compile_", False):
        opts["compile"] = True
    extra = dict(cfg.extra)
    for k in ("clip_seconds", "background_dir"):
        v = opts.pop(k, None)
        if v is not None:
            extra[k] = v if k != "clip_seconds" or v == "longest" else float(v)
    args = dict(cfg.backbone_args)
    for kv in opts.pop("backbone_arg", None) or []:
        if "=" not in kv:
            raise ClassforgeError(f"--arg expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        args[k.strip()] = load_yaml(v)
    opts["backbone_args"] = args or None
    for kv in opts.pop("set_", None) or []:
        if "=" not in kv:
            raise ClassforgeError(f"--set expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        opts[k.strip()] = load_yaml(v)
    overrides = {k: v for k, v in opts.items() if v is not None and v is not False}
    overrides["extra"] = extra
    cfg = cfg.replace(**overrides)
    if not cfg.data:
        raise ClassforgeError("Give DATA, or a --config that names it (data: ...)")
    return cfg


@app.command()
def train(**kw):
    """Train a classifier on DATA and write a run directory with model, metrics and report.html."""
    from classforge.training.run import train as run_train

    cfg = _run(build_config, kw)
    _run(run_train, cfg)


train.__signature__ = __import__("inspect").signature(_train_options, eval_str=True)  # typer reads the options from here
train.__doc__ = train.__doc__


@app.command()
def evaluate(run_dir: str = typer.Argument(..., help="A run directory"),
             data: Optional[str] = typer.Argument(None, help="Folder to score (class subfolders); default: the run's own test split"),
             out: Optional[str] = typer.Option(None, "--out", help="Where to write the evaluation [RUN/evaluations/<data>]")):
    """Re-score a trained run on any labelled folder; writes metrics, predictions and a report."""
    from classforge.evaluation.evaluate import evaluate as ev

    res = _run(ev, run_dir, data, out)
    t = res["test"]
    console.print(f"accuracy {t['accuracy']:.4f} (95% CI {t['accuracy_ci95'][0]:.3f}-{t['accuracy_ci95'][1]:.3f}, "
                  f"n={t['n']}), macro F1 {t['macro_f1']:.4f}, ECE {t['ece']:.4f}")
    console.print(f"Report: {Path(res['out']).resolve() / 'report.html'}")


@app.command()
def predict(run_dir: str = typer.Argument(..., help="A run directory"),
            files: list[str] = typer.Argument(..., help="Image or audio files"),
            top_k: int = typer.Option(3, "--top-k", help="How many classes to show per file"),
            as_json: bool = typer.Option(False, "--json", help="Print JSON"),
            backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime if model.onnx exists) | torch | onnx | int8 (model.int8.onnx from export --quantize int8)")):
    """Predict the class of files with a trained run."""
    from classforge.api import predict_files

    results = _run(predict_files, run_dir, files, top_k=top_k, backend=backend)
    if as_json:
        print(json.dumps(results, indent=2))
        raise typer.Exit(1 if any("error" in r for r in results) else 0)
    for r in results:
        if "error" in r:
            console.print(f"[red]{r['file']}: {r['error']}[/]")
            continue
        top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
        console.print(f"{r['file']}: [bold]{r['label']}[/] ({r['probability']:.3f})   top-{top_k}: {top}")
    if any("error" in r for r in results):
        raise typer.Exit(1)


@app.command()
def backbones(task: Optional[str] = typer.Option(None, help="Only image or audio")):
    """List the registered backbones with input size and weights source (any timm name works too)."""
    from classforge.models.registry import registered

    t = Table(title="classforge backbones")
    t.add_column("name", no_wrap=True)
    for c in ("task", "input", "weights", "description"):
        t.add_column(c)
    for e in registered().values():
        if task and e.task != task:
            continue
        t.add_row(e.name, e.task, e.input_desc, e.weights_desc, e.description)
    console.print(t)
    console.print("Any other timm model name also works for images (hub weights online, --weights PATH offline).")


@app.command()
def demo(out: str = typer.Option("runs/demo", "--out", help="Run directory"),
         backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Backbone to use")):
    """Train on scikit-learn's digits (no download) and print the path of the report."""
    from classforge.demo import run_demo

    _run(run_demo, out, backbone)


def _add_extensions() -> None:
    """Commands that live beside their feature (describe, export, serve, compare, search...)."""
    for mod in ("classforge.models.anatomy", "classforge.export", "classforge.serve.cli", "classforge.compare",
                "classforge.search", "classforge.tracking", "classforge.sweep", "classforge.tta",
                "classforge.calibrate"):
        try:
            m = __import__(mod, fromlist=["add_commands"])
        except ImportError as e:
            if mod in str(e) or "classforge" in str(e):
                continue
            raise
        if hasattr(m, "add_commands"):
            m.add_commands(app)


_add_extensions()


def main() -> None:
    try:
        app()
    except ClassforgeError as e:  # raised outside _run (e.g. in an extension command)
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
