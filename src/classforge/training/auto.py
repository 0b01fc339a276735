"""`--strategy auto --time-budget T`: the best model the time allows, with a leaderboard.

Candidates are what the registered backbones declare (`BackboneEntry.auto`: a linear head on the default
backbone first, then larger backbones' heads, fine-tuning, from-scratch networks), run in that order on ONE
split. Each is scored on the validation split only; a later candidate replaces the best so far only when it is
better beyond the validation split's noise (clearly_better), and the test split is scored once, for the winner.

The budget is the whole run's, from start to report:
- what finishing takes (the unknown score, scoring val and test, the report) is kept aside up front, for the
  costliest candidate that may win;
- before a candidate is committed, a few timed steps on its own model say what it needs: a head needs its
  embeddings (timed forward passes against the default backbone's measured speed), a network at least
  MIN_EPOCHS epochs; one that cannot finish in the time left is skipped with a note;
- a network gets its share of the time left as its training budget (its schedule stretches to it): the first
  network candidate FIRST_NETWORK_SHARE of it, the others equal parts of the rest.

The winner is then refit on train + validation (--refit; by default when validation holds whole groups the
training split lacks, such as speakers, whose absence from training the shipped model would otherwise pay for):
a head is fit again for the epochs its validation chose, a network continues from its trained weights at
REFIT_LR_SCALE of its learning rate for the time left. What that takes is kept aside like the scoring time,
for the costliest candidate that may win: a network's share of the time is split between its training and
its refit (REFIT_SHARE of its training time).

RUN/candidates.csv and the report's leaderboard list every candidate: validation accuracy with its interval,
time spent, and why it stopped or was skipped; config.yaml is the winner's, so `classforge train --config
RUN/config.yaml` repeats the winner alone."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from classforge.core.config import DEFAULT_EPOCHS, TrainConfig, parse_duration
from classforge.core.errors import ClassforgeError
from classforge.core.files import open_csv
from classforge.data.split import write_split
from classforge.evaluation.metrics import wilson_interval
from classforge.models.registry import entry as registry_entry
from classforge.models.registry import registered
from classforge.training.checkpoints import checkpoint_dir
from classforge.training.flow import (
    Fitted,
    build_for,
    finish_run,
    fit_head_on_embeddings,
    fit_network,
    fit_strategy,
    resolve_for_data,
)
from classforge.training.prepared import Prepared

MIN_EPOCHS = 3  # a network that cannot get this many epochs in its share is not started
FIRST_NETWORK_SHARE = 2 / 3
P_BETTER = 0.05  # a later candidate replaces the best when it is better at this one-sided level (clearly_better)
STEP_BATCH = 8  # timed steps use this batch; step time scales with it
FIXED_FINISH_S = 4.0  # report, plots, model card-free writes; the ONNX export for a network winner
AUTO_BUDGET_HEADS = 30  # --time-budget auto: the time of this many default-head runs ...
AUTO_BUDGET_RANGE = (120.0, 3600.0)  # ... within these bounds (seconds)
REFIT_SHARE = 0.5  # a network's refit gets this much of its training time kept aside ...
REFIT_LR_SCALE = 0.3  # ... and runs at this share of its learning rate: it continues from trained weights
REFIT_HEAD_S = 5.0  # fitting a head again on cached features, beside embedding the validation files' views


@dataclass
class Candidate:
    backbone: str
    strategy: str
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.overrides.items())
        return f"{self.strategy} {self.backbone}{extra}"


@dataclass
class Outcome:
    candidate: Candidate
    status: str  # finished | skipped | failed
    why: str = ""
    val_accuracy: float | None = None
    val_n: int = 0
    correct: np.ndarray | None = None  # per validation file, whether it was right
    seconds: float = 0.0
    fitted: Fitted | None = None
    finish_s: float = 0.0  # what saving and scoring it would take
    refit_s: float = 0.0  # what refitting it on train + validation would take (0: no refit)
    epoch_s: float = 0.0  # a network's training epoch, as its timed steps said

    def row(self, winner: bool) -> dict:
        lo, hi = (wilson_interval(round(self.val_accuracy * self.val_n), self.val_n)
                  if self.val_accuracy is not None else (None, None))
        return {"candidate": self.candidate.name, "backbone": self.candidate.backbone,
                "strategy": self.candidate.strategy, "status": self.status, "winner": winner,
                "val_accuracy": _round(self.val_accuracy), "val_ci95": [_round(lo), _round(hi)],
                "val_files": self.val_n, "seconds": round(self.seconds, 1), "why": self.why}


def _round(v):
    return None if v is None else round(float(v), 4)


def candidates(cfg: TrainConfig, task: str) -> list[Candidate]:
    """What the registered backbones of the task declare for --strategy auto, in rank order; only the given
    backbone's when --backbone names one."""
    pinned = cfg.backbone not in ("auto", "")
    entries = [registry_entry(cfg.backbone)] if pinned else [e for e in registered().values() if e.task == task]
    ranked = [(rank, e.name, Candidate(e.name, strategy, dict(overrides)))
              for e in entries if e is not None for rank, strategy, overrides in e.auto]
    return [c for _, _, c in sorted(ranked, key=lambda r: (r[0], r[1]))]


