"""The web UI in a real headless Chromium (Debian's /usr/bin/chromium driven by the PyPI playwright package; never
`playwright install`): upload a file, read the predicted label on the page; the random-test-sample tab."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ServerThread, shared_path

from classforge.data.rundata import run_files
from classforge.serve.api import create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            else None)
    page.goto(url, timeout=60_000)
    page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
    return page, outside


def upload_and_read_label(browser, url: str, file: Path, submit: bool = True) -> str:
    page, outside = open_page(browser, url)
    try:
        page.set_input_files("input[type=file]", str(file))
        if submit:
            page.get_by_role("button", name="Submit").click()
        label = page.wait_for_selector('[data-testid="label-output-value"]', timeout=60_000).inner_text().strip()
        assert not outside, f"the page reached beyond loopback: {outside[:3]}"
        return label
    finally:
        page.close()


def correctly_predicted(run: Path, predictor, splits=("test", "val")) -> tuple[Path, str]:
    """A file of the run's held-out splits that the model gets right (the UI must then show that label)."""
    files = run_files(run, splits)
    for (path, truth, _), res in zip(files, predictor.predict([p for p, _, _ in files], top_k=1)):
        if res["label"] == truth:
            return path, truth
    pytest.fail(f"the model gets none of the {len(files)} held-out files of {run} right")


@pytest.fixture(scope="module")
def ui_server(exported_run):
    with ServerThread(create_app(exported_run)) as s:
        yield s


def test_upload_image_shows_label(browser, ui_server, exported_run):
    path, truth = correctly_predicted(exported_run, ui_server.app.state.predictor)
    assert upload_and_read_label(browser, ui_server.url + "/", path) == truth


def test_upload_alone_predicts_without_submit(browser, ui_server, exported_run):
    path, truth = correctly_predicted(exported_run, ui_server.app.state.predictor)
    assert upload_and_read_label(browser, ui_server.url + "/", path, submit=False) == truth


def test_random_test_sample_tab(browser, ui_server, exported_run):
    labels = ui_server.app.state.predictor.labels
    page, outside = open_page(browser, ui_server.url + "/")
    try:
        page.get_by_role("tab", name="Random test sample").click()
        page.get_by_role("button", name="Draw a random test sample").click()
        truth = page.get_by_label("True label")
        page.wait_for_function("el => el.value.length > 0", arg=truth.element_handle(), timeout=60_000)
        assert truth.input_value() in labels
        top = page.wait_for_selector('[data-testid="label-output-value"]', timeout=60_000).inner_text().strip()
        assert top in labels
        assert page.get_by_text("Correct").or_(page.get_by_text("Wrong (predicted")).first.is_visible()
        assert not outside
    finally:
        page.close()


@pytest.mark.slow
def test_pokemon_sprite_gets_its_name(browser, tmp_path_factory):
    """A run trained on three Pokémon's sprites; a held-out sprite uploaded in the browser shows its name."""
    import classforge

    sprites = shared_path("datasets", "pokemon_gen1_sprites")
    run = classforge.train(sprites, tmp_path_factory.mktemp("runs") / "sprites",
                           classes="001_bulbasaur,004_charmander,007_squirtle", epochs=20)
    with ServerThread(create_app(run)) as s:
        path, truth = correctly_predicted(run, s.app.state.predictor)
        assert upload_and_read_label(browser, s.url + "/", path) == truth


@pytest.mark.parametrize("width", [1280, 390])
def test_report_fits_the_screen_and_every_image_loads(browser, linear_run, width):
    """report.html at desktop and phone width: nothing wider than the window, every image decoded, the per-class
    table sorts on a click, and the page asks for nothing outside the file."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    try:
        page.goto((linear_run / "report.html").as_uri(), timeout=60_000)
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), \
            page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
        assert images and all(done and w > 0 for done, w in images)
        header = page.locator("table.sortable th", has_text="F1")
        header.click()
        f1 = page.evaluate("[...document.querySelectorAll('table.sortable tr')].slice(1)"
                           ".map(r => parseFloat(r.children[3].textContent))")
        assert f1 == sorted(f1)
        assert not outside
    finally:
        page.close()


def test_upload_of_no_known_class_says_unknown(browser, ui_server, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        files.append(tmp_path / f"noise_{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files[-1])
    answers = ui_server.app.state.predictor.predict(files)
    foreign = next((f for f, a in zip(files, answers) if a["label"] == "unknown"), None)
    assert foreign is not None, f"no noise image was answered unknown: {answers}"
    page, outside = open_page(browser, ui_server.url + "/")
    try:
        page.set_input_files("input[type=file]", str(foreign))
        page.get_by_text("This file is unlike every class the model knows").wait_for(timeout=60_000)
        closest = page.wait_for_selector('[data-testid="label-output-value"]', timeout=60_000).inner_text().strip()
        assert closest == answers[files.index(foreign)]["best_label"] and not outside
    finally:
        page.close()
