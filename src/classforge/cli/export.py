"""`classforge export`: ONNX with a parity check, optional int8, the model card."""

from __future__ import annotations

from pathlib import Path

from classforge.cli.console import console, run_cmd


def add_commands(app) -> None:
    import typer

    @app.command("export")
    def export_cmd(
        run_dir: str = typer.Argument(..., help="A run directory (from `classforge train`)"),
        format: str = typer.Option("onnx", "--format", help="Export format (onnx)"),
        quantize: str = typer.Option(
            None,
            "--quantize",
            help="Also write model.int8.onnx: int8 (static, "
            "calibrated on the run's training files when present, else dynamic) | "
            "int8-static | int8-dynamic",
        ),
        n_parity: int = typer.Option(
            32,
            "--parity-n",
            help="How many of the run's own files (test split first) "
            "to check ONNX Runtime against PyTorch on",
        ),
        tolerance: float = typer.Option(1e-4, "--tolerance", help="Max |Δlogit| allowed"),
        no_card: bool = typer.Option(
            False, "--no-card", help="Do not (re)write the model card RUN/README.md"
        ),
    ):
        """Export a run to ONNX (RUN/model.onnx, opset 17, free batch axis) and check it against PyTorch.

        Parity: ONNX Runtime vs eager fp32 PyTorch logits on real files of the run's test split (random
        tensors only if the data is not on this machine); the figures go to RUN/export.json. `predict`,
        `evaluate` and `serve` use model.onnx through ONNX Runtime from then on. Also writes the model card."""
        from classforge.api import export as export_run

        r = run_cmd(
            export_run,
            run_dir,
            format=format,
            quantize=quantize,
            n_parity=n_parity,
            tolerance=tolerance,
            model_card=not no_card,
        )
        p = r["parity"]
        console.print(
            f"[green]wrote[/] {Path(run_dir) / r['file']} ({r['bytes'] / 1e6:.1f} MB, opset {r['opset']}, "
            f"{r['exporter']} exporter)"
        )
        console.print(
            f"parity on {p['n']} inputs ({p['source']}): max |Δlogit| {p['max_abs_diff']:.2e} "
            f"(≤ {p['tolerance'] * p['scale']:.2g}), top-1 agreement {p['top1_agreement']:.3f}"
        )
        if p.get("note"):
            console.print(f"[yellow]note:[/] {p['note']}")
        if "int8" in r:
            q = r["int8"]
            console.print(
                f"[green]wrote[/] {Path(run_dir) / q['file']} ({q['bytes'] / 1e6:.1f} MB, {q['method']} "
                f"int8): top-1 agreement with fp32 {q['top1_agreement']:.3f} on {q['n']} inputs"
            )
        console.print(f"figures: {Path(run_dir) / 'export.json'}")
        if not no_card:
            console.print(f"model card: {Path(run_dir) / 'README.md'}")
