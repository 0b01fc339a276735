"""How the frozen backbone runs when embeddings are extracted.

- ``onnx``: the backbone exported once to ONNX (kept in the embedding cache) and run by ONNX Runtime in fp32, one
  single-threaded pass per decode worker. Its features are the shipped fp32 model's, so a linear run scores its
  val and test files from them instead of running the model over them a second time.
- ``torch``: PyTorch, channels_last; on CPUs with native bf16 (AVX512-BF16 / AMX) image backbones run as a frozen
  TorchScript graph under bf16 autocast (eager bf16 autocast if tracing fails or CLASSFORGE_NO_JIT=1), fp32
  elsewhere, fp16 autocast on CUDA. bf16 features are close to fp32 but not equal, so scoring needs a second pass.

``auto`` picks ONNX Runtime on a CPU (with bf16 as well: exact features, no second pass for scoring, and per-core
workers that keep their speed when another process takes a core) and torch on a GPU. ONNX Runtime int8 is not
offered for extraction: its Lite0 features are too far from fp32 ones (benchmarks/results has the figures).

The Predictor (evaluation, predict, serving) stays fp32 so that a file's probabilities never depend on its batch
neighbours: PyTorch fp32, or ONNX Runtime fp32 where `resolve_eval_engine` picks it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from classforge.core.errors import ClassforgeError
from classforge.core.files import write_atomically
from classforge.runtime.feature_cache import OWN_GRAPH_ENGINE_KEY
from classforge.runtime.onnx import ort_session, torch_to_onnx_bytes

ENGINES = ("auto", "torch", "onnx")


def fast_cpu_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is far slower."""
    if os.environ.get("CLASSFORGE_NO_BF16") == "1":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(name: str, device: str = "cpu") -> str:
    """'auto' -> the engine for this machine; an explicit name is checked."""
    if name not in ENGINES:
        raise ClassforgeError(f"--extract-engine must be one of {', '.join(ENGINES)}, not {name!r}")
    if name != "auto":
        if name == "onnx" and not onnxruntime_available():
            raise ClassforgeError(f"--extract-engine {name} needs onnxruntime: pip install 'classforge[serve]'")
        return name
    if device != "cpu" or not onnxruntime_available():
        return "torch"
    return "onnx"


EVAL_ENGINES = ("auto", "torch", "onnx")


def resolve_eval_engine(name: str, extract_engine: str = "auto") -> str:
    """--eval-engine -> 'torch' or 'onnx' for the final evaluation. 'auto' follows the extraction engine: ONNX
    Runtime where extraction resolves to it (a CPU with onnxruntime), else PyTorch fp32."""
    if name not in EVAL_ENGINES:
        raise ClassforgeError(f"--eval-engine must be one of {', '.join(EVAL_ENGINES)}, not {name!r}")
    if name != "auto":
        return name
    return "onnx" if resolve_engine(extract_engine) == "onnx" else "torch"


@dataclass
class Engine:
    """A resolved engine. `key` goes into the embedding cache key: features of different engines never mix."""

    kind: str
    device: str = "cpu"
    note: str = ""
    # the last runner built, for the same backbone object: one export/trace per run, not one per split
    _built: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        if self.kind == "torch":
            if self.device == "cpu" and fast_cpu_bf16():
                # jit: image features from the frozen graph (equal to eager bf16 to cosine >= 0.999, not bit-equal)
                return "torch-bf16-jit" if jit_bf16() else "torch-bf16"
            if self.device.startswith("cuda"):
                return "torch-fp16-cuda"  # one key for every GPU: the processes of a run share their rows
            return f"torch-fp32-{self.device}"
        return self.kind

    def key_for(self, backbone) -> str:
        """The key of the features this engine computes for `backbone`: ONNX Runtime runs the backbone's own graph
        where it builds one (`Backbone.onnx_graph`), whose features are kept apart from an exported graph's."""
        if self.kind == "onnx" and getattr(backbone, "builds_onnx_graph", False):
            return OWN_GRAPH_ENGINE_KEY
        return self.key

    @property
    def pins_memory(self) -> bool:
        """Decoded batches go to page-locked memory, so the copy to the GPU overlaps the next batch's decoding."""
        return self.device.startswith("cuda")

    @property
    def per_core(self) -> bool:
        """Runs one single-threaded forward pass per decode worker (one per free core) rather than one pass on
        all cores: no intra-op barriers, which stall when another process holds a core, and decoding and forward
        passes overlap on every core."""
        return self.kind == "onnx" and self.device == "cpu"

    @property
    def exact(self) -> bool:
        """Whether its features are the shipped fp32 model's (to float32 rounding): no bf16, no fallback."""
        return "bf16" not in self.key and "fp16" not in self.key and not self.note

    def build(self, backbone: torch.nn.Module, cache: Path) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable (B, ...) input batch -> (B, D) float32 features on the CPU. The ONNX engine falls back to
        torch (with `note` set) when the backbone does not export. Built once per backbone object and engine."""
        if self._built is not None and self._built[0] is backbone and self._built[1] == cache:
            return self._built[2]
        run = None
        if self.kind == "onnx":
            try:
                run = _ort_runner(backbone, cache, threads=1 if self.per_core else None)
            except Exception as e:  # noqa: BLE001 - export or session failure: the torch path still works
                self.note = f"onnx engine unavailable ({str(e).splitlines()[0][:160]}); embeddings extracted with torch"
                warnings.warn(self.note, stacklevel=2)
        if run is None:
            run = _torch_runner(backbone, self.device)
        self._built = (backbone, cache, run)
        return run


def _ort_runner(backbone, cache: Path, threads: int | None = None):
    """ONNX Runtime on the backbone's own graph where it builds one (no export), else on its export, which is kept
    in `cache` for the next run."""
    path = cache / "backbone.onnx"
    graph = backbone.onnx_graph() if getattr(backbone, "builds_onnx_graph", False) else None
    model: Path | bytes = graph if graph is not None else path
    if graph is None and not path.is_file():
        with torch.no_grad():
            model = torch_to_onnx_bytes(backbone.eval().to(memory_format=torch.contiguous_format),
                                        example_input(backbone))
        # written for the next run while this one computes (the first write of a new file is slow on some disks)
        writer = threading.Thread(target=_write_cache, args=(path, model), name="classforge-onnx-cache")
        writer.start()
        _cache_writers.append(writer)
    # one session for all workers: ONNX Runtime's run() is thread-safe, and with one intra-op thread it computes
    # on the calling thread
    session = ort_session(model, threads=threads or torch.get_num_threads())
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0]).float()

    return run


_cache_writers: list[threading.Thread] = []


def wait_for_cache_writes() -> None:
    """Return once every exported backbone is in its cache file."""
    while _cache_writers:
        _cache_writers.pop().join()


def _write_cache(path: Path, data: bytes) -> None:
    """Atomically: parallel workers (classforge search) may export the same backbone at once. A cache that cannot
    be written only costs the next run an export."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)


