"""`classforge audit DATA`: suspect labels, duplicates with different labels, outliers, overlapping classes."""

from __future__ import annotations

import typer


def add_commands(app) -> None:

    @app.command("audit")
    def audit_cmd(
        data: str = typer.Argument(..., help="The data folder (or archive), as for `classforge train`"),
        out: str = typer.Option(..., "--out", "-o", help="Folder for audit.csv, audit.html, corrected_labels.csv"),
        labels_csv: str = typer.Option(None, "--labels-csv", help="CSV with columns path,label (paths inside DATA)"),
        label_from_name: str = typer.Option(None, "--label-from-name",
                                            help="Regex with a named group 'label' applied to file names"),
        bins: str = typer.Option(None, "--bins", help="Bin numeric labels at these edges, e.g. 0,3,10,20"),
        classes: str = typer.Option(None, "--classes", help="These classes only: a,b,c"),
        backbone: str = typer.Option("auto", "--backbone", help="Frozen backbone for the embeddings "
                                                                 "(default: the task's default)"),
        weights: str = typer.Option(None, "--weights", help="Local weights file for the backbone"),
        folds: int = typer.Option(5, "--folds", help="Cross-validation folds for the out-of-fold probabilities"),
        accept_top: int = typer.Option(0, "--accept-top",
                                       help="Apply the N most suspect relabels in corrected_labels.csv"),
    ):
        """Audit the labels of DATA: which files look mislabelled (with the label the data suggests), which are
        the same file with different labels, which fit no class, and which classes overlap.

        Uses the frozen default backbone's cached embeddings and k linear heads that each score the files they did
        not see; cleanlab's confident learning ranks the suspects. Writes OUT/audit.csv (most suspect first),
        OUT/audit.html (galleries) and OUT/corrected_labels.csv, a --labels-csv for train with the first
        --accept-top suggestions applied. DATA is only read.

        Example: classforge audit photos/ --out audit/ --accept-top 20  then
        classforge train photos/ --labels-csv audit/corrected_labels.csv"""
        from pathlib import Path

        from classforge.api import audit
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        options = {k: v for k, v in dict(labels_csv=labels_csv, label_from_name=label_from_name, bins=bins,
                                         classes=classes, backbone=backbone, weights=weights).items() if v}
        s = _run(audit, data, out, folds=folds, accept_top=accept_top, **options)
        console.print(f"{s['files']} files, {s['classes']} classes ({s['folds']}-fold heads on {s['backbone']}, "
                      f"out-of-fold accuracy {s['out_of_fold_accuracy']:.3f}): {s['label_issues']} suspect labels, "
                      f"{s['conflicting_duplicates']} duplicates with different labels, {s['outliers']} outliers")
        for o in s["overlapping_classes"][:3]:
            console.print(f"  overlapping classes: {' / '.join(o['classes'])} ({o['files']} files)")
        console.print(f"Findings: {Path(out) / 'audit.csv'} · gallery: {Path(out) / 'audit.html'} · "
                      f"{s['accepted']} relabel(s) applied in {Path(out) / 'corrected_labels.csv'}")
