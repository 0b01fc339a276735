"""Discovery, validation and splitting on real generated files."""

from __future__ import annotations

import csv
import random
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import bad_image_folder, draw_sample, make_image_folder, tree_checksums
from PIL import Image

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.data.discover import discover
from classforge.data.split import make_split, read_split, write_split
from classforge.data.validate import validate
from classforge.training.prepared import prepare_data


def test_folders_layout(shapes_dir):
    ds = discover(shapes_dir)
    assert ds.task == "image" and ds.layout == "folders"
    assert ds.classes == ["checker", "circle", "stripes"]
    assert Counter(s.label for s in ds.samples) == {"circle": 24, "stripes": 24, "checker": 24}


def test_official_train_val_only_evaluates_val_as_test_and_carves_val_from_train(tmp_path):
    make_image_folder(tmp_path / "train", 20, kinds=("circle", "stripes"))
    make_image_folder(tmp_path / "valid", 6, kinds=("circle", "stripes"), seed=1)
    data = prepare_data(TrainConfig(data=str(tmp_path)))
    counts = Counter(s.split for s in data.samples)
    assert counts["test"] == 12  # all of valid/
    assert all(s.rel.startswith("valid/") for s in data.of("test"))
    assert counts["val"] > 0 and all(s.rel.startswith("train/") for s in data.of("val"))
    assert {s.label for s in data.of("val")} == {"circle", "stripes"}  # stratified slice
    assert any("evaluated as the test set" in n for n in data.notes)


def test_csv_labels_with_groups_and_splits(tmp_path):
    make_image_folder(tmp_path / "imgs", 10, kinds=("circle", "stripes"))
    rows = []
    for p in sorted((tmp_path / "imgs").rglob("*.png")):
        i = int(p.stem.split("_")[1])
        rows.append([str(p.relative_to(tmp_path)), p.parent.name, f"g{i % 5}", "test" if i % 5 == 4 else ""])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "split"])
        w.writerows(rows)
    data = prepare_data(TrainConfig(data=str(tmp_path), labels_csv=str(tmp_path / "labels.csv")))  # default 0.7,0.2,0.1
    assert {s.rel for s in data.of("test")} == {r[0] for r in rows if r[3] == "test"}
    # a group never straddles splits
    by_group = {}
    for s in data.samples:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in by_group.values()), by_group


def test_label_from_name_with_bins(tmp_path):
    rng = np.random.default_rng(0)
    for age in (1, 2, 5, 7, 15, 30, 45, 80):
        for j in range(3):
            draw_sample("circle", rng).save(tmp_path / f"{age}_{j}.jpg")
    ds = discover(tmp_path, label_from_name=r"^(?P<label>\d+)_", bins="0,3,10,40")
    assert Counter(s.label for s in ds.samples) == {"0-3": 6, "3-10": 6, "10-40": 6, "40+": 6}
    with pytest.raises(ClassforgeError, match="named group"):
        discover(tmp_path, label_from_name=r"^(\d+)_")


def test_classes_subset_and_max_classes(shapes_dir):
    assert discover(shapes_dir, classes="circle,stripes").classes == ["circle", "stripes"]
    assert discover(shapes_dir, max_classes=1).classes == ["checker"]
    with pytest.raises(ClassforgeError, match="unknown"):
        discover(shapes_dir, classes="circle,nope")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_extract_to_cache_not_beside_the_file(tmp_path, shapes_dir, kind):
    arc = tmp_path / f"data.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(arc, "w") as z:
            for p in shapes_dir.rglob("*.png"):
                z.write(p, Path("shapes") / p.relative_to(shapes_dir))
    else:
        with tarfile.open(arc, "w:gz") as t:
            t.add(shapes_dir, arcname="shapes")
    before = sorted(tmp_path.iterdir())
    ds = discover(arc)
    assert sorted(tmp_path.iterdir()) == before  # nothing written beside the archive
    assert len(ds.samples) == 72 and ds.classes == ["checker", "circle", "stripes"]


