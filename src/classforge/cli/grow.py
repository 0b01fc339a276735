"""Growing a run: `classforge update` (new files or classes into a run, in seconds) and `classforge suggest`
(which unlabelled files to label next)."""

from __future__ import annotations

import typer


def add_commands(app) -> None:

    @app.command("update")
    def update_cmd(
        run: str = typer.Argument(..., help="A linear or two-stage run to update (it stays as it is)"),
        data: str = typer.Argument(None, help="The data folder as it is now, new files and class folders "
                                              "included (default: the run's own data folder)"),
        out: str = typer.Option(..., "--out", "-o", help="Folder for the updated run"),
        labels_csv: str = typer.Option(None, "--labels-csv", help="CSV with columns path,label (paths inside DATA)"),
        unknown_dir: str = typer.Option(None, "--unknown-dir", help="Files of no class to measure the 'unknown' "
                                                                    "answer on (default: the run's own, if any)"),
    ):
        """Add files or whole classes to a run without training it again.

        The run's backbone stays, so files it already embedded come from the cache; files it knew keep their
        split, new files are split as a new run would split them, and the head is refit starting from the run's.
        The new run's report says what changed: classes and files added, and the old test files' accuracy before
        and after.

        Example: mkdir photos/wasps (add files) then classforge update runs/insects photos/ --out runs/insects-2"""
        from pathlib import Path

        from classforge.api import update
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        options = {k: v for k, v in dict(labels_csv=labels_csv, unknown_dir=unknown_dir).items() if v}
        new = _run(update, run, data, out, **options)
        import json

        u = json.loads((Path(new) / "summary.json").read_text()).get("update", {})
        before, now = u.get("old_test_accuracy"), u.get("old_test_files_accuracy_now")
        if before is not None and now is not None:
            console.print(f"Old test files: accuracy {before:.3f} before, {now:.3f} now")
        if "new_classes_test_accuracy" in u:
            console.print(f"New classes {', '.join(u['classes_added'])}: test accuracy "
                          f"{u['new_classes_test_accuracy']:.3f} ({u['new_classes_test_files']} files)")

    @app.command("suggest")
    def suggest_cmd(
        run: str = typer.Argument(..., help="A trained run"),
        unlabelled: str = typer.Argument(..., help="A folder of files not labelled yet (read only)"),
        n: int = typer.Option(50, "--n", "-n", help="How many files to suggest"),
        out: str = typer.Option(None, "--out", "-o", help="Folder for suggestions.csv and suggestions.html "
                                                         "(default: RUN/suggestions)"),
    ):
        """Which files to label next: those the run is least sure of and least like what is labelled.

        Each file goes through the run's backbone once (cached) and its head; files are picked one at a time by
        uncertainty (a small margin between the two best classes) times the distance to the nearest labelled or
        already picked file, so the list is neither a clump of near-identical hard files nor a set of easy
        outliers. Copies and near copies of labelled files are left out, and said so.

        Example: classforge suggest runs/insects unsorted/ --n 50  then label them and classforge update"""
        from classforge.api import suggest
        from classforge.cli.console import console
        from classforge.cli.console import run_cmd as _run

        s = _run(suggest, run, unlabelled, n, out)
        console.print(f"{s['suggested']} of {s['files']} files suggested ({s['near_copies_skipped']} near copies "
                      f"of labelled files and {s['unreadable']} unreadable left out)")
        console.print(f"List: {s['out']}/suggestions.csv · gallery: {s['out']}/suggestions.html")
