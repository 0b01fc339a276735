"""The `classforge` command of classforge.training.tracking."""

from __future__ import annotations

import typer

from classforge.training.tracking import DEFAULT_EXPERIMENT, DEFAULT_URI


def add_commands(app) -> None:

    @app.command("track")
    def track_command(
        run_dirs: list[str] = typer.Argument(..., help="Finished run directories"),
        uri: str | None = typer.Option(None, "--uri", "--track-uri", help=f"MLflow tracking URI (default {DEFAULT_URI})"),
        experiment: str | None = typer.Option(None, "--experiment", help=f"Experiment name (default {DEFAULT_EXPERIMENT})"),
    ):
        """Log finished runs to MLflow (params, per-epoch metrics, figures, model; model.onnx after export).
        A run logged before is updated in place (its id is in RUN/tracking.json)."""
        from classforge.training.tracking import track_run
        for r in run_dirs:
            track_run(r, "mlflow", uri, experiment)
