"""Loading weights without unpickling (safetensors or weights_only state dicts), checksums, and the bounded
check for whether the Hugging Face Hub can be reached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from classforge.core.errors import ClassforgeError
from classforge.core.net import reachable


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a foreign checkpoint without unpickling arbitrary objects (safetensors or weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ClassforgeError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClassforgeError(f"Could not load {path} as a plain state dict (weights_only=True): {e}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ClassforgeError(f"{path} does not contain a state dict")
    return sd


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def hub_reachable(timeout: float = 1.5) -> bool:
    """Quick check whether the Hugging Face Hub can be reached (DNS + TCP), bounded in time."""
    return os.environ.get("HF_HUB_OFFLINE") != "1" and reachable("huggingface.co", 443, timeout)
