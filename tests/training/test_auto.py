"""--strategy auto under a whole-run --time-budget: candidates on one split, the best on validation kept."""

from __future__ import annotations

import csv
import json
import re

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
    assert ("two-stage", "efficientat_mn04") not in audio  # never near the fine-tune: its time goes to the refit
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
    if rows[1]["status"] == "finished":  # a network says how long it trained of its share, in epochs
        assert re.match(r"trained \d+ s of \d+s, [1-9]\d* epochs", rows[1]["why"]), rows[1]["why"]


def test_a_network_that_stopped_early_says_so_and_one_that_ran_out_of_time_does_not():
    from classforge.training.auto import training_note
    from classforge.training.flow import Fitted

    cfg = TrainConfig(strategy="finetune", train_budget="258s")
    early = Fitted(cfg, None, timing={"fit_s": 170.4}, extra={"trainer": {"stopped_by": "early stopping",
                                                                         "epochs_run": 8}})
    assert training_note(cfg, early) == "trained 170 s of 258s, 8 epochs, ended by early stopping"
    full = Fitted(cfg, None, timing={"fit_s": 258.9}, extra={"trainer": {"stopped_by": "time budget",
                                                                        "epochs_run": 13}})
    assert training_note(cfg, full) == "trained 259 s of 258s, 13 epochs"
    assert training_note(cfg.replace(train_budget=None), full) == ""  # a head has no share of its own


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


GROUPS = r"_\d\d(\d)\.png$"  # shapes_dir's files by their last digit: ten groups, each holding every class


def test_validation_joins_training_for_the_refit_only_when_it_holds_groups_training_lacks(shapes_dir):
    from classforge.training.auto import refits, with_validation_trained
    from classforge.training.prepared import prepare_data

    grouped = prepare_data(TrainConfig(data=str(shapes_dir), group_by=GROUPS))
    assert refits(TrainConfig(), grouped) and not refits(TrainConfig(refit="no"), grouped)
    plain = prepare_data(TrainConfig(data=str(shapes_dir)))  # validation: a slice of the same kind of files
    assert not refits(TrainConfig(), plain) and refits(TrainConfig(refit="yes"), plain)
    merged = with_validation_trained(grouped)
    n = {s: len(grouped.of(s)) for s in ("train", "val", "test")}
    assert len(merged.of("train")) == n["train"] + n["val"] and not merged.of("val")
    assert merged.of("test") == grouped.of("test")
    assert [s.path for s in merged.of("train")[:n["train"]]] == [s.path for s in grouped.of("train")]
    assert len(grouped.of("val")) == n["val"]  # the run's own split is untouched: it is scored and written


@pytest.mark.trains
def test_the_winning_head_is_refit_on_train_and_validation_groups(shapes_dir, tmp_path):
    run = classforge.train(shapes_dir, tmp_path / "grouped", backbone="efficientnet_lite0", time_budget="3s",
                           group_by=GROUPS)
    s = json.loads((run / "summary.json").read_text())
    refit = s["auto"]["refit"]
    assert refit["done"] and refit["files"] == s["split"]["counts"]["train"] + s["split"]["counts"]["val"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = min((r for r in rows if r["stage"] == "head" and r["val_loss"]), key=lambda r: float(r["val_loss"]))
    assert refit["epochs"] == int(chosen["epoch"]) == sum(r["stage"] == "refit" for r in rows)
    assert "refit on train + validation" in (run / "report.html").read_text()
    assert any("validation figures are not held out" in n for n in s.get("notes", []) + [
        (run / "report.html").read_text()])
    with open(run / "split.csv") as f:  # the split the run reports is the one it chose on
        assert sum(r["split"] == "val" for r in csv.DictReader(f)) == s["split"]["counts"]["val"]
    plain = classforge.train(shapes_dir, tmp_path / "kept", backbone="efficientnet_lite0", time_budget="3s",
                             group_by=GROUPS, refit="no")
    assert json.loads((plain / "summary.json").read_text())["auto"]["refit"] is None


@pytest.mark.trains
def test_a_network_winner_continues_from_its_weights_on_train_and_validation(tiny, tmp_path):
    import time

    from classforge.training.auto import REFIT_LR_SCALE, Candidate, Outcome, refit_winner
    from classforge.training.flow import build_for, fit_strategy, resolve_for_data
    from classforge.training.prepared import prepare_data

    cfg = TrainConfig(data=str(tiny), backbone="efficientnet_lite0", strategy="finetune", train_budget="4s",
                      batch_size=8, group_by=r"_\d\d(\d)\.png$", lr="0.001")
    data = prepare_data(cfg)
    cfg, model = build_for(resolve_for_data(cfg, data), data)
    (tmp_path / "c").mkdir()
    fitted = fit_strategy(cfg, tmp_path / "c", data, model, {}, time.time())
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    best = Outcome(Candidate("efficientnet_lite0", "finetune"), "finished", fitted=fitted, refit_s=3.0, epoch_s=1.0)
    info = refit_winner(best, tmp_path / "run", data, deadline=time.time() + 30)
    assert info["done"] and info["files"] == len(data.of("train")) + len(data.of("val"))
    assert info["lr"] == pytest.approx(0.001 * REFIT_LR_SCALE) and info["epochs"] >= 1
    assert any(r["stage"] == "refit" for r in fitted.history)
    moved = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch_equal(v, trained[k])]
    assert moved  # it trained further ...
    assert not (tmp_path / "run" / "refit").exists()  # ... and left nothing behind
    late = refit_winner(best, tmp_path / "run", data, deadline=time.time())  # no time left: said, not done
    assert not late["done"] and "less than one epoch" in late["why"]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_refit_setting_that_is_not_auto_yes_or_no_is_a_clear_error(shapes_dir, tmp_path):
    from classforge.core.errors import ClassforgeError

    with pytest.raises(ClassforgeError, match="--refit must be auto, yes or no"):
        classforge.train(shapes_dir, tmp_path / "x", refit="maybe")
