"""probprune.shards: safetensors read and written one tensor at a time, byte-compatible with the library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from probprune.errors import UserError
from probprune.shards import ShardReader, ShardWriter


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g, dtype=torch.float32),
        "b.weight": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(13, generator=g).to(torch.float16),
        "d.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.empty(0, 4),
    }


def test_writer_output_loads_with_safetensors_and_splits_into_shards(tmp_path):
    ts = tensors()
    w = ShardWriter(tmp_path, max_bytes=200)  # a.weight (140 bytes) fills the first shard
    for name, t in ts.items():
        w.add(name, t)
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 2 and not list(tmp_path.glob(".shard-*"))
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == ts.keys()
    for name, t in ts.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    back = ShardReader(tmp_path)
    for name, t in ts.items():
        assert torch.equal(back.read(name), t), name


def test_reader_reads_files_the_library_wrote_and_single_file_output(tmp_path):
    ts = tensors()
    save_file(ts, tmp_path / "model.safetensors", metadata={"format": "pt"})
    r = ShardReader(tmp_path)
    assert sorted(r.names()) == sorted(ts)
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(out, max_bytes=1 << 20)
    for name in r.names():
        w.add(name, r.read(name))
    w.finish()
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    again = load_file(out / "model.safetensors")
    for name, t in ts.items():
        assert torch.equal(again[name], t), name


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="neither model.safetensors"):
        ShardReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="not a safetensors file"):
        ShardReader(tmp_path)
    save_file({"x": torch.ones(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserError, match="truncated"):
        ShardReader(tmp_path).read("x")


def test_copy_streams_a_tensor_in_chunks_unchanged(tmp_path):
    ts = tensors()
    save_file(ts, tmp_path / "model.safetensors")
    r = ShardReader(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(out, max_bytes=1 << 20)
    for name in r.names():
        r.copy(name, w, chunk_bytes=16)  # a.weight: 9 chunks
    w.finish()
    again = load_file(out / "model.safetensors")
    for name, t in ts.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
