"""Safetensors files and Hugging Face model folders, read and written tensor by tensor.

read_header / read_tensor read one tensor's bytes with a positioned read (no mmap, so the process holds
only the tensors it is working on); ShardWriter writes a file whose header is planned up front, then
each tensor's bytes as they arrive. Output bytes depend only on the tensors: header keys sorted, no
timestamps. Files are created with the ordinary mode (0666 less the umask).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorEntry:
    """Name, dtype, shape and byte range of one tensor in a safetensors file."""

    def __init__(self, name: str, dtype: torch.dtype, shape, begin: int = 0, end: int = 0):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, tuple(shape), begin, end

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path) -> tuple[dict, dict]:
    """({name: TensorEntry} in file order with absolute byte offsets, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which quantd does not read")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(name, SAFETENSORS_DTYPES[info["dtype"]], info["shape"], 8 + size + begin, 8 + size + end)
    return entries, metadata


def read_tensor(path, entry: TensorEntry) -> torch.Tensor:
    """One tensor of a safetensors file, read into fresh memory."""
    buf = bytearray(entry.end - entry.begin)
    with open(path, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{path}: truncated in tensor {entry.name!r}")
    if not buf:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


class ShardWriter:
    """Writes a safetensors file whose tensors are known in advance ({name: (dtype, shape)}) into
    `path`.partial, tensor by tensor in any order; close() renames it to `path` and returns
    (size, sha256) of the bytes written."""

    def __init__(self, path, planned: dict, metadata: dict | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header, offset, self.offsets = {}, 0, {}
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        for name in sorted(planned):
            dtype, shape = planned[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, nbytes)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self.size = self.data_start + offset
        self.file = open(self.partial, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.size)
        self.pending = set(planned)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes = self.offsets[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, the header planned {nbytes}")
        self.file.seek(self.data_start + offset)
        self.file.write(data.tobytes() if data.nbytes == 0 else memoryview(data))
        self.pending.discard(name)

    def close(self) -> tuple[int, str]:
        if self.pending:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        self.file.close()
        os.replace(self.partial, self.path)
        return self.size, file_digest(self.path)

    def abort(self) -> None:
        self.file.close()


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` ({name: tensor}) as one safetensors file (the same bytes for the same tensors)."""
    writer = ShardWriter(path, _planned(tensors), metadata)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()


def _planned(tensors: dict) -> dict:
    return {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


class ModelFolder:
    """A Hugging Face model folder: config.json, and model.safetensors or shards listed by the index."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{path}: not a folder")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{path}: not a model folder (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        if (self.path / INDEX).is_file():
            self.index = json.loads((self.path / INDEX).read_text())
            weight_map = self.index.get("weight_map") or {}
            self.shards = sorted(set(weight_map.values()))
            missing = [s for s in self.shards if not (self.path / s).is_file()]
            if missing:
                raise ValueError(f"{path}: shard(s) named in {INDEX} are missing: {', '.join(missing)}")
        elif (self.path / SINGLE).is_file():
            self.index, self.shards = None, [SINGLE]
        else:
            raise ValueError(f"{path}: not a model folder (neither {INDEX} nor {SINGLE})")
        self.headers = {s: read_header(self.path / s) for s in self.shards}
        if self.index is not None:
            stored = {n: s for s, (entries, _) in self.headers.items() for n in entries}
            wrong = [n for n, s in self.index["weight_map"].items() if stored.get(n) != s]
            if wrong:
                raise ValueError(f"{path}: tensor(s) the index places in a shard that lacks them: {', '.join(wrong[:10])}")

    def entries(self, shard: str) -> dict:
        return self.headers[shard][0]

    def tensor(self, shard: str, name: str) -> torch.Tensor:
        return read_tensor(self.path / shard, self.entries(shard)[name])

    def other_files(self) -> list[Path]:
        """Files that are neither weights nor the index nor config.json (tokenizer, generation_config, ...)."""
        skip = {INDEX, "config.json", *self.shards}
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") and not p.name.startswith("."))
