"""The REST API (FastAPI) around the one Predictor, with the Gradio UI mounted at `/`.

    app = create_app("runs/x")            # uvicorn.run(app, host="127.0.0.1", port=8000)

POST /predict (multipart, field `file`, repeatable; `top_k` as query or form field; or a JSON body with the files
in base64) -> labels + probabilities; a file unlike every class is labelled "unknown" when the run has an unknown
threshold (`unknown=false` as query or form field, or in the JSON body, keeps the best class instead),
GET /health, GET /labels, GET /metadata, OpenAPI docs at /docs. Every bad input gets a 4xx JSON body
`{"error": "...", "status": N}` that says what was wrong; uploads are held in memory (never written under a name
from the request) and no path from a request is ever opened."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from classforge.core.errors import BadFile
from classforge.runtime.predictor import Predictor
from classforge.runtime.threads import one_torch_thread
from classforge.serve.budget import Busy, DecodeBudget, decoded_size
from classforge.serve.ui import create_ui

log = logging.getLogger("classforge.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may send. Defaults suit a small CPU server; all are `classforge serve` flags."""

    max_upload_mb: float = 20.0  # whole request body (all files + multipart overhead)
    max_files: int = 16  # files per request
    max_pixels: int = 40_000_000  # per image (a 48 MP phone photo is over; 24 MP is under)
    max_audio_seconds: float = 60.0  # per recording
    max_top_k: int = 100
    max_decoding_mb: float = 1024.0  # decoded pixels/samples of all requests at once; beyond it requests wait
    busy_wait_s: float = 10.0  # how long a request waits for decode memory before a 503 with Retry-After
    request_timeout_s: float = 15.0  # a request must arrive whole this soon after its connection (or answer)
    max_connections: int = 256  # open connections; beyond it requests get a 503 at once

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# -------------------------------------------------------------------------------------------- response models
class Score(BaseModel):
    label: str
    probability: float


class FileResult(BaseModel):
    filename: str | None
    label: str  # "unknown" when the file is unlike every class (then best_label is the closest class)
    probability: float  # of the best class
    top_k: list[Score]
    best_label: str | None = None
    unknown: bool | None = None  # None: the run has no unknown threshold
    unknown_score: float | None = None  # distance to the nearest class; above the run's threshold: "unknown"


class PredictResponse(BaseModel):
    results: list[FileResult]
    backend: str
    model: str


class ErrorResponse(BaseModel):
    error: str
    status: int


ERRORS = {c: {"model": ErrorResponse} for c in (400, 413, 415, 422, 503)}


