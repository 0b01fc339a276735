"""The everyday commands besides train: inspect, evaluate, predict, backbones, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from classforge.cli.console import console, run_cmd


def add_commands(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        data: str = typer.Argument(
            ..., help="Folder (one subfolder per class, or train/ val/ test/ splits), or a .zip/.tar.gz"
        ),
        labels_csv: Optional[str] = typer.Option(
            None, "--labels-csv", help="CSV with columns path,label[,group][,split]"
        ),
        label_from_name: Optional[str] = typer.Option(
            None, "--label-from-name", help="Regex with a named group 'label' applied to file names"
        ),
        bins: Optional[str] = typer.Option(
            None, "--bins", help="Bin numeric labels at these edges, e.g. 0,3,10,20"
        ),
        classes: Optional[str] = typer.Option(None, "--classes", help="These classes only: a,b,c"),
        max_classes: Optional[int] = typer.Option(None, "--max-classes", help="The first N classes only"),
        group_by: Optional[str] = typer.Option(
            None, "--group-by", help="Regex on the relative path; its first group names a group"
        ),
        min_size: int = typer.Option(8, "--min-size", help="Minimum image side"),
        split: str = typer.Option(
            "0.7,0.2,0.1", help="Fractions train,val,test when DATA has no official split"
        ),
        seed: int = typer.Option(0, help="Seed of the split"),
        as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON"),
    ):
        """Show what DATA holds: classes, counts, sizes, formats, bad files and duplicates. Reads only."""
        from classforge.api import inspect_data

        res = run_cmd(
            inspect_data,
            data,
            labels_csv=labels_csv,
            label_from_name=label_from_name,
            bins=bins,
            classes=classes,
            max_classes=max_classes,
            group_by=group_by,
            min_size=min_size,
            split=split,
            seed=seed,
        )
        if as_json:
            print(json.dumps(res["json"], indent=2))
        else:
            res["print"](console)

    @app.command()
    def evaluate(
        run_dir: str = typer.Argument(..., help="A run directory"),
        data: Optional[str] = typer.Argument(
            None, help="Folder to score (class subfolders); default: the run's own test split"
        ),
        out: Optional[str] = typer.Option(
            None, "--out", help="Where to write the evaluation (default: RUN/evaluations/<data>)"
        ),
    ):
        """Re-score a trained run on any labelled folder; writes metrics, predictions and a report."""
        from classforge.api import evaluate as ev

        res = run_cmd(ev, run_dir, data, out)
        t = res["test"]
        console.print(
            f"accuracy {t['accuracy']:.4f} (95% CI {t['accuracy_ci95'][0]:.3f}-{t['accuracy_ci95'][1]:.3f}, "
            f"n={t['n']}), macro F1 {t['macro_f1']:.4f}, ECE {t['ece']:.4f}"
        )
        console.print(f"Report: {Path(res['out']).resolve() / 'report.html'}")

    @app.command()
    def predict(
        run_dir: str = typer.Argument(..., help="A run directory"),
        files: list[str] = typer.Argument(..., help="Image or audio files"),
        top_k: int = typer.Option(3, "--top-k", help="How many classes to show per file"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON"),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto (ONNX Runtime if model.onnx exists) | torch | onnx | int8 (model.int8.onnx from export --quantize int8)",
        ),
        no_unknown: bool = typer.Option(
            False, "--no-unknown",
            help="Answer with the closest class even for files unlike every class (default: 'unknown' for them)",
        ),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N (a GPU runs the PyTorch model)"),
    ):
        """Predict the class of files with a trained run. A file unlike every class is answered "unknown" (with
        its closest class beside it), unless --no-unknown."""
        from classforge.api import predict_files

        results = run_cmd(predict_files, run_dir, files, top_k=top_k, backend=backend, unknown=not no_unknown,
                          device=device)
        if as_json:
            print(json.dumps(results, indent=2))
            raise typer.Exit(1 if any("error" in r for r in results) else 0)
        for r in results:
            if "error" in r:
                console.print(f"[red]{r['file']}: {r['error']}[/]")
                continue
            top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            if r.get("unknown"):
                console.print(f"{r['file']}: [bold]unknown[/] (unlike every class; closest {r['best_label']} "
                              f"{r['probability']:.3f})   top-{top_k}: {top}")
            else:
                console.print(f"{r['file']}: [bold]{r['label']}[/] ({r['probability']:.3f})   top-{top_k}: {top}")
        if any("error" in r for r in results):
            raise typer.Exit(1)

    @app.command()
    def backbones(task: Optional[str] = typer.Option(None, help="Only image or audio")):
        """List the registered backbones with input size and weights source (any timm name works too)."""
        from classforge.api import backbones as registered

        t = Table(title="classforge backbones")
        t.add_column("name", no_wrap=True)
        for c in ("task", "input", "weights", "description"):
            t.add_column(c)
        for e in registered().values():
            if task and e.task != task:
                continue
            t.add_row(e.name, e.task, e.input_desc, e.weights_desc, e.description)
        console.print(t)
        console.print(
            "Any other timm model name also works for images (hub weights online, --weights PATH offline)."
        )

    @app.command()
    def demo(
        out: str = typer.Option("runs/demo", "--out", help="Run directory"),
        backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Backbone to use"),
    ):
        """Train on scikit-learn's digits (no download) and print the path of the report."""
        from classforge.api import demo as run_demo

        run_cmd(run_demo, out, backbone)
