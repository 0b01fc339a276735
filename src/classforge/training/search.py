"""Hyperparameter search with optuna: TPE over a declared space, pruning from per-epoch validation scores.

    classforge search DATA --trials 30 [--time-budget 30m] [--workers 2] [--storage URL] [--study-name NAME]

Flow: the parent makes ONE split (OUT/split.csv, used by every trial), creates the study ONCE in its storage
(creating it from several processes races on the schema: see ../shared/DEPENDENCIES.md), then runs the
trials itself (--workers 1) or starts K worker processes that `load_study` and share it. Every trial is an
ordinary run (`training.run.train`) in OUT/trials/NNNN whose Lightning Trainers carry a callback that reports
the validation score of each epoch to the trial; a median pruner stops trials that fall below the median of
finished trials of the same backbone and strategy at the same epoch (comparing a linear probe's epochs with a
from-scratch CNN's would prune the CNN for starting at chance). Pruning acts on the Lightning fits (scratch,
finetune, the second stage of two-stage); the linear head trains on cached embeddings in a plain loop that
takes milliseconds per epoch, so linear trials always finish. The objective is the validation score
(accuracy by default; the test split is never looked at while searching).

Storage defaults to SQLite at OUT/study.db, so interrupting and re-running the same command resumes the
study: `--trials N` counts finished trials of the whole study, across workers and sessions. Trials left
RUNNING by a killed worker stop sending heartbeats; after the grace period they are marked FAIL and run
again with the same parameters. `--storage` takes any database URL optuna supports (PostgreSQL / MySQL
let several machines share one study) or a `.log` path for optuna's journal file.

Outputs: OUT/best.yaml (the best trial's full config: `classforge train --config OUT/best.yaml`),
best.json, trials.csv, history.png, importances.png, intermediate.png and report.html.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from classforge.core.config import TrainConfig, load_yaml, parse_duration
from classforge.core.errors import ClassforgeError
from classforge.evaluation.report import _CSS, _img_tag, _table
from classforge.models.registry import default_backbone
from classforge.models.registry import entry as registry_entry
from classforge.training import trainer as trainer_mod
from classforge.training.compare import from_scratch, make_shared_split
from classforge.training.run import train

FULL_FIT = ["finetune", "two-stage", "scratch"]

# The declared space. "when" limits a parameter to some strategies, or to from-scratch CNN backbones ("cnn").
# `--space FILE.yaml` replaces or adds entries in this format (an entry set to null removes it).
SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 0.3, "log": True, "when": {"strategy": FULL_FIT}},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"strategy": FULL_FIT}},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64], "when": {"strategy": FULL_FIT}},
    "augment": {"type": "categorical", "choices": ["none", "light", "strong"], "when": {"strategy": FULL_FIT}},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "views": {"type": "categorical", "choices": [1, 3], "when": {"strategy": ["linear"]}},
    "backbone_lr_mult": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "when": {"strategy": ["finetune"]}},
    "cnn_width": {"type": "categorical", "choices": [8, 16, 32, 48], "when": {"cnn": True}},
    "cnn_stages": {"type": "int", "low": 2, "high": 4, "when": {"cnn": True}},
    "cnn_depth": {"type": "int", "low": 1, "high": 2, "when": {"cnn": True}},
    "cnn_block": {"type": "categorical", "choices": ["plain", "residual"], "when": {"cnn": True}},
}
METRICS = {"val_acc": ("maximize", "accuracy"), "val_loss": ("minimize", "log_loss")}


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ----------------------------------------------------------------------------------------- the space
def load_space(path: str | None) -> dict[str, dict]:
    space = json.loads(json.dumps(SPACE))
    if path:
        user = load_yaml(Path(path).read_text()) or {}
        if not isinstance(user, dict):
            raise ClassforgeError(f"{path}: expected a mapping of parameter -> distribution")
        for k, v in user.items():
            if v is None:
                space.pop(k, None)
            else:
                if v.get("type") not in ("float", "int", "categorical"):
                    raise ClassforgeError(f"{path}: {k}: type must be float, int or categorical")
                space[k] = v
    return space


def is_cnn(backbone: str) -> bool:
    """Whether the backbone takes per-stage widths / depth / block (the search's "cnn" parameters)."""
    entry = registry_entry(backbone)
    return bool(entry and entry.stage_args)


def sample(trial, space: dict, backbones: list[str], strategies: dict[str, list[str]]) -> dict:
    """Draw one configuration: backbone, strategy (per backbone), then the parameters that apply to them."""
    b = trial.suggest_categorical("backbone", backbones) if len(backbones) > 1 else backbones[0]
    ss = strategies[b]
    s = trial.suggest_categorical("strategy", ss) if len(ss) > 1 else ss[0]
    p: dict[str, Any] = {"backbone": b, "strategy": s}
    for name, d in space.items():
        when = d.get("when") or {}
        if "strategy" in when and s not in when["strategy"]:
            continue
        if when.get("cnn") and not is_cnn(b):
            continue
        if d["type"] == "float":
            p[name] = trial.suggest_float(name, float(d["low"]), float(d["high"]), log=bool(d.get("log")))
        elif d["type"] == "int":
            p[name] = trial.suggest_int(name, int(d["low"]), int(d["high"]), log=bool(d.get("log")))
        else:
            p[name] = trial.suggest_categorical(name, list(d["choices"]))
    return p


def config_for(base: TrainConfig, p: dict) -> TrainConfig:
    """Sampled parameters -> a TrainConfig (what best.yaml holds for the best trial)."""
    over: dict[str, Any] = {"backbone": p["backbone"], "strategy": p["strategy"]}
    for k in ("weight_decay", "dropout", "batch_size", "augment", "label_smoothing", "views", "backbone_lr_mult"):
        if k in p:
            over[k] = p[k]
    if "lr" in p:
        over["lr"] = f"{p['lr']:.6g}"
    if "cnn_width" in p:
        stages = int(p.get("cnn_stages", 3))
        args = dict(base.backbone_args)
        args.update({"widths": [int(p["cnn_width"]) * 2 ** i for i in range(stages)],
                     "depth": int(p.get("cnn_depth", 1)), "block": p.get("cnn_block", "plain")})
        over["backbone_args"] = args
    return base.replace(**over)


# ----------------------------------------------------------------------------------------- pruning
def pruning_callback(trial, monitor: str, deadline: float | None = None):
    """A Lightning callback reporting `monitor` after every epoch to the optuna trial (steps count epochs
    across a run's stages) and raising TrialPruned when the pruner says so; also stops training at the
    search's deadline."""
    import optuna
    from lightning.pytorch.callbacks import Callback

    class OptunaPruning(Callback):
        def __init__(self):
            self.step = 0

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            v = trainer.callback_metrics.get(monitor)
            if v is not None and math.isfinite(float(v)):
                self.step += 1
                trial.report(float(v), self.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch-step {self.step} ({monitor} {float(v):.4f})")
            if deadline and time.time() > deadline:
                trainer.should_stop = True

    return OptunaPruning()


def grouped_median_pruner(n_startup_trials: int = 2, n_warmup_steps: int = 3):
    """Median pruning among finished trials of the same backbone/strategy group (optuna's MedianPruner
    compares every trial with every other, which is wrong when strategies differ in kind)."""
    import numpy as np
    import optuna
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    class GroupedMedianPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or step <= n_warmup_steps:
                return False
            group = trial.user_attrs.get("group")
            maximize = study.direction == StudyDirection.MAXIMIZE
            values = [v for s, v in trial.intermediate_values.items() if s <= step and math.isfinite(v)]
            if not values:
                return False
            best = max(values) if maximize else min(values)
            others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.user_attrs.get("group") == group and step in t.intermediate_values]
            if len(others) < n_startup_trials:
                return False
            median = float(np.median(others))
            return best < median if maximize else best > median

    return GroupedMedianPruner()


# ----------------------------------------------------------------------------------------- storage
def storage_url(storage: str | None, out: Path) -> str:
    if not storage:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if "://" not in storage and storage.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


def make_storage(url: str, heartbeat: int):
    _quiet_optuna()
    if url.endswith(".log") and "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url))
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kw: dict = {}
    if url.startswith("sqlite"):
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    if heartbeat:
        kw.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    return RDBStorage(url, **kw)


# ----------------------------------------------------------------------------------------- objective
def objective_for(settings: dict):
    optuna = _quiet_optuna()
    base = TrainConfig.from_dict(settings["base"])
    space = settings["space"]
    key = METRICS[settings["metric"]][1]
    out = Path(settings["out"])

    def objective(trial) -> float:
        p = sample(trial, space, settings["backbones"], settings["strategies"])
        trial.set_user_attr("group", f"{p['backbone']}/{p['strategy']}")
        trial.set_user_attr("worker_pid", os.getpid())
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = config_for(base, p).replace(out=str(run_dir), split_file=settings["split"])
        cb = pruning_callback(trial, settings["metric"], settings.get("deadline"))
        trainer_mod.RUN_CALLBACKS.append(cb)
        t0 = time.time()
        try:
            train(cfg)
        finally:
            trainer_mod.RUN_CALLBACKS.remove(cb)
            trial.set_user_attr("duration_s", round(time.time() - t0, 2))
        s = json.loads((run_dir / "summary.json").read_text())
        if not s.get("val"):
            raise ClassforgeError("the split has no validation samples: search needs them to score trials")
        trial.set_user_attr("val_accuracy", s["val"]["accuracy"])
        trial.set_user_attr("val_log_loss", s["val"]["log_loss"])
        trial.set_user_attr("test_accuracy", s["test"]["accuracy"])  # reported, never optimised
        return float(s["val"][key])

    return objective, optuna


def run_worker(settings: dict, index: int = 0) -> None:
    """One worker: load the study (created by the parent) and run trials until the study has enough."""
    optuna = _quiet_optuna()
    from optuna.trial import TrialState

    if settings["workers"] > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings["workers"]))
    storage = make_storage(settings["storage"], settings["heartbeat"])
    sampler = optuna.samplers.TPESampler(seed=settings["seed"] + index, n_startup_trials=settings["startup_trials"],
                                         multivariate=True, group=True, constant_liar=True)
    study = optuna.load_study(study_name=settings["study_name"], storage=storage, sampler=sampler,
                              pruner=grouped_median_pruner(n_warmup_steps=settings["warmup_steps"]))
    objective, _ = objective_for(settings)
    deadline = settings.get("deadline")
    if _finished(study) >= settings["trials"] or (deadline and time.time() >= deadline):
        return
    target = settings["trials"]

    def stop_when_enough(study, trial) -> None:
        # Trials running in other workers count (so K workers do not overshoot by K - 1), but not those of a
        # killed worker: fail them first once their heartbeat is stale (their parameters are then re-queued).
        optuna.storages.fail_stale_trials(study)
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        if len(study.get_trials(deepcopy=False, states=states)) >= target:
            study.stop()

    study.optimize(objective, timeout=max(1.0, deadline - time.time()) if deadline else None,
                   callbacks=[_print_trial, stop_when_enough], catch=(Exception,), gc_after_trial=True)


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _print_trial(study, t) -> None:
    v = f"{t.value:.4f}" if t.value is not None else "-"
    print(f"[pid {os.getpid()}] trial {t.number} {t.state.name.lower()} value {v} "
          f"{t.user_attrs.get('group', '')} {json.dumps(t.params, default=str)}", flush=True)


