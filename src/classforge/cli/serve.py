"""`classforge serve RUN_DIR`: the REST API and the web UI under uvicorn."""

from __future__ import annotations

import ipaddress
import os


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_commands(app) -> None:
    import typer

    @app.command("serve")
    def serve(
        run_dir: str = typer.Argument(
            ..., help="A run directory (from `classforge train`; `classforge export` first makes it faster)"
        ),
        host: str = typer.Option(
            "127.0.0.1",
            "--host",
            help="Address to bind. The default is reachable from this "
            "machine only; 0.0.0.0 exposes the server to the network",
        ),
        port: int = typer.Option(8000, "--port", help="TCP port"),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto (ONNX Runtime when RUN/model.onnx exists, "
            "else PyTorch) | onnx | int8 (RUN/model.int8.onnx) | torch",
        ),
        ui: bool = typer.Option(True, "--ui/--no-ui", help="Mount the Gradio web UI at /"),
        max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body (all files)"),
        max_files: int = typer.Option(16, "--max-files", help="Most files in one request"),
        max_pixels: int = typer.Option(
            40_000_000, "--max-pixels", help="Largest image, in pixels (width x height)"
        ),
        max_audio_seconds: float = typer.Option(60.0, "--max-audio-seconds", help="Longest recording"),
        max_decoding_mb: float = typer.Option(
            1024.0,
            "--max-decoding-mb",
            help="Memory that decoding may take "
            "across all requests at once; beyond it requests wait, then get 503",
        ),
        batch_size: int = typer.Option(
            16, "--batch-size", help="Micro-batching: most files per forward pass (1 turns batching off)"
        ),
        batch_wait_ms: float = typer.Option(
            5.0,
            "--batch-wait-ms",
            help="Micro-batching: how long the first request waits for others to join its batch",
        ),
        threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: one per core)"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N (a GPU runs the PyTorch model)"),
        request_timeout: float = typer.Option(
            15.0,
            "--request-timeout",
            help="Seconds a client has to send a whole request; slower or silent connections are closed",
        ),
        max_connections: int = typer.Option(
            256, "--max-connections", help="Open connections at most; beyond it requests get a 503 at once"
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    ):
        """Serve a run: REST API (POST /predict, GET /health, /labels, /metadata, docs at /docs) and a web UI at /.

        Example: classforge serve runs/pets  then  curl -F file=@cat.jpg 'http://127.0.0.1:8000/predict?top_k=3'"""
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        from classforge.api import serve_app, serving_app
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        limits = dict(
            max_upload_mb=max_upload_mb,
            max_files=max_files,
            max_pixels=max_pixels,
            max_audio_seconds=max_audio_seconds,
            max_decoding_mb=max_decoding_mb,
            request_timeout_s=request_timeout,
            max_connections=max_connections,
        )
        application = _run(
            serving_app,
            run_dir,
            limits=limits,
            backend=backend,
            ui=ui,
            batch_size=batch_size,
            batch_wait_ms=batch_wait_ms,
            threads=threads,
            device=device,
        )
        p = application.state.predictor
        if p.backend == "torch" and backend == "auto" and device == "cpu":
            console.print(
                f"[yellow]note:[/] serving with PyTorch; `classforge export {run_dir}` writes model.onnx, "
                "which ONNX Runtime answers faster on CPU"
            )
        if not _is_loopback(host):
            console.print(
                f"[bold yellow]warning:[/] binding {host}: the server is reachable from other machines; it "
                "has no authentication"
            )
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"serving {run_dir} ({p.spec.task}, {len(p.labels)} labels, backend {p.backend}) on "
            f"http://{shown}:{port}/  ·  API docs http://{shown}:{port}/docs"
        )
        serve_app(application, host=host, port=port, log_level=log_level)
        p.close()