def train_auto(cfg: TrainConfig, run: Path, data: Prepared, threads: dict, t0: float) -> Path:
    """Run the candidates within the budget, keep the best on validation, finish it as the run."""
    todo = candidates(cfg, data.ds.task)
    budget = whole_run_budget(cfg, data, todo[0])
    deadline = t0 + budget
    write_split(run / "split.csv", data.samples)
    print(f"--strategy auto, --time-budget {budget:.0f} s for the whole run: {len(todo)} candidates "
          f"({', '.join(c.name for c in todo)}), scored on {len(data.of('val'))} validation files")
    outcomes: list[Outcome] = []
    best: Outcome | None = None
    speed: dict | None = None  # the first head's measured embedding speed, which later heads' estimates scale
    for i, c in enumerate(todo):
        networks_left = sum(x.strategy != "linear" for x in todo[i:])
        out = try_candidate(c, cfg, run, data, threads, t0, deadline, best, first=not outcomes,
                            network_share=FIRST_NETWORK_SHARE if networks_left > 1 and not _ran_network(outcomes)
                            else 1 / max(1, networks_left), speed=speed, refit=refits(cfg, data))
        outcomes.append(out)
        if speed is None and out.status == "finished" and out.candidate.strategy == "linear":
            speed = embedding_speed(out.fitted)
        if out.status == "finished" and (best is None or clearly_better(out, best)):
            if best is not None:
                best.fitted = None  # only the best model is kept in memory
            best = out
        else:
            if out.status == "finished" and out.val_accuracy > best.val_accuracy:
                out.why = "; ".join(filter(None, [out.why, within_noise(out, best)]))
            out.fitted = None
        print(f"  {c.name}: {out.status}" + (f", validation accuracy {out.val_accuracy:.3f}"
                                            if out.val_accuracy is not None else "") + (f" ({out.why})" if out.why else ""))
    for o in outcomes:  # the candidates' training checkpoints (in the cache) are not needed once they finished
        shutil.rmtree(checkpoint_dir(run / "candidates" / _slug(o.candidate.name)), ignore_errors=True)
    shutil.rmtree(run / "candidates", ignore_errors=True)
    if best is None:
        raise ClassforgeError("--strategy auto: no candidate finished; " + "; ".join(
            f"{o.candidate.name}: {o.why}" for o in outcomes))
    refit = refit_winner(best, run, data, deadline) if refits(cfg, data) else None
    return finish_winner(run, data, best, outcomes, budget, t0, refit)


