"""Everything a person looks at after a run: CSVs, plots and one self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np

from classforge.core.files import open_csv, write_text_for_browser
from classforge.data.image import open_image


def write_predictions(path: Path, rels: list[str], labels: list[str], y_true, probs: np.ndarray, top_k: int = 3,
                      unknown_scores: np.ndarray | None = None, threshold: float | None = None):
    """One row per file; with the run's unknown score, two more columns: the score and whether the run would
    answer "unknown" (`predicted` stays the best class, so accuracy reads the same)."""
    k = min(top_k, len(labels))
    scored = unknown_scores is not None and threshold is not None
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "probability", "correct", "top_k"]
                   + (["unknown_score", "unknown"] if scored else []))
        for i, (rel, t, p) in enumerate(zip(rels, y_true, probs)):
            order = np.argsort(-p)[:k]
            row = [rel, labels[t], labels[order[0]], f"{p[order[0]]:.6f}", int(order[0] == t),
                   ";".join(f"{labels[j]}:{p[j]:.4f}" for j in order)]
            if scored:
                row += [f"{unknown_scores[i]:.4f}", int(unknown_scores[i] > threshold)]
            w.writerow(row)


def write_per_class(path: Path, labels: list[str], pc: dict):
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for i, lab in enumerate(labels):
            w.writerow([lab, f"{pc['precision'][i]:.4f}", f"{pc['recall'][i]:.4f}", f"{pc['f1'][i]:.4f}",
                        int(pc["support"][i])])


MAX_CONFUSION_CLASSES = 30  # beyond this a full matrix has no readable labels


def most_confused_classes(cm: np.ndarray, k: int = MAX_CONFUSION_CLASSES) -> list[int]:
    """The k classes with the most mistakes, as true or as predicted class, in label order."""
    off = np.asarray(cm, dtype=float).copy()
    np.fill_diagonal(off, 0)
    share = off / np.maximum(np.asarray(cm).sum(axis=1, keepdims=True), 1)
    weight = share.sum(axis=1) + share.sum(axis=0)
    return sorted(np.argsort(-weight, kind="stable")[:k].tolist())


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use: a run draws its figures in a second process
    (evaluation.figures), and the run itself need not load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, cm: np.ndarray, labels: list[str]):
    """The whole matrix with labels up to MAX_CONFUSION_CLASSES classes; beyond, the rows and columns of the
    classes with the most mistakes, labelled (the most confused pairs table in the report lists the rest)."""
    title = "Confusion matrix (test)"
    cm = np.asarray(cm)
    if len(labels) > MAX_CONFUSION_CLASSES:
        keep = most_confused_classes(cm)
        title = f"Confusion among the {len(keep)} most confused of {len(labels)} classes (test)"
        full_rows = cm.sum(axis=1, keepdims=True)[keep]
        cm, labels = cm[np.ix_(keep, keep)], [labels[i] for i in keep]
    else:
        full_rows = cm.sum(axis=1, keepdims=True)
    n = len(labels)
    size = min(24, max(5, 0.35 * n + 3))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(full_rows, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    if n <= 40:
        ax.set_xticks(range(n), labels, rotation=90 if n > 8 else 0, fontsize=8 if n > 15 else 10)
        ax.set_yticks(range(n), labels, fontsize=8 if n > 15 else 10)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                                color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_curves(path: Path, rows: list[dict]) -> bool:
    """Loss and accuracy per epoch, train vs val, from metrics.csv rows. Stages (head, then fine-tune) follow
    each other on one epoch axis, separated by a dotted line."""
    if not rows:
        return False
    stages: list[str] = []
    for r in rows:
        if r.get("stage", "") not in stages:
            stages.append(r.get("stage", ""))
    offset, offsets = 0.0, {}
    for st in stages:
        offsets[st] = offset
        offset += max((_num(r["epoch"]) or 0) for r in rows if r.get("stage", "") == st)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"train": "tab:blue", "val": "tab:orange"}
    for ax, metric in zip(axes, ("loss", "acc")):
        for st in stages:
            for split in ("train", "val"):
                pts = [(offsets[st] + _num(r["epoch"]), _num(r.get(f"{split}_{metric}"))) for r in rows
                       if r.get("stage", "") == st and _num(r.get(f"{split}_{metric}")) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    label = split if st == stages[0] else None
                    ax.plot(xs, ys, "-o" if split == "train" else "-s", color=colors[split], label=label,
                            markersize=3, alpha=0.9 if st == stages[-1] else 0.6)
            if offsets[st] > 0:
                ax.axvline(offsets[st], color="grey", ls=":", lw=1)
                ax.text(offsets[st], ax.get_ylim()[1], f" {st}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch" + (f" ({' then '.join(stages)})" if len(stages) > 1 else ""))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves (epoch 0 = before training)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_reliability(path: Path, y_true, probs: np.ndarray, n_bins: int = 10):
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, n_bins + 1)
    accs, confs, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        counts.append(int(m.sum()))
        accs.append(correct[m].mean() if m.any() else 0)
        confs.append(conf[m].mean() if m.any() else 0)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(edges[:-1], accs, width=1 / n_bins, align="edge", alpha=0.7, edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability (test)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _img_tag(path: Path, width: int = 0) -> str:
    if not path.exists():
        return ""
    b64 = base64.b64encode(path.read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{b64}"{w} alt="{html.escape(path.name)}">'


_AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg",
               ".opus": "audio/ogg", ".mp3": "audio/mpeg"}


def media_tag(abs_path: str, task: str) -> str:
    """A thumbnail (images) or an audio player (sounds), embedded so report.html travels alone."""
    p = Path(abs_path)
    try:
        if task == "audio":
            data = p.read_bytes()
            if len(data) > 2_000_000:
                return "<em>(clip too large to embed)</em>"
            mime = _AUDIO_MIME.get(p.suffix.lower(), "audio/wav")
            return f'<audio controls preload="none" src="data:{mime};base64,{base64.b64encode(data).decode()}"></audio>'
        img = open_image(p)
        small = max(img.size) < 96  # shown enlarged: crisp pixels rather than a blur
        img.thumbnail((160, 160))
        buf = io.BytesIO()
        img.save(buf, "PNG" if small else "JPEG", **({} if small else {"quality": 85}))
        mime, cls = ("png", ' class="small"') if small else ("jpeg", "")
        return f'<img{cls} src="data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'
    except Exception:  # noqa: BLE001 - a missing file must not break the report
        return "<em>(unavailable)</em>"


def worst_mistakes(samples, labels, y_true, probs, n: int = 12) -> list[dict]:
    pred = probs.argmax(axis=1)
    wrong = np.where(pred != np.asarray(y_true))[0]
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:n]  # most confident mistakes first
    return [{"path": samples[i].path, "rel": samples[i].rel, "true": labels[y_true[i]],
             "predicted": labels[pred[i]], "probability": float(probs[i, pred[i]]),
             "p_true": float(probs[i, y_true[i]])} for i in wrong]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;color:#222}
.warning{background:#fff3cd;border:1px solid #d9a400;border-radius:6px;padding:.6em 1em}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ddd;padding:4px 9px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
td.l{overflow-wrap:anywhere}td.l:first-child{overflow-wrap:normal;white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}img{max-width:100%;height:auto}th.sort{cursor:pointer}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:8px;padding:.8em 1.2em}
.big{font-size:1.8em;font-weight:600}.gal{display:flex;flex-wrap:wrap;gap:12px}
.gal div{width:180px;font-size:.85em;border:1px solid #eee;padding:6px;overflow-wrap:anywhere}
.gal img{width:170px;max-width:100%}.gal img.small{image-rendering:pixelated}
.gal audio{width:170px;max-width:100%}.warn{color:#a40}details{margin:1em 0}
@media (max-width:600px){body{margin:1em auto}.card{padding:.5em .8em}.big{font-size:1.4em}}"""

