"""Find the labelled files in DATA (a folder or an archive). Never writes into DATA."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from classforge.core.cache import cache_dir
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3"}
OTHER_AUDIO_EXT = {".m4a", ".aac", ".wma", ".amr", ".mp4", ".webm", ".aif", ".aiff", ".ape"}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Sample:
    path: str  # absolute path of the file
    rel: str  # path relative to the data root (what split.csv stores)
    label: str
    group: str = ""
    split: str = ""  # "", "train", "val", "test"


@dataclass
class Dataset:
    root: str
    task: str  # image | audio
    samples: list[Sample]
    layout: str  # folders | official-splits | csv | filename-regex
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason): not a data file
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for s in self.samples}, key=_natural_key)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def resolve_root(data: str | os.PathLike) -> Path:
    """A folder is used in place (read-only); a .zip / .tar(.gz) is extracted once into the cache."""
    p = Path(data).expanduser()
    if not p.exists():
        raise ClassforgeError(f"Data not found: {p}")
    if p.is_dir():
        return p.resolve()
    name = p.name.lower()
    if not (name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))):
        raise ClassforgeError(f"{p} is neither a folder nor a .zip/.tar.gz archive")
    h = hashlib.sha1()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    dest = cache_dir() / "archives" / h.hexdigest()[:16]
    if not (dest / ".complete").exists():
        tmp = dest.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _extract(p, tmp, unpack_limit(p.stat().st_size))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a refused or broken archive leaves nothing behind
            raise
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        (dest / ".complete").touch()
    # An archive holding one top folder: use that folder as the root.
    entries = [e for e in dest.iterdir() if e.name not in (".complete", "__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


MAX_UNPACK_RATIO = 100  # unpacked bytes per archive byte; photos and sound hardly compress, bombs do
MAX_UNPACK_BYTES = 64 * 2**30
MAX_MEMBERS = 2_000_000


def unpack_limit(archive_bytes: int) -> tuple[int, int]:
    """(bytes, members) an archive may unpack to. CLASSFORGE_MAX_UNPACK_GB and CLASSFORGE_MAX_MEMBERS raise them."""
    gb = os.environ.get("CLASSFORGE_MAX_UNPACK_GB")
    limit = int(float(gb) * 2**30) if gb else min(MAX_UNPACK_BYTES, max(2**30, MAX_UNPACK_RATIO * archive_bytes))
    return limit, int(os.environ.get("CLASSFORGE_MAX_MEMBERS", MAX_MEMBERS))


def _extract(archive: Path, dest: Path, limit: tuple[int, int]) -> None:
    """Unpack file by file, counting what is written: sizes declared in an archive can lie."""
    max_bytes, max_members = limit
    dest_r = dest.resolve()
    written = 0

    def safe(member: str) -> Path:
        target = (dest / member).resolve()
        if not str(target).startswith(str(dest_r) + os.sep) and target != dest_r:
            raise ClassforgeError(f"{archive}: refusing to extract {member!r} outside the target folder")
        return target

    def copy(src, target: Path) -> None:
        nonlocal written
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise ClassforgeError(
                        f"{archive} unpacks to more than {max_bytes / 2**30:.1f} GB (a possible archive bomb); "
                        "unpack it yourself and give the folder, or raise the limit with CLASSFORGE_MAX_UNPACK_GB")
                out.write(chunk)

    def count(n: int) -> None:
        if n > max_members:
            raise ClassforgeError(f"{archive} holds {n:,} entries, more than {max_members:,}; unpack it yourself "
                                  "and give the folder, or raise the limit with CLASSFORGE_MAX_MEMBERS")

    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                count(len(infos))
                for info in infos:
                    target = safe(info.filename)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        with z.open(info) as src:
                            copy(src, target)
        else:
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if m.isfile() or m.isdir()]
                count(len(members))
                for m in members:
                    target = safe(m.name)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        copy(t.extractfile(m), target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ClassforgeError(f"Cannot read archive {archive}: {e}") from None


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    if ext in IMAGE_EXT:
        return "image"
    if ext in AUDIO_EXT:
        return "audio"
    if ext in OTHER_AUDIO_EXT:
        return "other-audio"
    return None


def _files(root: Path) -> list[Path]:
    """Every non-hidden file under root, in a stable order. Symlinked folders are followed (once each: a link
    back up the tree does not loop)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith("."):
                out.append(Path(dirpath) / fn)
    return out


def media_files(folder: str | os.PathLike, task: str) -> list[Path]:
    """The image (or audio) files anywhere under a folder, labels aside (e.g. files of no known class)."""
    root = Path(folder)
    if not root.is_dir():
        raise ClassforgeError(f"{folder} is not a folder")
    return [f for f in _files(root) if _kind(f) == task]


def links_outside(root: Path, files: list[Path]) -> list[str]:
    """Files (relative to root) that are, or sit in folders that are, symbolic links to places outside root."""
    top = str(root.resolve())
    return [str(f.relative_to(root)) for f in files
            if not os.path.realpath(f).startswith(top + os.sep) and os.path.realpath(f) != top]


