"""How well `classforge audit` finds labels flipped on purpose.

    python benchmarks/audit.py DATA [DATA ...] --noise 0.05,0.10,0.20 [--out benchmarks/results/DATE-audit.md]

For each folder and noise level, a reproducible share of files gets another class's label through a labels CSV
(the folder itself is untouched); the audit runs on it, and the flipped files are looked for among the suspect
labels of audit.csv: recall in the top 2 x (number flipped) rows, precision in the top (number flipped) rows."""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import classforge
from classforge.data.discover import discover
from classforge.training.audit import flip_labels


def one(data: str, noise: float, work: Path) -> dict:
    ds = discover(data)
    flipped = flip_labels(ds.samples, noise, seed=1)
    labels = work / f"labels-{noise}.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for s in ds.samples:
            w.writerow([s.rel, flipped.get(s.rel, s.label)])
    t = time.time()
    s = classforge.audit(data, work / f"audit-{noise}", labels_csv=str(labels))
    took = time.time() - t
    with open(work / f"audit-{noise}" / "audit.csv") as f:
        suspects = [r["path"] for r in csv.DictReader(f) if r["reason"].startswith("label issue")]
    n = len(flipped)
    recall = sum(p in flipped for p in suspects[: 2 * n]) / n
    precision = sum(p in flipped for p in suspects[:n]) / n
    return {"data": data, "files": s["files"], "classes": s["classes"], "noise": noise, "flipped": n,
            "recall_at_2n": round(recall, 3), "precision_at_n": round(precision, 3),
            "out_of_fold_accuracy": round(s["out_of_fold_accuracy"], 3), "seconds": round(took, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--noise", default="0.05,0.10,0.20")
    ap.add_argument("--out", type=Path, help="write a Markdown table here too")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for noise in (float(x) for x in args.noise.split(",")):
                rows.append(one(data, noise, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        lines = ["| data | files | classes | noise | flipped | recall in top 2N | precision in top N | "
                 "out-of-fold accuracy | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {Path(r['data']).name} | {r['files']} | {r['classes']} | {r['noise']:.0%} | {r['flipped']} | "
                  f"{r['recall_at_2n']:.3f} | {r['precision_at_n']:.3f} | {r['out_of_fold_accuracy']:.3f} | "
                  f"{r['seconds']} |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
