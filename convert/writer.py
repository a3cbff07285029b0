"""Sharded safetensors artifact writer: planned headers, streamed data, atomic publication of the folder.

The caller declares every output tensor first (`plan`), typically from a meta-device dry run, so each shard's
header is written before its data and tensors (or one expert's slice of a 3-D stack) go straight to their offset
with pwrite: no shard or stack is ever held in memory. The
folder is built under a hidden temporary name and renamed into place only after every file is fsynced.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from convert.checkpoint import INDEX_NAME
from convert.errors import BadInput
from convert.safetensors_io import DTYPE_NAMES

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDir:
    """Build a folder under a hidden `.<name>.partial-<pid>` name; publish it by rename only when complete and
    fsynced. An existing folder is replaced only with `force`, and stays until its replacement is complete."""

    def __init__(self, final_dir: str | Path, force: bool = False):
        self.final, self.force = Path(final_dir), force
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.final.exists() and not self.force:
            raise BadInput(f"{self.final}: output already exists (pass --force, or FORCE=1 to make, to replace it)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self.publish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def publish(self) -> None:
        for p in self.tmp.iterdir():
            fsync_path(p)
        fsync_path(self.tmp)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            self.final.rename(old)
        self.tmp.rename(self.final)
        fsync_path(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class ArtifactWriter:
    def __init__(self, final_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False):
        self._dir = AtomicDir(final_dir, force)
        self.final, self.tmp = self._dir.final, self._dir.tmp
        self.max_shard_bytes = max_shard_bytes
        self._specs: list[OutSpec] = []
        self._shard_names: list[str] = []
        self._weight_map: dict[str, str] = {}
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, OutSpec]] = {}
        self._written: dict[str, int] = {}

    def __enter__(self) -> ArtifactWriter:
        self._dir.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as e:
                self._abort()
                self._dir.__exit__(type(e), e, e.__traceback__)
                raise
        else:
            self._abort()
        self._dir.__exit__(exc_type, exc, tb)

    def _abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # -- planning ---------------------------------------------------------------------------------------
    def plan(self, specs: list[OutSpec]) -> None:
        """Fix every tensor's shard and offset (greedy fill up to `max_shard_bytes`); create the shard files with
        their headers and their full size reserved, so a full disk shows up here rather than mid-conversion."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate output tensor names in the plan")
        shards: list[list[OutSpec]] = []
        used = 0
        for s in specs:
            if not shards or (used and used + s.nbytes > self.max_shard_bytes):
                shards.append([])
                used = 0
            shards[-1].append(s)
            used += s.nbytes
        self._shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard_name, members in zip(self._shard_names, shards):
            header, offset, layout = {"__metadata__": {"format": "pt"}}, 0, []
            for s in members:
                header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                                  "data_offsets": [offset, offset + s.nbytes]}
                layout.append((s, offset))
                offset += s.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment for mmap'd readers
            fd = os.open(self.tmp / shard_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            head = struct.pack("<Q", len(raw)) + raw
            if len(head) + offset:
                os.posix_fallocate(fd, 0, len(head) + offset)
            os.pwrite(fd, head, 0)
            for s, off in layout:
                self._where[s.name] = (fd, len(head) + off, s)
                self._written[s.name] = 0
        self._specs = list(specs)
        self._weight_map = {s.name: n for n, members in zip(self._shard_names, shards) for s in members}

    # -- streaming --------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> None:
        """Write a planned tensor, or (with `row`) a slice of it starting at `row` along dim 0."""
        if name not in self._where:
            raise ValueError(f"tensor {name}: not in the plan")
        fd, offset, spec = self._where[name]
        shape = tuple(tensor.shape)
        if row is None:
            ok, start = shape == spec.shape, 0
        else:
            ok = shape[1:] == spec.shape[1:] and 0 <= row and row + shape[0] <= spec.shape[0]
            start = row * (spec.nbytes // spec.shape[0]) if spec.shape[0] else 0
        if not ok or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name}: writing {tensor.dtype} {list(shape)} at row {row}, plan expects "
                             f"{spec.dtype} {list(spec.shape)}")
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            data = flat.view(torch.uint8).numpy().data
            done = 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(fd, data[done:], offset + start + done)
            self._written[name] += len(data)

    def _close_shards(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []

    def write_json(self, rel: str, obj) -> None:
        (self.tmp / rel).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: Path, rel: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (rel or src.name))

    @property
    def shard_names(self) -> list[str]:
        return list(self._shard_names)

    def _finish(self) -> None:
        self._close_shards()
        for s in self._specs:
            if self._written[s.name] != s.nbytes:
                raise ValueError(f"tensor {s.name}: {self._written[s.name]} of {s.nbytes} planned bytes written")
        total = sum(s.nbytes for s in self._specs)
        self.write_json(INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": self._weight_map})
