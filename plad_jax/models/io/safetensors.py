"""Minimal, pickle-free safetensors reader and writer on NumPy memory maps.

The reader slices tensors lazily (only the requested region is read from disk), which is what lets
`from_pretrained` place each device's shard without materialising the whole tensor, and it handles
bfloat16 and float8 through `ml_dtypes`. Format: 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}`, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from plad_jax.errors import SafetensorsError  # noqa: F401 (re-exported)

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Read-only view of one `.safetensors` file; `read(name, index)` returns a NumPy array."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: corrupt safetensors header (length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise SafetensorsError(
                    f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}"
                )
            if self._start + end > size:
                raise SafetensorsError(f"{path}: truncated file, tensor '{name}' runs past the end")
            if (
                end - begin
                != int(np.prod(entry["shape"])) * np.dtype(DTYPES[entry["dtype"]]).itemsize
            ):
                raise SafetensorsError(
                    f"{path}: tensor '{name}' byte size does not match its shape"
                )
        self._map = None

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def shape(self, name) -> tuple:
        return tuple(self._entries[name]["shape"])

    def read(self, name, index=()) -> np.ndarray:
        """The tensor `name`, or just `tensor[index]` (a tuple of slices), as a NumPy array."""
        entry = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        flat = self._map[self._start + begin : self._start + end]
        tensor = flat.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return np.array(tensor[index])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write `tensors` (name -> array) to `path` atomically (temp file, then rename)."""
    header, offset = {}, 0
    for name in sorted(tensors):
        arr = tensors[name]
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)
