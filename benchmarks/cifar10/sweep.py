"""`classforge sweep-batch`: the batch-size trade-off under a fixed training time.

For each batch size, one ordinary run (same data, split, seed and schedule) with `--time-budget TIME`, so the
LR schedule completes within the time each batch size gets. Reported per batch size: time per epoch, training
images/s, epochs done, validation accuracy when the time ran out and test accuracy. Larger batches run faster
per image on a CPU but take fewer optimizer steps in the same time; this table shows where that balances.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import typer

from classforge.core.config import TrainConfig, parse_duration
from classforge.core.errors import ClassforgeError

COLUMNS = ["batch_size", "lr", "epochs", "epoch_time_s", "epoch_time", "images_per_s", "ops_per_s",
           "val_acc", "test_acc", "fit_s", "stopped_by", "run"]


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ClassforgeError(f"--batch-sizes expects integers like 64,128,256, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise ClassforgeError(f"--batch-sizes expects positive integers, got {text!r}")
    return sizes


def sweep_batch(cfg: TrainConfig, batch_sizes: list[int], time_s: float, out: Path,
                scale_lr: bool = False, base_batch: int = 256) -> list[dict]:
    """One run per batch size under `out/bs<N>`; returns the table rows and writes out/sweep_batch.csv."""
    from classforge.training.fit import resolve_lr, resolve_optimizer
    from classforge.training.run import train

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bs in batch_sizes:
        lr = cfg.lr
        if scale_lr:  # linear scaling rule (Goyal et al. 2017) around base_batch
            lr = str(resolve_lr(cfg, cfg.strategy, resolve_optimizer(cfg)) * bs / base_batch)
        run_cfg = cfg.replace(batch_size=bs, lr=lr, train_budget=f"{time_s}s", epochs=0, out=str(out / f"bs{bs}"))
        run = train(run_cfg)
        rows.append(summarise(run, bs))
        write_table(out / "sweep_batch.csv", rows)
    return rows


def summarise(run: Path, bs: int) -> dict:
    """One table row from a finished run. Time per epoch is the median over complete epochs; when the time
    ran out before an epoch completed, it is estimated as training images / (images/s) + validation time."""
    with open(run / "metrics.csv") as f:
        m = [r for r in csv.DictReader(f) if r.get("epoch") not in ("0", "")]
    s = json.loads((run / "summary.json").read_text())
    trainer = s.get("trainer", {})

    def med(rows, k):
        v = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
        return statistics.median(v) if v else None

    n_train = s.get("split", {}).get("counts", {}).get("train")
    full = m[:-1]  # the last epoch is cut short by the budget
    ips = med(m, "images_per_s")
    if full:
        epoch_s, how = med(full, "epoch_time_s"), "measured"
    else:
        epoch_s = n_train / ips + (med(m, "val_time_s") or 0.0) if n_train and ips else None
        how = "estimated"
    ops = med(m, "ops_per_s")
    last = m[-1] if m else {}
    seen = sum(float(r["images_per_s"]) * float(r["train_time_s"]) for r in m if r.get("images_per_s"))
    return {"batch_size": bs, "lr": trainer.get("lr"), "epochs": _r(seen / n_train) if n_train else len(m),
            "epoch_time_s": _r(epoch_s), "epoch_time": how, "images_per_s": _r(ips),
            "ops_per_s": float(f"{ops:.3g}") if ops else None,
            "val_acc": _r(float(last["val_acc"]), 4) if last.get("val_acc") else None,
            "test_acc": _r(s["test"]["accuracy"], 4), "fit_s": _r(s["timing"].get("fit_s", 0)),
            "stopped_by": trainer.get("stopped_by"), "run": str(run)}


def _r(x, n: int = 2):
    return None if x is None else round(float(x), n)


def write_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def add_commands(app: typer.Typer) -> None:
    @app.command("sweep-batch")
    def sweep_batch_command(
        data: str = typer.Argument(..., help="Folder to train on (as for `classforge train`)"),
        batch_sizes: str = typer.Option("64,128,256,512", "--batch-sizes", help="Comma-separated batch sizes"),
        time: str = typer.Option("60s", "--time", help="Training time per batch size (90s, 5m); the LR "
                                 "schedule stretches to it"),
        out: str = typer.Option("runs/sweep-batch", "--out", "-o", help="Folder for the runs and sweep_batch.csv"),
        backbone: str = typer.Option("cnn_small", "--backbone", "-b", help="Backbone trained from scratch"),
        strategy: str = typer.Option("scratch", "--strategy", "-s", help="scratch | finetune"),
        schedule: str = typer.Option("cosine", "--schedule", help="cosine | step | onecycle | constant"),
        optimizer: str = typer.Option("auto", "--optimizer", help="auto | adamw | sgd | muon"),
        lr: str = typer.Option("default", "--lr", help="Learning rate (same for every batch size unless --scale-lr)"),
        scale_lr: bool = typer.Option(False, "--scale-lr", help="Scale the LR linearly: lr x batch size / 256 (Goyal et al. 2017)"),
        split: str = typer.Option("0.7,0.2,0.1", "--split", help="train,val,test fractions (val is carved "
                                  "from train when DATA has official train/ test/ folders)"),
        max_params: int = typer.Option(None, "--max-params", help="Refuse a model over this many parameters"),
        label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="Label smoothing"),
        seed: int = typer.Option(0, "--seed", help="Seed of split and training"),
        threads: int = typer.Option(0, "--threads", help="torch threads (default: one per core); 1 when other jobs share "
                                    "the cores"),
        set_: list[str] = typer.Option(None, "--set", help="Any other config key: --set key=value (repeatable)"),
    ):
        """Time per epoch and accuracy after a fixed training time, for several batch sizes (table + CSV)."""
        from rich.console import Console
        from rich.table import Table

        from classforge.cli.console import run_cmd as _run

        def go():
            from classforge.core.config import load_yaml

            overrides = {}
            for kv in set_ or []:
                if "=" not in kv:
                    raise ClassforgeError(f"--set expects key=value, got {kv!r}")
                k, v = kv.split("=", 1)
                overrides[k.strip()] = load_yaml(v)
            cfg = TrainConfig(data=data, backbone=backbone, strategy=strategy, schedule=schedule,
                              optimizer=optimizer, lr=lr, split=split, max_params=max_params,
                              label_smoothing=label_smoothing, seed=seed, patience=10**6, threads=threads,
                              pretrained=strategy != "scratch").replace(**overrides)
            secs = parse_duration(time)
            if not secs:
                raise ClassforgeError("--time must be a duration such as 60s or 5m")
            return sweep_batch(cfg, parse_batch_sizes(batch_sizes), secs, Path(out), scale_lr)

        rows = _run(go)
        t = Table(title=f"Batch-size sweep: {time} of training each ({backbone}, {schedule})")
        for c in ("batch", "lr", "epochs", "s/epoch", "images/s", "ops/s", "val acc", "test acc"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["batch_size"]), f"{r['lr']:.3g}" if r["lr"] else "", str(r["epochs"]),
                      f"{r['epoch_time_s']:.0f}" + ("*" if r["epoch_time"] == "estimated" else ""),
                      f"{r['images_per_s']}",
                      f"{r['ops_per_s']:.3g}" if r["ops_per_s"] else "", f"{r['val_acc']}", f"{r['test_acc']}")
        con = Console()
        con.print(t)
        if any(r["epoch_time"] == "estimated" for r in rows):
            con.print("* no epoch completed in the time: training images / (images/s) + validation time")
        con.print(f"Table: {(Path(out) / 'sweep_batch.csv').resolve()}")


def main() -> None:
    """Run as a script: `python benchmarks/cifar10/sweep.py --help` (the batch-size sweep)."""
    from script import run  # benchmarks/cifar10/script.py

    run(add_commands)


if __name__ == "__main__":
    main()