def whole_run_budget(cfg: TrainConfig, data: Prepared, first: Candidate) -> float:
    """--time-budget in seconds; `auto`: AUTO_BUDGET_HEADS times what the first candidate's embeddings take on
    this machine (timed forward passes), within AUTO_BUDGET_RANGE, printed."""
    if str(cfg.time_budget).strip().lower() != "auto":
        return parse_duration(cfg.time_budget)
    from classforge.models.registry import Classifier, create_backbone
    from classforge.training.flow import backbone_kwargs

    c = cfg.replace(backbone=first.backbone)
    model = Classifier(create_backbone(first.backbone, pretrained=False, **backbone_kwargs(c, 0)), len(data.labels))
    per_file = timed_forward_per_file(model) * 1.5
    n = len(data.samples)
    lo, hi = AUTO_BUDGET_RANGE
    budget = min(hi, max(lo, AUTO_BUDGET_HEADS * n * per_file))
    print(f"--time-budget auto: {budget:.0f} s ({n} files; {first.name} embeds about {1 / per_file:.0f} files/s "
          f"here)")
    return budget


def _ran_network(outcomes: list[Outcome]) -> bool:
    return any(o.candidate.strategy != "linear" and o.status == "finished" for o in outcomes)


def embedding_speed(f: Fitted) -> dict | None:
    """Seconds per embedded file as the first head's run measured them (decoding, the engine, cache writes), beside
    a timed forward pass of its model; None when its embeddings all came from the cache."""
    e = f.extra.get("embeddings", {})
    if not e.get("computed") or not f.timing.get("embedding_s"):
        return None
    return {"s_per_file": f.timing["embedding_s"] / e["computed"], "fwd_s": timed_forward_per_file(f.model)}


def try_candidate(c: Candidate, cfg: TrainConfig, run: Path, data: Prepared, threads: dict, t0: float,
                  deadline: float, best: Outcome | None, first: bool, network_share: float,
                  speed: dict | None = None, refit: bool = False) -> Outcome:
    """Fit one candidate if the time left allows it; its validation accuracy. The first candidate (the
    default backbone's head) always runs: its failure is the run's."""
    t = time.time()
    try:
        ccfg = resolve_for_data(cfg.replace(backbone=c.backbone, strategy=c.strategy, time_budget=None,
                                            **declared_overrides(c, cfg)), data)
        ccfg, model = build_for(ccfg, data)
        # the first candidate runs whatever it costs: a head needs no timed steps to finish
        cost = ({"finish_s": FIXED_FINISH_S} if first and ccfg.strategy == "linear"
                else measured_cost(model, ccfg, data, speed))
        if not refit or ccfg.strategy != "linear":  # a network's refit is carved from its own share below
            cost["refit_s"] = 0.0
        finish = max(cost["finish_s"] + cost.get("refit_s", 0.0), best.finish_s + best.refit_s if best else 0.0)
        left = deadline - time.time() - finish
        if not first:
            if ccfg.strategy == "linear" and cost["embed_s"] > left:
                return Outcome(c, "skipped", f"its embeddings need ~{cost['embed_s']:.0f} s, {max(0, left):.0f} s "
                                             "left", seconds=time.time() - t)
            if ccfg.strategy != "linear":
                share = left * network_share - cost["val_s"] - cost.get("embed_s", 0.0) * (ccfg.strategy == "two-stage")
                share /= 1 + REFIT_SHARE * refit
                need = MIN_EPOCHS * cost["epoch_s"]
                if share < need:
                    return Outcome(c, "skipped", f"{MIN_EPOCHS} epochs need ~{need:.0f} s, {max(0, share):.0f} s "
                                                 "left for it", seconds=time.time() - t)
                ccfg = ccfg.replace(train_budget=f"{share:.0f}s")
                cost["refit_s"] = REFIT_SHARE * share * refit
        where = run / "candidates" / _slug(c.name)  # its per-epoch files; removed once the winner is known
        where.mkdir(parents=True, exist_ok=True)
        fitted = fit_strategy(ccfg, where, data, model, threads, t0)
        correct = validation_correct(fitted, data)
    except ClassforgeError as e:
        if first:
            raise
        return Outcome(c, "failed", str(e).splitlines()[0][:200], seconds=time.time() - t)
    why = training_note(ccfg, fitted)
    if refit and ccfg.strategy == "linear":  # measured now: how fast this head's backbone embedded here
        cost["refit_s"] = head_refit_seconds(fitted, data)
    return Outcome(c, "finished", why, float(correct.mean()), len(correct), correct, time.time() - t, fitted,
                   cost["finish_s"], cost.get("refit_s", 0.0), cost.get("epoch_s", 0.0))


