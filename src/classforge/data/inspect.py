"""`classforge inspect`: what a data folder holds, what is wrong with it, and how it would be split."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from rich.table import Table

from classforge.core.config import parse_fractions
from classforge.data.discover import discover
from classforge.data.split import make_split
from classforge.data.validate import duplicate_groups, validate


def _rng(vals: list[float], fmt: str = "{:.0f}") -> str:
    if not vals:
        return "-"
    a = np.asarray(vals)
    return f"{fmt.format(a.min())} / {fmt.format(np.median(a))} / {fmt.format(a.max())}"


def inspect_data(data: str, labels_csv=None, label_from_name=None, bins=None, classes=None, max_classes=None,
                 group_by=None, min_size: int = 8, split: str = "0.7,0.2,0.1", seed: int = 0) -> dict:
    ds = discover(data, labels_csv, label_from_name, bins, classes, max_classes, group_by)
    checked = validate(ds, min_size)
    clusters = duplicate_groups(checked.good, checked.info)
    given = Counter(s.split for s in checked.good if s.split)
    rep = make_split(checked.good, checked.info, parse_fractions(split), seed)
    per: dict[str, dict] = defaultdict(lambda: {"n": 0, "splits": Counter(), "w": [], "h": [], "dur": [], "sr": Counter(),
                                                "ch": Counter(), "fmt": Counter(), "skipped": 0})
    for s in ds.samples:
        fi = checked.info.get(s.path)
        c = per[s.label]
        c["n"] += 1
        if fi is None or not fi.ok:
            c["skipped"] += 1
            continue
        c["splits"][s.split or "excluded"] += 1
        c["fmt"][fi.format] += 1
        if ds.task == "image":
            c["w"].append(fi.width)
            c["h"].append(fi.height)
        else:
            c["dur"].append(fi.duration_s)
            c["sr"][fi.sample_rate] += 1
            c["ch"][fi.channels] += 1
    labels = ds.classes
    js = {"root": ds.root, "task": ds.task, "layout": ds.layout, "classes": len(labels), "files": len(ds.samples),
          "usable": len(checked.good), "skipped": [{"file": r, "reason": why} for r, why in checked.skipped],
          "duplicate_clusters": len(clusters), "split": {"method": rep.method, "counts": rep.counts},
          "excluded_cross_split_duplicates": [{"file": r, "reason": why} for r, why in rep.excluded],
          "official_split": dict(given), "notes": ds.notes + rep.notes, "warnings": list(rep.warnings),
          "per_class": {lab: {"files": per[lab]["n"], "skipped": per[lab]["skipped"], "splits": dict(per[lab]["splits"])}
                        for lab in labels}}

    def show(console):
        t = Table(title=f"{ds.root}  ({ds.task}, layout: {ds.layout})")
        cols = ["class", "files", "train/val/test"]
        cols += ["width min/med/max", "height min/med/max", "formats"] if ds.task == "image" else \
            ["duration s min/med/max", "sample rates", "channels", "formats"]
        cols.append("skipped")
        for c in cols:
            t.add_column(c, justify="left" if c in ("class", "formats") else "right")
        for lab in labels:
            c = per[lab]
            sp = "/".join(str(c["splits"].get(k, 0)) for k in ("train", "val", "test"))
            fmts = ", ".join(f"{k}" for k in c["fmt"])
            if ds.task == "image":
                row = [lab, str(c["n"]), sp, _rng(c["w"]), _rng(c["h"]), fmts]
            else:
                row = [lab, str(c["n"]), sp, _rng(c["dur"], "{:.2f}"), ", ".join(map(str, c["sr"])),
                       ", ".join(map(str, c["ch"])), fmts]
            row.append(f"[red]{c['skipped']}[/]" if c["skipped"] else "0")
            t.add_row(*row)
        console.print(t)
        console.print(f"{len(labels)} classes, {len(ds.samples)} files, {len(checked.good)} usable. "
                      f"Split: {rep.method} -> train {rep.counts['train']}, val {rep.counts['val']}, test {rep.counts['test']}.")
        console.print(f"Duplicate clusters (exact or near, perceptual-hash distance <= 18 of 255 bits): {len(clusters)}; "
                      f"copies that would straddle splits and are dropped from evaluation: {len(rep.excluded)}")
        for n in js["notes"]:
            console.print(f"[yellow]note:[/] {n}")
        for w in js["warnings"]:
            console.print(f"[bold yellow]warning:[/] {w}")
        if checked.skipped:
            st = Table(title=f"Problems: {len(checked.skipped)} files skipped")
            st.add_column("file")
            st.add_column("reason")
            for r, why in checked.skipped[:200]:
                st.add_row(r, why)
            console.print(st)
        elif not js["warnings"]:
            console.print("[green]No problems found.[/]")

    return {"json": js, "print": show}
