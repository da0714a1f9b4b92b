"""Safetensors shards read and written one tensor at a time, with plain file I/O.

The ``safetensors`` library maps a whole file into memory; every page a read touches then counts in the process's
resident memory until the file is closed, so copying a 140 GB checkpoint through it shows 140 GB resident. Streamed
compaction must stay at one tensor whatever the model's size, so it reads with ``readinto`` into a buffer of the
tensor's size and writes each output tensor to disk as soon as it exists. The files are ordinary safetensors
(``https://github.com/huggingface/safetensors#format``): an 8-byte little-endian header length, a JSON header of
names, dtypes, shapes and byte offsets, then the tensors' bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from .errors import UserError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not a safetensors file: unreadable header ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class ShardReader:
    """Tensors of a saved model folder (``model.safetensors`` or an index over shards), read one at a time."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (folder / "model.safetensors").exists():
            files = [folder / "model.safetensors"]
        else:
            raise UserError(
                f"streamed compaction reads safetensors checkpoints: {folder} has neither "
                "model.safetensors nor model.safetensors.index.json"
            )
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            header, start = _header(path)
            for name, meta in header.items():
                self.entries[name] = (path, start, meta)

    def names(self) -> list[str]:
        return list(self.entries)

    def copy(self, name: str, writer: ShardWriter, chunk_bytes: int = 64 << 20) -> None:
        """Copy the tensor ``name`` unchanged into ``writer``, ``chunk_bytes`` at a time (never the whole tensor)."""
        path, start, meta = self.entries[name]
        begin, end = meta["data_offsets"]

        def chunks():
            with open(path, "rb") as f:
                f.seek(start + begin)
                left = end - begin
                while left:
                    data = f.read(min(left, chunk_bytes))
                    if not data:
                        raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
                    left -= len(data)
                    yield data

        writer.add_bytes(name, meta["dtype"], meta["shape"], end - begin, chunks())

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in a fresh buffer (nothing of the file stays mapped)."""
        path, start, meta = self.entries[name]
        if meta["dtype"] not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {meta['dtype']}, which probprune does not read")
        begin, end = meta["data_offsets"]
        buf = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
        if not buf:
            return torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        return torch.frombuffer(buf, dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"])


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each, then the index that maps them.

    Each tensor goes to disk when it is added (into the shard's data file); closing a shard writes the header and
    appends the data after it. Memory held: the tensor being written.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.files: list[tuple[str, list[str]]] = []
        self._header: dict[str, dict] = {}
        self._size = 0
        self._data = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        data = [tensor.view(-1).view(torch.uint8).numpy().data] if nbytes else []
        self.add_bytes(name, _NAMES[tensor.dtype], list(tensor.shape), nbytes, data)

    def add_bytes(self, name: str, dtype: str, shape: list[int], nbytes: int, chunks) -> None:
        """Add a tensor given as its raw bytes (``chunks``: an iterable of byte strings, ``nbytes`` in all)."""
        if self._header and self._size + nbytes > self.max_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.files) + 1:05d}.data", "wb")
        written = 0
        for chunk in chunks:
            written += self._data.write(chunk)
        if written != nbytes:
            raise ValueError(f"tensor {name}: {written} bytes written, {nbytes} expected")
        self._header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes

    def flush(self) -> None:
        if self._data is None:
            return
        self._data.close()
        data_path = Path(self._data.name)
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.folder / fname, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 64 << 20)
        data_path.unlink()
        self.files.append((fname, list(self._header)))
        self._header, self._size, self._data = {}, 0, None

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:  # one shard: the usual single-file name
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        total = sum((self.folder / f).stat().st_size for f, _ in self.files)
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, names in self.files for n in names}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
