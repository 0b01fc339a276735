"""Hyperparameter search: the declared space, the grouped pruner, two worker processes on one SQLite study,
resuming after a worker is killed, and the best trial's config reproducing its score."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.training.search import (
    SPACE,
    config_for,
    grouped_median_pruner,
    load_space,
    make_storage,
    sample,
    search,
    storage_url,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_space_is_conditional_on_strategy_and_backbone():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        t = study.ask()
        p = sample(t, SPACE, ["efficientnet_lite0", "cnn_small"],
                   {"efficientnet_lite0": ["linear", "two-stage"], "cnn_small": ["scratch"]})
        study.tell(t, 0.0)
        seen.setdefault((p["backbone"], p["strategy"]), p)
        cfg = config_for(TrainConfig(data="x"), p)  # every draw is a valid TrainConfig
        assert cfg.backbone == p["backbone"] and cfg.strategy == p["strategy"] and float(cfg.lr) == pytest.approx(p["lr"], rel=1e-5)
    lin, two, cnn = (seen[k] for k in [("efficientnet_lite0", "linear"), ("efficientnet_lite0", "two-stage"),
                                       ("cnn_small", "scratch")])
    assert "views" in lin and "weight_decay" not in lin and "batch_size" not in lin  # no effect on a head on embeddings
    assert {"weight_decay", "dropout", "batch_size", "augment"} <= set(two) and "cnn_width" not in two
    assert {"cnn_width", "cnn_stages", "cnn_depth", "cnn_block"} <= set(cnn)
    cfg = config_for(TrainConfig(data="x"), cnn)
    assert cfg.backbone_args["widths"] == [cnn["cnn_width"] * 2 ** i for i in range(cnn["cnn_stages"])]


def test_space_file_overrides(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("lr: {type: float, low: 0.001, high: 0.01, log: true}\nviews: null\n")
    space = load_space(str(f))
    assert space["lr"]["low"] == 0.001 and "views" not in space and "dropout" in space
    f.write_text("lr: {type: normal}\n")
    with pytest.raises(ClassforgeError, match="type must be"):
        load_space(str(f))


def test_pruner_compares_only_within_a_group():
    study = optuna.create_study(direction="maximize", pruner=grouped_median_pruner(n_startup_trials=2, n_warmup_steps=1))

    def finished(group, values):
        t = study.ask()
        t.set_user_attr("group", group)
        for step, v in enumerate(values, 1):
            t.report(v, step)
        study.tell(t, values[-1])

    finished("lite0/linear", [0.8, 0.9, 0.92])
    finished("lite0/linear", [0.7, 0.85, 0.9])
    low = study.ask()
    low.set_user_attr("group", "lite0/linear")
    low.report(0.4, 1)
    low.report(0.5, 2)
    assert low.should_prune()  # below the median of its group at step 2
    other = study.ask()
    other.set_user_attr("group", "cnn/scratch")  # starts at chance: must not be judged against the linear probes
    other.report(0.35, 1)
    other.report(0.4, 2)
    assert not other.should_prune()
    good = study.ask()
    good.set_user_attr("group", "lite0/linear")
    good.report(0.9, 1)
    good.report(0.95, 2)
    assert not good.should_prune()


def test_storage_urls(tmp_path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    assert storage_url(str(tmp_path / "a.db"), tmp_path).startswith("sqlite:///")
    assert storage_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    from optuna.storages.journal import JournalStorage

    assert isinstance(make_storage(str(tmp_path / "j.log"), 0), JournalStorage)


def _study(out: Path):
    s = json.loads((out / "search.json").read_text())
    return optuna.load_study(study_name=s["study_name"], storage=make_storage(s["storage"], 0))


def _states(study):
    from collections import Counter

    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def _kill_if_still_running(out: Path, trial) -> bool:
    """Kill the worker running `trial` if the trial is still running. The worker is stopped first, so it cannot
    finish the trial between this look and the kill; a worker that did finish it goes on. (The workers'
    heartbeat grace, 2 x 2 s, outlasts the look, so the other worker does not fail the stopped one's trial.)"""
    pid = trial.user_attrs["worker_pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:  # the worker finished its trials and ended
        return False
    try:
        still = _study(out).get_trials(deepcopy=False)[trial.number].state.name == "RUNNING"
    except Exception:  # noqa: BLE001 - stopped inside a write, the storage may not answer: look again later
        still = False
    os.kill(pid, signal.SIGKILL if still else signal.SIGCONT)
    return still


def test_two_workers_share_a_study_survive_a_kill_resume_and_reproduce(shapes_dir, tmp_path):
    out = tmp_path / "search"
    space = tmp_path / "space.yaml"  # small CNNs only, to keep the test quick on a shared 2-core machine
    space.write_text("cnn_width: {type: categorical, choices: [8, 16]}\ncnn_stages: {type: int, low: 2, high: 3}\n")
    env = dict(os.environ, CLASSFORGE_QUIET="1")
    cmd = [sys.executable, "-m", "classforge.cli", "search", str(shapes_dir), "--backbones", "cnn_small",
           "--trials", "6", "--workers", "2", "--epochs", "1", "--heartbeat", "2", "--space", str(space),
           "--out", str(out)]
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait until both workers have finished a trial and one is busy with another, then kill that one.
        deadline = time.time() + 150
        victim = None
        while time.time() < deadline and parent.poll() is None:
            time.sleep(0.5)
            if not (out / "search.json").exists():
                continue
            try:
                trials = _study(out).get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001, S112 - the study may not be created yet
                continue
            done_pids = {t.user_attrs.get("worker_pid") for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
            running = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("worker_pid")]
            if len(done_pids) >= 2 and running and _kill_if_still_running(out, running[0]):
                victim = running[0]
                break
        assert victim is not None, "both workers should have finished a trial"
        log, _ = parent.communicate(timeout=200)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 0, log
    study = _study(out)
    by_pid: dict = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name in ("COMPLETE", "PRUNED"):
            by_pid.setdefault(t.user_attrs["worker_pid"], []).append(t.number)
    assert len(by_pid) == 2, by_pid  # both processes contributed to the one study
    # the pruning callback reached the Lightning Trainers inside train(): every finished trial reported epochs
    assert all(t.intermediate_values for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    assert sum(map(len, by_pid.values())) >= 3

    # Re-running with a larger target resumes the same study: earlier trials kept, numbering goes on, the killed
    # worker's trial failed (its heartbeat went stale) and its parameters run again.
    before = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    search(str(shapes_dir), trials=7, workers=1, out=out, base=TrainConfig(epochs=1), backbones=["cnn_small"],
           heartbeat=1, space_file=str(space))
    study = _study(out)
    assert {t.number: t.value for t in study.trials if t.number in before} == before
    states = _states(study)
    assert states["COMPLETE"] + states["PRUNED"] >= 7 and states["RUNNING"] == 0
    assert study.trials[victim.number].state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retried and retried[0].params == victim.params

    # best.yaml is a config `classforge train --config` accepts, and it reproduces the best trial's score.
    info = json.loads((out / "best.json").read_text())
    assert (out / "history.png").stat().st_size > 0 and "history.png" in (out / "report.html").read_text()
    from typer.testing import CliRunner

    from classforge.cli import app

    res = CliRunner().invoke(app, ["train", "--config", str(out / "best.yaml"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    val = json.loads((tmp_path / "again" / "summary.json").read_text())["val"]
    n = val["n"]
    assert abs(val["accuracy"] - info["best_value"]) <= 1.0 / n + 1e-9  # within one validation image