def training_note(cfg: TrainConfig, f: Fitted) -> str:
    """How long a network trained of the share it was given, and what stopped it before the share ran out
    (the leaderboard's "why": a candidate that stopped early is not one that ran out of time)."""
    if not cfg.train_budget:
        return ""
    trainer = f.extra.get("trainer", {})
    stopped = trainer.get("stopped_by")
    return (f"trained {f.timing.get('fit_s', 0.0):.0f} s of {cfg.train_budget}, {trainer.get('epochs_run', 0)} epochs"
            + (f", ended by {stopped}" if stopped and stopped != "time budget" else ""))


def declared_overrides(c: Candidate, cfg: TrainConfig) -> dict:
    """The candidate's declared settings, where the user left the key at its default: what the user set wins."""
    defaults = TrainConfig()
    return {k: v for k, v in c.overrides.items() if getattr(cfg, k) == getattr(defaults, k)}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name)[:60]


def clearly_better(new: Outcome, old: Outcome) -> bool:
    """Whether `new` beats `old` on the validation files by more than their noise: of the files only one of them
    gets right, new must win so many more that a coin would do it less than P_BETTER of the time (McNemar's
    exact test, one-sided).
    Candidates come in the order of what they are expected to be worth, so a later one must show it is better: a
    lead of a few files is the luck of the validation split, and the candidate that wins by luck does worse on
    the test split (the winner's curse of choosing among many on one small split)."""
    return sign_test_p(*_discordant(new, old)) < P_BETTER


def sign_test_p(wins: int, losses: int) -> float:
    """P(at least `wins` heads in wins + losses fair coin tosses)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def within_noise(new: Outcome, old: Outcome) -> str:
    wins, losses = _discordant(new, old)
    return (f"not clearly better than {old.candidate.name}: right on {wins} validation files it missed, wrong on "
            f"{losses} it got (p = {sign_test_p(wins, losses):.2f}, needs < {P_BETTER})")


def _discordant(new: Outcome, old: Outcome) -> tuple[int, int]:
    return int((new.correct & ~old.correct).sum()), int((~new.correct & old.correct).sum())


@torch.inference_mode()
def validation_correct(f: Fitted, data: Prepared) -> np.ndarray:
    """Per validation file, whether the candidate gets it right: from exact cached features when a linear head
    has them, else through the same Predictor as the final scoring."""
    from classforge.runtime.predictor import Predictor

    y = np.array(data.y("val"))
    if not len(y):
        raise ClassforgeError("--strategy auto chooses on the validation split, and this split has none")
    if f.cfg.strategy == "linear" and "val" in f.features:
        pred = f.model.head(torch.from_numpy(f.features["val"])).argmax(1).numpy()
    else:
        p = Predictor(f.model, f.model.backbone.spec, data.labels, max_pixels=f.cfg.max_pixels)
        pred = p.predict_proba([s.path for s in data.of("val")], progress_desc="Validating candidate").argmax(1)
        f.model.train(False)
    return pred == y


def measured_cost(model, cfg: TrainConfig, data: Prepared, speed: dict | None = None) -> dict:
    """Seconds, from a few timed steps on this model: a forward pass per file (embedding, scoring) and for a
    network a training epoch; what finishing the run with it would take. Embedding: the first head's measured
    seconds per file (`speed`), scaled by how much slower this model's forward pass is than its model's; without
    it, 1.5 forward passes per file (decoding and the engines make embedding slower than a bare pass)."""
    fwd = timed_forward_per_file(model)
    n_train, n_val, n_test = (len(data.of(s)) for s in ("train", "val", "test"))
    views = max(1, cfg.views)
    embed = embedding_seconds(n_train * views + n_val + n_test, fwd, speed)
    cost = {"fwd_s": fwd, "embed_s": embed, "val_s": n_val * fwd * 1.5}
    if cfg.strategy == "linear":
        cost["finish_s"] = FIXED_FINISH_S
        cost["refit_s"] = REFIT_HEAD_S + embedding_seconds(n_val * views, fwd, speed)
    else:
        cost["epoch_s"] = timed_train_step(model, cfg) * math.ceil(n_train / cfg.batch_size) + cost["val_s"]
        fit_files = min(n_train, 3000)  # the unknown score's features (training.open_set.MAX_FIT_FILES)
        cost["finish_s"] = FIXED_FINISH_S + (n_val + n_test + fit_files) * fwd * 1.5
    return cost


def embedding_seconds(files: int, fwd_s: float, speed: dict | None) -> float:
    """Embedding `files` with a model whose timed forward pass takes `fwd_s` per file: the first head's measured
    seconds per file scaled by the two models' forward times, or 1.5 forward passes per file without it."""
    per_file = speed["s_per_file"] * fwd_s / speed["fwd_s"] if speed else fwd_s * 1.5
    return files * per_file


