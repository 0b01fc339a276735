"""A corpus of bad and awkward inputs, generated here (no binary blobs in the repository): images, audio, labels
CSVs, archives and HTTP requests. Each case must end in a reported skip (with its reason), a use of the file, a
clear error, or a 4xx with a JSON message; never a traceback, and the data folders' bytes never change.

The tally of every case is printed (run with -s to see it) and written to $CLASSFORGE_CORPUS_TALLY when set."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerThread, draw_sample, make_image_folder, tree_checksums
from PIL import Image

pytestmark = pytest.mark.slow

TALLY: list[dict] = []


@dataclass
class Case:
    name: str  # the file (or request) in the corpus
    family: str
    expect: str  # "skip" (listed with a reason), "use" (trained on), "error" (clear message), "4xx" (HTTP)
    says: str = ""  # what the reason or message must contain (lower case)


def _record(case: Case, handled: bool, traceback: bool, detail: str) -> None:
    TALLY.append({"case": case.name, "family": case.family, "expect": case.expect, "handled": handled,
                  "traceback": traceback, "detail": detail[:200]})


def _cli(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "classforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CLASSFORGE_QUIET": "1", **(env or {})})


def _check_files(cases: list[Case], skipped: dict[str, str], out: subprocess.CompletedProcess, run: Path) -> bool:
    """Each case skipped with its reason (inspect's list) or used (the run's split.csv); returns whether the
    train output held a traceback."""
    tb = "Traceback" in out.stdout + out.stderr
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run / "split.csv", encoding="utf-8", errors="surrogateescape") as f:
        used = {r["path"] for r in csv.DictReader(f)}
    for case in cases:
        if case.expect == "skip":
            ok = case.name in skipped and case.says in skipped[case.name]
            detail = skipped.get(case.name, "not listed")
        else:
            ok = case.name in used
            detail = "in split.csv" if ok else f"missing from split.csv ({skipped.get(case.name)})"
        _record(case, ok, tb, detail)
        assert ok, (case, detail)
    return tb


# ------------------------------------------------------------------------------------------------ images
def _images(root: Path) -> list[Case]:
    make_image_folder(root, 12, kinds=("circle", "stripes"))
    rng = np.random.default_rng(7)
    c, s = root / "circle", root / "stripes"
    cases = []

    def add(name, expect, says=""):
        cases.append(Case(name, "image", expect, says))

    jpg = c / "truncated.jpg"
    draw_sample("circle", rng, 128).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    add("circle/truncated.jpg", "skip", "truncated")
    (c / "empty.png").write_bytes(b"")
    add("circle/empty.png", "skip", "empty")
    (s / "notes.jpg").write_text("a text file, not an image")
    add("stripes/notes.jpg", "skip", "not an image")
    Image.new("RGB", (1, 1)).save(s / "tiny.png")
    add("stripes/tiny.png", "skip", "too small")
    Image.new("L", (20000, 20000)).save(s / "bomb.png", optimize=True)
    add("stripes/bomb.png", "skip", "pixels")
    png = io.BytesIO()
    draw_sample("circle", rng).save(png, "PNG")
    broken = bytearray(png.getvalue())
    broken[len(broken) // 2:len(broken) // 2 + 64] = b"\xff" * 64  # damaged image data
    (c / "damaged.png").write_bytes(bytes(broken))
    add("circle/damaged.png", "skip", "")
    (c / "directory.jpg").mkdir()  # a folder with an image's name
    grey = np.asarray(draw_sample("circle", rng).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(c / "sixteen_bit.png")
    add("circle/sixteen_bit.png", "use")
    Image.fromarray(grey.astype(np.float32) / 255).save(c / "float.tif")
    add("circle/float.tif", "use")
    draw_sample("stripes", rng).convert("CMYK").save(s / "cmyk.jpg")
    add("stripes/cmyk.jpg", "use")
    rgba = draw_sample("stripes", rng).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(s / "alpha.png")
    add("stripes/alpha.png", "use")
    draw_sample("stripes", rng).convert("P").save(s / "palette.gif")
    add("stripes/palette.gif", "use")
    frames = [draw_sample("circle", rng) for _ in range(3)]
    frames[0].save(c / "animated.gif", save_all=True, append_images=frames[1:])
    add("circle/animated.gif", "use")
    img = draw_sample("circle", rng)
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.save(c / "rotated.jpg", exif=exif)
    add("circle/rotated.jpg", "use")
    draw_sample("stripes", rng).save(s / "UPPER.JPG")
    add("stripes/UPPER.JPG", "use")
    draw_sample("stripes", rng).save(s / "image.webp")
    add("stripes/image.webp", "use")
    draw_sample("circle", rng).save(c / "bitmap.bmp")
    add("circle/bitmap.bmp", "use")
    weird = os.fsencode(c) + b"/\xff\xfe-latin1-\xe9.png"  # not valid UTF-8
    with open(weird, "wb") as f:
        draw_sample("circle", rng).save(f, "PNG")
    add(os.fsdecode(b"circle/\xff\xfe-latin1-\xe9.png"), "use")
    (s / "readme.txt").write_text("not data")
    add("stripes/readme.txt", "skip", "not an image or audio file")
    return cases


def test_image_corpus_train_reports_every_case(tmp_path):
    root = tmp_path / "images"
    cases = _images(root)
    before = tree_checksums(root)
    js = _cli("inspect", root, "--json")
    assert js.returncode == 0 and "Traceback" not in js.stderr, js.stderr[-2000:]
    found = json.loads(js.stdout)
    skipped = {d["file"]: d["reason"].lower() for d in found["skipped"]}
    out = _cli("train", root, "--out", tmp_path / "run", "--epochs", "3")
    tb = _check_files(cases, skipped, out, tmp_path / "run")
    assert not tb
    assert tree_checksums(root) == before


# ------------------------------------------------------------------------------------------------ audio
def _tone(sr: int, seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _audio(root: Path) -> list[Case]:
    import soundfile as sf

    cases = []
    for label, hz in (("low", 220.0), ("high", 1760.0)):
        (root / label).mkdir(parents=True)
        for i in range(10):
            sf.write(root / label / f"{label}_{i}.wav", _tone(16000, 0.8, hz * (1 + i / 50)), 16000)

    def add(name, expect, says=""):
        cases.append(Case(name, "audio", expect, says))

    sf.write(root / "low" / "zero_length.wav", np.zeros(0, np.float32), 16000)
    add("low/zero_length.wav", "skip", "no audio")
    sf.write(root / "low" / "silent.wav", np.zeros(16000, np.float32), 16000)
    add("low/silent.wav", "skip", "silent")
    sf.write(root / "high" / "stereo_48k.wav", np.stack([_tone(48000, 1, 1760)] * 2, 1), 48000)
    add("high/stereo_48k.wav", "use")
    sf.write(root / "high" / "eight_bit.wav", _tone(8000, 1, 1760), 8000, subtype="PCM_U8")
    add("high/eight_bit.wav", "use")
    sf.write(root / "low" / "short.wav", _tone(16000, 0.01, 220), 16000)
    add("low/short.wav", "use")
    sf.write(root / "high" / "good.ogg", _tone(16000, 1, 1760), 16000, format="OGG", subtype="VORBIS")
    ogg = (root / "high" / "good.ogg").read_bytes()
    (root / "high" / "corrupt.ogg").write_bytes(ogg[:40] + b"\x00" * 200)
    add("high/corrupt.ogg", "skip", "cannot decode")
    add("high/good.ogg", "use")
    (root / "low" / "fake.mp3").write_text("not an mp3 at all")
    add("low/fake.mp3", "skip", "cannot decode")
    with wave.open(str(root / "high" / "header_only.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    add("high/header_only.wav", "skip", "no audio")
    nan = _tone(16000, 1, 220)
    nan[100:200] = np.nan
    sf.write(root / "low" / "nan.wav", nan, 16000, subtype="FLOAT")
    add("low/nan.wav", "skip", "nan")
    return cases


def test_audio_corpus_train_reports_every_case(tmp_path):
    pytest.importorskip("soundfile")
    root = tmp_path / "audio"
    cases = _audio(root)
    before = tree_checksums(root)
    js = _cli("inspect", root, "--json")
    assert js.returncode == 0 and "Traceback" not in js.stderr, js.stderr[-2000:]
    skipped = {d["file"]: d["reason"].lower() for d in json.loads(js.stdout)["skipped"]}
    out = _cli("train", root, "--out", tmp_path / "run", "--backbone", "audio_cnn", "--strategy", "scratch",
               "--epochs", "1")
    tb = _check_files(cases, skipped, out, tmp_path / "run")
    assert not tb and tree_checksums(root) == before


# ------------------------------------------------------------------------------------------------ CSV
def test_labels_csv_corpus(tmp_path):
    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    outside = make_image_folder(tmp_path / "outside", 1, kinds=("x",)) / "x" / "x_000.png"
    rows = [(f"{k}/{k}_{i:03d}.png", k) for k in ("circle", "stripes") for i in range(12)]
    rows = [r for r in rows if r[0] not in ("circle/circle_001.png", "circle/circle_002.png", "circle/circle_003.png")]
    bad = [
        (Case("circle/circle_001.png", "csv", "skip", "labels"), [("circle/circle_001.png", "circle"),
                                                                 ("circle/circle_001.png", "stripes")]),
        (Case("circle/circle_002.png", "csv", "skip", "listed again"), [("circle/circle_002.png", "circle")] * 2),
        (Case("../outside/x/x_000.png", "csv", "skip", "outside the data folder"), [("../outside/x/x_000.png", "x")]),
        (Case(str(outside), "csv", "skip", "outside the data folder"), [(str(outside), "x")]),
        (Case("circle/missing.png", "csv", "skip", "missing"), [("circle/missing.png", "circle")]),
        (Case("circle/circle_003.png", "csv", "skip", "empty label"), [("circle/circle_003.png", "")]),
    ]
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows + [r for _, extra in bad for r in extra])
    before = tree_checksums(root)
    js = _cli("inspect", root, "--labels-csv", csv_path, "--json")
    assert js.returncode == 0 and "Traceback" not in js.stderr, js.stderr[-2000:]
    skipped = [(d["file"], d["reason"].lower()) for d in json.loads(js.stdout)["skipped"]]
    for case, extra in bad:
        path = extra[0][0]
        ok = any(f == path and case.says in why for f, why in skipped)
        _record(case, ok, False, next((why for f, why in skipped if f == path), "not listed"))
        assert ok, (case, skipped)
    # CSVs that cannot be used at all: a clear error each
    broken = {
        "no_label_column.csv": b"path,kind\ncircle/circle_000.png,circle\n",
        "not_csv.csv": b"\x00\x01\x02\xff\xfe binary",
        "empty.csv": b"",
    }
    for name, data in broken.items():
        p = tmp_path / name
        p.write_bytes(data)
        out = _cli("train", root, "--labels-csv", p, "--out", tmp_path / f"run-{name}")
        tb = "Traceback" in out.stdout + out.stderr
        ok = out.returncode != 0 and not tb and "error" in (out.stdout + out.stderr).lower()
        _record(Case(name, "csv", "error"), ok, tb, (out.stdout + out.stderr).strip()[-200:])
        assert ok, out.stdout + out.stderr
        assert not (tmp_path / f"run-{name}").exists()  # no half-made run folder
    assert tree_checksums(root) == before


# ------------------------------------------------------------------------------------------------ archives
def test_archive_corpus(tmp_path):
    shapes = make_image_folder(tmp_path / "shapes", 6, kinds=("circle", "stripes"))
    cases = []
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as z:
        for p in sorted(shapes.rglob("*.png")):
            z.write(p, str(p.relative_to(shapes)))
        z.writestr("../../escaped.png", b"x")
    cases.append((Case("slip.zip", "archive", "error", "outside"), slip, {}))
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(slip.read_bytes()[:200])
    cases.append((Case("corrupt.zip", "archive", "error", ""), corrupt, {}))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("circle/big.png", b"\x00" * (64 * 2**20))
    cases.append((Case("bomb.zip", "archive", "error", "unpack"), bomb, {"CLASSFORGE_MAX_UNPACK_GB": "0.01"}))
    linked = tmp_path / "links.tar"
    with tarfile.open(linked, "w") as t:
        for p in sorted(shapes.rglob("*.png")):
            t.add(p, str(p.relative_to(shapes)))
        info = tarfile.TarInfo("circle/passwd.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    cases.append((Case("links.tar", "archive", "error|use", ""), linked, {}))
    for case, path, env in cases:
        before = path.read_bytes()
        out = _cli("inspect", path, "--json", env={**env, "CLASSFORGE_CACHE": str(tmp_path / "cache")})
        text = out.stdout + out.stderr
        tb = "Traceback" in text
        if case.expect == "error":
            ok = out.returncode != 0 and not tb and case.says in text.lower()
        else:  # a link inside the archive is not followed: the rest is usable
            ok = not tb and (out.returncode != 0 or "/etc/passwd" not in text)
        partial = list((tmp_path / "cache").rglob("*.partial"))
        ok = ok and not partial and path.read_bytes() == before and not (tmp_path / "escaped.png").exists()
        _record(case, ok, tb, text.strip()[-200:])
        assert ok, (case, text[-2000:], partial)


# ------------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def corpus_server(exported_run):
    from classforge.serve.api import Limits, create_app

    app = create_app(exported_run, Limits(max_upload_mb=2, max_files=4, max_pixels=4_000_000), ui=True)
    with ServerThread(app) as s:
        yield s


def _png(size=(64, 64)) -> bytes:
    b = io.BytesIO()
    draw_sample("circle", np.random.default_rng(1), size[0]).save(b, "PNG")
    return b.getvalue()


def test_http_corpus(corpus_server):
    import requests

    url = corpus_server.url
    big = io.BytesIO()
    Image.new("L", (4000, 4000)).save(big, "PNG", optimize=True)
    trunc = io.BytesIO()
    draw_sample("circle", np.random.default_rng(2), 96).convert("RGB").save(trunc, "JPEG")
    requests_ = [
        ("GET /predict", lambda: requests.get(url + "/predict"), 405),
        ("POST /health", lambda: requests.post(url + "/health"), 405),
        ("PUT /labels", lambda: requests.put(url + "/labels"), 405),
        ("DELETE /predict", lambda: requests.delete(url + "/predict"), 405),
        ("POST /predict without a file", lambda: requests.post(url + "/predict", data={"x": "1"}), 400),
        ("POST /predict empty file", lambda: requests.post(url + "/predict", files={"file": ("a.png", b"")}), 400),
        ("POST /predict text as image",
         lambda: requests.post(url + "/predict", files={"file": ("a.jpg", b"hello")}), 415),
        ("POST /predict truncated JPEG",
         lambda: requests.post(url + "/predict", files={"file": ("t.jpg", trunc.getvalue()[:300])}), 422),
        ("POST /predict 16 MP over the pixel limit",
         lambda: requests.post(url + "/predict", files={"file": ("big.png", big.getvalue())}), 413),
        ("POST /predict five files over --max-files 4",
         lambda: requests.post(url + "/predict", files=[("file", (f"{i}.png", _png())) for i in range(5)]), 413),
        ("POST /predict 3 MB body over 2 MB",
         lambda: requests.post(url + "/predict", files={"file": ("x.png", b"\x89PNG" + b"\0" * 3 * 2**20)}), 413),
        ("POST /predict top_k=0", lambda: requests.post(url + "/predict?top_k=0", files={"file": ("a.png", _png())}),
         422),
        ("POST /predict top_k=abc",
         lambda: requests.post(url + "/predict?top_k=abc", files={"file": ("a.png", _png())}), 422),
        ("POST /predict JSON body", lambda: requests.post(url + "/predict", json={"file": "a.png"}), 400),
        ("POST /predict malformed multipart",
         lambda: requests.post(url + "/predict", data=b"--x\r\nbroken", headers={"Content-Type":
                                                                              "multipart/form-data; boundary=x"}),
         400),
        ("POST /predict filename ../../etc/passwd",
         lambda: requests.post(url + "/predict", files={"file": ("../../etc/passwd", b"root:x:0:0")}), 415),
    ]
    for name, send, want in requests_:
        r = send()
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        ok = r.status_code == want and isinstance(body, dict) and body.get("status") == want and body.get("error")
        _record(Case(name, "http", "4xx"), bool(ok), r.status_code >= 500, f"{r.status_code} {str(body)[:150]}")
        assert ok, (name, r.status_code, r.text[:300])
    good = requests.post(url + "/predict", files={"file": ("ok.png", _png())})
    assert good.status_code == 200  # and it still serves


def test_corpus_tally():
    """Runs last in this module: the size of the corpus and its counts."""
    if not TALLY:
        pytest.skip("the corpus tests did not run")
    counts = {"cases": len(TALLY), "handled": sum(t["handled"] for t in TALLY),
              "tracebacks": sum(t["traceback"] for t in TALLY),
              "by_family": {f: sum(t["family"] == f for t in TALLY) for f in sorted({t["family"] for t in TALLY})}}
    print("\nbad-input corpus:", json.dumps(counts))
    if os.environ.get("CLASSFORGE_CORPUS_TALLY"):
        Path(os.environ["CLASSFORGE_CORPUS_TALLY"]).write_text(json.dumps({"counts": counts, "cases": TALLY}, indent=1))
    assert counts["handled"] == counts["cases"] and counts["tracebacks"] == 0