# Click a header of a sortable table to sort by that column (numbers as numbers), again to reverse.
_SORT_JS = """document.querySelectorAll('table.sortable').forEach(t=>{t.querySelectorAll('th').forEach((th,i)=>{
th.classList.add('sort');th.title='sort';th.onclick=()=>{const rows=[...t.querySelectorAll('tr')].slice(1);
const up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';const key=r=>{const v=r.children[i].textContent;
const n=parseFloat(v.replace(/,/g,''));return isNaN(n)?v:n};rows.sort((a,b)=>{const x=key(a),y=key(b);
return (x<y?-1:x>y?1:0)*(up?1:-1)});rows.forEach(r=>t.appendChild(r))}})});"""


def _table(headers: list[str], rows: list[list], left: int = 1, sortable: bool = False) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    cls = ' class="sortable"' if sortable else ""
    return f'<div class="scroll"><table{cls}><tr>{th}</tr>{body}</table></div>'


def confused_pairs(confusion, labels: list[str], n: int = 15) -> list[list]:
    """The most frequent (true, predicted) mistakes: [true, predicted, count, share of the true class]."""
    import numpy as np

    c = np.asarray(confusion)
    off = c.copy()
    np.fill_diagonal(off, 0)
    order = np.dstack(np.unravel_index(np.argsort(-off, axis=None), off.shape))[0][:n]
    rows = []
    for i, j in order:
        if off[i, j] <= 0:
            break
        rows.append([labels[i], labels[j], int(off[i, j]), f"{off[i, j] / max(1, c[i].sum()):.1%}"])
    return rows


def _split_sizes(counts: dict) -> str:
    return " · ".join(f"{k} {v:,}" for k, v in counts.items()) if counts else ""


def _parameters(summary: dict) -> str:
    p = summary["params"]
    if summary.get("strategy") == "linear" and p.get("head"):
        return f'{p["total"]:,} in all; {p["head"]:,} trained (the head: the backbone stays frozen)'
    return f'{p["total"]:,} in all; {p["trainable"]:,} trained'



