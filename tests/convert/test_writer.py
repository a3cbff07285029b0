import json

import pytest
import torch
from safetensors.torch import load_file

from convert.errors import BadInput
from convert.safetensors_io import SafetensorsFile
from convert.writer import ArtifactWriter, OutSpec


def _specs(tensors):
    return [OutSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_size_capped_shards_index_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(64, 64, generator=g).bfloat16() for i in range(5)}  # 8 KiB each
    tensors["fp8"] = torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn)
    with ArtifactWriter(tmp_path / "out", max_shard_bytes=20_000) as w:
        w.plan(_specs(tensors))
        for k, v in reversed(list(tensors.items())):  # any write order
            w.write(k, v)
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert shards == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                      "model-00003-of-00003.safetensors"]
    got = {}
    for s in shards:
        got.update(load_file(tmp_path / "out" / s))  # the reference reader accepts our files
        SafetensorsFile(tmp_path / "out" / s)        # and so does our strict one
    assert set(got) == set(tensors)
    for k in tensors:
        assert torch.equal(got[k].view(torch.uint8), tensors[k].view(torch.uint8))
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert not list(tmp_path.glob(".out.partial-*"))


def test_expert_rows_written_slice_by_slice(tmp_path):
    stack = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)
    with ArtifactWriter(tmp_path / "out") as w:
        w.plan([OutSpec("s", torch.float32, (4, 3, 2))])
        for e in (2, 0, 3, 1):
            w.write("s", stack[e:e + 1], row=e)
    assert torch.equal(load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")["s"], stack)


def test_failure_leaves_no_output(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "out") as w:
            w.plan([OutSpec("a", torch.float32, (2,))])
            w.write("a", torch.zeros(2))
            raise RuntimeError("crash mid-conversion")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_plan_is_an_error_and_leaves_no_output(tmp_path):
    with pytest.raises(ValueError, match="tensor b: 0 of 8 planned bytes written"):
        with ArtifactWriter(tmp_path / "out") as w:
            w.plan([OutSpec("a", torch.float32, (2,)), OutSpec("b", torch.float32, (2,))])
            w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_write_must_match_the_plan(tmp_path):
    with pytest.raises(ValueError, match="plan expects"):
        with ArtifactWriter(tmp_path / "out") as w:
            w.plan([OutSpec("a", torch.float32, (2,))])
            w.write("a", torch.zeros(3))


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(BadInput, match="already exists"):
        with ArtifactWriter(tmp_path / "out"):
            pass
    with ArtifactWriter(tmp_path / "out", force=True) as w:
        w.plan([OutSpec("a", torch.float32, (1,))])
        w.write("a", torch.ones(1))
    assert not (tmp_path / "out" / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recorded_digests_match_the_bytes_whatever_the_write_order(tmp_path):
    """A unit's record holds the digest streamed while writing (rows front to back) or, for any other order, read
    back from the shard: both must equal the digest of the bytes on disk, or resuming would redo finished units."""
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 8, 16, generator=g).bfloat16()
    specs = [OutSpec("in_order", stack.dtype, tuple(stack.shape)), OutSpec("reversed", stack.dtype, tuple(stack.shape))]
    with ArtifactWriter(tmp_path / "out", resumable=True) as w:
        w.plan(specs)
        for e in range(4):
            w.write("in_order", stack[e:e + 1], row=e)
        for e in reversed(range(4)):
            w.write("reversed", stack[e:e + 1], row=e)
        w.commit("unit", "key", ["in_order", "reversed"])
        record = json.loads((w.tmp / ".progress.jsonl").read_text().splitlines()[-1])
        on_disk = {n: w._region_digest(n) for n in ("in_order", "reversed")}
    assert record["outputs"] == on_disk
    assert on_disk["in_order"] == on_disk["reversed"]  # the same bytes