def example_input(backbone) -> torch.Tensor:
    spec = backbone.spec
    if spec.task == "audio":
        return torch.zeros(1, round(spec.sample_rate * spec.clip_seconds))
    return torch.zeros(1, spec.channels, spec.size, spec.size)


def jit_bf16() -> bool:
    """Whether the torch engine runs image backbones as a frozen TorchScript graph under bf16 autocast: freezing
    folds BatchNorm into the convolutions and the fp32->bf16 weight casts into constants, which eager autocast
    redoes on every batch. Off with CLASSFORGE_NO_JIT=1."""
    return fast_cpu_bf16() and os.environ.get("CLASSFORGE_NO_JIT") != "1"


def _freeze_bf16(model: torch.nn.Module, example: torch.Tensor):
    """A frozen, traced copy of `model` under bf16 autocast, or None when tracing fails or the traced graph does
    not agree with eager fp32 on `example` (cosine similarity of the features < 0.99; bf16 rounding alone keeps
    it above 0.998 on EfficientNet-Lite0 features of real photos)."""
    try:
        with torch.inference_mode():
            want = model(example).float()
            with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                warnings.simplefilter("ignore")  # torch.jit's deprecation notices
                traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
                got = traced(example).float()
                traced(example)  # the profiling executor optimises the graph on the first calls
    except Exception:  # noqa: BLE001 - any tracing problem: eager autocast still works
        return None
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1).min()
    return traced if bool(cos >= 0.99) else None


def _torch_runner(backbone, device: str):
    model = prepare_fast(backbone, backbone.spec.task, device)
    task = backbone.spec.task
    frozen = None
    if task == "image" and device == "cpu" and jit_bf16() and backbone.bf16_safe:
        ex = torch.randn(2, *example_input(backbone).shape[1:]).contiguous(memory_format=torch.channels_last)
        frozen = _freeze_bf16(model, ex)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if task == "image":
            x = x.contiguous(memory_format=torch.channels_last)
        if frozen is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                return frozen(x).float()
        with fast_context(model, device):
            return model(x).float().cpu()

    return run


def prepare_fast(model: torch.nn.Module, task: str, device: str = "cpu") -> torch.nn.Module:
    model = model.eval().to(device)
    if task == "image":
        model = model.to(memory_format=torch.channels_last)
    return model


def fast_context(model: torch.nn.Module, device: str = "cpu"):
    """bf16 autocast where it is fast and the model says it is safe; fp32 otherwise."""
    if device == "cpu" and fast_cpu_bf16() and getattr(model, "backbone", model).bf16_safe:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.inference_mode()
def forward_batches(model, xs: list[torch.Tensor], task: str, device: str = "cpu", bf16: bool = True) -> torch.Tensor:
    """bf16=False keeps fp32 (channels_last only): results then do not depend on how files are batched,
    which the Predictor needs (a file's probabilities must not change with its batch neighbours)."""
    x = torch.stack(xs).to(device)
    if task == "image":
        x = x.contiguous(memory_format=torch.channels_last)
    with fast_context(model, device) if bf16 else contextlib.nullcontext():
        return model(x).float().cpu()


def exact_engine(device: str = "cpu") -> Engine | None:
    """The fastest engine whose features are the shipped fp32 model's: ONNX Runtime fp32 on a CPU."""
    return Engine("onnx", device) if device == "cpu" and onnxruntime_available() else None


def engine_for(name: str, device: str = "cpu") -> Engine:
    return Engine(resolve_engine(name, device), device)


__all__ = ["ENGINES", "EVAL_ENGINES", "Engine", "engine_for", "exact_engine", "fast_cpu_bf16", "resolve_engine",
           "resolve_eval_engine", "prepare_fast", "fast_context", "forward_batches"]
