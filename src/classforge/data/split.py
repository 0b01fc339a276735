"""Split before anything else: stratified, group-aware, duplicates kept out of different splits, seeded."""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.discover import Sample
from classforge.data.validate import FileInfo, duplicate_groups

SPLITS = ("train", "val", "test")


@dataclass
class SplitReport:
    counts: dict[str, int]
    method: str
    duplicate_clusters: int = 0
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # class shares of the test split far from the data's


def _greedy(groups: list[tuple[str, list[Sample]]], fracs: tuple[float, float, float]) -> dict[str, str]:
    """Assign whole groups to the split with the largest remaining deficit against its target size."""
    n = sum(len(m) for _, m in groups)
    targets = [f * n for f in fracs]
    counts = [0.0, 0.0, 0.0]
    out = {}
    for g, members in groups:
        k = max(range(3), key=lambda i: (targets[i] - counts[i], -i))
        out[g] = SPLITS[k]
        counts[k] += len(members)
    return out


def _stratified_groups(groups: list[tuple[str, list[Sample]]], fracs: tuple[float, float, float]) -> dict[str, str]:
    """Whole groups to splits so that each split holds each class in about its share (the idea of scikit-learn's
    StratifiedGroupKFold, for three splits of unequal size): large groups first, each to the split where it
    lowers the squared distance of the per-class counts from their targets the most (relative to the class's
    size, so that small classes count as much as large ones). Groups holding one class and single ungrouped files
    fill in what the large groups left."""
    labels = sorted({s.label for _, m in groups for s in m})
    col = {c: i for i, c in enumerate(labels)}
    total = [0] * len(labels)
    vectors = []
    for g, m in groups:
        v = [0] * len(labels)
        for s in m:
            v[col[s.label]] += 1
            total[col[s.label]] += 1
        vectors.append((g, v))
    order = sorted(range(len(vectors)), key=lambda i: -sum(vectors[i][1]))  # stable: the seeded shuffle breaks ties
    sizes = [f * sum(total) for f in fracs]
    for _ in range(3):
        # Large groups can make a split bigger than its fraction; the classes' targets then follow the split's
        # real size, so that each class keeps its share of every split (a second pass is usually enough).
        targets = [[size * n / sum(total) for n in total] for size in sizes]
        out, counts = _place(vectors, order, targets, fracs)
        new_sizes = [float(sum(row)) for row in counts]
        if new_sizes == sizes:
            break
        sizes = new_sizes
    return out


def _place(vectors, order, targets, fracs) -> tuple[dict[str, str], list[list[int]]]:
    n_classes = len(targets[0])
    total = [max(1e-9, sum(t[c] for t in targets)) for c in range(n_classes)]
    counts = [[0] * n_classes for _ in fracs]
    out = {}
    for i in order:
        g, v = vectors[i]

        k = min((k for k in range(3) if fracs[k] > 0), key=lambda k, v=v: (_growth(counts[k], targets[k], v, total), k))
        out[g] = SPLITS[k]
        for c in range(n_classes):
            counts[k][c] += v[c]
    return out, counts


def _growth(counts: list[int], targets: list[float], v: list[int], total: list[float]) -> float:
    """How much adding a group's per-class counts `v` moves a split's counts away from its targets (squared,
    relative to each class's size); negative when it fills a deficit."""
    return sum(((counts[c] + v[c] - targets[c]) ** 2 - (counts[c] - targets[c]) ** 2) / total[c]
               for c in range(len(v)) if v[c])


def class_share_warnings(samples: list[Sample], split: str = "test", max_points: float = 5.0) -> list[str]:
    """Classes missing from `split` (too few files to reach it), and classes whose share of `split` differs from
    their share of all the data by more than `max_points` percentage points: the split's accuracy then weighs
    that class more (or less) than the data does."""
    kept = [s for s in samples if s.split]
    part = [s for s in kept if s.split == split]
    if not part:
        return []
    everywhere, there = Counter(s.label for s in kept), Counter(s.label for s in part)
    out = []
    absent = sorted(lab for lab in everywhere if not there.get(lab))
    if absent:
        few = ", ".join(f"{lab!r} ({everywhere[lab]} file{'s' if everywhere[lab] > 1 else ''})" for lab in absent[:8])
        out.append(f"{len(absent)} class(es) have no {split} file, so their accuracy is not measured: {few}"
                   f"{' ...' if len(absent) > 8 else ''}; add files to them")
    for label in sorted(set(everywhere) - set(absent)):
        data_share, split_share = everywhere[label] / len(kept), there.get(label, 0) / len(part)
        if abs(split_share - data_share) * 100 > max_points:
            out.append(f"class {label!r} is {split_share:.1%} of the {split} split but {data_share:.1%} of the data: "
                       f"{split} accuracy weighs it {'more' if split_share > data_share else 'less'} than the data "
                       "does (per-class figures in the report are not affected)")
    return out


