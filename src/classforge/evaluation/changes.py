"""Report sections for how a run came about: what `classforge update` changed (the old classes' test files scored
by the old run and by the new one, a new class taking their files counting as a mistake; the new classes' own
accuracy; the files added), and the candidates `--strategy auto` tried (the leaderboard)."""

from __future__ import annotations

import html

import numpy as np

from classforge.evaluation import report as rp


def update_figures(update: dict, test_samples, y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """summary.json's `update`: the old run's figures beside the new run's on the same files."""
    pred = probs.argmax(1)
    old_files = set(update.get("old_test_files", ()))
    on_old = np.array([s.rel in old_files for s in test_samples], bool)
    new_class = np.isin(y, np.arange(len(update["old_classes"]), len(labels)))
    out = {k: v for k, v in update.items() if k not in ("old_test_files", "frozen_rows")}
    out["old_test_files"] = int(on_old.sum())
    if on_old.any():
        out["old_test_files_accuracy_now"] = round(float((pred[on_old] == y[on_old]).mean()), 4)
    if new_class.any():
        out["new_classes_test_accuracy"] = round(float((pred[new_class] == y[new_class]).mean()), 4)
        out["new_classes_test_files"] = int(new_class.sum())
    return out


def update_section(u: dict) -> str:
    """The report's "What changed" section."""
    def acc(v):
        return "—" if v is None else f"{v:.3f}"

    rows = [["updated from", html.escape(u["from"])],
            ["classes added", html.escape(", ".join(u["classes_added"])) or "none"],
            ["files added (train / val / test)", f'{u["files_added"]} ({u["files_added_per_split"]["train"]} / '
                                                 f'{u["files_added_per_split"]["val"]} / '
                                                 f'{u["files_added_per_split"]["test"]})'],
            [f'old run\'s test files ({u["old_test_files"]}): accuracy before → now',
             f'{acc(u.get("old_test_accuracy"))} → {acc(u.get("old_test_files_accuracy_now"))}']]
    if "new_classes_test_accuracy" in u:
        rows.append([f'new classes\' test files ({u["new_classes_test_files"]}): accuracy',
                     acc(u["new_classes_test_accuracy"])])
    how = ("The old classes' weights were refit too (new training files of old classes arrived)."
           if u.get("old_rows") == "refit" else "The old classes' weights were kept as they were; only the new "
           "classes' were fit.")
    return ('<h2>What changed</h2><p class="sub">The head was refit starting from the updated run\'s own; files '
            f'that run knew kept their split. {how}</p>' + rp._table(["", ""], rows, left=2))


def refit_sentence(r: dict | None) -> str:
    if not r:
        return ""
    if not r.get("done"):
        return f' The winner was not refit on the validation files: {html.escape(r.get("why", ""))}.'
    return (f' The winner was then refit on train + validation ({r["files"]} files, {r["seconds"]:.0f} s, included '
            'above): its validation figures below are not held out; the test split\'s are.')


def candidates_section(a: dict) -> str:
    """The report's leaderboard of --strategy auto: every candidate, the winner first in its own row order."""
    def acc(r):
        if r["val_accuracy"] is None:
            return "—"
        lo, hi = r["val_ci95"]
        return f'{r["val_accuracy"]:.3f} ({lo:.3f}–{hi:.3f})'

    rows = [[("★ " if r["winner"] else "") + html.escape(r["candidate"]), r["status"], acc(r), f'{r["seconds"]:.0f} s',
             html.escape(r["why"])] for r in a["candidates"]]
    return (f'<h2>Candidates (--strategy auto)</h2><p class="sub">Each candidate was scored on the validation split '
            f'only; the best ({html.escape(a["winner"])}) was kept and scored on the test split once. Time budget '
            f'{a["time_budget_s"]:.0f} s for the whole run; the candidates took {a["candidates_s"]:.0f} s.'
            f'{refit_sentence(a.get("refit"))}</p>'
            + rp._table(["candidate", "status", "validation accuracy (95% CI)", "time", "note"], rows, left=2))