def bad_file_status(reason: str) -> int:
    """BadFile reasons -> HTTP status: too big for the limits 413, not our kind of file 415, broken 422."""
    r = reason.lower()
    if "too many pixels" in r or "decompression bomb" in r or "too long" in r:
        return 413
    if "unrecognised format" in r or "format not recognised" in r or "not an image" in r:
        return 415
    if "empty file" in r:
        return 400
    return 422


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """A JSON 413 for request bodies over `max_bytes`, for the API and the UI's upload route alike.
    Declared too large (Content-Length): read and drop up to `drain_bytes` of it first, because a client still
    sending when the connection closes sees a reset instead of the answer. Not declared (chunked): counted while
    the app reads; past the limit the app's read fails and its response is replaced by the 413."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 256 * 2**20):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    def _response(self, size: str) -> JSONResponse:
        return JSONResponse({"error": f"request too large ({size}the body may hold at most "
                                      f"{self.max_bytes / 2**20:g} MB, --max-upload-mb)", "status": 413},
                            status_code=413, headers={"connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            more = int(length) <= self.drain_bytes
            while more:
                msg = await receive()
                more = msg["type"] == "http.request" and msg.get("more_body", False)
            return await self._response(f"{int(length) / 2**20:.1f} MB; ")(scope, receive, send)
        total, over, started = 0, False, False

        async def counted_receive():
            nonlocal total, over
            if over:
                raise BodyTooLarge()
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.max_bytes:
                    over = True
                    raise BodyTooLarge()
            return msg

        async def guarded_send(msg):
            nonlocal started
            if over:
                if msg["type"] == "http.response.start" and not started:
                    started = True
                    await self._response("")(scope, receive, send)
                return  # the app's own (error) response is dropped
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
            started = True
            await self._response("")(scope, receive, send)


# -------------------------------------------------------------------------------------------- the app
def create_app(run_dir: str | Path, limits: Limits | None = None, backend: str = "auto", ui: bool = True,
               batch_size: int = 16, batch_wait_ms: float = 5.0, threads: int | None = None,
               predictor: Predictor | None = None, device: str = "cpu") -> FastAPI:
    """A FastAPI app serving RUN_DIR. `predictor` may be given (tests, custom backends); otherwise it is
    Predictor.from_run(run_dir, backend) with the limits applied and micro-batching on (`batch_size` rows,
    `batch_wait_ms` window; batch_size=1 turns it off)."""
    run = Path(run_dir)
    limits = limits or Limits()
    if predictor is None:
        predictor = Predictor.from_run(run, backend=backend, max_pixels=limits.max_pixels,
                                       max_audio_seconds=limits.max_audio_seconds, threads=threads, device=device)
    if batch_size > 1:
        predictor.start_batching(batch_size, batch_wait_ms)
    predictor.pre.warm_up()
    summary = _read_json(run / "summary.json") or {}
    export = _read_json(run / "export.json")
    name = run.resolve().name
    task = predictor.spec.task

    about = dict(title=f"classforge: {name}", version="1", docs_url=None, redoc_url=None,
                 description=f"{task.capitalize()} classifier `{name}` ({len(predictor.labels)} labels, backend "
                             f"{predictor.backend}). POST files to /predict; the web UI is at /.")
    try:  # the multipart parser stops counting files/fields early (FastAPI >= 0.16x); /predict checks again
        app = FastAPI(**about, form_limits={"max_files": limits.max_files, "max_fields": 16,
                                            "max_part_size": 64 * 1024})
    except TypeError:
        app = FastAPI(**about)
    budget = DecodeBudget(int(limits.max_decoding_mb * 2**20), limits.busy_wait_s)
    app.state.predictor, app.state.limits, app.state.run_dir, app.state.budget = predictor, limits, run, budget
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message, "status": e.status}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = str(e.detail)
        if msg.startswith("Too many files"):  # the multipart parser's own limit: the same answer as /predict's
            return JSONResponse({"error": f"too many files (more than {limits.max_files}, --max-files)",
                                 "status": 413}, status_code=413)
        if msg == "There was an error parsing the body":
            cause = e.__cause__
            msg = (f"could not parse the multipart body ({cause})" if cause else msg) + \
                  f"; send multipart/form-data with up to {limits.max_files} parts named 'file'"
        return JSONResponse({"error": msg, "status": e.status_code}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse({"error": "invalid request: " + "; ".join(parts), "status": 422}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug, not a bad input: say so, keep serving
        if isinstance(e, ClientDisconnect):  # the client left (or was too slow) mid-request: nobody to answer
            log.info("client left during %s", request.url.path)
            return JSONResponse({"error": "client disconnected", "status": 499}, status_code=499)
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the server keeps running",
                             "status": 500}, status_code=500)

    @app.get("/health", summary="Liveness and what is loaded")
    def health():
        out = {"status": "ok", "task": task, "backend": predictor.backend, "labels": len(predictor.labels)}
        if predictor.batcher is not None:
            out["batching"] = dict(predictor.batcher.stats)
        out["decoding"] = budget.stats()
        return out

    @app.get("/labels", summary="The labels, in the order of the model's outputs")
    def labels():
        return {"labels": predictor.labels}

    @app.get("/metadata", summary="Task, backbone, input spec, metrics from summary.json, limits")
    def metadata():
        meta = getattr(predictor, "meta", {}) or {}
        return {
            "name": name, "task": task, "backbone": meta.get("backbone", summary.get("backbone")),
            "strategy": summary.get("strategy"), "labels": predictor.labels, "backend": predictor.backend,
            "input": predictor.spec.to_dict(),
            "metrics": {k: summary.get(k) for k in ("test", "val") if summary.get(k)},
            "params": summary.get("params"),
            "export": {"parity": export.get("parity"), "int8": export.get("int8")} if export else None,
            "limits": asdict(limits),
        }

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Classify one or more uploaded files")
    async def predict(
        request: Request,
        file: list[UploadFile] | None = File(None, description="The image or audio file(s); repeat "  # noqa: B008
                                                               "the field for several files"),
        top_k_form: int | None = Form(None, alias="top_k", ge=1, description="How many labels per file"),
        top_k: int | None = Query(None, ge=1, description="How many labels per file (default 3)"),
        unknown_form: bool | None = Form(None, alias="unknown", description="false: never answer 'unknown'"),
        unknown: bool | None = Query(None, description="false: answer with the closest class even for files "
                                                       "unlike every class (default true)"),
    ):
        """multipart/form-data with one or more parts named `file`, or a JSON body
        `{"files": [{"filename": "a.jpg", "data": "<base64>"}], "top_k": 3}`. Returns, per file in the order
        sent, the top label and the `top_k` labels with their probabilities. A file unlike every class gets
        label "unknown", its closest class in `best_label`, unless `unknown=false`."""
        files = file or []
        if not files and request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            items, json_top_k, json_unknown = await _json_items(request, limits)
            k = min(top_k or json_top_k or 3, limits.max_top_k, len(predictor.labels))
            flag = _first_given(unknown, json_unknown)
            return await run_in_threadpool(_infer, predictor, items, k, name, budget, flag)
        if not files:
            raise ApiError(400, _no_file_message(await _field_names(request), limits))
        if len(files) > limits.max_files:  # the form limit normally stops this earlier
            raise ApiError(413, f"too many files ({len(files)} > {limits.max_files}, --max-files)")
        k = min(top_k or top_k_form or 3, limits.max_top_k, len(predictor.labels))
        items = []
        for f in files:
            data = await f.read()
            if not data:
                raise ApiError(400, f"{_name(f)}: empty file (0 bytes)")
            items.append((f.filename, data))
        flag = _first_given(unknown, unknown_form)
        return await run_in_threadpool(_infer, predictor, items, k, name, budget, flag)

    _offline_docs(app)
    _refuse_other_methods(app, {"/health": "GET", "/labels": "GET", "/metadata": "GET", "/predict": "POST"})
    if ui:
        import gradio as gr

        demo, allowed = create_ui(predictor, run, limits)
        app = gr.mount_gradio_app(app, demo, path="/", allowed_paths=allowed, max_file_size=limits.max_upload_bytes,
                                  footer_links=["api"])
    return app


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from files installed with the serve extra (fastapi-offline's copies of
    the Swagger UI and ReDoc bundles), not from a CDN: the pages work on a machine without internet."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        import fastapi_offline
    except ImportError:  # pragma: no cover - the serve extra installs it
        log.warning("fastapi-offline is not installed: no /docs page (pip install 'classforge[serve]')")
        return
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)


def _refuse_other_methods(app: FastAPI, routes: dict[str, str]) -> None:
    """405 with the JSON error body for every other method on the API's paths. Without these routes a request
    such as POST /health falls through to the web UI mounted at / and gets a bare 404."""
    others = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    for path, allowed in routes.items():
        def refuse(request: Request, _allowed: str = allowed):
            return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}; use {_allowed}",
                                 "status": 405}, status_code=405, headers={"Allow": _allowed})

        app.add_api_route(path, refuse, methods=[m for m in others if m != allowed], include_in_schema=False)


def _first_given(*flags: bool | None) -> bool:
    return next((f for f in flags if f is not None), True)


def _infer(predictor: Predictor, items: list[tuple[str | None, bytes]], k: int, name: str,
           budget: DecodeBudget | None = None, unknown: bool = True) -> dict:
    one_torch_thread()
    with predictor.batch_slot():
        xs = []
        for i, (filename, data) in enumerate(items):
            try:
                xs.append(_preprocess_within(predictor, data, budget))
            except BadFile as e:
                label = filename or f"file #{i + 1}"
                raise ApiError(bad_file_status(str(e)), f"{label}: {e}") from None
            except Busy:
                raise ApiError(503, f"the server is decoding as much as it may hold at once "
                                    f"({budget.max_bytes / 2**20:g} MB, --max-decoding-mb); try again shortly",
                               headers={"Retry-After": str(max(1, round(budget.wait_s / 2)))}) from None
        outputs = predictor.forward_batched(torch.stack(xs))
    res = predictor.results(outputs, k, unknown)
    return {"results": [{"filename": fn, **r} for (fn, _), r in zip(items, res)], "backend": predictor.backend,
            "model": name}


def _preprocess_within(predictor: Predictor, data: bytes, budget: DecodeBudget | None) -> torch.Tensor:
    """Decode and preprocess one upload while holding its share of the decode budget; the result is small."""
    if budget is None:
        return predictor.preprocess(data)
    with budget.reserve(decoded_size(data, predictor.spec.task)):
        return predictor.preprocess(data)


JSON_FORM = ('{"files": [{"filename": "a.jpg", "data": "<base64 of the file>"}], "top_k": 3} or '
             '{"data": "<base64>"}')


async def _json_items(request: Request, limits: Limits) -> tuple[list[tuple[str | None, bytes]], int | None,
                                                                 bool | None]:
    """A JSON body: {"files": [{"filename": ..., "data": base64}, ...], "top_k": k, "unknown": bool} or
    {"data": base64}."""
    import base64
    import binascii

    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, f"the body is not valid JSON; send {JSON_FORM}") from None
    entries = body.get("files") if isinstance(body, dict) else None
    if entries is None and isinstance(body, dict) and "data" in body:
        entries = [body]
    if not isinstance(entries, list) or not entries:
        raise ApiError(400, f"no file in the JSON body; send {JSON_FORM}, or multipart/form-data with a part "
                            "named 'file'")
    if len(entries) > limits.max_files:
        raise ApiError(413, f"too many files ({len(entries)} > {limits.max_files}, --max-files)")
    items = []
    for i, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        label = name or f"file #{i + 1}"
        raw = entry.get("data") if isinstance(entry, dict) else None
        if not isinstance(raw, str):
            raise ApiError(400, f"{label}: 'data' must be the file's bytes as a base64 string")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{label}: 'data' is not valid base64") from None
        if not data:
            raise ApiError(400, f"{label}: empty file (0 bytes)")
        items.append((name if isinstance(name, str) else None, data))
    top_k = body.get("top_k") if isinstance(body, dict) else None
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ApiError(422, "invalid request: top_k must be a positive integer")
    unknown = body.get("unknown") if isinstance(body, dict) else None
    if unknown is not None and not isinstance(unknown, bool):
        raise ApiError(422, "invalid request: unknown must be true or false")
    return items, top_k, unknown


async def _field_names(request: Request) -> list[str]:
    try:
        form = await request.form()
        return sorted(set(form.keys()))
    except Exception:  # noqa: BLE001 - only used to explain the error
        return []


def _no_file_message(fields: list[str], limits: Limits) -> str:
    got = f"the form has the fields {fields}" if fields else "the request has no form fields"
    return (f"no file uploaded: {got}; send multipart/form-data with the file in a part named 'file' (repeat it "
            f"for up to {limits.max_files} files), e.g. curl -F file=@photo.jpg URL/predict")


def _name(f: UploadFile) -> str:
    return f.filename or "upload"


def _read_json(p: Path):
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None
