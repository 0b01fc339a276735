"""The training flow, top to bottom: discover -> validate -> split -> fit (strategy) -> save -> evaluate. The
steps live in training.flow; --strategy auto's candidates in training.auto."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import torch

from classforge.core.config import STRATEGIES, TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.data.precheck import Precheck
from classforge.models.registry import factory_for
from classforge.runtime.distributed import current, join
from classforge.runtime.engines import resolve_eval_engine
from classforge.runtime.threads import adapted_threads
from classforge.training.auto import candidates, train_auto
from classforge.training.flow import build_for, fit_and_evaluate, resolve_for_data
from classforge.training.prepared import Prepared, prepare_data
from classforge.training.tracking import check_tracker


def train(cfg: TrainConfig, precheck: Precheck | None = None) -> Path:
    """Train, save and evaluate one run; returns the run directory. `precheck`: the file check already started
    for cfg's data (data.precheck)."""
    if cfg.strategy not in STRATEGIES + ("auto",):
        raise ClassforgeError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {cfg.strategy!r}")
    resolve_eval_engine(cfg.eval_engine, cfg.extract_engine)  # bad names fail now, not after training
    if cfg.refit not in ("auto", "yes", "no"):
        raise ClassforgeError(f"--refit must be auto, yes or no, not {cfg.refit!r}")
    if str(cfg.time_budget).strip().lower() == "auto" and cfg.strategy != "auto":
        raise ClassforgeError("--time-budget auto goes with --strategy auto (the candidates share it); give "
                              f"--strategy {cfg.strategy} a duration such as 10m")
    if cfg.track:
        check_tracker(cfg.track)  # an unknown tracker or missing package fails now, not after training
    if cfg.backbone not in ("auto", ""):
        factory_for(cfg.backbone)  # a misspelt name fails now, not after every file was checked
    check_out(cfg)
    group = join(cfg.accelerator, cfg.devices, cfg.num_nodes)
    if group.world_size > 1 and not cfg.out:
        # every process of the run uses the main process's folder (a default name has the start time in it)
        cfg = cfg.replace(out=str(group.from_main(run_path(cfg))))
    with adapted_threads(cfg.threads, share=group.local_world_size) as threads:
        return train_with(cfg, threads, precheck)


def train_with(cfg: TrainConfig, threads: dict, precheck: Precheck | None = None) -> Path:
    """The flow, once the options are known to be sound and the thread count chosen. The run folder is made
    once data and model are ready; a run that stops on an error removes the folder it made."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg, keep_decoded=True, precheck=precheck)
    try:
        if tries_candidates(cfg, data):
            return in_run_folder(cfg, lambda run: train_auto(cfg, run, data, threads, t0))
        cfg, model = build_for(resolve_for_data(cfg, data), data)
        return in_run_folder(cfg, lambda run: fit_and_evaluate(cfg, run, data, model, threads, t0))
    finally:
        data.release_kept()


def tries_candidates(cfg: TrainConfig, data: Prepared) -> bool:
    """--strategy auto with a whole-run --time-budget, where the backbones declare more than one candidate:
    training.auto runs them. Without a budget auto is the first candidate alone (a head on cached embeddings)."""
    if cfg.strategy != "auto" or not cfg.time_budget or cfg.train_budget or cfg.resume:
        return False
    if len(candidates(cfg, data.ds.task)) <= 1:
        return False
    if current().world_size > 1:  # candidates are timed and chosen in one process; the others would disagree
        data.notes.append("--strategy auto tries its candidates in one process: with several processes it is the "
                          "first candidate alone (a head on cached embeddings)")
        return False
    return True


def in_run_folder(cfg: TrainConfig, work) -> Path:
    """work(run folder); a run that stops on a clear error removes the folder it made (a folder the user made
    stays; nothing to resume from either)."""
    run = run_path(cfg)
    made = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        return work(run)
    except ClassforgeError:
        if made:
            shutil.rmtree(run, ignore_errors=True)
        raise


def run_path(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(str(cfg.data)).name or 'run'}-{cfg.backbone}-{cfg.strategy}-{stamp}"


def check_out(cfg: TrainConfig) -> None:
    run = run_path(cfg)
    data_root = Path(cfg.data).resolve() if cfg.data else None
    if data_root and (run.resolve() == data_root or data_root in run.resolve().parents):
        raise ClassforgeError(f"--out {run} is inside the data folder; classforge never writes into your data")