def test_bad_files_are_skipped_with_reasons_and_data_is_untouched(tmp_path):
    root = bad_image_folder(tmp_path / "bad")
    before = tree_checksums(root)
    ds = discover(root)
    checked = validate(ds, min_size=8, max_pixels=50_000_000)
    reasons = dict(checked.skipped)
    assert "truncated" in reasons["circle/truncated.jpg"]
    assert "empty" in reasons["circle/empty.png"]
    assert "not an image" in reasons["stripes/notes.jpg"]
    assert "too small" in reasons["stripes/tiny.png"]
    assert "pixels" in reasons["stripes/bomb.png"]
    assert len(checked.good) == 24
    assert tree_checksums(root) == before


def test_split_is_stratified_deterministic_and_keeps_duplicates_together(tmp_path):
    root = make_image_folder(tmp_path / "d", 40, kinds=("circle", "stripes"))
    # exact copies and a near duplicate (re-encoded at another size) of one image
    src = root / "circle" / "circle_000.png"
    shutil.copy(src, root / "circle" / "copy_a.png")
    shutil.copy(src, root / "circle" / "copy_b.png")
    Image.open(src).resize((80, 80)).save(root / "circle" / "near_c.jpg", quality=92)

    def split(seed):
        ds = discover(root)
        checked = validate(ds)
        rep = make_split(checked.good, checked.info, (0.6, 0.2, 0.2), seed)
        return {s.rel: s.split for s in checked.good}, rep

    a, rep = split(3)
    b, _ = split(3)
    c, _ = split(4)
    assert a == b and a != c
    family = {a[r] for r in ("circle/circle_000.png", "circle/copy_a.png", "circle/copy_b.png", "circle/near_c.jpg")}
    assert len(family) == 1
    assert rep.duplicate_clusters >= 1
    for label in ("circle", "stripes"):
        n = Counter(sp for r, sp in a.items() if r.startswith(label))
        assert n["train"] > n["val"] > 0 and n["test"] > 0


def test_group_split_drops_cross_split_duplicates_from_evaluation(tmp_path):
    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    shutil.copy(root / "circle" / "circle_000.png", root / "circle" / "circle_dup.png")
    ds = discover(root, group_by=r"_\d(\d)\d|dup")  # groups by the tens digit; the copy has its own group
    checked = validate(ds)
    rep = make_split(checked.good, checked.info, (0.5, 0.0, 0.5), seed=0)
    splits = {s.rel: s.split for s in checked.good}
    pair = [splits["circle/circle_000.png"], splits["circle/circle_dup.png"]]
    assert "" in pair or pair[0] == pair[1]  # never in two different splits
    if "" in pair:
        assert any("duplicate of" in why for _, why in rep.excluded)


def _speakers_and_an_ungrouped_class(seed: int):
    """An FSDD-like set: 10 digits x 6 speakers x 20 files, plus 160 'silence' files that no speaker pattern
    matches (each its own group). The groups are not single-class, which once made the split drop class
    balance: silence, the easy class, filled the test set."""
    from classforge.data.discover import Sample

    samples = [Sample(f"/x/{d}_{sp}_{k}.wav", f"{d}_{sp}_{k}.wav", str(d), sp)
               for d in range(10) for sp in "abcdef" for k in range(20)]
    samples += [Sample(f"/x/silence_{k}.wav", f"silence_{k}.wav", "silence", "") for k in range(160)]
    random.Random(seed).shuffle(samples)
    return samples


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_with_mixed_class_groups_keeps_groups_whole_and_classes_balanced(seed):
    from classforge.data.split import class_share_warnings
    from classforge.data.validate import FileInfo

    samples = _speakers_and_an_ungrouped_class(seed)
    info = {s.path: FileInfo(s.rel, True, sha1=f"{i:040x}") for i, s in enumerate(samples)}  # no duplicates
    rep = make_split(samples, info, (0.7, 0.2, 0.1), seed=seed)
    assert rep.method == "stratified by class, whole groups"
    by_group: dict = {}
    for s in samples:
        if not s.group.startswith("#"):
            by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(sp) == 1 for sp in by_group.values())  # a speaker never spans two splits
    kept = [s for s in samples if s.split]
    for split in ("train", "val", "test"):
        part = [s for s in kept if s.split == split]
        for label in {s.label for s in kept}:
            data_share = sum(s.label == label for s in kept) / len(kept)
            assert abs(sum(s.label == label for s in part) / len(part) - data_share) < 0.05, (split, label)
    assert rep.warnings == [] and class_share_warnings(samples) == []


