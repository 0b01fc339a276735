"""The REST API over real HTTP on loopback (uvicorn in a thread, and the CLI in a subprocess): predictions,
metadata, OpenAPI, bad inputs answered with 4xx JSON while the server keeps serving, micro-batching."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from conftest import ServerThread, free_port

from classforge.data.rundata import run_files
from classforge.runtime.batching import MicroBatcher
from classforge.serve.api import Limits, create_app


# ------------------------------------------------------------------------------------------------ helpers
def jpeg_bytes(path: Path, size: int = 224) -> bytes:
    img = Image.open(path).convert("RGB").resize((size, size))
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def big_png(side: int = 7072) -> bytes:
    """A 50-megapixel PNG of one colour: ~160 kB on disk, 150 MB once decoded."""
    b = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(b, "PNG")
    return b.getvalue()


def wav_bytes(seconds: float, sr: int = 8000, freq: float = 440.0, sampwidth: int = 1) -> bytes:
    """8-bit mono WAV: 10 minutes at 8 kHz is 4.8 MB, under the upload limit, so the duration limit must act."""
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    data = (x * 127 + 128).astype(np.uint8).tobytes() if sampwidth == 1 else (x * 32767).astype("<i2").tobytes()
    b = io.BytesIO()
    with wave.open(b, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(sampwidth)
        w.setframerate(sr)
        w.writeframes(data)
    return b.getvalue()


def error_of(r) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    body = r.json()
    assert body["status"] == r.status_code and len(body["error"]) > 10, body
    return body["error"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(exported_run):
    app = create_app(exported_run, Limits(max_upload_mb=2, max_files=4), ui=True)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def test_images(exported_run) -> list[tuple[Path, str]]:
    files = [(p, label) for p, label, _ in run_files(exported_run, ("test", "val"))]
    assert len(files) >= 6
    return files


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> Path:
    """A small audio run (from-scratch log-mel CNN on generated tones), exported to ONNX."""
    import soundfile as sf

    import classforge

    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    for cls, f0 in (("low", 300.0), ("mid", 1000.0), ("high", 3000.0)):
        (root / cls).mkdir()
        for i in range(16):
            t = np.arange(int(16000 * rng.uniform(0.6, 1.2))) / 16000
            w = 0.4 * np.sin(2 * np.pi * f0 * rng.uniform(0.9, 1.1) * t) + 0.02 * rng.standard_normal(len(t))
            sf.write(root / cls / f"{cls}_{i:02d}.wav", w.astype(np.float32), 16000)
    run = classforge.train(root, tmp_path_factory.mktemp("runs") / "tones", backbone="audio_cnn",
                           strategy="scratch", epochs=15, lr=3e-3)
    classforge.export(run)
    return run


# ------------------------------------------------------------------------------------------------ the API
def test_health_labels_metadata(server, exported_run):
    h = requests.get(server.url + "/health", timeout=10).json()
    assert {k: h[k] for k in ("status", "task", "backend", "labels")} == \
        {"status": "ok", "task": "image", "backend": "onnxruntime", "labels": 3}
    assert set(h["batching"]) == {"calls", "rows", "max_rows", "workers", "alone"}
    assert requests.get(server.url + "/labels").json()["labels"] == json.loads((exported_run / "labels.json").read_text())
    m = requests.get(server.url + "/metadata").json()
    s = json.loads((exported_run / "summary.json").read_text())
    assert m["task"] == "image" and m["backbone"] == "efficientnet_lite0" and m["strategy"] == "linear"
    assert m["metrics"]["test"]["accuracy"] == s["test"]["accuracy"] and m["input"]["size"] == 224
    assert m["export"]["parity"]["passed"] and m["limits"]["max_upload_mb"] == 2


def test_openapi_docs_and_ui_share_the_port(server):
    spec = requests.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"/health", "/labels", "/metadata", "/predict"} <= set(spec["paths"])
    assert requests.get(server.url + "/docs").status_code == 200
    ui = requests.get(server.url + "/")
    assert ui.status_code == 200 and "gradio" in ui.text.lower()


def test_predict_files_top_k(server, test_images, exported_run):
    probe = __import__("classforge").load(exported_run)
    (p1, _), (p2, _) = test_images[0], test_images[3]
    r = requests.post(server.url + "/predict?top_k=2", files=[("file", (p1.name, p1.read_bytes())),
                                                             ("file", (p2.name, p2.read_bytes()))], timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == [p1.name, p2.name]
    expected = probe.predict([p1, p2], top_k=2)  # the same Predictor code path, without HTTP
    for got, exp in zip(res, expected):
        assert got["label"] == exp["label"] and abs(got["probability"] - exp["probability"]) < 1e-4
        assert len(got["top_k"]) == 2 and got["top_k"][0]["label"] == got["label"]
        assert got["top_k"][0]["probability"] >= got["top_k"][1]["probability"]
    # top_k as a form field; clamped to the number of labels
    r = requests.post(server.url + "/predict", files={"file": (p1.name, p1.read_bytes())}, data={"top_k": "9"})
    assert r.status_code == 200 and len(r.json()["results"][0]["top_k"]) == 3
    assert abs(sum(t["probability"] for t in r.json()["results"][0]["top_k"]) - 1) < 1e-4


def _bad_cases(test_images) -> dict:
    good = test_images[0][0]
    jpg = jpeg_bytes(good)
    return {
        "text as image": dict(files={"file": ("notes.jpg", b"hello, I am not an image\n" * 20, "image/jpeg")},
                              status=415, says="not an image"),
        "truncated JPEG": dict(files={"file": ("cut.jpg", jpg[: len(jpg) // 2], "image/jpeg")}, status=422,
                               says="truncated"),
        "50-megapixel PNG": dict(files={"file": ("huge.png", big_png(), "image/png")}, status=413,
                                 says="too many pixels"),
        "empty body": dict(data=b"", status=400, says="no file uploaded"),
        "empty file": dict(files={"file": ("zero.jpg", b"", "image/jpeg")}, status=400, says="empty"),
        "wrong field name": dict(files={"image": ("a.jpg", jpg, "image/jpeg")}, status=400, says="'file'"),
        "a path instead of a file": dict(data={"file": "/etc/passwd"}, status=422, says="file"),
        "oversized body": dict(files={"file": ("big.jpg", os.urandom(3 * 2**20), "image/jpeg")}, status=413,
                               says="too large"),
        "too many files": dict(files=[("file", (f"{i}.jpg", jpg)) for i in range(5)], status=413, says="files"),
        "bad top_k": dict(files={"file": ("a.jpg", jpg)}, params={"top_k": "many"}, status=422, says="top_k"),
    }


CASES = ["text as image", "truncated JPEG", "50-megapixel PNG", "empty body", "empty file", "wrong field name",
         "a path instead of a file", "oversized body", "too many files", "bad top_k"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_4xx_and_server_keeps_serving(server, test_images, case):
    c = _bad_cases(test_images)[case]
    status, says = c.pop("status"), c.pop("says")
    r = requests.post(server.url + "/predict", timeout=60, **c)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    assert says.lower() in error_of(r).lower()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    p, _ = test_images[1]
    ok = requests.post(server.url + "/predict", files={"file": (p.name, p.read_bytes())}, timeout=30)
    assert ok.status_code == 200


def test_never_opens_request_paths(server, test_images):
    """A filename in the multipart header is only echoed back: the bytes are what gets classified."""
    p, _ = test_images[0]
    r = requests.post(server.url + "/predict", files={"file": ("/etc/passwd", p.read_bytes())})
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "/etc/passwd"
    r = requests.post(server.url + "/predict", files={"file": ("../../x.jpg", b"/etc/passwd")})
    assert r.status_code == 415


def test_concurrent_requests_are_batched(server, test_images):
    """Concurrent requests share forward passes (fewer passes than rows), and every answer is its own file's:
    the same label and probability as that file scored alone."""
    files = [p.read_bytes() for p, _ in test_images[:8]]
    pred = server.app.state.predictor
    alone = [pred.postprocess(pred.probs(pred.forward(pred.preprocess(f)[None])), 1)[0] for f in files]
    before = dict(pred.batcher.stats)

    def post(i):
        return requests.post(server.url + "/predict", files={"file": (f"{i}.png", files[i % len(files)])},
                             timeout=60)

    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(post, range(32)))
    assert all(r.status_code == 200 for r in rs)
    rows = pred.batcher.stats["rows"] - before["rows"]
    calls = pred.batcher.stats["calls"] - before["calls"]
    assert rows == 32 and calls < rows
    for i, r in enumerate(rs):
        got, want = r.json()["results"][0], alone[i % len(files)]
        assert got["filename"] == f"{i}.png" and got["label"] == want["label"]
        assert abs(got["probability"] - want["probability"]) < 1e-4
    labels = {r.json()["results"][0]["label"] for r in rs[:len(files)]}
    assert labels <= set(pred.labels)


def test_micro_batcher_groups_and_routes_rows():
    import torch

    seen = []

    def forward(x):
        seen.append(len(x))
        time.sleep(0.05)
        return x.sum(dim=1, keepdim=True).numpy() * np.ones((1, 2), np.float32)

    b = MicroBatcher(forward, max_batch=16, max_wait_ms=20)
    try:
        xs = [torch.full((1 + i % 2, 3), float(i)) for i in range(10)]
        with ThreadPoolExecutor(10) as ex:
            outs = list(ex.map(b.submit, xs))
        for x, o in zip(xs, outs):
            assert o.shape == (len(x), 2) and np.allclose(o, 3.0 * x[0, 0].item())
        assert sum(seen) == sum(len(x) for x in xs) and len(seen) < len(xs)  # requests shared forward passes
        # an error reaches the callers and the worker lives on
        with pytest.raises(ValueError):
            b.submit(torch.zeros(1, 5, 7))  # (1, 1, 7) * (1, 2) does not broadcast
        assert b.submit(torch.ones(1, 3)).tolist() == [[3.0, 3.0]]
    finally:
        b.close()


class PassCounter:
    """A forward pass for MicroBatcher tests that counts how many passes run at once (`peak`)."""

    def __init__(self, seconds: float):
        self.seconds, self.active, self.peak, self.lock = seconds, 0, 0, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        return x[:, :1].numpy()


def test_micro_batcher_workers_run_passes_side_by_side_and_route_every_answer():
    """Per-core workers: while one pass computes, another worker takes the next batch (passes overlap), each
    caller gets its own rows back, and a lone request goes to the all-cores forward."""
    import torch

    alone_calls, passes = [], PassCounter(0.05)

    def forward(x):
        return passes(x) * np.array([[1.0, -1.0]], np.float32)  # row i answers with its own value

    def forward_alone(x):
        alone_calls.append(len(x))
        return forward(x)

    b = MicroBatcher(forward, max_batch=2, max_wait_ms=1, workers=2, forward_alone=forward_alone)
    try:
        assert b.submit(torch.full((1, 3), 7.0)).tolist() == [[7.0, -7.0]] and alone_calls == [1]
        xs = [torch.full((1, 3), float(i)) for i in range(12)]
        with ThreadPoolExecutor(12) as ex:
            outs = list(ex.map(b.submit, xs))
        assert [o.tolist() for o in outs] == [[[float(i), -float(i)]] for i in range(12)]
        assert passes.peak == 2 and b.stats["workers"] == 2 and b.stats["rows"] == 13
    finally:
        b.close()
    assert all(not t.is_alive() for t in b._threads)


def test_micro_batcher_runs_a_lone_request_in_its_own_thread_and_holds_the_others_meanwhile():
    """A lone request skips the hand-over to a worker (its own thread runs `forward_alone`); requests that come
    while it computes wait for it, so passes never outnumber the workers."""
    import torch

    threads_seen, started, release = [], threading.Event(), threading.Event()
    passes = PassCounter(0.02)

    def forward_alone(x):
        threads_seen.append(threading.current_thread())
        started.set()
        release.wait(timeout=30)
        return passes(x)

    b = MicroBatcher(passes, max_batch=4, max_wait_ms=1, workers=1, forward_alone=forward_alone)
    try:
        with ThreadPoolExecutor(1) as lone:
            first = lone.submit(b.submit, torch.full((1, 2), 5.0))
            assert started.wait(timeout=30)
            with ThreadPoolExecutor(3) as ex:
                later = [ex.submit(b.submit, torch.full((1, 2), float(i))) for i in range(3)]
                time.sleep(0.1)
                assert not any(f.done() for f in later)  # held while the lone pass has every core
                release.set()
                assert [f.result(timeout=30).item() for f in later] == [0.0, 1.0, 2.0]
            assert first.result(timeout=30).item() == 5.0
        assert threads_seen and threads_seen[0] not in b._threads  # not a batcher worker
        assert passes.peak == 1 and b.stats["alone"] >= 1 and b.stats["rows"] == 4
    finally:
        b.close()


def test_busy_watch_tells_quiet_from_busy_cores():
    """Other processes' cores from /proc/stat readings, this process's own CPU time left out."""
    import os

    from classforge.runtime.threads import BusyWatch

    cores, hz = os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")
    state = {"busy": 0, "total": 0, "own": 0.0, "others": 0.0}

    def read():  # every reading, 0.1 s of every core passes
        state["total"] += int(0.1 * hz) * cores
        state["own"] += 0.05  # this process keeps half a core busy: its own work never counts as busy
        state["busy"] += int((0.05 + state["others"] * 0.1) * hz)
        return state["busy"], state["total"]

    w = BusyWatch(period_s=0.01, read=read, own_time=lambda: state["own"])
    try:
        deadline = time.time() + 10
        while w.busy is None and time.time() < deadline:
            time.sleep(0.01)
        assert w.quiet and w.busy == pytest.approx(0.0, abs=0.1)
        state["others"] = 1.0  # another process takes a whole core
        _wait_until(lambda: not w.quiet, "the watch sees the busy core", within_s=10)
        assert w.busy == pytest.approx(min(1.0, cores), abs=0.2)
    finally:
        w.close()
    assert not w._thread.is_alive()


def test_lone_requests_spin_only_on_quiet_cores_with_the_same_answers(exported_run, test_images):
    """A lone request's pass uses the spin-waiting session only while the watch sees idle cores; both give the
    all-threads session's outputs."""
    import torch

    from classforge.runtime.predictor import Predictor

    pred = Predictor.from_run(exported_run, backend="onnx", threads=2).start_batching()
    try:
        spin = pred.session_spinning.get_session_options().get_session_config_entry
        plain = pred.session.get_session_options().get_session_config_entry
        assert spin("session.intra_op.allow_spinning") == "1" and plain("session.intra_op.allow_spinning") == "0"
        x = torch.stack([pred.preprocess(p.read_bytes()) for p, _ in test_images[:1]])
        want = pred.forward(x)
        used = []
        pred.busy_watch.close()  # its thread no longer overwrites the readings set here
        for busy in (0.0, 1.5):
            pred.busy_watch.busy = busy
            run = {id(pred.session_spinning): "spinning", id(pred.session): "plain"}
            for s in (pred.session_spinning, pred.session):
                orig = s.run
                s.run = (lambda o, name: lambda *a, **k: (used.append(name), o(*a, **k))[1])(orig, run[id(s)])
            got = pred.forward_batched(x)
            for s in (pred.session_spinning, pred.session):
                del s.run
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert used == ["spinning", "plain"]
    finally:
        pred.close()


