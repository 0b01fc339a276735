"""One bound on decoding memory across all requests: concurrent large uploads wait for their share or get a
503 with Retry-After, never more than the budget at once, and the server answers normally afterwards."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import ServerThread
from PIL import Image

from classforge.serve.api import Limits, create_app
from classforge.serve.budget import Busy, DecodeBudget, decoded_size

pytestmark = pytest.mark.server


def test_budget_waits_for_room_then_refuses():
    budget = DecodeBudget(100, wait_s=60)
    order = []
    with budget.reserve(80):
        def second():
            with budget.reserve(50):
                order.append("second in")
        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 30
        while not budget._cond._waiters:  # the second reservation is waiting for room
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        order.append("first out")
    t.join()
    assert order == ["first out", "second in"]  # it waited for the first to finish, then went in
    assert budget.refused == 0 and budget.peak <= 100 and budget.in_use == 0
    quick = DecodeBudget(100, wait_s=0.05)
    with quick.reserve(90):
        with pytest.raises(Busy):
            with quick.reserve(20):
                pass
    assert quick.refused == 1 and quick.peak <= 100 and quick.in_use == 0


def test_decoded_size_reads_the_header_only():
    b = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(b, "PNG")
    assert decoded_size(b.getvalue(), "image") == 4000 * 3000 * 8
    assert decoded_size(b"not an image", "image") == len(b"not an image")


def _big_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)).resize((side, side))
    b = io.BytesIO()
    img.save(b, "PNG", compress_level=1)
    return b.getvalue()


def test_concurrent_large_uploads_stay_within_the_budget(exported_run):
    side = 2500  # 6.25 MP: 50 MB decoded by the budget's count
    limits = Limits(max_decoding_mb=60, busy_wait_s=0.2)
    png = _big_png(side)
    with ServerThread(create_app(exported_run, limits=limits, ui=False)) as srv:
        def post(_):
            r = requests.post(srv.url + "/predict", files={"file": ("big.png", png, "image/png")}, timeout=120)
            return r.status_code, r.headers.get("Retry-After"), r.json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        codes = sorted(c for c, _, _ in answers)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for code, retry, body in answers:
            if code == 503:
                assert retry and int(retry) >= 1 and "try again" in body["error"] and body["status"] == 503
        health = requests.get(srv.url + "/health", timeout=10).json()["decoding"]
        assert health["peak_mb"] <= 60 and health["in_use_mb"] == 0 and health["refused"] >= 1
        small = io.BytesIO()
        Image.new("RGB", (300, 200), (200, 40, 40)).save(small, "JPEG")
        r = requests.post(srv.url + "/predict", files={"file": ("s.jpg", small.getvalue(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"]
