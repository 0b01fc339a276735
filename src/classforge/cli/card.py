"""`classforge card` and `classforge push`: the model card, and uploading a run to the Hugging Face Hub."""

from __future__ import annotations

import typer


def add_commands(app) -> None:

    @app.command("card")
    def card_cmd(
        run_dir: str = typer.Argument(..., help="A run directory"),
        license: str = typer.Option(
            None,
            "--license",
            help="Licence id for the front matter, e.g. apache-2.0 (only you know the data's terms)",
        ),
    ):
        """Write the model card RUN/README.md (Hugging Face Hub layout) from the run's metrics and metadata."""
        from classforge.api import model_card as write_model_card
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        console.print(f"wrote {_run(write_model_card, run_dir, license)}")

    @app.command("push")
    def push_cmd(
        run_dir: str = typer.Argument(..., help="A run directory"),
        repo_id: str = typer.Argument(..., help="Hub model repository, e.g. user/my-classifier"),
        private: bool = typer.Option(False, "--private", help="Create the repository as private"),
        token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)"),
        include_data_files: bool = typer.Option(
            False,
            "--include-data-files",
            help="Also upload report.html, predictions.csv and split.csv (they name your data files)",
        ),
    ):
        """Upload a run (model card, model.onnx/model.safetensors, labels, metrics) to the Hugging Face Hub.

        Needs the network; offline it stops at once with a message."""
        from classforge.api import push
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        console.print(f"pushed: {_run(push, run_dir, repo_id, private, token, include_data_files)}")
