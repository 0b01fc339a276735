"""The one place defaults live. A run's resolved config is written to RUN_DIR/config.yaml and can be read back
(`classforge train --config config.yaml`); unknown keys are rejected with a "did you mean" suggestion."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from classforge.core.errors import ClassforgeError


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 numbers (dropped in YAML 1.2): `24:0.5` and `1:30` stay text
    instead of becoming 1440.5 and 90. Other scalars resolve as with yaml.safe_load."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT,
    re.compile(
        r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse a config file or a --set/-a value: yaml.safe_load, except that 24:0.5 stays the text it looks like."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


GROUPS = ("data", "model", "optimisation", "augmentation", "hardware", "tracking", "output")


def setting(
    *,
    group: str,
    help: str,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
    flags: tuple[str, ...] = (),
):
    """A TrainConfig field: its default, the group it belongs to, one line of help, and its command-line flags."""
    assert group in GROUPS, group
    meta = {"group": group, "help": help, "flags": flags}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run is made of. Each field has its default, its group (the `--help` panel it shows in) and
    one line of help; `flags` name its command-line option (none: set it with --set KEY=VALUE or --config).
    Frozen: a resolved config is a new object (`replace`), never a changed one."""

    # data
    data: str = setting(
        default="",
        group="data",
        help="Folder (one subfolder per class, or train/ val/ test/ splits), or a .zip/.tar.gz; may be left out when --config names it",
    )
    labels_csv: str | None = setting(
        default=None,
        group="data",
        help="CSV with columns path,label[,group][,split]; paths relative to DATA",
        flags=("--labels-csv",),
    )
    label_from_name: str | None = setting(
        default=None,
        group="data",
        help="Regex with a named group 'label' applied to file names, e.g. '^(?P<label>\\d+)_'",
        flags=("--label-from-name",),
    )
    bins: str | None = setting(
        default=None,
        group="data",
        help="Bin numeric labels at these edges, e.g. 0,3,10,20 (ages -> 0-3, 3-10, 10-20, 20+)",
        flags=("--bins",),
    )
    classes: str | None = setting(
        default=None, group="data", help="Train on these classes only: a,b,c", flags=("--classes",)
    )
    max_classes: int | None = setting(
        default=None, group="data", help="Train on the first N classes only", flags=("--max-classes",)
    )
    min_size: int = setting(
        default=8,
        group="data",
        help="Skip images smaller than this many pixels on either side",
        flags=("--min-size",),
    )
    max_pixels: int = setting(
        default=89_478_485, group="data", help="Pillow's decompression-bomb limit; larger images are skipped"
    )
    split: str = setting(
        default="0.7,0.2,0.1",
        group="data",
        help="train,val,test fractions when DATA has no split",
        flags=("--split",),
    )
    group_by: str | None = setting(
        default=None,
        group="data",
        help="Regex on the relative path; its first group names a group whose files never straddle splits",
        flags=("--group-by",),
    )
    test_groups: str | None = setting(
        default=None,
        group="data",
        help="Hold out these groups (comma-separated) as the test set",
        flags=("--test-groups",),
    )
    split_file: str | None = setting(
        default=None,
        group="data",
        help="Re-use a split.csv (e.g. from an earlier run)",
        flags=("--split-file",),
    )
    resplit: bool = setting(
        default=False,
        group="data",
        help="Ignore DATA's train/val/test folders and split anew (e.g. with --group-by/--test-groups)",
        flags=("--resplit",),
    )
    seed: int = setting(default=0, group="data", help="Seed for the split and training", flags=("--seed",))
    near_dup_distance: int = setting(
        default=18,
        group="data",
        help="Bits of the 255-bit perceptual hash within which images are near duplicates",
    )
    # model
    backbone: str = setting(
        default="auto",
        group="model",
        help="Registered name (see `classforge backbones`) or any timm model name (default: efficientnet_lite0 for images, efficientat_mn04 for audio)",
        flags=("--backbone", "-b"),
    )
    weights: str | None = setting(
        default=None,
        group="model",
        help="Local checkpoint (.safetensors or state-dict .pth) for the backbone; needed offline for hub models",
        flags=("--weights",),
    )
    pretrained: bool = setting(
        default=True, group="model", help="Start the backbone from random weights", flags=("--no-pretrained",)
    )
    strategy: str = setting(
        default="auto",
        group="model",
        help="auto (default: linear, or scratch for backbones without pretrained weights such as cnn*; with "
             "--time-budget, the best of several candidates on validation) | linear (cached embeddings + head) | "
             "finetune | two-stage | scratch",
        flags=("--strategy", "-s"),
    )
    dropout: float = setting(
        default=0.0, group="model", help="Dropout before the head (default: 0)", flags=("--dropout",)
    )
    backbone_args: dict[str, Any] = setting(
        factory=dict,
        group="model",
        help="Backbone argument key=value (repeatable), e.g. -a widths=[16,32,64] -a block=residual",
        flags=("--arg", "-a"),
    )
    max_params: int | None = setting(
        default=None,
        group="model",
        help="Refuse a model with more parameters (head included)",
        flags=("--max-params",),
    )
    fit_budget: bool = setting(
        default=False,
        group="model",
        help="With --max-params: scale a cnn* backbone's widths to fit instead of refusing",
        flags=("--fit-budget",),
    )
    # optimisation
    epochs: int = setting(
        default=0,
        group="optimisation",
        help="Maximum epochs (early stopping may end sooner); default per strategy",
        flags=("--epochs",),
    )
    batch_size: int = setting(default=32, group="optimisation", help="Training batch size (files per step)", flags=("--batch-size",))
    lr: str = setting(
        default="default",
        group="optimisation",
        help="Learning rate, or 'auto' for Lightning's LR finder (plot saved)",
        flags=("--lr",),
    )
    backbone_lr_mult: float | None = setting(
        default=None,
        group="optimisation",
        help="Backbone LR = lr x this when fine-tuning; None: 0.1 (0.3 for audio)",
    )
    weight_decay: float = setting(
        default=0.05, group="optimisation", help="AdamW weight decay", flags=("--weight-decay",)
    )
    optimizer: str = setting(
        default="auto",
        group="optimisation",
        help="auto (SGD+momentum for --schedule step, else AdamW) | adamw | sgd | any optimiser registered with classforge.training.optimizers.register_optimizer (its options: --set optimizer_args={...})",
        flags=("--optimizer",),
    )
    optimizer_args: dict[str, Any] = setting(
        factory=dict, group="optimisation", help="The chosen optimizer's own options"
    )
    momentum: float = setting(default=0.9, group="optimisation", help="Momentum of SGD-like optimisers")
    schedule: str = setting(
        default="cosine",
        group="optimisation",
        help="LR schedule over the run (or the --time-budget): cosine (warm-up + cosine, default) | step (base LR, /10, /100 over 50%/25%/25%; the course's 0.01/0.001/0.0001 with SGD) | onecycle | constant",
        flags=("--schedule",),
    )
    # hardware
    compile: bool = setting(
        default=False,
        group="hardware",
        help="torch.compile the network for training (pays off only on long runs; measure)",
        flags=("--compile",),
    )
    threads: int = setting(
        default=0,
        group="hardware",
        help="torch threads while training (default: one per core); 1 is far faster when other jobs keep the cores busy (OpenMP threads stall waiting for each other)",
        flags=("--threads",),
    )
    # optimisation
    warmup_epochs: float = setting(default=1.0, group="optimisation", help="Epochs of linear learning-rate warm-up before the cosine decay")
    label_smoothing: float = setting(
        default=0.0, group="optimisation", help="Label smoothing (default: 0)", flags=("--label-smoothing",)
    )
    sam: float = setting(
        default=0.0,
        group="optimisation",
        help="Sharpness-aware minimisation (Foret et al. 2021) with this radius, e.g. 0.05: each step takes the gradient at the weights moved uphill by RHO, so training seeks flat minima. Two forward-backward passes per batch (half the images/s; with --time-budget, half the epochs). Scratch, finetune and two-stage training; not --strategy linear (default: 0: off)",
        flags=("--sam",),
    )
    ema: float = setting(
        default=0.0,
        group="optimisation",
        help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.999) and validate, keep and export the average (default: 0: off)",
        flags=("--ema",),
    )
    patience: int = setting(
        default=5, group="optimisation", help="Early-stopping patience in epochs", flags=("--patience",)
    )
    time_budget: str | None = setting(
        default=None,
        group="optimisation",
        help="The whole run's time: 90s, 10m, 1h. With --strategy auto (the default), candidates (larger heads, "
             "fine-tuning, from-scratch networks) are tried within it and the best on validation kept; 'auto' "
             "derives it from the data size and this machine's speed. With a fixed strategy, training gets what "
             "is left after preparing the data, minus what scoring will take",
        flags=("--time-budget",),
    )
    train_budget: str | None = setting(
        default=None,
        group="optimisation",
        help="Training time alone (preparing and scoring come on top): 90s, 10m. For benchmarks that measure "
             "what a given training time buys; otherwise use --time-budget",
        flags=("--train-budget",),
    )
    refit: str = setting(
        default="auto",
        group="optimisation",
        help="After --strategy auto chooses its winner, train it further on train + validation files (a head is "
             "fit again; a network continues at a lower learning rate in the time left): auto (when validation "
             "holds whole groups - speakers, sources - that training lacks, so the shipped model also learns "
             "them) | yes | no. The validation figures of a refit model are then not held out; the test split's are",
        flags=("--refit",),
    )
    # hardware
    precision: str = setting(
        default="auto",
        group="hardware",
        help="auto | 32-true | bf16-mixed | 16-mixed (default: bf16 where the CPU has it)",
        flags=("--precision",),
    )
    grad_checkpointing: bool = setting(
        default=False,
        group="hardware",
        help="Trade compute for activation memory",
        flags=("--grad-checkpointing",),
    )
    # augmentation
    augment: str = setting(
        default="light",
        group="augmentation",
        help="none | light | strong | cifar (pad + random crop + flip; what light means for small from-scratch inputs)",
        flags=("--augment",),
    )
    cutout: int = setting(
        default=0,
        group="augmentation",
        help="Images: blank a random N x N square (input pixels; may reach past the border) of every training image, after crop and flip (DeVries & Taylor 2017; 8 or 16 on 32x32 CIFAR). Applies when the network is trained (scratch, finetune), not to cached embeddings (default: 0: off)",
        flags=("--cutout",),
    )
    mixup: float = setting(
        default=0.0,
        group="augmentation",
        help="Mixup (Zhang et al. 2018) with this alpha, e.g. 0.2-1: each training input is blended with another from its batch, lam ~ Beta(alpha, alpha), and the loss blends their labels. Images and audio; scratch, finetune and two-stage training, not --strategy linear (default: 0: off)",
        flags=("--mixup",),
    )
    cutmix: float = setting(
        default=0.0,
        group="augmentation",
        help="Images: CutMix (Yun et al. 2019) with this alpha, e.g. 1: a box of about 1 - lam of each training image, lam ~ Beta(alpha, alpha), comes from another image of the batch; labels blend by pixel share. With --mixup too, each mixed batch uses one of the two at even odds (default: 0: off)",
        flags=("--cutmix",),
    )
    mix_prob: float = setting(
        default=1.0,
        group="augmentation",
        help="Share of training batches mixed when --mixup or --cutmix is on, above 0 and at most 1 (default: 1)",
        flags=("--mix-prob",),
    )
    progressive_resize: str = setting(
        default="",
        group="augmentation",
        help="Images: train on downscaled images early on, then at full size (fast.ai-style progressive resizing: early epochs cost less, so a --time-budget fits more of them). SIZE:UNTIL[,SIZE:UNTIL...] with UNTIL the fraction of training (steps, or the time budget), e.g. 24:0.5 = 24 px for the first half, full size after. Scratch and finetune training only; validation and the saved model stay at full size (default: off)",
        flags=("--progressive-resize",),
    )
    views: int = setting(
        default=1,
        group="augmentation",
        help="Augmented views per training file for cached embeddings",
        flags=("--views",),
    )
    # hardware
    extract_engine: str = setting(
        default="auto",
        group="hardware",
        help="How the frozen backbone runs for cached embeddings: auto (ONNX Runtime fp32 on a CPU, one single-threaded pass per core, features exact; torch with fp16 autocast on a GPU) | torch (bf16 autocast where the CPU has native bf16) | onnx",
        flags=("--extract-engine",),
    )
    eval_engine: str = setting(
        default="auto",
        group="hardware",
        help="How the trained model is scored on val/test: auto (a linear run scores from its exact cached features, checked through PyTorch; other strategies through ONNX Runtime where extraction uses it) | torch | onnx. onnx exports RUN/model.onnx (parity-checked against PyTorch), which predict and serve then use too",
        flags=("--eval-engine",),
    )
    # augmentation
    augment_to: int = setting(
        default=0,
        group="augmentation",
        help="Audio: write N augmented variants of every training recording to the cache (they inherit its split)",
        flags=("--augment-to",),
    )
    background_dir: str | None = setting(
        default=None,
        group="augmentation",
        help="Audio: folder of background sounds mixed in as augmentation",
        flags=("--background-dir",),
    )
    # data
    balance: str | None = setting(
        default=None, group="data", help="oversample | weights | 'augment-to N'", flags=("--balance",)
    )
    preprocess: str | None = setting(
        default=None,
        group="data",
        help="Classical ops applied at train and predict time, in order. Images: autocontrast, equalize, gamma=0.8, blur=1.0, bilateral, nlmeans. Audio: lowpass=HZ (band-limit, as a recording at 2*HZ samples/s), bits=N (N-bit quantisation), loudness[=DBFS] (the sounding part at -20 dBFS)",
        flags=("--preprocess",),
    )
    clip_seconds: float | str | None = setting(
        default=None,
        group="data",
        help="Audio clip length in seconds, or 'longest' (the longest training recording); default: the backbone's",
        flags=("--clip-seconds",),
    )
    # hardware
    accelerator: str = setting(
        default="auto", group="hardware", help="auto | cpu | gpu | mps (Lightning)", flags=("--accelerator",)
    )
    devices: str = setting(
        default="auto", group="hardware",
        help="Processes per machine (one per GPU, or CPU processes with --accelerator cpu): each embeds its share "
             "of the files, networks train data-parallel; see docs/scaling.md",
        flags=("--devices",)
    )
    num_nodes: int = setting(
        default=1, group="hardware",
        help="Machines in the run (torchrun, SLURM or MASTER_ADDR/NODE_RANK set by hand); the embedding cache "
             "(CLASSFORGE_CACHE) should be on storage they all see",
        flags=("--num-nodes",)
    )
    dist_strategy: str = setting(
        default="auto",
        group="hardware",
        help="Lightning strategy: auto | ddp | fsdp ...",
        flags=("--dist-strategy",),
    )
    num_workers: int | str = setting(
        default="auto", group="hardware",
        help="Worker processes that augment training batches; auto: one per spare core (up to 8) when training on "
             "a GPU, 0 on a CPU (the training step uses every core)",
        flags=("--num-workers",),
    )
    # output
    out: str = setting(
        default="",
        group="output",
        help="Run directory (default runs/<data>-<backbone>-<strategy>-<time>)",
        flags=("--out", "-o"),
    )
    resume: bool = setting(
        default=False, group="output", flags=("--resume",),
        help="Continue a run that stopped (crash, kill, Ctrl-C) from its last checkpoint, kept in the cache",
    )
    keep_checkpoints: bool = setting(
        default=False, group="output", flags=("--keep-checkpoints",),
        help="Keep the training checkpoints (in the cache, not the run folder) after a run succeeds, so that "
             "--resume can train it further",
    )
    top_k: int = setting(default=3, group="output", help="Classes listed per file in predictions.csv")
    unknown_recall: float = setting(
        default=0.95, group="output", flags=("--unknown-recall",),
        help="Answer 'unknown' for inputs unlike every class: the threshold keeps this share of the validation "
             "files known (0 = no unknown answer)",
    )
    unknown_dir: str | None = setting(
        default=None, group="output", flags=("--unknown-dir",),
        help="A folder of files that belong to none of the classes: the report and summary.json then say how "
             "well 'unknown' separates them (AUROC, share wrongly accepted)",
    )
    # tracking
    track: str | None = setting(
        default=None,
        group="tracking",
        help="Also log the run to an experiment tracker: mlflow",
        flags=("--track",),
    )
    track_uri: str | None = setting(
        default=None,
        group="tracking",
        help="MLflow tracking URI (default: sqlite:///mlflow.db, artifacts in ./mlruns)",
        flags=("--track-uri",),
    )
    # output
    extra: dict[str, Any] = setting(
        factory=dict, group="output", help="Free-form settings for experiments, e.g. {fast_data: false}"
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = _upgrade(d)
        check_keys(d, cls)
        return cls(**d)

    @classmethod
    def fields_of(cls, group: str) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata["group"] == group]

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = load_yaml(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise ClassforgeError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(d)

    def replace(self, **overrides) -> "TrainConfig":
        check_keys(overrides, type(self))
        return dataclasses.replace(self, **overrides)


STRATEGIES = ("linear", "finetune", "two-stage", "scratch")
# Each strategy's recipe, used where the config leaves epochs / lr / backbone_lr_mult at their defaults (a
# backbone's own recipe, BackboneEntry.recipes, comes first).
DEFAULT_EPOCHS = {"linear": 60, "finetune": 8, "two-stage": 6, "scratch": 30}
DEFAULT_LR = {"linear": 3e-3, "finetune": 1e-3, "two-stage": 3e-4, "scratch": 2e-3}
DEFAULT_BACKBONE_LR_MULT = 0.1  # fine-tuning: backbone LR = lr x this


def _upgrade(d: dict) -> dict:
    """Config files of earlier runs: audio options that lived under `extra`, Muon's step under `muon_lr`."""
    d = dict(d)
    extra = dict(d.get("extra") or {})
    for key in ("clip_seconds", "background_dir"):
        if key in extra:
            d.setdefault(key, extra.pop(key))
    if "extra" in d:
        d["extra"] = extra
    if "muon_lr" in d:
        muon_lr = d.pop("muon_lr")
        if d.get("optimizer") == "muon":
            d["optimizer_args"] = {"muon_lr": muon_lr, **(d.get("optimizer_args") or {})}
    return d


def check_keys(d: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ClassforgeError(f"Unknown config key {k!r}.{hint}")


def parse_duration(s: str | None) -> float | None:
    """'90s', '10m', '1.5h', '600' -> seconds."""
    if s in (None, "", "none"):
        return None
    s = str(s).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}
    try:
        if s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except ValueError:
        raise ClassforgeError(f"Cannot read duration {s!r}; use e.g. 90s, 10m, 1h") from None


def parse_fractions(s: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in str(s).split(",")]
    except ValueError:
        raise ClassforgeError(f"--split expects three fractions like 0.7,0.2,0.1, got {s!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] <= 0:
        raise ClassforgeError(f"--split expects three non-negative fractions summing to 1, got {s!r}")
    return parts[0], parts[1], parts[2]
