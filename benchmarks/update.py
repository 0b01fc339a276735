"""`classforge update` on real data: a run gets a new class; how long it takes and what happens to the old classes.

    python benchmarks/update.py ../shared/datasets/hymenoptera ../shared/datasets/pokemon_gen1_sprites \\
        --new-class pokemon --files 60 --repeats 3 [--busy] [--out benchmarks/results/DATE-update.md]

DATA must have train/ and val/ (or class) folders; the new class's files (drawn at random, seed 1, from the
second folder's files) go three quarters into train/<new-class> and the rest into val/<new-class> of a copy made
of symbolic links (the data stays untouched). The base run is trained once (`classforge train`, defaults); then
`classforge update BASE NEW_DATA --out ...` runs `--repeats` times as a separate process, timed from process start
to exit with the embedding cache warm (as the user's cache is after training). `--busy` runs one competing busy
loop meanwhile."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from classforge.data.discover import media_files


def grown_copy(data: Path, extra: Path, new_class: str, n: int, dest: Path, seed: int = 1) -> Path:
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        (dest / split.name).mkdir(parents=True)
        for cls in sorted(p for p in split.iterdir() if p.is_dir()):
            os.symlink(cls.resolve(), dest / split.name / cls.name)
    files = random.Random(seed).sample(sorted(media_files(extra, "image")), n)
    for i, f in enumerate(files):
        split = "train" if i < n * 3 // 4 else "val"
        (dest / split / new_class).mkdir(exist_ok=True)
        shutil.copy(f, dest / split / new_class / f"{i:03d}_{f.parent.name}_{f.name}")
    return dest


def cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "classforge.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("extra", type=Path, help="where the new class's files come from")
    ap.add_argument("--new-class", default="new")
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="one competing busy loop while timing")
    ap.add_argument("--draws", type=int, default=1,
                    help="also update with this many draws of the new class's files (seeds 1..N, one update each) "
                         "and report the old test files' accuracy for each")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grown = grown_copy(args.data, args.extra, args.new_class, args.files, tmp / "grown")
        train_s = cli("train", str(args.data), "--out", str(tmp / "base"))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
        try:
            walls = [cli("update", str(tmp / "base"), str(grown), "--out", str(tmp / f"up{i}"))
                     for i in range(args.repeats)]
        finally:
            if busy:
                busy.kill()
        s = json.loads((tmp / "up0" / "summary.json").read_text())
        draws = [accuracy_after_draw(args, tmp, seed) for seed in range(2, args.draws + 1)]
    u = s["update"]
    row = {"data": str(args.data), "new_class": args.new_class, "files_added": u["files_added"],
           "busy": args.busy, "base_train_s": round(train_s, 1), "update_wall_s": [round(w, 2) for w in walls],
           "update_wall_median_s": round(statistics.median(walls), 2),
           "old_test_accuracy_before": round(u["old_test_accuracy"], 4),
           "old_test_accuracy_after": u["old_test_files_accuracy_now"], "old_test_files": u["old_test_files"],
           "new_class_test_accuracy": u.get("new_classes_test_accuracy"),
           "new_class_test_files": u.get("new_classes_test_files"), "old_rows": u["old_rows"],
           "embeddings": {k: s["embeddings"][k] for k in ("cached", "computed")}}
    if draws:
        after = [row["old_test_accuracy_after"]] + [d["old_test_accuracy_after"] for d in draws]
        row["draws"] = [{"seed": 1, "old_test_accuracy_after": row["old_test_accuracy_after"],
                         "new_class_test_accuracy": row["new_class_test_accuracy"]}] + draws
        row["old_test_accuracy_after_mean"] = round(statistics.mean(after), 4)
    print(json.dumps(row, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"```json\n{json.dumps(row, indent=2)}\n```\n")


def accuracy_after_draw(args, tmp: Path, seed: int) -> dict:
    grown = grown_copy(args.data, args.extra, args.new_class, args.files, tmp / f"grown{seed}", seed)
    cli("update", str(tmp / "base"), str(grown), "--out", str(tmp / f"draw{seed}"))
    u = json.loads((tmp / f"draw{seed}" / "summary.json").read_text())["update"]
    return {"seed": seed, "old_test_accuracy_after": u["old_test_files_accuracy_now"],
            "new_class_test_accuracy": u.get("new_classes_test_accuracy")}


if __name__ == "__main__":
    main()