def test_a_test_split_skewed_by_class_is_warned_about():
    from classforge.data.split import class_share_warnings

    samples = _speakers_and_an_ungrouped_class(0)
    for s in samples:  # the old fallback: whole groups, blind to class, silence piling into test
        s.split = "test" if s.label == "silence" or s.group == "a" else "train"
    warned = class_share_warnings(samples)
    assert warned and "'silence'" in warned[0] and "more than the data" in warned[0]


def test_split_file_roundtrip(tmp_path, shapes_dir):
    ds = discover(shapes_dir)
    checked = validate(ds)
    make_split(checked.good, checked.info, (0.7, 0.2, 0.1), 0)
    write_split(tmp_path / "split.csv", checked.good)
    want = {s.rel: s.split for s in checked.good}
    ds2 = discover(shapes_dir)
    read_split(tmp_path / "split.csv", ds2.samples)
    assert {s.rel: s.split for s in ds2.samples} == want


def test_test_groups_hold_out_whole_groups(tmp_path):
    make_image_folder(tmp_path, 15, kinds=("circle", "stripes"))
    data = prepare_data(TrainConfig(data=str(tmp_path), group_by=r"_0(\d)", test_groups="1"))
    assert data.of("test") and all(s.group == "1" for s in data.of("test"))
    assert all(s.group != "1" for s in data.of("train") + data.of("val"))


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (256, 256), (120, 90), (640, 480)])
def test_fast_eval_view_is_bitwise_the_torchvision_pipeline(tmp_path, size):
    """ImagePreprocessor.eval crops and normalises the uint8 array itself when `load` already shrank the image;
    it must give exactly what the torchvision eval transform gives (cached embeddings and predict rely on it)."""
    import torch

    from classforge.core.spec import InputSpec
    from classforge.data.image import ImagePreprocessor

    rng = np.random.default_rng(sum(size))
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(arr).save(path, quality=90)
    spec = InputSpec(task="image", size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation="bicubic", crop_pct=0.875)
    pre = ImagePreprocessor(spec)
    raw = pre.load(path)
    fast, ref = pre.eval(raw), pre._eval(raw)
    assert fast.shape == ref.shape == (3, 224, 224) and fast.dtype == torch.float32
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("size", [(120, 90), (90, 200), (255, 200), (200, 200)])
def test_small_images_are_enlarged_like_torchvision_without_importing_it(tmp_path, size):
    """Images smaller than a bilinear model's input are enlarged with Pillow (torchvision's import costs seconds):
    to the same size as torchvision's Resize and within one grey level of its pixels."""

    from classforge.core.spec import InputSpec
    from classforge.data.image import ImagePreprocessor

    rng = np.random.default_rng(sum(size))
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    spec = InputSpec(task="image", size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                     crop_pct=0.875)
    pre = ImagePreprocessor(spec)
    raw = pre.load(tmp_path / "x.png")
    fast, ref = pre.eval(raw), pre._eval(raw)
    assert fast.shape == ref.shape == (3, 224, 224)
    assert float((fast - ref).abs().max()) * 0.5 * 255 <= 1.0 + 1e-4  # std 0.5: one grey level = 1/127.5
    assert float((fast - ref).abs().mean()) < 1e-3


