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


def test_a_later_candidate_must_beat_the_best_beyond_the_noise():
    import numpy as np

    from classforge.training.auto import Candidate, Outcome, clearly_better, sign_test_p, within_noise

    def outcome(correct):
        c = np.array(correct, bool)
        return Outcome(Candidate("b", "linear"), "finished", val_accuracy=float(c.mean()), val_n=len(c), correct=c)

    base = [True] * 450 + [False] * 50
    lucky = outcome([True] * 3 + [False] * 7 + [True] * 440 + [False] * 40 + [True] * 10)  # 10 gained, 7 lost
    assert lucky.val_accuracy > outcome(base).val_accuracy
    assert not clearly_better(lucky, outcome(base)) and "not clearly better" in within_noise(lucky, outcome(base))
    assert not clearly_better(outcome([True] * 453 + [False] * 47), outcome(base))  # 3 gained, none lost: p 0.125
    better = outcome([True] * 480 + [False] * 20)  # 30 gained, none lost
    assert clearly_better(better, outcome(base)) and not clearly_better(outcome(base), better)
    assert sign_test_p(3, 0) == 0.125 and sign_test_p(0, 0) == 1.0


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
    # the best on validation, unless its lead over an earlier candidate was within the noise (the row says so)
    higher = [r for r in finished if float(r["val_accuracy"]) > float(winner[0]["val_accuracy"])]
    assert all("not clearly better than" in r["why"] for r in higher)
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
