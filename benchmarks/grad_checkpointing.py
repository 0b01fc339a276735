"""Memory saved by --grad-checkpointing: peak resident memory of one training step (forward + backward),
measured in a fresh process per setting so the peaks do not mix.

Usage: python benchmarks/grad_checkpointing.py [--backbone efficientnet_lite0] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(backbone: str, batch: int, ckpt: bool) -> dict:
    import torch

    from classforge.models.registry import Classifier, create_backbone

    torch.manual_seed(0)
    bb = create_backbone(backbone, pretrained=False)
    model = Classifier(bb, 10).train()
    bb.set_grad_checkpointing(ckpt)
    x = torch.randn(batch, 3, bb.spec.size, bb.spec.size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after imports and model
    t = time.time()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = (time.time() - t) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"backbone": backbone, "batch": batch, "grad_checkpointing": ckpt,
            "step_peak_mib": round((peak - base) / 1024, 1), "step_s": round(step_s, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", choices=["on", "off"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.backbone, a.batch, a.child == "on")))
        return
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--backbone", a.backbone, "--batch", str(a.batch),
                              "--child", mode], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:])


if __name__ == "__main__":
    main()
