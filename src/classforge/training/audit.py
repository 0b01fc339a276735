"""`classforge audit DATA`: which labels look wrong, which files are the same with different labels, which files
fit no class, which classes overlap. Built on the cached embeddings of the default (frozen, pretrained) backbone.

Out-of-fold class probabilities come from k linear heads (logistic regression on standardised embeddings), each
scoring the files it did not see. Confident learning (Northcutt et al., 2021) then finds the suspect labels, as
cleanlab implements it: cleanlab's `find_label_issues`, `get_label_quality_scores`, `find_overlapping_classes`
and `OutOfDistribution` are used as they are. The data folder is only read."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv, write_text_for_browser
from classforge.data.discover import Sample, discover
from classforge.data.preprocess import make_preprocessor
from classforge.data.validate import duplicate_groups, validate
from classforge.evaluation.report import media_tag
from classforge.models.registry import create_backbone, default_backbone
from classforge.runtime import embeddings as emb
from classforge.runtime.engines import engine_for

OUTLIER_SHARE = 0.01  # the least typical 1% of files (at least 3) are listed as outliers


@dataclass
class Finding:
    sample: Sample
    given: str
    suggested: str
    score: float  # higher = more suspect, in [0, 1]
    reason: str


def run_audit(cfg: TrainConfig, out: Path, folds: int = 5, accept_top: int = 0) -> dict:
    """Write OUT/audit.csv, OUT/audit.html, OUT/corrected_labels.csv and OUT/audit.json; return the summary."""
    cleanlab = _cleanlab()
    ds = discover(cfg.data, cfg.labels_csv, cfg.label_from_name, cfg.bins, cfg.classes, cfg.max_classes)
    checked = validate(ds, cfg.min_size, cfg.max_pixels)
    samples, notes = _auditable(checked.good)
    labels = sorted({s.label for s in samples}, key=ds.classes.index)
    if len(labels) < 2:
        raise ClassforgeError(f"audit needs at least 2 classes with {folds} or more files each; found {labels}")
    y = np.array([labels.index(s.label) for s in samples])
    k = int(min(folds, np.bincount(y).min()))
    feats, backbone = embed(cfg, ds.task, samples, checked.info)
    probs = out_of_fold_probs(feats, y, k, cfg.seed)
    findings = label_issues(cleanlab, samples, labels, y, probs)
    findings += conflicting_duplicates(samples, checked.info, labels)
    findings += outliers(cleanlab, samples, labels, y, feats, {f.sample.path for f in findings})
    overlap = overlapping_classes(cleanlab, labels, y, probs)
    out.mkdir(parents=True, exist_ok=True)
    write_audit_csv(out / "audit.csv", findings)
    accepted = write_corrected_labels(out / "corrected_labels.csv", samples, findings, accept_top)
    summary = {"data": str(cfg.data), "task": ds.task, "files": len(samples), "classes": len(labels),
               "folds": k, "backbone": backbone, "out_of_fold_accuracy": float((probs.argmax(1) == y).mean()),
               "label_issues": sum(f.reason.startswith("label issue:") for f in findings),
               "weaker_label_issues": sum(f.reason.startswith("label issue (weaker)") for f in findings),
               "conflicting_duplicates": sum(f.reason.startswith("near-duplicate") for f in findings),
               "outliers": sum(f.reason.startswith("outlier") for f in findings),
               "overlapping_classes": overlap[:10], "accepted": accepted, "skipped": len(checked.skipped),
               "notes": notes}
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    write_audit_html(out / "audit.html", summary, findings, ds.task)
    return summary


def _cleanlab():
    try:
        import cleanlab.dataset
        import cleanlab.filter
        import cleanlab.outlier
        import cleanlab.rank  # noqa: F401
    except ImportError:
        raise ClassforgeError("classforge audit needs cleanlab: pip install 'classforge[audit]'") from None
    return cleanlab


def _auditable(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Classes with fewer than 2 files cannot be cross-validated: they are left out, and said so."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.label] = counts.get(s.label, 0) + 1
    few = sorted(c for c, n in counts.items() if n < 2)
    notes = [f"classes with a single file are not audited: {', '.join(few)}"] if few else []
    return [s for s in samples if s.label not in few], notes


def embed(cfg: TrainConfig, task: str, samples: list[Sample], info: dict) -> tuple[np.ndarray, str]:
    """(N, D) embeddings of the frozen backbone (the task's default unless --backbone), and its name."""
    name = cfg.backbone if cfg.backbone not in ("auto", "") else default_backbone(task)
    bb = create_backbone(name, pretrained=cfg.pretrained, weights=cfg.weights)
    engine = engine_for(cfg.extract_engine)
    key = emb.features_key(name, bb, json.dumps({}), engine)
    pre = make_preprocessor(bb.spec, augment="light", max_pixels=cfg.max_pixels)
    feats, _ = emb.extract(bb, samples, [info[s.path].sha1 for s in samples], pre, key, 1, cfg.batch_size,
                           desc="Embedding", engine=engine)
    return feats[:, 0], name


def out_of_fold_probs(x: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each file's class probabilities from a head that never saw it (stratified k-fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), int(y.max()) + 1))
    for fit_idx, held_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        head.fit(x[fit_idx], y[fit_idx])
        probs[np.ix_(held_idx, head.classes_)] = head.predict_proba(x[held_idx])
    return probs


def label_issues(cleanlab, samples, labels, y, probs) -> list[Finding]:
    """Confident learning: files whose given label the other folds' heads confidently contradict, most suspect
    first, each with the label the heads favour."""
    ranked = cleanlab.filter.find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    quality = cleanlab.rank.get_label_quality_scores(y, probs)
    flagged = set(int(i) for i in ranked)
    # then the files whose heads favour another class but confident learning did not flag: weaker suspects,
    # still worth a look (with many small classes the flagged set alone misses flips)
    weaker = [i for i in np.argsort(quality) if int(i) not in flagged and probs[i].argmax() != y[i]]
    out = []
    for i in [*ranked, *weaker]:
        s, j = samples[i], int(probs[i].argmax())
        kind = "label issue" if int(i) in flagged else "label issue (weaker)"
        reason = (f"{kind}: the heads that did not see it give {labels[j]} {probs[i, j]:.2f} and "
                  f"{labels[y[i]]} {probs[i, y[i]]:.2f}")
        out.append(Finding(s, labels[y[i]], labels[j], float(1 - quality[i]), reason))
    return out


def conflicting_duplicates(samples, info, labels) -> list[Finding]:
    """Files that are the same (byte-identical or near-identical pictures) but carry different labels."""
    out = []
    for cluster in duplicate_groups(samples, info):
        names = {samples[i].label for i in cluster}
        if len(names) < 2:
            continue
        for i in cluster:
            others = [samples[j] for j in cluster if samples[j].label != samples[i].label]
            out.append(Finding(samples[i], samples[i].label, others[0].label, 1.0,
                               f"near-duplicate of {others[0].rel} labelled {others[0].label}"))
    return out


def outliers(cleanlab, samples, labels, y, feats, already: set[str]) -> list[Finding]:
    """The least typical files in embedding space (far from every class): not of any class, or broken."""
    ood = cleanlab.outlier.OutOfDistribution()
    scores = ood.fit_score(features=feats.astype(np.float32), verbose=False)  # low = atypical
    n = max(3, int(round(OUTLIER_SHARE * len(samples))))
    out = []
    for i in np.argsort(scores)[:n]:
        if samples[i].path in already:
            continue
        out.append(Finding(samples[i], labels[y[i]], "", float(1 - scores[i]),
                           f"outlier: far from every class in embedding space (typicality {scores[i]:.2f})"))
    return out


def overlapping_classes(cleanlab, labels, y, probs) -> list[dict]:
    df = cleanlab.dataset.find_overlapping_classes(labels=y, pred_probs=probs)
    return [{"classes": [labels[int(r["Class Index A"])], labels[int(r["Class Index B"])]],
             "files": int(r["Num Overlapping Examples"]), "joint_probability": float(r["Joint Probability"])}
            for _, r in df.iterrows() if int(r["Num Overlapping Examples"]) > 0]


def write_audit_csv(path: Path, findings: list[Finding]) -> None:
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "given_label", "suggested_label", "score", "reason"])
        for x in findings:
            w.writerow([x.sample.rel, x.given, x.suggested, f"{x.score:.4f}", x.reason])


