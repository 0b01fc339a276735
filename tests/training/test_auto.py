"""--strategy auto under a whole-run --time-budget: candidates on one split, the best on validation kept."""

from __future__ import annotations

import csv
import json

import pytest

import classforge
from classforge.core.config import TrainConfig
from classforge.training.auto import candidates


def test_candidates_come_from_the_registry_in_rank_order():
    image = [c.name for c in candidates(TrainConfig(), "image")]
    assert image[0] == "linear efficientnet_lite0"  # the cheap head always first
    assert "linear efficientnet_lite2" in image and "two-stage efficientnet_lite0" in image
    # the views candidate first: the clean-view head then reads row 0 of the same cache files
    assert image.index("linear efficientnet_lite2 views=4") < image.index("linear efficientnet_lite2")
    audio = [(c.strategy, c.backbone) for c in candidates(TrainConfig(), "audio")]
    assert audio[0] == ("linear", "efficientat_mn04") and ("scratch", "audio_cnn") in audio
    assert "finetune efficientat_mn04 augment=strong preprocess=loudness" in [c.name for c in candidates(
        TrainConfig(), "audio")]
    pinned = candidates(TrainConfig(backbone="efficientnet_lite0"), "image")
    assert [c.strategy for c in pinned] == ["linear", "two-stage"]


def test_what_the_user_set_wins_over_a_candidates_declared_settings():
    from classforge.training.auto import declared_overrides

    finetune = next(c for c in candidates(TrainConfig(), "audio") if c.strategy == "finetune")
    assert declared_overrides(finetune, TrainConfig()) == {"augment": "strong", "preprocess": "loudness"}
    assert declared_overrides(finetune, TrainConfig(augment="none")) == {"preprocess": "loudness"}


def test_a_heads_embedding_time_scales_the_first_heads_measured_speed():
    from classforge.training.auto import embedding_seconds

    measured = {"s_per_file": 0.01, "fwd_s": 0.004}  # the first head: 10 ms a file, 4 ms a bare forward pass
    assert embedding_seconds(100, 0.008, measured) == pytest.approx(2.0)  # a model twice as slow: 20 ms a file
    assert embedding_seconds(100, 0.008, None) == pytest.approx(1.2)  # no measurement: 1.5 forward passes


def read_rows(run):
    with open(run / "candidates.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.trains
def test_auto_runs_candidates_and_keeps_the_best_on_validation(shapes_dir, tmp_path):
    run = classforge.train(shapes_dir, tmp_path / "auto", backbone="efficientnet_lite0", time_budget="90s",
                           batch_size=16)
    rows = read_rows(run)
    assert [r["candidate"] for r in rows] == ["linear efficientnet_lite0", "two-stage efficientnet_lite0"]
    assert rows[0]["status"] == "finished"
    finished = [r for r in rows if r["status"] == "finished"]
    winner = [r for r in rows if r["winner"] == "1"]
    assert len(winner) == 1 and winner[0]["status"] == "finished"
    assert float(winner[0]["val_accuracy"]) == max(float(r["val_accuracy"]) for r in finished)
    s = json.loads((run / "summary.json").read_text())
    assert s["auto"]["winner"] == winner[0]["candidate"] and s["strategy"] == winner[0]["strategy"]
    assert s["val"]["accuracy"] == pytest.approx(float(winner[0]["val_accuracy"]), abs=1e-3)
    cfg = TrainConfig.load(run / "config.yaml")  # the winner alone, reproducible
    assert cfg.strategy == winner[0]["strategy"] and cfg.time_budget is None
    assert "Candidates (--strategy auto)" in (run / "report.html").read_text()
    assert not (run / "candidates").exists()


@pytest.mark.trains
def test_a_candidate_that_cannot_finish_in_time_is_skipped_with_a_note(shapes_dir, tmp_path):
    run = classforge.train(shapes_dir, tmp_path / "tight", backbone="efficientnet_lite0", time_budget="2s")
    rows = read_rows(run)
    assert rows[0]["status"] == "finished" and rows[0]["winner"] == "1"  # the head always runs
    assert rows[1]["status"] == "skipped" and "left" in rows[1]["why"]


@pytest.mark.trains
def test_auto_without_a_budget_is_the_head_alone(shapes_dir, tmp_path):
    run = classforge.train(shapes_dir, tmp_path / "plain", epochs=5)
    assert not (run / "candidates.csv").exists()
    assert json.loads((run / "summary.json").read_text())["strategy"] == "linear"


def test_time_budget_auto_is_derived_from_the_data_and_this_machine(shapes_dir, capsys):
    from classforge.training.auto import AUTO_BUDGET_RANGE, whole_run_budget
    from classforge.training.prepared import prepare_data

    cfg = TrainConfig(data=str(shapes_dir), time_budget="auto")
    data = prepare_data(cfg)
    budget = whole_run_budget(cfg, data, candidates(cfg, "image")[0])
    assert AUTO_BUDGET_RANGE[0] <= budget <= AUTO_BUDGET_RANGE[1]
    assert f"--time-budget auto: {budget:.0f} s ({len(data.samples)} files" in capsys.readouterr().out
    assert whole_run_budget(cfg.replace(time_budget="2m"), data, candidates(cfg, "image")[0]) == 120


def test_time_budget_auto_needs_strategy_auto(shapes_dir, tmp_path):
    from classforge.core.errors import ClassforgeError

    with pytest.raises(ClassforgeError, match="--time-budget auto goes with --strategy auto"):
        classforge.train(shapes_dir, tmp_path / "x", strategy="finetune", time_budget="auto")
