"""Streaming safetensors reader: validated header, mmap, one tensor or one expert slice at a time.

Written by hand rather than through `safetensors.safe_open` because (a) errors must name the file and the tensor,
and the library's messages name neither the file nor, for holes and overlaps, the tensor; (b) one expert of a
3-D stack must be readable as a zero-copy view of the mapping, without materialising the stack.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from convert.errors import BadInput

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the reference implementation
READ_AHEAD_BYTES = 256 << 20  # how far `read_ahead` keeps the kernel reading ahead of a front-to-back reader


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _parse_header(path: Path, size: int, head: bytes) -> tuple[dict[str, Entry], dict, int]:
    if size < 8:
        raise BadInput(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise BadInput(f"{path}: not a safetensors file or truncated (header length {n} past end of file, {size} bytes)")
    try:
        header = json.loads(head[8:8 + n])
    # ValueError: besides JSONDecodeError, an integer literal past Python's digit limit; RecursionError: deep nesting
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"{path}: safetensors header is not valid JSON ({e.__class__.__name__})")
    if not isinstance(header, dict):
        raise BadInput(f"{path}: safetensors header is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BadInput(f"{path}: __metadata__ must map names to strings")
    entries = {}
    for name, e in header.items():
        if not name.isprintable():  # it would break the one-line error messages that name it
            raise BadInput(f"{path}: tensor {name!r}: name holds non-printable characters")
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise BadInput(f"{path}: tensor {name}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise BadInput(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        # `type(d) is int`: JSON true/false parse as bools, which are ints; < 2**63: torch's dimension type
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            raise BadInput(f"{path}: tensor {name}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise BadInput(f"{path}: tensor {name}: invalid data_offsets {offsets!r}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise BadInput(f"{path}: tensor {name}: data_offsets {offsets} outside the {data_len}-byte data section")
        if end - start != prod(shape) * itemsize(dtype):
            raise BadInput(f"{path}: tensor {name}: {dtype} x {shape} needs {prod(shape) * itemsize(dtype)} bytes, "
                           f"data_offsets give {end - start}")
        entries[name] = Entry(name, dtype, tuple(shape), base + start, base + end)
    pos = base
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start < pos:
            raise BadInput(f"{path}: tensor {e.name}: data overlaps the previous tensor")
        if e.start > pos:
            raise BadInput(f"{path}: tensor {e.name}: hole of {e.start - pos} bytes before its data")
        pos = e.end
    if pos != size:
        raise BadInput(f"{path}: {size - pos} trailing bytes after the last tensor")
    return entries, metadata, base


class SafetensorsFile:
    """One validated shard. `read` / `read_expert` return views of a private (copy-on-write) mapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise BadInput(f"{self.path}: cannot open ({e.strerror})")
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += os.pread(fd, min(n, MAX_HEADER_BYTES), 8) if n <= MAX_HEADER_BYTES else b""
            self.entries, self.metadata, self.data_start = _parse_header(self.path, size, head)
            self.header_sha256 = hashlib.sha256(head).hexdigest()
            # ACCESS_COPY: writable for torch.frombuffer without ever writing back to the checkpoint.
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
        finally:
            os.close(fd)
        self.size = size
        self._advised = 0  # `read_ahead` has asked for the bytes up to here

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _view(self, start: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=DTYPES[dtype])
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=start)
        return raw.view(DTYPES[dtype]).reshape(shape)

    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise BadInput(f"{self.path}: tensor {name}: not in this shard")

    def read(self, name: str) -> torch.Tensor:
        e = self.entry(name)
        return self._view(e.start, e.nbytes, e.dtype, e.shape)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert` of a 3-D stack `[E, out, in]`, touching only that expert's bytes."""
        e = self.entry(name)
        if len(e.shape) != 3 or not 0 <= expert < e.shape[0]:
            raise BadInput(f"{self.path}: tensor {name}: no expert {expert} in shape {list(e.shape)}")
        per = e.nbytes // e.shape[0]
        return self._view(e.start + expert * per, per, e.dtype, e.shape[1:])

    def will_need(self, name: str) -> None:
        """Ask the kernel to read tensor `name`'s bytes ahead (MADV_WILLNEED: returns at once, the reads run in the
        background), so a layer built next finds its weights in the page cache."""
        e = self.entry(name)
        if self._map is None or e.nbytes == 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = e.start - e.start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, start, e.start + e.nbytes - start)

    def read_ahead(self, start: int, window: int = READ_AHEAD_BYTES) -> None:
        """Keep the kernel reading `[start, start + window)` in the background (MADV_WILLNEED), for a caller going
        through the file front to back: its page faults then find the bytes already read instead of each waiting
        for the kernel's own small read-ahead (mapped reads here: 1.4 GB/s by faults alone, 2.2 GB/s with this).
        Asked in steps of a quarter window, never twice for the same bytes."""
        end = min(self.size, start + window)
        lo = max(start, self._advised)
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED") or end <= lo:
            return
        if end - lo < window // 4 and end < self.size:
            return
        lo -= lo % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, lo, end - lo)
        self._advised = end

    def close(self) -> None:
        # Only drop our reference: tensors from `read` keep the mmap object alive (torch.frombuffer holds it but
        # exports no buffer, so mmap.close() would unmap under them); the mapping goes with the last of them.
        self._map = None