def _example(model, batch: int) -> torch.Tensor:
    spec = model.backbone.spec
    if spec.task == "audio":
        return 0.1 * torch.randn(batch, round(spec.sample_rate * spec.clip_seconds))
    return torch.randn(batch, spec.channels, spec.size, spec.size)


@torch.inference_mode()
def timed_forward_per_file(model, reps: int = 2) -> float:
    model.eval()
    x = _example(model, STEP_BATCH)
    model(x)  # the first pass allocates
    t = time.perf_counter()
    for _ in range(reps):
        model(x)
    return (time.perf_counter() - t) / (reps * STEP_BATCH)


def timed_train_step(model, cfg: TrainConfig, reps: int = 2) -> float:
    """Seconds of one training step at cfg.batch_size (forward + backward, scaled from STEP_BATCH)."""
    model.train()
    x = _example(model, STEP_BATCH)
    y = torch.zeros(STEP_BATCH, dtype=torch.long)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in params:
            p.grad = None

    step()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    model.eval()
    return (time.perf_counter() - t) / reps * cfg.batch_size / STEP_BATCH


def refits(cfg: TrainConfig, data: Prepared) -> bool:
    """--refit yes, or auto and the validation split holds whole groups (speakers, sources) that the training
    split lacks: then the shipped model would never learn them unless it is refit."""
    if cfg.refit == "no" or not data.of("val"):
        return False
    if cfg.refit == "yes":
        return True
    val_groups = {s.group for s in data.of("val") if given_group(s.group)}
    return bool(val_groups) and not val_groups & {s.group for s in data.of("train")}


def given_group(group: str) -> bool:
    """A group the data gave (--group-by, a labels CSV's group column), not one the split made up ("#N": a file
    on its own or a cluster of near-duplicates)."""
    return bool(group) and not group.startswith("#")


def head_refit_seconds(f: Fitted, data: Prepared) -> float:
    """A finished head's refit: embedding the validation files' training views (at the speed its run measured,
    or 1.5 timed forward passes per file), then fitting the head again."""
    speed = embedding_speed(f)
    per_file = speed["s_per_file"] if speed else 1.5 * timed_forward_per_file(f.model)
    views = max(1, f.extra.get("embeddings", {}).get("views", 1))
    return REFIT_HEAD_S + per_file * len(data.of("val")) * views


def with_validation_trained(data: Prepared) -> Prepared:
    """The same data with the validation files moved into the training split (training files first, in order)."""
    moved = [dataclasses.replace(s, split="train") for s in data.of("val")]
    return dataclasses.replace(data, samples=data.of("train") + moved + data.of("test"), notes=[])