def test_micro_batcher_waits_only_for_announced_requests():
    import torch

    seen = []
    b = MicroBatcher(lambda x: (seen.append(len(x)), x.numpy())[1], max_batch=8, max_wait_ms=10_000)
    try:
        t = time.perf_counter()
        with b.expect():
            b.submit(torch.ones(1, 2))
        assert time.perf_counter() - t < 5  # alone: no 10 s window

        both_announced = threading.Barrier(2)

        def late(delay):
            with b.expect():
                # Both requests announce themselves before either submits; without the barrier, a loaded
                # machine could schedule the second thread after the first had already been served alone.
                both_announced.wait(timeout=30)
                time.sleep(delay)  # still "decoding"
                return b.submit(torch.full((1, 2), delay))

        with ThreadPoolExecutor(2) as ex:
            outs = list(ex.map(late, [0.0, 0.1]))
        assert [o[0, 0] for o in outs] == [0.0, np.float32(0.1)]
        assert seen[-1] == 2  # the early one waited for the announced late one
        with pytest.raises(ValueError), b.expect():  # a request that fails before submitting ...
            raise ValueError
        t = time.perf_counter()
        b.submit(torch.ones(1, 2))
        assert time.perf_counter() - t < 5  # ... is no longer waited for
    finally:
        b.close()


