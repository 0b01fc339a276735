"""The linear head's own AdamW is torch's AdamW with a cosine LambdaLR, step for step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classforge.training.head import HeadAdamW


def _train(make_opt, steps: int = 60):
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 4)
    x, y = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 4
    opt, sched = make_opt(head)
    lrs = []
    for _ in range(steps):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        lrs.append(sched.get_last_lr()[0] if sched is not None else opt.lr)
    return head.weight.detach().clone(), head.bias.detach().clone(), lrs


def test_head_adamw_matches_torch_adamw_with_cosine_schedule():
    def torch_opt(head):
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / 50))))

    def ours(head):
        return HeadAdamW(list(head.parameters()), lr=3e-3, weight_decay=1e-3, total_steps=50), None

    w1, b1, lr1 = _train(torch_opt)
    w2, b2, lr2 = _train(ours)
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(b2, b1, rtol=0, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(lr1, lr2)) < 1e-12 and lr2[-1] == 0.0
