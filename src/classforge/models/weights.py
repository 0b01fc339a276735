"""Loading weights without unpickling (safetensors or weights_only state dicts), checksums, and the bounded
check for whether the Hugging Face Hub can be reached.

`load_arrays` reads a state dict as numpy arrays without importing torch (a second process computes features
with ONNX Runtime while the first is still importing torch). A PyTorch checkpoint is a pickle: it is read by an
unpickler that knows only what a plain state dict holds (ordered dicts, tensors rebuilt from their storages)
and refuses anything else, as torch.load(weights_only=True) does."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classforge.core.errors import ClassforgeError
from classforge.core.net import reachable

if TYPE_CHECKING:
    import torch


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a foreign checkpoint without unpickling arbitrary objects (safetensors or weights_only)."""
    import torch

    path = _existing(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClassforgeError(f"Could not load {path} as a plain state dict (weights_only=True): {e}") from e
    return _inner_state_dict(sd, path)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ClassforgeError(f"Weights file not found: {path}")
    return path


def _inner_state_dict(sd, path: Path) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ClassforgeError(f"{path} does not contain a state dict")
    return sd


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A checkpoint's state dict as numpy arrays, without torch: safetensors, or a PyTorch checkpoint in either of
    its formats (a zip archive, or the legacy stream of pickles). The arrays equal torch.load's tensors bit for
    bit. ClassforgeError for anything that is not a plain state dict of tensors numpy can hold (not bf16)."""
    path = _existing(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    try:
        if zipfile.is_zipfile(path):
            sd = _read_zip_checkpoint(path)
        else:
            with open(path, "rb") as f:
                sd = _read_legacy_checkpoint(f)
    except ClassforgeError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as e:
        raise ClassforgeError(f"Could not read {path} as a plain state dict: {e}") from e
    sd = _inner_state_dict(sd, path)
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


# what torch.save writes for each storage type, as numpy dtypes (bf16 has none: such files are refused)
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    """A storage the pickle refers to; its bytes are read after the pickle (legacy) or from the archive (zip)."""

    def __init__(self, dtype, numel: int):
        self.dtype, self.numel = np.dtype(dtype), numel
        self.array: np.ndarray | None = None


class _TensorRef:
    """What _rebuild_tensor_v2 would have built: a strided view of a storage, made an array once it is read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.array
        if any(s < 0 for s in self.stride) or len(self.size) != len(self.stride):
            raise ClassforgeError("a tensor with an unusual layout")
        extent = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
        if self.offset + extent > len(flat):
            raise ClassforgeError("a tensor reaches past its storage")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               [s * flat.itemsize for s in self.stride])
        return np.array(view)  # a copy: C-contiguous, independent of the file's buffer


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(tensor, *_):
    return tensor


_ALLOWED = {("collections", "OrderedDict"): OrderedDict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


def _state_dict_unpickler(f, storage):
    """An unpickler that knows the few globals a plain state dict refers to and refuses every other one.
    `storage(key, dtype, numel)` gives the storage a persistent reference names. (Made on use: loading a run
    never touches pickle.)"""

    class StateDictUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _ALLOWED:
                return _ALLOWED[(module, name)]
            if module == "torch" and name in _STORAGE_DTYPES:
                return _STORAGE_DTYPES[name]
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict")

        def persistent_load(self, pid):
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or storage is None:
                raise pickle.UnpicklingError("an unexpected persistent reference")
            _, dtype, key, _location, numel, *view = pid
            if not isinstance(dtype, type) or dtype not in _STORAGE_DTYPES.values():
                raise pickle.UnpicklingError("a storage of an unsupported type")
            if view and view[0] is not None:
                raise pickle.UnpicklingError("a storage view")
            return storage(str(key), dtype, int(numel))

    return StateDictUnpickler(f)


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    return obj


def _read_zip_checkpoint(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ClassforgeError("not a PyTorch checkpoint (no data.pkl)")
        prefix = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def storage(key, dtype, numel):
            if key not in storages:
                s = storages[key] = _Storage(dtype, numel)
                raw = z.read(f"{prefix}data/{key}")
                s.array = np.frombuffer(raw, dtype=s.dtype, count=numel)
            return storages[key]

        obj = _state_dict_unpickler(io.BytesIO(z.read(pkl)), storage).load()
    return _materialise(obj)


def _read_legacy_checkpoint(f) -> dict:
    """torch.save's format before zip archives: magic number, protocol, system info, the pickle, the storage keys;
    then each storage's bytes in key order, after its element count (int64)."""
    header = _state_dict_unpickler(f, None)
    if header.load() != _LEGACY_MAGIC:
        raise ClassforgeError("not a PyTorch checkpoint")
    header.load()  # protocol version
    info = header.load()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise ClassforgeError("a big-endian checkpoint")
    storages: dict[str, _Storage] = {}

    def storage(key, dtype, numel):
        return storages.setdefault(key, _Storage(dtype, numel))

    obj = _state_dict_unpickler(f, storage).load()
    keys = _state_dict_unpickler(f, None).load()
    for key in keys:
        s = storages[str(key)]
        count = int(np.frombuffer(f.read(8), "<i8")[0])
        raw = f.read(count * s.dtype.itemsize)
        if count < s.numel or len(raw) != count * s.dtype.itemsize:
            raise ClassforgeError("the file ends inside a tensor")
        s.array = np.frombuffer(raw, dtype=s.dtype.newbyteorder("<"))
    return _materialise(obj)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def hub_reachable(timeout: float = 1.5) -> bool:
    """Quick check whether the Hugging Face Hub can be reached (DNS + TCP), bounded in time."""
    return os.environ.get("HF_HUB_OFFLINE") != "1" and reachable("huggingface.co", 443, timeout)