# ----------------------------------------------------------------------------------------- the parent
def search(data: str, trials: int = 20, time_budget: str | None = None, storage: str | None = None,
           study_name: str | None = None, workers: int = 1, out: str | Path | None = None,
           base: TrainConfig | None = None, backbones: list[str] | None = None, strategies: list[str] | None = None,
           metric: str = "val_acc", space_file: str | None = None, seed: int = 0, heartbeat: int = 10,
           reproduce: bool = False) -> Path:
    """Run (or resume) a study; writes best.yaml and the report into OUT and returns OUT."""
    optuna = _quiet_optuna()
    if metric not in METRICS:
        raise ClassforgeError(f"--metric must be one of {', '.join(METRICS)}")
    if trials < 1 or workers < 1:
        raise ClassforgeError("--trials and --workers must be at least 1")
    base = (base or TrainConfig()).replace(data=str(Path(data).resolve()) if Path(data).exists() else str(data))
    backbones = backbones or [default_backbone("image") if base.backbone in ("auto", "") else base.backbone]
    out = Path(out) if out else Path("runs") / f"search-{Path(str(data)).name}"
    out.mkdir(parents=True, exist_ok=True)
    per_backbone = {}
    for b in backbones:
        wanted = strategies or ["linear", "two-stage"]
        per_backbone[b] = ["scratch"] if from_scratch(b, base) else [s for s in wanted if s != "scratch"] or ["finetune"]
    split = _shared_split(base, out)
    url = storage_url(storage, out)
    name = study_name or f"classforge-{Path(str(data)).name}"
    budget = parse_duration(time_budget)
    settings = {"data": base.data, "base": base.replace(out="", split_file=None).to_dict(), "space": load_space(space_file),
                "backbones": backbones, "strategies": per_backbone, "metric": metric, "trials": int(trials),
                "deadline": time.time() + budget if budget else None, "storage": url, "study_name": name,
                "seed": int(seed), "heartbeat": int(heartbeat), "workers": int(workers), "split": str(split.resolve()),
                "out": str(out.resolve()), "startup_trials": max(3, min(10, trials // 3)), "warmup_steps": 3}
    # Create the study ONCE, here, before any worker starts; workers only load it.
    store = make_storage(url, heartbeat)
    direction = METRICS[metric][0]
    try:
        study = optuna.create_study(storage=store, study_name=name, direction=direction, load_if_exists=True)
    except Exception as e:
        raise ClassforgeError(f"Cannot create or load study {name!r} in {url}: {e}") from e
    if study.direction.name.lower() != direction:
        raise ClassforgeError(f"Study {name!r} in {url} {study.direction.name.lower()}s; --metric {metric} needs "
                              f"{direction}. Use another --study-name.")
    _check_same_study(study, settings)
    if getattr(store, "is_heartbeat_enabled", lambda: False)():
        optuna.storages.fail_stale_trials(study)  # trials of a killed worker: FAIL, then retried
    done = _finished(study)
    (out / "search.json").write_text(json.dumps(settings, indent=2, default=str))
    print(f"search: study {name!r} in {url}: {done} of {trials} trials finished; {workers} worker(s); "
          f"backbones {backbones}, strategies {per_backbone}; objective {metric} ({direction})")
    if done < trials:
        if workers == 1:
            run_worker(settings, 0)
        else:
            run_workers(out, workers)
    study = optuna.load_study(study_name=name, storage=make_storage(url, 0))
    write_report(out, study, settings)
    if reproduce:
        reproduce_best(out)
    return out


def _shared_split(base: TrainConfig, out: Path) -> Path:
    return make_shared_split(base, out)


def _check_same_study(study, settings: dict) -> None:
    """A resumed study must keep its data, space and objective: TPE learns from the earlier trials."""
    sig = {k: settings[k] for k in ("data", "space", "backbones", "strategies", "metric")}
    old = study.user_attrs.get("classforge")
    if old is None:
        study.set_user_attr("classforge", json.loads(json.dumps(sig)))
    elif old != json.loads(json.dumps(sig)):
        changed = [k for k in sig if json.loads(json.dumps(sig[k])) != old.get(k)]
        raise ClassforgeError(f"Study {settings['study_name']!r} was started with other {', '.join(changed)}; "
                              "resume it with the same settings or use another --study-name / --out")


def run_workers(out: Path, workers: int) -> None:
    """Start K worker processes on the study, stream a progress line, wait; Ctrl-C stops them all."""
    env = dict(os.environ, CLASSFORGE_QUIET=os.environ.get("CLASSFORGE_QUIET", "1"))
    procs = []
    for i in range(workers):
        log = open(out / f"worker-{i}.log", "a")  # noqa: SIM115 - closed in the finally below
        procs.append((subprocess.Popen([sys.executable, "-m", "classforge.training.search", str(out / "search.json"), str(i)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print(f"  worker {i}: pid {procs[-1][0].pid}, log {out / f'worker-{i}.log'}")
    settings = json.loads((out / "search.json").read_text())
    study = _quiet_optuna().load_study(study_name=settings["study_name"], storage=make_storage(settings["storage"], 0))
    seen: set[int] = set()
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(2)
            seen = _print_new(study, seen)
        _print_new(study, seen)
    except KeyboardInterrupt:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            p.wait(timeout=60)
        raise
    finally:
        for _, log in procs:
            log.close()
    bad = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode]
    if bad:
        print(f"  workers exited with errors: {bad} (see worker-*.log)")


def _print_new(study, seen: set[int]) -> set[int]:
    """One line per trial that finished since the last look (the workers' own output goes to their logs)."""
    try:
        trials = study.get_trials(deepcopy=False)
    except Exception:  # noqa: BLE001 - a busy database: try again at the next look
        return seen
    for t in trials:
        if t.number not in seen and t.state.is_finished():
            seen.add(t.number)
            v = f"{t.value:.4f}" if t.value is not None else "-"
            print(f"  trial {t.number} {t.state.name.lower()} value {v} (worker pid {t.user_attrs.get('worker_pid')})",
                  flush=True)
    return seen


# ----------------------------------------------------------------------------------------- results
def best_trial(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


def write_report(out: Path, study, settings: dict) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    _write_trials_csv(out / "trials.csv", trials)
    best = best_trial(study)
    info: dict = {"study": study.study_name, "storage": settings["storage"], "metric": settings["metric"],
                  "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}}
    if best is not None:
        cfg = TrainConfig.load(Path(best.user_attrs["run_dir"]) / "config.yaml").replace(out="")
        cfg.save(out / "best.yaml")
        info.update({"best_trial": best.number, "best_value": best.value, "best_params": best.params,
                     "best_group": best.user_attrs.get("group"), "best_run_dir": best.user_attrs.get("run_dir"),
                     "best_test_accuracy": best.user_attrs.get("test_accuracy"),
                     "best_config": str((out / "best.yaml").resolve())})
    (out / "best.json").write_text(json.dumps(info, indent=2, default=str))
    figures = _plots(out, study)
    _html(out, study, info, figures, trials)
    print(f"\nsearch: {info['trials']}")
    if best is not None:
        print(f"best trial {best.number}: {settings['metric']} {best.value:.4f} ({best.user_attrs.get('group')}) "
              f"{json.dumps(best.params, default=str)}\nBest config: {(out / 'best.yaml').resolve()} "
              f"(classforge train --config {out / 'best.yaml'} [--out RUN])")
    print(f"Report: {(out / 'report.html').resolve()}")
    return info


def _write_trials_csv(path: Path, trials) -> None:
    names = sorted({k for t in trials for k in t.params})
    attrs = ["group", "val_accuracy", "val_log_loss", "test_accuracy", "duration_s", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "last_step"] + names + attrs)
        for t in trials:
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value, t.last_step if t.last_step is not None else ""]
                       + [t.params.get(k, "") for k in names] + [t.user_attrs.get(a, "") for a in attrs])


def _plots(out: Path, study) -> dict[str, str]:
    """optuna's matplotlib plots (no plotly needed); a plot that cannot be drawn is skipped with its reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = _quiet_optuna()
    vis = optuna.visualization.matplotlib
    made = {}
    for fname, fn in (("history.png", vis.plot_optimization_history), ("importances.png", vis.plot_param_importances),
                      ("intermediate.png", vis.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=100)
            plt.close(fig)
            made[fname] = ""
        except Exception as e:  # noqa: BLE001 - e.g. importances need two finished trials with varying params
            made[fname] = f"{type(e).__name__}: {e}"
            plt.close("all")
    return made


def _html(out: Path, study, info: dict, figures: dict, trials) -> None:
    best_rep = Path(info.get("best_run_dir") or "") / "report.html"
    link = os.path.relpath(best_rep, out) if best_rep.is_file() else ""
    rows = [[t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
             t.user_attrs.get("group", ""), "" if t.last_step is None else t.last_step,
             ", ".join(f"{k}={_short(v)}" for k, v in t.params.items()),
             _short(t.user_attrs.get("duration_s", ""))] for t in trials]
    figs = "".join(f"<h3>{html.escape(n)}</h3>" + (_img_tag(out / n, 700) if not err else
                                                   f"<p class='sub'>not drawn: {html.escape(err)}</p>")
                   for n, err in figures.items())
    summary = [["study", info["study"]], ["storage", info["storage"]], ["objective", info["metric"]],
               ["trials", json.dumps(info["trials"])]]
    if "best_trial" in info:
        summary += [["best trial", info["best_trial"]], ["best value", f"{info['best_value']:.4f}"],
                    ["best group", info.get("best_group", "")], ["best params", json.dumps(info["best_params"], default=str)],
                    ["its test accuracy (not optimised)", _short(info.get("best_test_accuracy"))],
                    ["best config", info["best_config"]], ["best run report", link]]
    doc = (f'<!doctype html><html><head><meta charset="utf-8"><title>classforge search</title><style>{_CSS}</style>'
           f"</head><body><h1>classforge search</h1><p class='sub'>{html.escape(dt.datetime.now().isoformat(timespec='seconds'))}</p>"
           f"{_table(['', ''], summary)}<h2>Study plots</h2>{figs}<p class='sub'>Parameter importances use the "
           "parameters present in every finished trial (optuna's default): parameters that exist only for some "
           "strategies are left out.</p><h2>Trials</h2>"
           f"{_table(['#', 'state', 'value', 'group', 'last step', 'params', 'seconds'], rows, left=0)}</body></html>")
    (out / "report.html").write_text(doc)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def reproduce_best(out: Path) -> dict:
    """Train best.yaml again (same split and seed) and compare its validation score with the trial's."""
    info = json.loads((out / "best.json").read_text())
    settings = json.loads((out / "search.json").read_text())
    cfg = TrainConfig.load(out / "best.yaml").replace(out=str(out / "best-reproduced"))
    run = train(cfg)
    s = json.loads((run / "summary.json").read_text())
    value = s["val"][METRICS[settings["metric"]][1]]
    res = {"trial_value": info["best_value"], "reproduced_value": value,
           "difference": value - info["best_value"], "run_dir": str(run)}
    info["reproduced"] = res
    (out / "best.json").write_text(json.dumps(info, indent=2, default=str))
    print(f"reproduced best config: {settings['metric']} {value:.4f} vs trial {info['best_value']:.4f}")
    return res


# ----------------------------------------------------------------------------------------- CLI


def _worker_main(argv: list[str]) -> None:
    settings = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    run_worker(settings, int(argv[1]) if len(argv) > 1 else 0)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
