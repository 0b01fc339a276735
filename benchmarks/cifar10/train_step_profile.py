"""Where a CPU training step of a small CIFAR CNN spends its time, and what the frozen whitening bias saves.

    python benchmarks/train_step_profile.py --backbone cnn_fast_256k --threads 2
    python benchmarks/train_step_profile.py --backbone cnn_plain_256k --batch-size 128 --rounds 5
    python benchmarks/train_step_profile.py --backbone cnn_plain_256k --bf16 --compare optimizer   # SGD vs muon
    python benchmarks/train_step_profile.py --backbone cnn_plain_256k --bf16 --compare block   # plain vs plainpool
    python benchmarks/train_step_profile.py --backbone cnn_plain_256k --bf16 --compare variants \
        --variant "block=plainpool" --variant "block=plainpool se=8"   # any backbone arguments, side by side

A plain PyTorch step (forward, label-smoothed cross-entropy, backward, SGD Nesterov; channels_last, fp32 or
--bf16 autocast), no Lightning and no data loading, so only the network's own cost is measured. For each
`whiten_bias` setting ("train": the stem's bias learns; "frozen": it does not, so backpropagation stops at the
first trained conv) it prints training images/s over alternating rounds (the two settings take turns, so drift in
a shared machine's speed hits both alike), then one torch.profiler step breakdown: time per operator and input
shape, largest first. Random inputs: the cost does not depend on the pixel values. `--compare optimizer` instead
compares SGD Nesterov with `--optimizer muon` (classforge.training.optim.OrthoSGD: the conv weights orthogonalised,
the rest SGD) on the preset's frozen stem, in the same alternating rounds. `--compare block` compares the preset's
own block order with `block=plainpool` (each stage's max-pool moved before its last BN and ReLU; SGD, frozen stem);
`--compare variants` compares any backbone arguments given by `--variant` (SGD, frozen stem).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from classforge.core.config import load_yaml
from classforge.models.registry import Classifier, create_backbone


def parse_variant(text: str) -> dict:
    """ "block=plainpool se=8 act=gelu" -> {"block": "plainpool", "se": 8, "act": "gelu"} (values read as YAML,
    as `classforge train -a` reads them)."""
    out = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--variant takes key=value pairs separated by spaces, got {text!r}")
        out[key] = load_yaml(value)
    return out


def build(name: str, whiten_bias: str, backbone_args: dict) -> Classifier:
    torch.manual_seed(0)
    m = Classifier(create_backbone(name, pretrained=False, whiten_bias=whiten_bias, **backbone_args), 10)
    return m.to(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="cnn_fast_256k", help="a cnn preset with the whitening stem")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per setting")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with native bf16)")
    ap.add_argument("--top", type=int, default=12, help="profiler rows to print")
    ap.add_argument("--variant", action="append", default=[],
                    help="with --compare variants: backbone arguments of one setting, e.g. \"block=plainpool se=8\" "
                         "(repeat the option; an empty string is the preset as it is)")
    ap.add_argument("--compare", choices=("whiten", "optimizer", "block", "variants"), default="whiten",
                    help="whiten: the stem's bias trained vs frozen (SGD); optimizer: SGD vs muon (frozen stem); "
                         "block: the preset's blocks vs block=plainpool (SGD, frozen stem); variants: the --variant "
                         "settings")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x = torch.randn(a.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch_size,))
    runs = {}
    if a.compare == "whiten":
        settings = {f"whiten_bias={wb}": (wb, "sgd", {}) for wb in ("train", "frozen")}
    elif a.compare == "optimizer":
        settings = {f"optimizer={o}": ("frozen", o, {}) for o in ("sgd", "muon")}
    elif a.compare == "block":
        settings = {"block=preset": ("frozen", "sgd", {}), "block=plainpool": ("frozen", "sgd", {"block": "plainpool"})}
    else:
        if len(a.variant) < 2:
            raise SystemExit("--compare variants needs two or more --variant options")
        settings = {(v or "preset"): ("frozen", "sgd", parse_variant(v)) for v in a.variant}
    for label, (wb, optimizer, backbone_args) in settings.items():
        m = build(a.backbone, wb, backbone_args)
        m.backbone.init_from_data(x[:64].contiguous())
        if optimizer == "sgd":
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        else:
            from classforge.training.optim import OrthoSGD

            body = [q for q in m.backbone.parameters() if q.ndim > 1]
            rest = [q for q in m.parameters() if q.ndim <= 1] + [q for q in m.head.parameters() if q.ndim > 1]
            opt = OrthoSGD([{"params": body, "lr": 0.015, "orthogonal": True}, {"params": rest}], lr=0.01)

        def step(m=m, opt=opt) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                loss = F.cross_entropy(m(x), y, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        runs[label] = (step, [])
    for _ in range(a.rounds):
        for step, rates in runs.values():
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            rates.append(a.steps * a.batch_size / (time.perf_counter() - t))
    print(f"{a.backbone}, batch {a.batch_size}, {a.threads} threads, {'bf16 autocast' if a.bf16 else 'fp32'}, "
          f"channels_last: training images/s per round ({a.steps} steps each)")
    for label, (_, rates) in runs.items():
        print(f"  {label:<30}  median {statistics.median(rates):7.1f}   rounds "
              + " ".join(f"{r:.0f}" for r in rates))
    from torch.profiler import ProfilerActivity, profile

    for label, (step, _) in runs.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(3):
                step()
        rows = sorted(p.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows)
        print(f"\n{label}: {total / 3 / 1000:.0f} ms per step (profiled); largest operators per step:")
        for e in rows[:a.top]:
            shapes = ", ".join("x".join(map(str, s)) for s in e.input_shapes if s)[:70]
            print(f"  {e.self_cpu_time_total / 3 / 1000:7.1f} ms  {100 * e.self_cpu_time_total / total:5.1f}%  "
                  f"{e.key:<40} {shapes}")


if __name__ == "__main__":
    main()
