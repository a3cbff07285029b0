import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.errors import BadInput
from convert.safetensors_io import SafetensorsFile


def _write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_equal_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).bfloat16(), "stack": torch.randn(4, 6, 8, generator=g).bfloat16(),
               "bias": torch.randn(7, generator=g), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors")
    ref = load_file(tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for name, t in ref.items():
        assert torch.equal(f.read(name), t) and f.read(name).dtype == t.dtype
    for e in range(4):
        assert torch.equal(f.read_expert("stack", e), ref["stack"][e])


def test_expert_slice_is_a_view_of_only_its_bytes(tmp_path):
    stack = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    save_file({"s": stack}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    e1 = f.read_expert("s", 1)
    assert e1.untyped_storage().nbytes() == 3 * 4 * 4  # one expert's bytes, not the stack's
    with pytest.raises(BadInput, match="tensor s: no expert 2"):
        f.read_expert("s", 2)


def _good(tmp_path):
    return _write_raw(tmp_path / "g.safetensors",
                      {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]}}, bytes(12))


def test_valid_raw_file_opens(tmp_path):
    f = SafetensorsFile(_good(tmp_path))
    assert set(f.entries) == {"a", "b"}


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "outside the 4-byte data section"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "tensor a: F32 x \\[3\\] needs 12 bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor a: unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "tensor a: hole of 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "4 trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "tensor a: invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "tensor a: header entry must have"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(8), "tensor a: data_offsets"),
])
def test_lying_headers_are_rejected_naming_file_and_tensor(tmp_path, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(BadInput, match=message) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file_is_rejected(tmp_path):
    path = _good(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BadInput, match="trailing|outside"):
        SafetensorsFile(path)


@pytest.mark.parametrize("content, message", [
    (b"", "shorter than the 8-byte header length"),
    (b"PK\x03\x04" + bytes(100), "header length .* past end of file"),   # a zip (torch.save) file
    (struct.pack("<Q", 5) + b"{notj", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_non_safetensors_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        SafetensorsFile(path)