# ------------------------------------------------------------------------------------------------ audio
def test_audio_server_limits_duration(audio_run):
    app = create_app(audio_run, Limits(max_audio_seconds=30), ui=False)
    assert app.state.predictor.backend == "onnxruntime"
    with ServerThread(app) as s:
        clips = [p.read_bytes() for p, _, _ in run_files(audio_run, ("test", "val"))][:4]
        good = requests.post(s.url + "/predict", files=[("file", (f"{i}.wav", c)) for i, c in enumerate(clips)])
        assert good.status_code == 200, good.text
        expected = app.state.predictor.predict(clips)
        assert [r["label"] for r in good.json()["results"]] == [e["label"] for e in expected]
        long = wav_bytes(600.0)  # 10 minutes
        assert len(long) < Limits().max_upload_bytes
        r = requests.post(s.url + "/predict", files={"file": ("long.wav", long)}, timeout=60)
        assert r.status_code == 413 and "too long" in error_of(r)
        r = requests.post(s.url + "/predict", files={"file": ("cut.wav", wav_bytes(2.0)[:3000])})
        assert r.status_code == 422 and "truncated" in error_of(r)
        r = requests.post(s.url + "/predict", files={"file": ("notes.wav", b"not a sound " * 50)})
        assert r.status_code == 415, r.text
        assert requests.post(s.url + "/predict", files={"file": ("b.wav", wav_bytes(1.0, 16000, 300, 2))}
                             ).status_code == 200


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_serve_subprocess_binds_loopback(exported_run, test_images):
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "classforge.cli", "serve", str(exported_run), "--port", str(port),
                             "--no-ui", "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t = time.time()
        while True:
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() - t < 120, "server did not come up"
            time.sleep(0.3)
        p, _ = test_images[0]
        r = requests.post(url + "/predict", files={"file": (p.name, p.read_bytes())})
        assert r.status_code == 200 and r.json()["backend"] == "onnxruntime"
        # bound to loopback only: the machine's other addresses refuse
        other = _non_loopback_address()
        if other:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
            return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_serve_help_mentions_limits():
    from typer.testing import CliRunner

    from classforge.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--host", "--port", "--max-upload-mb", "--max-pixels", "--max-audio-seconds", "--backend"):
        assert flag in out
    assert "127.0.0.1" in out


