"""The "unknown" answer, measured: the threshold on the unknown score chosen on the validation split for a target
share of known files kept, how many test files it keeps, and with files of no class (`--unknown-dir`) how well it
separates them (AUROC, share wrongly accepted). Plus the plot and the report section that show it."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from classforge.evaluation import report as rp


def choose_threshold(val_scores: np.ndarray, recall: float) -> float:
    """The score below which `recall` of the validation files fall: above it an input is "unknown"."""
    return float(np.quantile(np.asarray(val_scores, np.float64), min(max(recall, 0.0), 1.0), method="higher"))


def open_set_summary(threshold: float, target_recall: float, val_scores: np.ndarray | None,
                     test_scores: np.ndarray, unknown_scores: np.ndarray | None = None,
                     unknown_dir: str | None = None) -> dict:
    """summary.json's open_set: the threshold, the known files kept (val, test), and against --unknown-dir files
    the AUROC of the score and the share of them accepted as a known class (false_accept)."""
    out = {"score": "mahalanobis", "threshold": round(threshold, 6), "target_recall": target_recall,
           "test_known_recall": round(float(np.mean(test_scores <= threshold)), 4)}
    if val_scores is not None and len(val_scores):
        out["val_known_recall"] = round(float(np.mean(val_scores <= threshold)), 4)
    if unknown_scores is not None and len(unknown_scores):
        from sklearn.metrics import roc_auc_score

        y = np.r_[np.zeros(len(test_scores)), np.ones(len(unknown_scores))]
        out.update(unknown_dir=unknown_dir, unknown_files=int(len(unknown_scores)),
                   auroc=round(float(roc_auc_score(y, np.r_[test_scores, unknown_scores])), 4),
                   false_accept=round(float(np.mean(unknown_scores <= threshold)), 4))
    return out


def plot_open_set(path: Path, test_scores: np.ndarray, threshold: float, unknown_scores: np.ndarray | None = None):
    """Histograms of the unknown score: the test files (known classes), the --unknown-dir files, the threshold."""
    plt = rp.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    pool = np.r_[test_scores, unknown_scores if unknown_scores is not None else []]
    bins = np.linspace(float(pool.min()), float(max(pool.max(), threshold)) * 1.02, 40)
    ax.hist(test_scores, bins=bins, alpha=0.65, label=f"test files, known classes ({len(test_scores)})")
    if unknown_scores is not None and len(unknown_scores):
        ax.hist(unknown_scores, bins=bins, alpha=0.65, label=f"files of no class ({len(unknown_scores)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}: above is 'unknown'")
    ax.set_xlabel("unknown score (distance to the nearest class)")
    ax.set_ylabel("files")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def open_set_section(run: Path, s: dict) -> str:
    """The report's "Unknown inputs" section."""
    rows = [["threshold", f'{s["threshold"]:.4g} (chosen on validation for {s["target_recall"]:.0%} of known '
                          f'files kept)'],
            ["known test files kept", f'{s["test_known_recall"]:.3f}']]
    if "auroc" in s:
        rows += [["files of no class", f'{s["unknown_files"]} from {html.escape(str(s["unknown_dir"]))}'],
                 ["AUROC (known test vs no class)", f'{s["auroc"]:.3f}'],
                 ["files of no class accepted as a class", f'{s["false_accept"]:.3f}']]
    how = ("Inputs whose features lie far from every class (Mahalanobis distance to the nearest class mean) are "
           "answered <b>unknown</b> by predict, the API and the web UI; <code>--no-unknown</code> or "
           "<code>unknown=false</code> turns that off.")
    return (f'<h2>Unknown inputs</h2><p class="sub">{how}</p>{rp._table(["", ""], rows, left=2)}'
            f'{rp._img_tag(run / "open_set.png", 600)}')