def empty_class_folders(root: Path, samples: list[Sample]) -> list[str]:
    """Top-level folders of a one-folder-per-class layout that yielded no file of the dataset's kind."""
    used = {s.rel.split("/", 1)[0] for s in samples}
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in used)


def _say_what_is_odd(root: Path, ds: Dataset) -> None:
    """Notes on what a user would not guess: class folders that are empty (not classes), and files reached
    through links that point outside the data folder (used, and read only)."""
    if ds.layout == "folders":
        empty = empty_class_folders(root, ds.samples)
        if empty:
            ds.notes.append(f"{len(empty)} folder(s) hold no usable file and are not classes: "
                            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    outside = links_outside(root, [Path(s.path) for s in ds.samples])
    if outside:
        ds.notes.append(f"{len(outside)} file(s) are symbolic links to files outside {root} (used, read only), "
                        f"e.g. {outside[0]}")


def discover_for(cfg) -> Dataset:
    """The data a TrainConfig names, as its run sees it (with --resplit, no split of the folders' own)."""
    ds = discover(cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, cfg.classes, cfg.max_classes, cfg.group_by)
    if cfg.resplit:
        for s in ds.samples:
            s.split = ""
        ds.notes = [n for n in ds.notes if "val/" not in n and "test/" not in n]
        ds.notes.append("--resplit: the folders' own train/val/test split was ignored")
    return ds


def discover(data: str | os.PathLike, labels_csv: str | None = None, label_from_name: str | None = None,
             bins: str | None = None, classes: str | None = None, max_classes: int | None = None,
             group_by: str | None = None) -> Dataset:
    root = resolve_root(data) if data else Path(labels_csv).resolve().parent
    if labels_csv:
        ds = _from_csv(root, Path(labels_csv))
    elif label_from_name:
        ds = _from_regex(root, label_from_name)
    else:
        ds = _from_folders(root)
    if bins:
        _apply_bins(ds, bins)
    if group_by:
        try:
            rx = re.compile(group_by)
        except re.error as e:
            raise ClassforgeError(f"--group-by {group_by!r} is not a valid regex: {e}") from None
        for s in ds.samples:
            m = rx.search(s.rel)
            s.group = (m.group(1) if m.groups() else m.group(0)) if m else ""
        missing = sum(1 for s in ds.samples if not s.group)
        if missing:
            ds.notes.append(f"--group-by matched no group in {missing} paths; each of those is its own group")
    _select_classes(ds, classes, max_classes)
    if ds.samples and data:
        _say_what_is_odd(root, ds)
    if not ds.samples:
        raise ClassforgeError(f"No labelled image or audio files found in {root}. Expected one folder per class, "
                              "train/val/test folders, --labels-csv or --label-from-name.")
    return ds


def _detect_task(root: Path, files: list[Path], ignored: list) -> tuple[str, list[Path]]:
    kinds = {"image": [], "audio": [], "other-audio": []}
    for f in files:
        k = _kind(f)
        if k:
            kinds[k].append(f)
        else:
            ignored.append((str(f.relative_to(root)), f"not an image or audio file ({f.suffix or 'no extension'})"))
    if not kinds["image"] and not kinds["audio"] and kinds["other-audio"]:
        exts = sorted({f.suffix.lower() for f in kinds["other-audio"]})
        raise ClassforgeError(f"Audio format {', '.join(exts)} is not supported; supported formats: "
                              "wav, flac, ogg (Vorbis/Opus), mp3. Convert the files, e.g. with ffmpeg.")
    task = "audio" if len(kinds["audio"]) > len(kinds["image"]) else "image"
    for f in kinds["other-audio"]:
        ignored.append((str(f.relative_to(root)), f"unsupported audio format {f.suffix}; use wav, flac, ogg or mp3"))
    other = "image" if task == "audio" else "audio"
    for f in kinds[other]:
        ignored.append((str(f.relative_to(root)), f"{other} file in a {task} dataset"))
    return task, kinds[task]


def _from_folders(root: Path) -> Dataset:
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    splits = {SPLIT_ALIASES[n]: d for n, d in subdirs.items() if n in SPLIT_ALIASES}
    ignored: list = []
    notes: list[str] = []
    if "train" in splits and len(splits) >= 2:
        layout = "official-splits"
        samples, all_files = [], []
        for split, d in splits.items():
            for f in _files(d):
                all_files.append((split, f))
        task, keep = _detect_task(root, [f for _, f in all_files], ignored)
        keep_set = set(keep)
        for split, f in all_files:
            if f not in keep_set:
                continue
            rel_in_split = f.relative_to(splits[split])
            if len(rel_in_split.parts) < 2:
                ignored.append((str(f.relative_to(root)), "file directly in a split folder (no class folder)"))
                continue
            samples.append(Sample(str(f), str(f.relative_to(root)), rel_in_split.parts[0], split=split))
        if "test" not in splits:
            for s in samples:
                if s.split == "val":
                    s.split = "test"
            notes.append("No test/ folder: the official val/ split is evaluated as the test set; early stopping "
                         "uses a stratified slice of train/")
        elif "val" not in splits:
            notes.append("No val/ folder: early stopping uses a stratified slice of train/")
        # Without an official val/, split.py carves a stratified slice of train/ for early stopping.
        return Dataset(str(root), task, samples, layout, ignored, notes)
    files = _files(root)
    task, keep = _detect_task(root, files, ignored)
    samples = []
    for f in keep:
        rel = f.relative_to(root)
        if len(rel.parts) < 2:
            ignored.append((str(rel), "file at the top level (no class folder)"))
            continue
        samples.append(Sample(str(f), str(rel), rel.parts[0]))
    return Dataset(str(root), task, samples, "folders", ignored, notes)


def _from_regex(root: Path, pattern: str) -> Dataset:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ClassforgeError(f"--label-from-name {pattern!r} is not a valid regex: {e}") from None
    if "label" not in rx.groupindex:
        raise ClassforgeError("--label-from-name needs a named group, e.g. '^(?P<label>\\d+)_'")
    ignored: list = []
    task, keep = _detect_task(root, _files(root), ignored)
    samples = []
    for f in keep:
        m = rx.search(f.name)
        if not m:
            ignored.append((str(f.relative_to(root)), "file name does not match --label-from-name"))
            continue
        samples.append(Sample(str(f), str(f.relative_to(root)), m.group("label")))
    return Dataset(str(root), task, samples, "filename-regex", ignored, [])


def _from_csv(root: Path, csv_path: Path) -> Dataset:
    if not csv_path.is_file():
        raise ClassforgeError(f"Labels CSV not found: {csv_path}")
    with open_csv(csv_path) as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise ClassforgeError(f"{csv_path}: needs columns path,label[,group][,split]; found {cols}")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    ignored: list = []
    rows = _consistent_rows(root, rows, ignored)
    files = [(root / r["path"]) for r in rows]
    task, keep = _detect_task(root, [f for f in files if f.exists()], ignored)
    keep_set = set(keep)
    samples = []
    for r, f in zip(rows, files):
        if not f.exists():
            ignored.append((r["path"], "listed in the CSV but missing"))
            continue
        if f not in keep_set or not r["label"]:
            if not r["label"]:
                ignored.append((r["path"], "empty label in the CSV"))
            continue
        split = r.get("split", "").lower()
        if split and split not in SPLIT_ALIASES:
            raise ClassforgeError(f"{csv_path}: split {split!r} for {r['path']}; use train, val or test")
        samples.append(Sample(str(f.resolve()), r["path"], r["label"], r.get("group", ""),
                              SPLIT_ALIASES.get(split, "")))
    return Dataset(str(root), task, samples, "csv", ignored, [])


def _consistent_rows(root: Path, rows: list[dict], ignored: list) -> list[dict]:
    """The CSV rows that name one file each, inside DATA, with one label. A path that leaves DATA (`../`, an
    absolute path) is refused; a file listed twice with one label is kept once; a file listed with two labels is
    left out (which is right cannot be known). Each left-out row is reported with its reason."""
    top = root.resolve()
    by_file: dict[Path, list[dict]] = {}
    for r in rows:
        f = (root / r["path"]).resolve()
        if f != top and top not in f.parents:
            ignored.append((r["path"], "outside the data folder (paths in the CSV must stay inside DATA)"))
            continue
        by_file.setdefault(f, []).append(r)
    kept = []
    for listed in by_file.values():
        labels = sorted({r["label"] for r in listed})
        if len(labels) > 1:
            ignored += [(r["path"], f"listed with {len(labels)} labels ({', '.join(labels)}): left out") for r in listed]
            continue
        kept.append(listed[0])
        ignored += [(r["path"], "listed again in the CSV: kept once") for r in listed[1:]]
    return kept


def _apply_bins(ds: Dataset, bins: str) -> None:
    try:
        edges = sorted(float(x) for x in bins.split(",") if x.strip())
    except ValueError:
        raise ClassforgeError(f"--bins expects numbers like 0,3,10,20; got {bins!r}") from None

    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    kept = []
    for s in ds.samples:
        try:
            v = float(s.label)
        except ValueError:
            raise ClassforgeError(f"--bins needs numeric labels; {s.rel} has label {s.label!r}") from None
        if v < edges[0]:
            ds.ignored.append((s.rel, f"label {s.label} below the first bin edge {fmt(edges[0])}"))
            continue
        i = sum(1 for e in edges if v >= e) - 1
        s.label = f"{fmt(edges[i])}-{fmt(edges[i + 1])}" if i + 1 < len(edges) else f"{fmt(edges[i])}+"
        kept.append(s)
    ds.samples = kept


def _select_classes(ds: Dataset, classes: str | None, max_classes: int | None) -> None:
    if classes:
        wanted = [c.strip() for c in classes.split(",") if c.strip()]
        known = set(ds.classes)
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ClassforgeError(f"--classes: unknown {unknown}; available: {', '.join(ds.classes[:30])}")
        ds.samples = [s for s in ds.samples if s.label in set(wanted)]
    if max_classes:
        keep = set(ds.classes[:max_classes])
        ds.samples = [s for s in ds.samples if s.label in keep]
