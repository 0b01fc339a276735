"""Several processes for one run, on one machine or several: `--devices N` / `--num-nodes M`, `torchrun` or SLURM.

Lightning Fabric (the engine under classforge's Lightning training) launches or joins them: with `--devices N`
the command starts N-1 copies of itself; under torchrun, SLURM or hand-set variables (MASTER_ADDR, MASTER_PORT,
NODE_RANK, WORLD_SIZE, LOCAL_RANK) the launcher made them. CPUs talk over gloo, GPUs over NCCL.

What the processes share is the embedding cache (content-addressed, so shards never collide): each process
embeds its share of the files, and the main process (global rank 0) reads the others' rows from the cache, fits
the head, evaluates and writes the run. Across machines the cache must be on storage they all see
(CLASSFORGE_CACHE); where it is not, the main process embeds what it cannot find and says so."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from classforge.core.errors import ClassforgeError


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the run's processes; one process alone is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's part of `items` (every world_size-th, from its rank): parts never overlap and cover
        all items."""
        return items[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list:
        """`obj` of every process, in rank order (picklable values between our own processes only)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """The main process's `obj` in every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def wants_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def local_device(accelerator: str, local_rank: int = 0) -> str:
    """Where this process runs its forward passes: its own GPU where one is asked for (or `auto` finds one)."""
    if wants_gpu(accelerator):
        if not torch.cuda.is_available():
            raise ClassforgeError("--accelerator gpu, but torch sees no CUDA device here; use --accelerator cpu "
                                  "or install a CUDA build of torch")
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def launched_by_launcher() -> bool:
    """torchrun, Lightning's own children, hand-set variables, or a SLURM batch job of several tasks."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1 and ("LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env):
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requested_processes(devices: str | int, num_nodes: int) -> int:
    """Processes asked for with --devices N --num-nodes M (`auto` devices: one per node)."""
    d = str(devices).strip()
    per_node = int(d) if d.isdigit() else (len([x for x in d.split(",") if x.strip()]) if "," in d else 1)
    return max(1, per_node) * max(1, int(num_nodes))


_joined = ProcessGroup()  # what join() found for this process; process-wide, like torch.distributed's own state


def current() -> ProcessGroup:
    """The process group this process has joined (one process alone when none)."""
    if _joined.world_size == 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # a group someone else started (Lightning's Trainer on its own): its ranks, this process's device
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), local,
                            int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _joined.device)
    return _joined


def join(accelerator: str = "auto", devices: str | int = "auto", num_nodes: int = 1) -> ProcessGroup:
    """Start (or join) the run's processes when more than one is asked for or a launcher started this one;
    one process alone otherwise. Every process returns from here with its place in the group."""
    global _joined
    if requested_processes(devices, num_nodes) <= 1 and not launched_by_launcher():
        _joined = ProcessGroup(device=local_device(accelerator))
        return _joined
    if _joined.world_size > 1:
        return _joined
    from lightning.fabric import Fabric  # seconds of imports: only for several processes

    per_node, nodes = _per_node(devices, num_nodes)
    gpu = wants_gpu(accelerator)
    try:
        fabric = Fabric(accelerator="cuda" if gpu else "cpu", devices=per_node, num_nodes=nodes, strategy="ddp")
        fabric.launch()
    except (ValueError, RuntimeError, TypeError) as e:
        raise ClassforgeError(f"could not start {per_node} x {nodes} processes: {str(e).splitlines()[0]}. With "
                              "torchrun or SLURM, give --devices (processes per node) and --num-nodes as the launcher "
                              "has them") from e
    _joined = ProcessGroup(fabric.global_rank, fabric.world_size, fabric.local_rank,
                           fabric.world_size // max(1, nodes), f"cuda:{fabric.local_rank}" if gpu else "cpu")
    return _joined


def _per_node(devices: str | int, num_nodes: int) -> tuple[int | str, int]:
    """(processes per node, nodes): from the options, or from the launcher when the options leave them open."""
    d = str(devices).strip()
    env = os.environ
    if d in ("auto", "", "-1"):
        if "LOCAL_WORLD_SIZE" in env:  # torchrun
            d = env["LOCAL_WORLD_SIZE"]
        elif "SLURM_NTASKS_PER_NODE" in env:
            d = env["SLURM_NTASKS_PER_NODE"].split("(")[0]
        else:
            d = "1"
    per_node: int | str = int(d) if d.isdigit() else d
    nodes = int(num_nodes)
    if nodes <= 1 and isinstance(per_node, int) and per_node > 0:
        if "WORLD_SIZE" in env:
            nodes = max(1, int(env["WORLD_SIZE"]) // per_node)
        elif "SLURM_NNODES" in env:
            nodes = int(env["SLURM_NNODES"])
    return per_node, nodes
