"""`classforge train`: the everyday options first, the rest in named panels. Each option that sets a config key
shows that key's default, read from TrainConfig (the one place defaults live); a test checks that every option
maps to a config key and every key can be set (as an option or with --set)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import typer

from classforge.cli.console import run_cmd
from classforge.core.config import TrainConfig

# options whose config key is not their own name
OPTION_KEYS = {"no_pretrained": "pretrained", "compile_": "compile", "backbone_arg": "backbone_args",
               "clip_seconds": "extra", "background_dir": "extra", "config": None, "set_": None}
# config keys with no option of their own: set them with --set KEY=VALUE or in a --config file
CONFIG_ONLY = ("backbone_lr_mult", "max_pixels", "momentum", "near_dup_distance", "optimizer_args", "top_k",
               "warmup_epochs")
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(TrainConfig)}
_SHOWN_AS_PER_STRATEGY = {"epochs": "per strategy", "lr": "per strategy", "strategy": "auto", "backbone": "auto"}


def _with_default(key: str, help: str) -> str:
    if "default" in help or key not in _DEFAULTS:
        return help
    value = _SHOWN_AS_PER_STRATEGY.get(key, _DEFAULTS[key])
    if value is None or value is False or value == "" or value == {}:
        return help
    return f"{help} (default: {value})"


def opt(*names: str, help: str, panel: str | None = None):
    key = names[0].lstrip("-").replace("-", "_")
    return typer.Option(None, *names, help=_with_default(key, help), rich_help_panel=panel)


def flag(*names: str, help: str, panel: str | None = None):
    return typer.Option(False, *names, help=help, rich_help_panel=panel)


def train_options(
    data: Optional[str] = typer.Argument(None, help="Folder (one subfolder per class, or train/ val/ test/ splits), or a .zip/.tar.gz; may be left out when --config names it"),
    out: Optional[str] = opt("--out", "-o", help="Run directory (default runs/<data>-<backbone>-<strategy>-<time>)"),
    config: Optional[str] = opt("--config", help="YAML config (e.g. a run's config.yaml or a search's best.yaml); flags override it"),
    backbone: Optional[str] = opt("--backbone", "-b", help="Registered name (see `classforge backbones`) or any timm model name (default: efficientnet_lite0 for images, efficientat_mn04 for audio)"),
    weights: Optional[str] = opt("--weights", help="Local checkpoint (.safetensors or state-dict .pth) for the backbone; needed offline for hub models"),
    no_pretrained: bool = flag("--no-pretrained", help="Start the backbone from random weights", panel="Model"),
    strategy: Optional[str] = opt("--strategy", "-s", help="auto (default: linear, or scratch for backbones without pretrained weights such as cnn*) | linear (cached embeddings + head) | finetune | two-stage | scratch"),
    labels_csv: Optional[str] = opt("--labels-csv", help="CSV with columns path,label[,group][,split]; paths relative to DATA"),
    label_from_name: Optional[str] = opt("--label-from-name", help="Regex with a named group 'label' applied to file names, e.g. '^(?P<label>\\d+)_'", panel="Data"),
    bins: Optional[str] = opt("--bins", help="Bin numeric labels at these edges, e.g. 0,3,10,20 (ages -> 0-3, 3-10, 10-20, 20+)", panel="Data"),
    classes: Optional[str] = opt("--classes", help="Train on these classes only: a,b,c", panel="Data"),
    max_classes: Optional[int] = opt("--max-classes", help="Train on the first N classes only", panel="Data"),
    group_by: Optional[str] = opt("--group-by", help="Regex on the relative path; its first group names a group whose files never straddle splits", panel="Data"),
    test_groups: Optional[str] = opt("--test-groups", help="Hold out these groups (comma-separated) as the test set", panel="Data"),
    split: Optional[str] = opt("--split", help="train,val,test fractions when DATA has no split", panel="Data"),
    split_file: Optional[str] = opt("--split-file", help="Re-use a split.csv (e.g. from an earlier run)", panel="Data"),
    resplit: bool = flag("--resplit", help="Ignore DATA's train/val/test folders and split anew (e.g. with --group-by/--test-groups)", panel="Data"),
    seed: Optional[int] = opt("--seed", help="Seed for the split and training"),
    min_size: Optional[int] = opt("--min-size", help="Skip images smaller than this many pixels on either side", panel="Data"),
    epochs: Optional[int] = opt("--epochs", help="Maximum epochs (early stopping may end sooner); default per strategy"),
    batch_size: Optional[int] = opt("--batch-size", help="Batch size"),
    lr: Optional[str] = opt("--lr", help="Learning rate, or 'auto' for Lightning's LR finder (plot saved)"),
    weight_decay: Optional[float] = opt("--weight-decay", help="AdamW weight decay", panel="Optimisation"),
    dropout: Optional[float] = opt("--dropout", help="Dropout before the head (default: 0)", panel="Model"),
    label_smoothing: Optional[float] = opt("--label-smoothing", help="Label smoothing (default: 0)", panel="Optimisation"),
    cutout: Optional[int] = opt("--cutout", help="Images: blank a random N x N square (input pixels; may reach past the border) of every training image, after crop and flip (DeVries & Taylor 2017; 8 or 16 on 32x32 CIFAR). Applies when the network is trained (scratch, finetune), not to cached embeddings (default: 0: off)", panel="Augmentation"),
    progressive_resize: Optional[str] = opt("--progressive-resize", help="Images: train on downscaled images early on, then at full size (fast.ai-style progressive resizing: early epochs cost less, so a --time-budget fits more of them). SIZE:UNTIL[,SIZE:UNTIL...] with UNTIL the fraction of training (steps, or the time budget), e.g. 24:0.5 = 24 px for the first half, full size after. Scratch and finetune training only; validation and the saved model stay at full size (default: off)", panel="Augmentation"),
    mixup: Optional[float] = opt("--mixup", help="Mixup (Zhang et al. 2018) with this alpha, e.g. 0.2-1: each training input is blended with another from its batch, lam ~ Beta(alpha, alpha), and the loss blends their labels. Images and audio; scratch, finetune and two-stage training, not --strategy linear (default: 0: off)", panel="Augmentation"),
    cutmix: Optional[float] = opt("--cutmix", help="Images: CutMix (Yun et al. 2019) with this alpha, e.g. 1: a box of about 1 - lam of each training image, lam ~ Beta(alpha, alpha), comes from another image of the batch; labels blend by pixel share. With --mixup too, each mixed batch uses one of the two at even odds (default: 0: off)", panel="Augmentation"),
    mix_prob: Optional[float] = opt("--mix-prob", help="Share of training batches mixed when --mixup or --cutmix is on, above 0 and at most 1 (default: 1)", panel="Augmentation"),
    sam: Optional[float] = opt("--sam", help="Sharpness-aware minimisation (Foret et al. 2021) with this radius, e.g. 0.05: each step takes the gradient at the weights moved uphill by RHO, so training seeks flat minima. Two forward-backward passes per batch (half the images/s; with --time-budget, half the epochs). Scratch, finetune and two-stage training; not --strategy linear (default: 0: off)", panel="Optimisation"),
    ema: Optional[float] = opt("--ema", help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.999) and validate, keep and export the average (default: 0: off)", panel="Optimisation"),
    patience: Optional[int] = opt("--patience", help="Early-stopping patience in epochs", panel="Optimisation"),
    time_budget: Optional[str] = opt("--time-budget", help="Stop training after this long: 90s, 10m, 1h. The LR schedule stretches to the budget (epochs unlimited unless --epochs)"),
    schedule: Optional[str] = opt("--schedule", help="LR schedule over the run (or the --time-budget): cosine (warm-up + cosine, default) | step (base LR, /10, /100 over 50%/25%/25%; the course's 0.01/0.001/0.0001 with SGD) | onecycle | constant", panel="Optimisation"),
    optimizer: Optional[str] = opt("--optimizer", help="auto (SGD+momentum for --schedule step, else AdamW) | adamw | sgd | muon (the backbone's weight matrices take orthogonalised momentum steps, Jordan et al. 2024, with their norm held fixed: for from-scratch or fine-tuned nets with a BatchNorm after each conv; biases, norms and the head take SGD with --lr)", panel="Optimisation"),
    compile_: bool = flag("--compile", help="torch.compile the network for training (pays off only on long runs; measure)", panel="Hardware"),
    threads: Optional[int] = opt("--threads", help="torch threads while training (default: one per core); 1 is far faster when other jobs keep the cores busy (OpenMP threads stall waiting for each other)", panel="Hardware"),
    precision: Optional[str] = opt("--precision", help="auto | 32-true | bf16-mixed | 16-mixed (default: bf16 where the CPU has it)", panel="Hardware"),
    grad_checkpointing: bool = flag("--grad-checkpointing", help="Trade compute for activation memory", panel="Hardware"),
    augment: Optional[str] = opt("--augment", help="none | light | strong | cifar (pad + random crop + flip; what light means for small from-scratch inputs)"),
    views: Optional[int] = opt("--views", help="Augmented views per training file for cached embeddings", panel="Augmentation"),
    extract_engine: Optional[str] = opt("--extract-engine", help="How the frozen backbone runs for cached embeddings: auto (torch with bf16 autocast where the CPU has native bf16, or on a GPU; else ONNX Runtime fp32, 2.5x faster than torch fp32 on an AVX2 CPU) | torch | onnx", panel="Hardware"),
    eval_engine: Optional[str] = opt("--eval-engine", help="How the trained model is scored on val/test: auto (ONNX Runtime where --extract-engine auto picks it, i.e. CPUs without native bf16; else PyTorch fp32) | torch | onnx. onnx exports RUN/model.onnx (parity-checked against PyTorch), which predict and serve then use too", panel="Hardware"),
    augment_to: Optional[int] = opt("--augment-to", help="Audio: write N augmented variants of every training recording to the cache (they inherit its split)", panel="Augmentation"),
    balance: Optional[str] = opt("--balance", help="oversample | weights | 'augment-to N'", panel="Data"),
    accelerator: Optional[str] = opt("--accelerator", help="auto | cpu | gpu | mps (Lightning)", panel="Hardware"),
    devices: Optional[str] = opt("--devices", help="Number of devices/processes (Lightning)", panel="Hardware"),
    num_nodes: Optional[int] = opt("--num-nodes", help="Nodes for multi-node DDP", panel="Hardware"),
    dist_strategy: Optional[str] = opt("--dist-strategy", help="Lightning strategy: auto | ddp | fsdp ...", panel="Hardware"),
    num_workers: Optional[int] = opt("--num-workers", help="DataLoader workers", panel="Hardware"),
    resume: bool = flag("--resume", help="Continue from RUN/checkpoints/last.ckpt"),
    clip_seconds: Optional[str] = opt("--clip-seconds", help="Audio clip length in seconds, or 'longest'", panel="Data"),
    background_dir: Optional[str] = opt("--background-dir", help="Audio: folder of background sounds mixed in as augmentation", panel="Augmentation"),
    backbone_arg: Optional[list[str]] = opt("--arg", "-a", help="Backbone argument key=value (repeatable), e.g. -a widths=[16,32,64] -a block=residual", panel="Model"),
    max_params: Optional[int] = opt("--max-params", help="Refuse a model with more parameters (head included)"),
    fit_budget: bool = flag("--fit-budget", help="With --max-params: scale a cnn* backbone's widths to fit instead of refusing", panel="Model"),
    preprocess: Optional[str] = opt("--preprocess", help="Classical ops applied at train and predict time, in order. Images: autocontrast, equalize, gamma=0.8, blur=1.0, bilateral, nlmeans. Audio: lowpass=HZ (band-limit, as a recording at 2*HZ samples/s), bits=N (N-bit quantisation)", panel="Data"),
    track: Optional[str] = opt("--track", help="Also log the run to an experiment tracker: mlflow", panel="Tracking"),
    track_uri: Optional[str] = opt("--track-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db, artifacts in ./mlruns)", panel="Tracking"),
    set_: Optional[list[str]] = opt("--set", help="Any config key: --set key=value (repeatable)", panel="Advanced"),
):
    return locals()



def build_config(opts: dict):
    """The run's config: --config (if any), then the flags given, then --set key=value."""
    from classforge.core.config import TrainConfig, load_yaml
    from classforge.core.errors import ClassforgeError

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



def train(**kw):
    """Train a classifier on DATA and write a run directory: model, metrics, predictions and report.html.

    Example: classforge train photos/ --out runs/photos (EfficientNet-Lite0 features + a linear head).
    """
    from classforge.api import train_config

    cfg = run_cmd(build_config, kw)
    run_cmd(train_config, cfg)


train.__signature__ = inspect.signature(train_options, eval_str=True)  # typer reads the options from here


def add_commands(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(train)