def test_16_bit_and_float_images_keep_their_content(tmp_path):
    """A 16-bit greyscale PNG and a float TIFF decode to the 8-bit image they hold, not to white or black."""
    from classforge.data.image import open_image

    g8 = np.linspace(0, 255, 96 * 96).reshape(96, 96).astype(np.uint8)
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(g8.astype(np.float32) / 255).save(tmp_path / "f.tif")
    Image.fromarray(g8.astype(np.int32) * 257, mode="I").save(tmp_path / "i32.png")
    for name in ("g16.png", "f.tif", "i32.png"):
        img = open_image(tmp_path / name)
        assert img.mode == "RGB", name
        got = np.asarray(img)[..., 0].astype(int)
        assert np.abs(got - g8).max() <= 1, name
    Image.new("RGB", (96, 96), "white").save(tmp_path / "white.png")
    assert np.asarray(open_image(tmp_path / "white.png")).mean() == 255
    assert np.asarray(open_image(tmp_path / "g16.png")).mean() < 140  # the gradient, not white (255)


def test_labels_csv_contradictions_are_left_out_and_reported(tmp_path):
    """A file with two labels, paths leaving DATA (../ and absolute) and repeated rows: none of them is trained
    under a wrong or doubled label, and each is reported with its reason."""
    root = make_image_folder(tmp_path / "d", 6, kinds=("circle", "stripes"))
    outside = make_image_folder(tmp_path / "elsewhere", 1, kinds=("circle",))
    lines = ["path,label"]
    lines += [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    lines += ["circle/circle_000.png,stripes",  # a second, different label
              "stripes/stripes_001.png,stripes",  # the same row again
              f"../elsewhere/circle/{next((outside / 'circle').iterdir()).name},circle",
              f"{next((outside / 'circle').iterdir()).resolve()},circle"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = discover(root, labels_csv=str(tmp_path / "labels.csv"))
    rels = [s.rel for s in ds.samples]
    assert "circle/circle_000.png" not in rels  # two labels: left out
    assert rels.count("stripes/stripes_001.png") == 1
    assert all(not r.startswith(("..", "/")) for r in rels) and len(rels) == 11
    reasons = dict(ds.ignored) if isinstance(ds.ignored, list) else {}
    text = " ".join(f"{k}: {v}" for k, v in ds.ignored)
    assert "2 labels (circle, stripes)" in text and "kept once" in text and text.count("outside the data folder") == 2
    assert reasons  # every left-out row is listed


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_bombs_are_refused_and_leave_nothing(tmp_path, monkeypatch, kind):
    """An archive that unpacks to far more than it weighs is stopped while unpacking (declared sizes are not
    trusted), with a message that says what to do, and no half-unpacked folder stays in the cache."""
    import tarfile

    from classforge.core.cache import cache_dir
    from classforge.data.discover import resolve_root

    monkeypatch.setenv("CLASSFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLASSFORGE_MAX_UNPACK_GB", str(20 / 1024))  # 20 MB, so the test stays small
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(8 * 2**20))
    arc = tmp_path / f"bomb.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as z:
            for i in range(4):
                z.write(zeros, f"cls/{i}.bin")
    else:
        with tarfile.open(arc, "w:gz") as t:
            for i in range(4):
                t.add(zeros, f"cls/{i}.bin")
    assert arc.stat().st_size < 2**20  # 32 MB of zeros packed into well under 1 MB
    with pytest.raises(ClassforgeError, match="unpacks to more than .*CLASSFORGE_MAX_UNPACK_GB"):
        resolve_root(arc)
    left = list((cache_dir() / "archives").iterdir()) if (cache_dir() / "archives").exists() else []
    assert left == []
    monkeypatch.setenv("CLASSFORGE_MAX_UNPACK_GB", "1")  # raised: the same archive unpacks
    assert len(list(resolve_root(arc).rglob("*.bin"))) == 4


def test_odd_folders_are_named_not_silently_used_or_dropped(tmp_path):
    """An empty class folder, a class with one file (no test file possible) and a symlink to a file outside DATA
    are each said: in inspect's notes/warnings, and (the split's warnings) in every run's summary."""
    from classforge.data.inspect import inspect_data

    root = make_image_folder(tmp_path / "d", 12, kinds=("circle", "stripes"))
    (root / "empty_class").mkdir()
    (root / "lonely").mkdir()
    shutil.copy(root / "circle" / "circle_000.png", root / "lonely" / "only.png")
    outside = make_image_folder(tmp_path / "elsewhere", 1, kinds=("stripes",))
    (root / "stripes" / "linked.png").symlink_to(outside / "stripes" / "stripes_000.png")
    (root / "linked_class").symlink_to(outside / "stripes", target_is_directory=True)
    before = tree_checksums(root)
    js = inspect_data(str(root))["json"]
    notes, warnings = " ".join(js["notes"]), " ".join(js["warnings"])
    assert "empty_class" in notes and "not classes" in notes
    assert "symbolic links to files outside" in notes and "2 file(s)" in notes
    assert "'lonely' (1 file)" in warnings and "no test file" in warnings
    assert js["per_class"]["linked_class"]["files"] == 1  # a linked folder is followed, not skipped
    assert tree_checksums(root) == before


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (JPEG's DCT scaling only shows on real content)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([128 + 100 * np.sin(xx / (9 + 7 * c) + yy / (13 + c) + rng.uniform(0, 6)) for c in range(3)], -1)
    return Image.fromarray(np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8))


def test_images_decoded_by_the_check_serve_the_next_pass_exactly_once(tmp_path):
    """The check hands its decoded images to KeptImages; the preprocessor's load takes each once and gives the
    very pixels it would have decoded itself: a JPEG, an EXIF-rotated JPEG, a transparent PNG, a small image.
    A JPEG large enough to be decoded at a reduced DCT scale is decoded again instead."""
    from classforge.data.image import ImagePreprocessor
    from classforge.data.kept import KeptImages, held_bytes
    from classforge.models.registry import create_backbone

    spec = create_backbone("efficientnet_lite0", pretrained=False).spec  # short side 256 before the crop
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _photo((500, 375), 0).save(root / "a" / "plain.jpg", quality=90)
    rotated = _photo((480, 360), 1)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "a" / "rotated.jpg", exif=exif, quality=90)
    _photo((1200, 1100), 2).save(root / "b" / "large.jpg", quality=90)  # both sides >= 2 x 256
    rgba = _photo((300, 260), 3).convert("RGBA")
    rgba.putalpha(120)
    rgba.save(root / "b" / "alpha.png")
    _photo((100, 90), 4).save(root / "b" / "small.png")
    before = tree_checksums(root)

    ds = discover(root)
    kept = KeptImages()
    checked = validate(ds, keep=kept)
    assert len(checked.good) == 5 and len(kept) == 5 and kept.stats["kept"] == 5
    rot = checked.info[str(root / "a" / "rotated.jpg")]
    assert (rot.width, rot.height) == (360, 480)  # the size as shown, after the EXIF rotation

    fresh = ImagePreprocessor(spec)
    served = ImagePreprocessor(spec, kept=kept)
    for s in ds.samples:
        want = np.asarray(fresh.load(s.path))
        got = np.asarray(served.load(s.path))
        assert got.shape == want.shape and np.array_equal(got, want), s.rel
        assert kept.take(s.path) is None  # handed out once
    assert kept.stats["taken"] == 5 and kept.used == 0 and len(kept) == 0
    assert tree_checksums(root) == before

    from classforge.data.image import open_image

    small_budget = KeptImages(max_mb=1.0)  # room for some of the five, not all
    for s in ds.samples:
        small_budget.offer(s.path, open_image(s.path))
    assert 1 <= len(small_budget) < 5 and small_budget.used <= 2**20 and small_budget.stats["over_budget"] >= 1
    small_budget.clear()
    assert small_budget.used == 0 and small_budget.take(ds.samples[0].path) is None
    # what Pillow really holds: RGB in 4 bytes per pixel, greyscale in 1
    assert held_bytes(Image.new("RGB", (10, 20))) == 800 and held_bytes(Image.new("L", (10, 20))) == 200