def write_corrected_labels(path: Path, samples, findings, accept_top: int) -> int:
    """A --labels-csv for the same data with the first `accept_top` suggested relabels applied (label issues
    and duplicates; outliers have no suggestion). Returns how many were applied."""
    change = {}
    for x in findings:
        if x.suggested and x.sample.path not in change and len(change) < accept_top:
            change[x.sample.path] = x.suggested
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for s in samples:
            w.writerow([s.rel, change.get(s.path, s.label)])
    return len(change)


_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>classforge audit</title>
<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;color:#222}
.sub{color:#666}.gal{display:flex;flex-wrap:wrap;gap:12px}.gal div{width:190px;font-size:.85em;border:1px solid #eee;
padding:6px;overflow-wrap:anywhere}.gal img{width:180px;max-width:100%}.gal img.small{image-rendering:pixelated}
.gal audio{width:180px}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 9px}</style></head><body>
<h1>classforge audit</h1>
<p class="sub">{{ s.files }} files, {{ s.classes }} classes, {{ s.folds }}-fold heads on {{ s.backbone }} embeddings
(out-of-fold accuracy {{ "%.3f"|format(s.out_of_fold_accuracy) }}). Suspect labels: {{ s.label_issues }};
duplicates with different labels: {{ s.conflicting_duplicates }}; outliers: {{ s.outliers }}.</p>
{% for n in s.notes %}<p class="sub">{{ n }}</p>{% endfor %}
{% if s.overlapping_classes %}<h2>Classes that overlap</h2><table><tr><th>classes</th><th>files</th></tr>
{% for o in s.overlapping_classes %}<tr><td>{{ o.classes|join(" / ") }}</td><td>{{ o.files }}</td></tr>{% endfor %}
</table>{% endif %}
{% for title, group in groups %}<h2>{{ title }} ({{ group|length }})</h2><div class="gal">
{% for f in group %}<div>{{ f.media|safe }}<br><b>{{ f.x.sample.rel }}</b><br>given: {{ f.x.given }}
{% if f.x.suggested %}<br>suggested: <b>{{ f.x.suggested }}</b>{% endif %}<br>
<span class="sub">score {{ "%.2f"|format(f.x.score) }} · {{ f.x.reason }}</span></div>{% endfor %}
</div>{% else %}<p>No findings.</p>{% endfor %}
<p class="sub">Files: audit.csv (all findings, most suspect first), corrected_labels.csv (a --labels-csv with
{{ s.accepted }} suggestion(s) applied; --accept-top N), audit.json.</p></body></html>"""

GALLERY_LIMIT = 60  # per section; audit.csv lists every finding


def write_audit_html(path: Path, summary: dict, findings: list[Finding], task: str) -> None:
    import jinja2

    sections = [("Suspect labels", "label"), ("Duplicates with different labels", "near-duplicate"),
                ("Outliers", "outlier")]
    groups = []
    for title, prefix in sections:
        chosen = [x for x in findings if x.reason.startswith(prefix)][:GALLERY_LIMIT]
        if chosen:
            groups.append((title, [{"x": x, "media": media_tag(x.sample.path, task)} for x in chosen]))
    page = jinja2.Environment(autoescape=True).from_string(_PAGE).render(s=summary, groups=groups)
    write_text_for_browser(path, page)


def flip_labels(samples: list[Sample], share: float, seed: int = 0) -> dict[str, str]:
    """For benchmarks and tests: a reproducible `share` of files given another class's label (path -> label)."""
    labels = sorted({s.label for s in samples})
    rng = np.random.default_rng(int(hashlib.sha1(str(seed).encode()).hexdigest()[:8], 16))
    chosen = rng.choice(len(samples), size=max(1, int(round(share * len(samples)))), replace=False)
    flipped = {}
    for i in sorted(chosen):
        s = samples[i]
        flipped[s.rel] = rng.choice([c for c in labels if c != s.label])
    return flipped


__all__ = ["run_audit", "out_of_fold_probs", "flip_labels"]