def write_html(run: Path, summary: dict, labels: list[str], per_class_test: dict, mistakes: list[dict],
               skipped: list, excluded: list, notes: list[str], task: str, extra_sections: list[str] = (),
               confusion=None):
    t, v = summary["test"], summary.get("val") or {}
    lo, hi = t["accuracy_ci95"]
    cards = [
        ("test accuracy", f'{t["accuracy"]:.3f}', f"95% CI {lo:.3f}–{hi:.3f}, n={t['n']}"),
        ("macro F1", f'{t["macro_f1"]:.3f}', "test"),
        ("calibration error", f'{t["ece"]:.3f}', "ECE, 15 bins"),
        ("val accuracy", f'{v.get("accuracy", float("nan")):.3f}', f"n={v.get('n', 0)}"),
        ("time", f'{summary["timing"]["total_s"]:.0f} s', "total wall time"),
    ]
    if t.get("ordinal"):  # ordered bins: a neighbouring bin is a near miss
        o = t["ordinal"]
        cards.insert(1, ("within one bin", f'{o["within_one_bin"]:.3f}',
                         f'mean error {o["mean_abs_bin_error"]:.2f} bins'))
    cards_html = "".join(f'<div class="card"><div>{a}</div><div class="big">{b}</div><div class="sub">{c}</div></div>'
                         for a, b, c in cards)
    pc_rows = [[lab, f"{per_class_test['precision'][i]:.3f}", f"{per_class_test['recall'][i]:.3f}",
                f"{per_class_test['f1'][i]:.3f}", int(per_class_test["support"][i])] for i, lab in enumerate(labels)]
    gal = "".join(
        f'<div>{media_tag(m["path"], task)}<br><b>true:</b> {html.escape(m["true"])}<br>'
        f'<b>predicted:</b> {html.escape(m["predicted"])} ({m["probability"]:.2f})<br>'
        f'<span class="sub">p(true)={m["p_true"]:.2f}<br>{html.escape(m["rel"])}</span></div>' for m in mistakes)
    info_rows = [["task", task], ["backbone", summary["backbone"]], ["strategy", summary["strategy"]],
                 ["classes", summary["classes"]], ["data", summary.get("data", "")],
                 ["scored with", (summary.get("evaluation") or {}).get("engine", "torch-fp32")],
                 ["split", summary.get("split", {}).get("method", "")],
                 ["split sizes", _split_sizes(summary.get("split", {}).get("counts", {}))],
                 ["parameters", _parameters(summary)],
                 ["timing", ", ".join(f"{k} {v:.1f}s" for k, v in summary["timing"].items())]]
    skipped_html = _table(["file", "reason"], [list(s) for s in skipped]) if skipped else "<p>None.</p>"
    excl_html = _table(["file", "reason"], [list(s) for s in excluded]) if excluded else "<p>None.</p>"
    notes_html = "".join(f'<li>{html.escape(n)}</li>' for n in notes)
    warnings_html = "".join(f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>'
                            for w in summary.get("warnings") or [])
    pairs = confused_pairs(confusion, labels) if confusion is not None and len(labels) > 2 else []
    pairs_html = ("<h2>Most confused pairs (test)</h2>" + _table(["true", "predicted as", "files", "of the class"],
                                                                   pairs, left=2)) if pairs else ""
    doc = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>classforge report</title>
<style>{_CSS}</style></head><body>
<h1>classforge report</h1><p class="sub">{html.escape(summary["backbone"])} · {html.escape(summary["strategy"])} ·
{summary["classes"]} classes · {html.escape(summary.get("created", ""))}</p>
{warnings_html}<div class="cards">{cards_html}</div>
{f'<ul class="warn">{notes_html}</ul>' if notes else ''}
<h2>Run</h2>{_table(["", ""], info_rows, left=2)}
<h2>Training curves</h2>{_img_tag(run / "curves.png", 900) or '<p>No per-epoch curves for this run.</p>'}
{_img_tag(run / "lr_finder.png", 450)}
<h2>Confusion matrix</h2>{_img_tag(run / "confusion_matrix.png", 700)}
{pairs_html}
<h2>Calibration</h2>{_img_tag(run / "reliability.png", 380)}
<h2>Per-class metrics (test)</h2><p class="sub">Click a column to sort.</p>
{_table(["class", "precision", "recall", "F1", "support"], pc_rows, sortable=True)}
<h2>Worst mistakes (most confident wrong predictions)</h2><div class="gal">{gal or '<p>No mistakes.</p>'}</div>
{''.join(extra_sections)}
<h2>Skipped files ({len(skipped)})</h2>{skipped_html}
<h2>Excluded duplicates ({len(excluded)})</h2>{excl_html}
<p class="sub">Files: summary.json, metrics.csv, predictions.csv, per_class.csv, split.csv, config.yaml.</p>
<script>{_SORT_JS}</script>
</body></html>"""
    write_text_for_browser(run / "report.html", doc)
