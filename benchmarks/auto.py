"""`--strategy auto` under a whole-run budget: what it chose, what it scored, and whether it kept to the budget.

    python benchmarks/auto.py ../shared/datasets/fsdd --budget 10m --out benchmarks/results/DATE-auto.md
    python benchmarks/auto.py ../shared/datasets/fsdd --budget 10m --resplit --group-by '^[^/]+/\\d+/\\d+_([a-z]+)_' \\
        --each-test-group george,jackson,lucas,nicolas,theo,yweweler --out ...

Each run is `classforge train DATA --time-budget BUDGET` (defaults otherwise: --strategy auto) in its own process,
timed from process start to exit. With --each-test-group, one run per group held out as the test split
(`--test-groups G`), and their mean. Rows are appended to --out as JSON, then a table."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from classforge.core.config import parse_duration


def one(data: str, budget: str, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "classforge.cli", "train", data, "--time-budget", budget,
                           "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    with open(out / "candidates.csv") as f:
        cands = [{k: r[k] for k in ("candidate", "status", "val_accuracy", "seconds", "why")} | {"winner": r["winner"]}
                 for r in csv.DictReader(f)]
    limit = parse_duration(budget)
    return {"data": data, "options": " ".join(extra), "budget_s": limit, "wall_s": round(wall, 1),
            "wall_over_budget": round(wall / limit, 3), "winner": s["auto"]["winner"],
            "test_accuracy": round(s["test"]["accuracy"], 4), "test_ci95": [round(v, 4) for v in s["test"]["accuracy_ci95"]],
            "test_n": s["test"]["n"], "val_accuracy": round(s["val"]["accuracy"], 4), "candidates": cands,
            "refit": s["auto"].get("refit")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--group-by", help="regex with a named group 'group' (the --group-by of train)")
    ap.add_argument("--each-test-group", help="comma-separated groups, each held out in turn as the test split")
    ap.add_argument("--labels-csv")
    ap.add_argument("--resplit", action="store_true", help="ignore the folders' own train/test split")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    extra = (["--group-by", args.group_by] if args.group_by else []) + \
        (["--labels-csv", args.labels_csv] if args.labels_csv else []) + (["--resplit"] if args.resplit else [])
    groups = args.each_test_group.split(",") if args.each_test_group else [None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for g in groups:
            more = ["--test-groups", g] if g else []
            rows.append(one(args.data, args.budget, Path(tmp) / (g or "run"), extra + more))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(f"```json\n{json.dumps(rows[-1], indent=2)}\n```\n")
    lines = ["| run | winner | test accuracy (95% CI) | wall / budget |", "|---|---|---:|---:|"]
    lines += [f"| {r['options'] or Path(r['data']).name} | {r['winner']} | {r['test_accuracy']:.3f} "
              f"({r['test_ci95'][0]:.3f}-{r['test_ci95'][1]:.3f}, n={r['test_n']}) | "
              f"{r['wall_s']:.0f} s / {r['budget_s']:.0f} s ({r['wall_over_budget']:.2f}) |" for r in rows]
    if len(rows) > 1:
        lines.append(f"| mean | | {statistics.mean(r['test_accuracy'] for r in rows):.3f} | "
                     f"max {max(r['wall_over_budget'] for r in rows):.2f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
