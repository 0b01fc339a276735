"""`classforge train`: its options are generated from TrainConfig's fields (flags, help, group, default), so the
command line cannot drift from the config. The everyday options come first; the rest sit in one panel per
config group."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import typer

from classforge.cli.console import key_values, run_cmd
from classforge.core.config import TrainConfig

PANELS = {
    "data": "Data",
    "model": "Model",
    "optimisation": "Optimisation",
    "augmentation": "Augmentation",
    "hardware": "Hardware",
    "tracking": "Tracking",
    "output": "Output",
}
_TYPES = {"int": int, "float": float}
# The first panel, in this order; every other option sits in its group's panel in field order.
EVERYDAY = (
    "out",
    "backbone",
    "strategy",
    "epochs",
    "batch_size",
    "lr",
    "time_budget",
    "augment",
    "seed",
    "weights",
    "labels_csv",
    "max_params",
    "resume",
)
# Shown instead of the raw default where the default means "decided later"
_RESOLVED_LATER = {"epochs": "per strategy", "lr": "per strategy", "strategy": "auto", "backbone": "auto"}


def _default_text(f: dataclasses.Field) -> str:
    if "default" in f.metadata["help"]:
        return ""
    if f.name in _RESOLVED_LATER:
        return _RESOLVED_LATER[f.name]
    value = f.default if f.default is not dataclasses.MISSING else None
    if value is None or value is False or value == "":
        return ""
    return str(value)


def _option(f: dataclasses.Field) -> inspect.Parameter:
    meta = f.metadata
    shown = _default_text(f)
    help_ = meta["help"] + (f" (default: {shown})" if shown else "")
    panel = None if f.name in EVERYDAY else PANELS[meta["group"]]
    kind = str(f.type).replace(" | None", "")
    if kind == "bool":  # a flag turns the setting to the opposite of its default (--resplit, --no-pretrained)
        return inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, *meta["flags"], help=meta["help"], rich_help_panel=panel),
        )
    if kind.startswith("dict"):  # --arg KEY=VALUE, repeatable
        return inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[list[str]],
            default=typer.Option(None, *meta["flags"], help=help_, rich_help_panel=panel),
        )
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[_TYPES.get(kind, str)],
        default=typer.Option(None, *meta["flags"], help=help_, rich_help_panel=panel),
    )


def _signature() -> inspect.Signature:
    fields = [f for f in dataclasses.fields(TrainConfig) if f.metadata["flags"]]
    fields.sort(key=lambda f: EVERYDAY.index(f.name) if f.name in EVERYDAY else len(EVERYDAY))
    data = dataclasses.fields(TrainConfig)[0]
    params = [
        inspect.Parameter(
            "data",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Optional[str],
            default=typer.Argument(None, help=data.metadata["help"]),
        )
    ]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[str],
            default=typer.Option(
                None,
                "--config",
                help="YAML config (a run's config.yaml, a search's best.yaml); flags override it",
            ),
        )
    )
    params += [_option(f) for f in fields]
    params.append(
        inspect.Parameter(
            "set_",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[list[str]],
            default=typer.Option(
                None,
                "--set",
                help="Any config key: --set key=value (repeatable; YAML values)",
                rich_help_panel="Advanced",
            ),
        )
    )
    return inspect.Signature(params)


def build_config(opts: dict) -> TrainConfig:
    """The run's config: --config (if any), then the flags given, then --set key=value."""
    from classforge.core.errors import ClassforgeError

    opts = dict(opts)
    cfg = TrainConfig.load(opts.pop("config")) if opts.get("config") else TrainConfig()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for key, value in opts.items():
        if key in ("set_", "backbone_args") or value is None or value is False:
            continue
        changes[key] = (not defaults[key]) if isinstance(defaults.get(key), bool) else value
    if opts.get("backbone_args"):
        changes["backbone_args"] = {**cfg.backbone_args, **key_values(opts["backbone_args"], "--arg")}
    if isinstance(changes.get("clip_seconds"), str) and changes["clip_seconds"] != "longest":
        try:
            changes["clip_seconds"] = float(changes["clip_seconds"])
        except ValueError:
            raise ClassforgeError(
                f"--clip-seconds is a number of seconds or 'longest', not {changes['clip_seconds']!r}"
            ) from None
    changes.update(key_values(opts.get("set_"), "--set"))
    cfg = cfg.replace(**changes)
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


train.__signature__ = _signature()  # typer reads the options from here


def add_commands(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(train)