def _assign(samples: list[Sample], fracs: tuple[float, float, float], seed: int) -> str:
    """Give every sample with an empty split one, by group, stratified by label where groups are pure."""
    todo = [s for s in samples if not s.split]
    if not todo:
        return "given"
    rng = random.Random(seed)
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in todo:
        by_group[s.group].append(s)
    groups = list(by_group.items())
    rng.shuffle(groups)
    pure = all(len({s.label for s in m}) == 1 for _, m in groups)
    if pure:
        by_label: dict[str, list] = defaultdict(list)
        for g, m in groups:
            by_label[m[0].label].append((g, m))
        assignment = {}
        for label in sorted(by_label):
            assignment.update(_greedy(by_label[label], fracs))
        method = "stratified"
    else:
        assignment = _stratified_groups(groups, fracs)
        method = "stratified by class, whole groups"
    for g, m in groups:
        for s in m:
            s.split = assignment[g]
    return method


def make_split(samples: list[Sample], info: dict[str, FileInfo], fracs=(0.7, 0.2, 0.1), seed: int = 0,
               test_groups: str | None = None, near_dup_distance: int = 18) -> SplitReport:
    """Sets `split` on every sample in place and returns what was done. Samples may arrive with splits
    (official folders, a CSV split column); those are kept."""
    notes = []
    clusters = duplicate_groups(samples, info, near_dup_distance)
    has_groups = any(s.group for s in samples)
    if not has_groups:
        # No user groups: each file is its own group, and duplicates share one, so they land together.
        for i, s in enumerate(samples):
            s.group = f"#{i}"
        for c in clusters:
            for i in c[1:]:
                samples[i].group = samples[c[0]].group
    else:
        for i, s in enumerate(samples):
            s.group = s.group or f"#{i}"
    if test_groups:
        wanted = {g.strip() for g in test_groups.split(",") if g.strip()}
        found = {s.group for s in samples} & wanted
        if not found:
            raise ClassforgeError(f"--test-groups {test_groups!r}: no sample has such a group")
        for s in samples:
            if not s.split and s.group in wanted:
                s.split = "test"
        fracs = (fracs[0] / (fracs[0] + fracs[1]), fracs[1] / (fracs[0] + fracs[1]), 0.0)
        notes.append(f"groups {sorted(found)} held out as the test set")
    given = Counter(s.split for s in samples if s.split)
    if given and not any(not s.split for s in samples) and "val" not in given:
        # Official train (+test) without val: carve a stratified slice of train for early stopping.
        t, v = fracs[0], fracs[1] or 0.2
        for s in samples:
            if s.split == "train":
                s.split = ""
        method = "official splits; val carved from train (" + _assign(samples, (t / (t + v), v / (t + v), 0.0), seed) + ")"
    elif given and any(not s.split for s in samples):
        # Splits named explicitly for some files (a CSV split column, --test-groups) are not topped up with
        # other files: the rest is divided among the remaining splits only.
        f = [0.0 if SPLITS[i] in given else fracs[i] for i in range(3)]
        if sum(f) <= 0:
            f = [1.0, 0.0, 0.0]
        method = "partly given; rest " + _assign(samples, tuple(x / sum(f) for x in f), seed)
    else:
        method = _assign(samples, fracs, seed) if not given else "given"
    excluded = _resolve_duplicates(samples, clusters)
    kept = [s for s in samples if s.split]
    counts = Counter(s.split for s in kept)
    missing = [sp for sp in ("train", "test") if not counts.get(sp)]
    if missing:
        raise ClassforgeError(f"The split left no {' and no '.join(missing)} samples; check --split / the data")
    if not counts.get("val"):
        notes.append("No validation samples: early stopping watches the training loss")
    return SplitReport({sp: counts.get(sp, 0) for sp in SPLITS}, method, len(clusters), excluded, notes,
                       class_share_warnings(samples))


def _resolve_duplicates(samples: list[Sample], clusters: list[list[int]]) -> list[tuple[str, str]]:
    """A duplicate must not straddle splits: keep the copy in the earliest split (train < val < test),
    drop the later copies from evaluation, and say so."""
    order = {sp: i for i, sp in enumerate(SPLITS)}
    excluded = []
    for c in clusters:
        splits = {samples[i].split for i in c}
        if len(splits) < 2:
            continue
        first = min(splits, key=lambda sp: order[sp])
        anchor = next(samples[i] for i in c if samples[i].split == first)
        for i in c:
            s = samples[i]
            if s.split != first:
                excluded.append((s.rel, f"duplicate of {anchor.rel} ({first}); dropped from {s.split}"))
                s.split = ""
    return excluded


def write_split(path: str | Path, samples: list[Sample]) -> None:
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        for s in samples:
            if s.split:
                w.writerow([s.rel, s.label, s.split, s.group])


def read_split(path: str | Path, samples: list[Sample]) -> SplitReport:
    """Re-use a split.csv (from an earlier run or by hand). Files not in it are left out, and reported."""
    p = Path(path)
    if not p.is_file():
        raise ClassforgeError(f"Split file not found: {p}")
    with open_csv(p) as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    if not rows or "split" not in next(iter(rows.values())):
        raise ClassforgeError(f"{p}: expected columns path,label,split[,group]")
    excluded = []
    for s in samples:
        r = rows.get(s.rel)
        if r is None:
            s.split = ""
            excluded.append((s.rel, f"not in {p.name}"))
        else:
            s.split, s.group = r["split"], r.get("group", "") or s.group
    counts = Counter(s.split for s in samples if s.split)
    return SplitReport({sp: counts.get(sp, 0) for sp in SPLITS}, f"from {p.name}", 0, excluded)
