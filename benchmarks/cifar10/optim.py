"""Muon-style orthogonalised updates for from-scratch CNNs, with SGD (Nesterov) for everything else.

For a weight matrix W (a conv's filters flattened to out x in*k*k) the momentum of its gradient is replaced by
the nearest semi-orthogonal matrix before the step: all its singular values set to about 1 by a few Newton-Schulz
iterations (Jordan et al. 2024, "Muon"; used by the fastest CIFAR-10 speed runs). Each step then moves every
direction of the filter bank by the same amount instead of mostly along the few dominant gradient directions.

classforge's variant is meant for layers followed by a normalisation layer (BatchNorm after every conv in the
`cnn` family, ResNets), where a weight's scale does not change the network's function: each orthogonal group keeps
its weight norm at its starting value, and its learning rate is the step size relative to that norm (0.015
moves a filter bank by 1.5% of its norm per step at the peak of the schedule; on CIFAR-10 at batch 256, 0.2
diverged and 0.015 did best of 0.2 / 0.03 / 0.015 in 10-minute trials). Weight decay would only change that norm, so those
groups get none. Biases, normalisation weights and the classifier head take plain SGD with Nesterov momentum and
the usual learning rate and L2 weight decay.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients that push singular values in (0, 1] towards 1 in few steps (Jordan et al.)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors (U V^T of g = U S V^T), in float32."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.T if tall else x


def _orthogonal_like(d: torch.Tensor, steps: int) -> torch.Tensor:
    """orthogonalize(d as out x rest) in d's shape and memory layout. A channels_last conv gradient is flattened
    in memory order (out, kh, kw, in): a column permutation of (out, in, kh, kw), which commutes with the
    orthogonalisation, so neither the flattening nor the step into the weight copies across layouts."""
    if d.dim() == 4 and not d.is_contiguous() and d.is_contiguous(memory_format=torch.channels_last):
        v = d.permute(0, 2, 3, 1)
        return orthogonalize(v.reshape(len(d), -1), steps).view(v.shape).permute(0, 3, 1, 2)
    return orthogonalize(d.reshape(len(d), -1), steps).view(d.shape)


class OrthoSGD(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum whose groups with `orthogonal=True` take Muon steps of relative size `lr`.

    Groups: {"params", "lr", "weight_decay", "orthogonal"}; momentum and nesterov are shared. One optimizer, so
    Lightning's automatic optimisation, LR schedulers (they scale every group's lr), SAM's closure and
    checkpoints work as with torch.optim.SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, not {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=False, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd and not group["orthogonal"]:
                    d = d.add(p, alpha=wd)
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                if not group["orthogonal"] or p.ndim < 2:
                    p.add_(d, alpha=-lr)
                    continue
                if "norm" not in state:
                    state["norm"] = p.norm().clamp_min(1e-12).item()
                norm = state["norm"]
                o = _orthogonal_like(d, group["ns_steps"]).to(p.dtype)
                p.add_(o, alpha=-lr * norm / max(o.norm().item(), 1e-12))
                p.mul_(norm / p.norm().clamp_min(1e-12))
        return loss


# ------------------------------------------------------------------------------- registration as --optimizer muon
def _check(args: dict) -> None:
    from classforge.core.errors import ClassforgeError

    try:
        step = float(args.get("muon_lr", MUON_LR))
    except (TypeError, ValueError):
        step = float("nan")
    if not 0 < step <= 1:  # also NaN
        raise ClassforgeError(f"muon_lr is each weight's step as a fraction of its norm, above 0 and at most 1 "
                              f"(default {MUON_LR}); got {args.get('muon_lr')!r}")
    unknown = set(args) - {"muon_lr"}
    if unknown:
        raise ClassforgeError(f"--optimizer muon takes optimizer_args muon_lr only, not {sorted(unknown)}")


def _matrix_groups(index: int, is_head: bool, mats: list, lr_share: float, settings) -> list[dict] | None:
    """The backbone's weight matrices take orthogonal steps of muon_lr x (the group's share of the head's LR);
    the head stays SGD."""
    if is_head:
        return None
    step = float(settings.args.get("muon_lr", MUON_LR))
    return [{"params": mats, "lr": step * lr_share, "orthogonal": True, "weight_decay": 0.0}]


def _build(groups: list[dict], settings) -> torch.optim.Optimizer:
    return OrthoSGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0,
                    weight_decay=settings.weight_decay)


MUON_LR = 0.015  # chosen on 10-minute CIFAR-10 trials at batch 256: 0.2 diverged, 0.03 and 0.015 trained


def register() -> None:
    """`--optimizer muon` (with `optimizer_args={muon_lr: 0.015}`) for runs started in this process."""
    from classforge.training.optimizers import OptimizerEntry, register_optimizer

    register_optimizer(OptimizerEntry("muon", _build, sgd_like=True, matrix_groups=_matrix_groups, check=_check,
                                      description="orthogonalised steps for the backbone's weight matrices"))


register()