def refit_winner(best: Outcome, run: Path, data: Prepared, deadline: float) -> dict:
    """Train the chosen model further on train + validation files, in place; what was done, for the summary.
    A head is fit again (cached features) for as many epochs as its validation chose; a network continues from
    its weights at REFIT_LR_SCALE of its learning rate for the time left before scoring, at most as long as it
    trained. The unknown score is still fitted on the training split alone, and the test split stays unseen."""
    f, t = best.fitted, time.time()
    merged = with_validation_trained(data)
    where = run / "refit"
    where.mkdir(parents=True, exist_ok=True)
    left = deadline - t - best.finish_s
    info = {"files": len(merged.of("train")), "validation_files": len(data.of("val"))}
    if f.cfg.strategy == "linear":
        epochs = chosen_head_epochs(f.history)
        rcfg = f.cfg.replace(epochs=epochs)
        hist = fit_head_on_embeddings(f.model, merged, rcfg, where, {"embedding_s": 0.0, "fit_s": 0.0}, {}, {})
        info["epochs"] = epochs
    else:
        seconds = min(left, f.timing.get("fit_s", 0.0))
        if seconds < best.epoch_s:
            shutil.rmtree(where, ignore_errors=True)
            return {**info, "done": False, "why": f"{max(0.0, left):.0f} s left before scoring, less than one epoch"}
        from classforge.training.fit import resolve_lr, resolve_optimizer

        lr = resolve_lr(f.cfg, f.cfg.strategy, resolve_optimizer(f.cfg)) * REFIT_LR_SCALE
        rcfg = f.cfg.replace(lr=f"{lr:.6g}", epochs=0, time_budget=None, train_budget=f"{seconds:.0f}s",
                             resume=False)
        hist = fit_network(f.model, merged, rcfg, where, f.cfg.strategy, {}, warm_start=True)
        info.update(train_budget_s=round(seconds), lr=float(f"{lr:.6g}"), epochs=sum(1 for r in hist if r.get("epoch")))
    shutil.rmtree(checkpoint_dir(where), ignore_errors=True)
    shutil.rmtree(where, ignore_errors=True)
    f.history += [{**r, "stage": "refit"} for r in hist]
    f.timing["fit_s"] += time.time() - t
    data.notes.append(f"The shipped model was refit on the {info['validation_files']} validation files after it was "
                      "chosen (--refit): its validation figures are not held out; the test split's are")
    print(f"Refit the winner on train + validation ({info['files']} files) in {time.time() - t:.0f} s")
    return {**info, "done": True, "seconds": round(time.time() - t, 1)}


def chosen_head_epochs(history: list[dict]) -> int:
    """The epoch whose weights a head's early stopping kept (lowest validation loss)."""
    rows = [r for r in history if r.get("stage") == "head" and r.get("val_loss") is not None]
    return min(rows, key=lambda r: r["val_loss"])["epoch"] if rows else DEFAULT_EPOCHS["linear"]


def finish_winner(run: Path, data: Prepared, best: Outcome, outcomes: list[Outcome], budget: float,
                  t0: float, refit: dict | None = None) -> Path:
    rows = [o.row(o is best) for o in outcomes]
    write_candidates_csv(run / "candidates.csv", rows)
    f = best.fitted
    winner_cfg = f.cfg.replace(time_budget=None)
    winner_cfg.save(run / "config.yaml")  # `classforge train --config` repeats the winner alone
    f.extra["auto"] = {"time_budget_s": round(budget, 1), "winner": best.candidate.name,
                       "candidates_s": round(time.time() - t0, 1), "candidates": rows, "refit": refit}
    print(f"Best on validation: {best.candidate.name} ({best.val_accuracy:.3f}); scoring the test split once")
    return finish_run(run, data, f, t0)


def write_candidates_csv(path: Path, rows: list[dict]) -> None:
    keys = ["candidate", "backbone", "strategy", "status", "winner", "val_accuracy", "val_ci95_low",
            "val_ci95_high", "val_files", "seconds", "why"]
    with open_csv(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in keys}, "val_ci95_low": r["val_ci95"][0],
                        "val_ci95_high": r["val_ci95"][1], "winner": int(r["winner"])})
