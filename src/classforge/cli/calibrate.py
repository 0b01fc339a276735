"""`classforge calibrate`: temperature scaling fitted on a run's validation split."""

from __future__ import annotations

from pathlib import Path

import typer


def add_commands(app) -> None:

    @app.command("calibrate")
    def calibrate_cmd(
        run_dir: str = typer.Argument(..., help="A run directory (from `classforge train`)"),
        data: str = typer.Option(None, "--data", help="The run's data folder, if it moved since training"),
        test: bool = typer.Option(
            False, "--test", help="Also report the test split before / after (not used to fit)"
        ),
        temperature: float = typer.Option(
            None, "--temperature", help="Set this temperature instead of fitting one (1 undoes calibration)"
        ),
    ):
        """Calibrate a run's probabilities by temperature scaling, fitted on its validation split.

        Finds the T minimising the validation negative log-likelihood of softmax(logits / T) and writes it into
        RUN/model.json; predict, evaluate, serve and the web UI use it from then on. The predicted class never
        changes, only how confident the probabilities are. Prints NLL, expected calibration error (ECE) and mean
        confidence before and after; the figures go to RUN/calibration.json."""
        from rich.table import Table

        from classforge.api import calibrate as calibrate_run
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        r = _run(calibrate_run, run_dir, data=data, test=test, temperature=temperature)
        splits = [sp for sp in ("val", "test") if sp in r]
        if splits:
            t = Table("split", "", "NLL", "ECE", "mean confidence", "accuracy")
            for sp in splits:
                for k in ("uncalibrated", "calibrated"):
                    v = r[sp][k]
                    t.add_row(
                        f"{sp} (n={v['n']})",
                        k,
                        f"{v['nll']:.4f}",
                        f"{v['ece']:.4f}",
                        f"{v['mean_confidence']:.3f}",
                        f"{v['accuracy']:.4f}",
                    )
            console.print(t)
        if r.get("note"):
            console.print(f"[yellow]note:[/] {r['note']}")
        console.print(
            f"temperature {r['before']:g} → [green]{r['temperature']:g}[/], written to "
            f"{Path(run_dir) / 'model.json'}; figures: {Path(run_dir) / 'calibration.json'}"
        )
