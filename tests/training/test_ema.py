"""EMAWeights: the average is the one validation scores, the best epoch keeps, and the model ends with."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classforge.core.config import TrainConfig
from classforge.core.errors import ClassforgeError
from classforge.training.module import ClassifierModule
from classforge.training.trainer import EMAWeights, make_trainer


class Recorder(L.Callback):
    """Snapshots of the live weights after every optimizer step (what the EMA must average)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def hand_ema(steps, start, decay):
    ema = {k: v.clone() for k, v in start.items()}
    ends = []
    for n, w in enumerate(steps, start=1):
        d = min(decay, (1 + n) / (10 + n))
        for k, e in list(ema.items()):
            ema[k] = d * e + (1 - d) * w[k] if e.dtype.is_floating_point else w[k].clone()
        ends.append({k: v.clone() for k, v in ema.items()})
    return ends


def val_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("with_val", [True, False])
def test_ema_is_validated_kept_and_restored(tmp_path, with_val):
    torch.manual_seed(0)
    x = torch.randn(96, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    xv, yv = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    val_dl = DataLoader(TensorDataset(xv, yv), batch_size=40) if with_val else None
    module = ClassifierModule(model, [(list(model.parameters()), 0.2)], weight_decay=0.0, total_steps=30,
                              optimizer="sgd", schedule="constant")
    rec = Recorder()
    cfg = TrainConfig(ema=0.9, patience=10**6, precision="32-true")
    trainer, hist = make_trainer(cfg, tmp_path, "scratch", 5, "val_loss" if with_val else "train_loss",
                                 checkpoints=False, distributed=False, extra_callbacks=[rec])
    trainer.fit(module, train_dl, val_dl)

    emas = hand_ema(rec.steps, start, 0.9)
    assert len(rec.steps) == 30
    per_epoch = [emas[6 * (e + 1) - 1] for e in range(5)]  # 6 steps per epoch
    # the live weights moved away from the average: the test can tell them apart
    assert not torch.allclose(rec.steps[-1]["3.weight"], per_epoch[-1]["3.weight"], atol=1e-4)
    if with_val:
        ref = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        losses = []
        for e, state in enumerate(per_epoch):
            ref.load_state_dict(state)
            losses.append(val_loss(ref, xv, yv))
            assert hist.rows[e]["val_loss"] == pytest.approx(losses[-1], rel=1e-4, abs=1e-5)  # EMA was validated
        best = min(range(5), key=lambda e: losses[e])
        expect = per_epoch[best]
    else:
        expect = per_epoch[-1]
    got = model.state_dict()
    for k, v in expect.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-5), k


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ClassforgeError, match="--ema"):
        EMAWeights(1.5)
