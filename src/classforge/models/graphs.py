"""Backbones whose forward pass at inference exists as an ONNX graph built without torch (`Backbone.onnx_graph`):
what a process that has not imported torch needs to compute their features with ONNX Runtime. Free of torch
itself, as are the modules it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from classforge.core.spec import InputSpec
from classforge.models import efficientnet_lite_plan as lite


@dataclass(frozen=True)
class TorchFreeGraph:
    """A backbone with its default pretrained weights, as the registry would build it."""

    name: str
    spec: InputSpec
    weights_source: str  # what the Backbone reports as its weights_source (part of the features' cache key)
    build: Callable[[], bytes]  # the serialised ONNX model: "input" (B, C, S, S) -> "logits" (B, D) features


def torch_free_graph(name: str, task: str) -> TorchFreeGraph | None:
    """Backbone `name` ("auto" or "": the task's default) with its default pretrained weights, or None where it
    has no graph built without torch (or its weights are not installed)."""
    if name in ("auto", ""):
        name = lite.DEFAULT_FOR_IMAGES if task == "image" else ""
    if name not in lite.VARIANTS:
        return None
    try:
        weights = lite.wheel_weights_file(name)
    except Exception:  # noqa: BLE001 - not installed or not verified: the run builds the backbone and says why
        return None
    return TorchFreeGraph(name, lite.input_spec(name), lite.wheel_source(weights),
                          lambda: lite.onnx_graph(name, lite.wheel_state(name, weights)))
