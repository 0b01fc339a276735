"""Decode every file once, read-only: report and skip bad files, hash content for duplicates and caching."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from classforge.core.cache import cache_dir
from classforge.core.errors import BadFile
from classforge.core.files import write_atomically
from classforge.core.progress import progress
from classforge.data.discover import Dataset, Sample
from classforge.data.image import decode_image, phash
from classforge.data.kept import KeptImages

_VERSION = 4  # bump when the record format or the checks change


@dataclass
class FileInfo:
    rel: str
    ok: bool
    reason: str = ""
    sha1: str = ""
    phash: int = 0  # images: 255-bit perceptual hash; audio: 0
    width: int = 0
    height: int = 0
    format: str = ""
    duration_s: float = 0.0
    sample_rate: int = 0
    channels: int = 0


@dataclass
class Validation:
    good: list[Sample]
    skipped: list[tuple[str, str]]  # (rel, reason)
    info: dict[str, FileInfo]  # by absolute path


def file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _check_image(s: Sample, min_size: int, max_pixels: int, keep: KeptImages | None = None) -> FileInfo:

    try:
        img, fmt = decode_image(s.path, max_pixels=max_pixels)
    except BadFile as e:
        return FileInfo(s.rel, False, str(e))
    except OSError as e:
        return FileInfo(s.rel, False, f"cannot read file: {e}")
    w, h = img.size
    if min(w, h) < min_size:
        return FileInfo(s.rel, False, f"too small ({w}x{h} < --min-size {min_size})", width=w, height=h)
    if keep is not None:
        keep.offer(s.path, img)
    return FileInfo(s.rel, True, sha1=file_sha1(s.path), phash=phash(img), width=w, height=h, format=fmt)


def _check_audio(s: Sample) -> FileInfo:
    from classforge.data.audio import inspect_audio  # the audio extra (soundfile, soxr)

    try:
        a = inspect_audio(s.path)
    except BadFile as e:
        return FileInfo(s.rel, False, str(e))
    except OSError as e:
        return FileInfo(s.rel, False, f"cannot read file: {e}")
    return FileInfo(s.rel, True, sha1=file_sha1(s.path), format=a.get("format", ""), duration_s=a["duration_s"],
                    sample_rate=a["sample_rate"], channels=a["channels"])


def validate(ds: Dataset, min_size: int = 8, max_pixels: int = 89_478_485, workers: int = 4,
             keep: KeptImages | None = None) -> Validation:
    """Check every sample. Results are cached by (path, size, mtime) so a re-run only decodes changed files.
    `keep` gets the images this check decoded, for the run's next pass over them."""
    key = hashlib.sha1(f"{ds.root}|{min_size}|{max_pixels}|{_VERSION}".encode()).hexdigest()[:16]
    cache_file = cache_dir() / "validate" / f"{key}.json"
    cache: dict = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}

    def stamp(p: str) -> str:
        st = os.stat(p)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def check(s: Sample) -> FileInfo:
        try:
            st = stamp(s.path)
        except OSError as e:
            return FileInfo(s.rel, False, f"cannot read file: {e}")
        hit = cache.get(s.path)
        if hit and hit[0] == st:
            return FileInfo(**hit[1])
        fi = _check_audio(s) if ds.task == "audio" else _check_image(s, min_size, max_pixels, keep)
        new[s.path] = [st, asdict(fi)]
        return fi

    new: dict = {}
    with ThreadPoolExecutor(max_workers=workers) as ex:
        infos = list(progress(ex.map(check, ds.samples), total=len(ds.samples), desc="Checking files"))
    if new:
        cache.update(new)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, json.dumps(cache).encode())  # processes of one run write it at once
    good, skipped, info = [], [], {}
    for s, fi in zip(ds.samples, infos):
        info[s.path] = fi
        if fi.ok:
            good.append(s)
        else:
            skipped.append((s.rel, fi.reason))
    skipped += ds.ignored
    return Validation(good, skipped, info)


def duplicate_groups(samples: list[Sample], info: dict[str, FileInfo], max_distance: int = 18) -> list[list[int]]:
    """Clusters (indices into samples) of exact (same bytes) and near duplicates (255-bit pHash within
    max_distance bits). Near pairs are found by pigeonhole: split the hash into max_distance + 1 chunks;
    two hashes within that distance agree exactly on at least one chunk, so only bucket-mates are compared."""
    parent = list(range(len(samples)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    by_sha: dict[str, int] = {}
    for i, s in enumerate(samples):
        sha = info[s.path].sha1
        if sha in by_sha:
            union(by_sha[sha], i)
        else:
            by_sha[sha] = i
    hashes = [info[s.path].phash for s in samples]
    if max_distance >= 0 and any(hashes):
        n_chunks = max_distance + 1
        width = -(-256 // n_chunks)
        mask = (1 << width) - 1
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, h in enumerate(hashes):
            if h == 0:
                continue
            for c in range(n_chunks):
                buckets.setdefault((c, (h >> (width * c)) & mask), []).append(i)
        for members in buckets.values():
            if len(members) < 2 or len(members) > 2000:  # huge buckets: flat images; exact matches still count
                continue
            for a_i, a in enumerate(members):
                for b in members[a_i + 1:]:
                    if find(a) != find(b) and bin(hashes[a] ^ hashes[b]).count("1") <= max_distance:
                        union(a, b)
    clusters: dict[int, list[int]] = {}
    for i in range(len(samples)):
        clusters.setdefault(find(i), []).append(i)
    return [c for c in clusters.values() if len(c) > 1]