@pytest.mark.parametrize("ui", [False, True])
def test_wrong_methods_get_405_with_a_json_body(exported_run, ui):
    """With or without the web UI mounted at /, API paths answer other methods with 405, Allow and JSON."""
    with ServerThread(create_app(exported_run, ui=ui)) as srv:
        for method, path, allowed in (("POST", "/health", "GET"), ("GET", "/predict", "POST"),
                                      ("PUT", "/labels", "GET"), ("DELETE", "/predict", "POST"),
                                      ("PATCH", "/metadata", "GET")):
            r = requests.request(method, srv.url + path, timeout=30)
            assert r.status_code == 405, (ui, method, path, r.status_code, r.text[:200])
            assert r.headers["allow"] == allowed and r.json()["status"] == 405 and allowed in r.json()["error"]
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _wait_until(condition, what: str, within_s: float = 30.0) -> None:
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < within_s, f"{what} within {within_s} s"
        time.sleep(0.02)


def test_silent_and_trickling_connections_are_closed_and_a_slow_answer_is_not(exported_run, test_images):
    """Connections that never send a request, or send it a byte at a time, are closed once the request deadline
    passes (they would otherwise hold a socket each for ever); a request that arrives in time is answered however
    long the answer takes; the server keeps serving."""
    import requests

    from classforge.serve.http import server_config

    app = create_app(exported_run, Limits(), ui=False, batch_size=1)
    config = server_config(app, "127.0.0.1", 0, request_timeout_s=1.0, log_level="warning")
    with ServerThread(app, config) as srv:
        silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
        trickling = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: "
        cut = set()  # trickling connections the server closed while they were still sending
        for step in range(14):  # headers that never finish, a few bytes at a time, for longer than the deadline
            for i, s in enumerate(trickling):
                try:
                    s.sendall(head[step * 8:(step + 1) * 8] or b"a")
                except (BrokenPipeError, ConnectionResetError):
                    cut.add(i)
            time.sleep(0.15)
        assert all(_closed_by_server(s, 3.0) for s in silent)
        assert all(i in cut or _closed_by_server(s, 3.0) for i, s in enumerate(trickling))
        for s in silent + trickling:
            s.close()
        p, _ = test_images[0]
        ok = requests.post(srv.url + "/predict", files={"file": (p.name, p.read_bytes())}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["label"]
        # an answer that takes longer than the request deadline is still delivered
        slow = app.state.predictor.forward

        def slower(x):
            time.sleep(1.5)
            return slow(x)

        app.state.predictor.forward = slower
        late = requests.post(srv.url + "/predict", files={"file": (p.name, p.read_bytes())}, timeout=30)
        assert late.status_code == 200


def test_beyond_the_connection_cap_requests_get_503_and_the_server_then_serves(exported_run, test_images):
    import requests

    from classforge.serve.http import server_config

    app = create_app(exported_run, Limits(), ui=False, batch_size=1)
    config = server_config(app, "127.0.0.1", 0, request_timeout_s=60.0, max_connections=12, log_level="warning")
    with ServerThread(app, config) as srv:
        connections = srv.server.server_state.connections
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(12)]
        _wait_until(lambda: len(connections) == 12, "the server sees the 12 held connections")
        r = requests.get(srv.url + "/health", timeout=10)
        assert r.status_code == 503
        for s in held:
            s.close()
        _wait_until(lambda: not connections, "the server sees the held connections closed")
        p, _ = test_images[0]
        ok = requests.post(srv.url + "/predict", files={"file": (p.name, p.read_bytes())}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["label"]


def test_predict_takes_a_json_body_with_base64_files(server, test_images):
    """The same answers from a JSON body as from multipart, and clear 4xx answers for a broken one."""
    import base64

    import requests

    (p0, _), (p1, _) = test_images[0], test_images[1]
    multi = requests.post(server.url + "/predict?top_k=2", files=[("file", (p0.name, p0.read_bytes())),
                                                                   ("file", (p1.name, p1.read_bytes()))]).json()
    body = {"files": [{"filename": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in (p0, p1)],
            "top_k": 2}
    js = requests.post(server.url + "/predict", json=body)
    assert js.status_code == 200 and js.json()["results"] == multi["results"]
    one = requests.post(server.url + "/predict", json={"data": base64.b64encode(p0.read_bytes()).decode()})
    assert one.status_code == 200 and one.json()["results"][0]["label"] == multi["results"][0]["label"]
    for bad, status, says in [({"files": [{"data": "not base64!"}]}, 400, "base64"),
                              ({"files": []}, 400, "no file"), ({"data": ""}, 400, "empty file"),
                              ({"data": base64.b64encode(b"hello").decode()}, 415, "not an image"),
                              ({**body, "top_k": 0}, 422, "top_k"),
                              ({"files": [body["files"][0]] * 5}, 413, "too many files")]:
        r = requests.post(server.url + "/predict", json=bad)
        assert r.status_code == status and says in r.json()["error"], (bad, r.status_code, r.text[:200])
    raw = requests.post(server.url + "/predict", data=b"{broken", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]


def test_api_docs_pages_need_no_internet(server):
    """/docs and /redoc load their scripts and styles from this server: no URL in the page leaves it."""
    import re

    import requests

    for page in ("/docs", "/redoc"):
        r = requests.get(server.url + page, timeout=10)
        assert r.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
        assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
        for u in urls:
            if u.startswith("/docs-assets/"):
                assert requests.get(server.url + u, timeout=10).status_code == 200, u
        assert "https://" not in r.text and "http://" not in r.text
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert "/predict" in spec["paths"]
