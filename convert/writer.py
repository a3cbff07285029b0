"""Sharded safetensors artifact writer: planned headers, streamed data, resumable progress, atomic publication.

The caller declares every output tensor first (`plan`), typically from a meta-device dry run, so each shard's
header is written before its data and tensors (or one expert's slice of a 3-D stack) go straight to their offset
with pwrite: no shard or stack is ever held in memory. The folder is built under a hidden temporary name and
renamed into place only after every file is fsynced.

Resume (`resumable=True`): the temporary folder has a fixed name, `.<name>.partial` (the output lock, not the pid,
keeps runs apart), and holds the job's resume ledger (`convert.ledger`, `.progress.jsonl`): the plan's identity,
then one line per finished unit of work with the caller's key for it (a hash of its inputs and settings) and the
digest (XXH3-128) of every output tensor it wrote: the ledger's byte-range specialisation. A re-run with the same plan reopens the shard files and skips each unit whose key is unchanged and whose
bytes still hash to what was recorded; everything else is written again, in place. Lines are appended without
fsync: a line that outlived its data (power loss) fails the hash check and its unit is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
import xxhash

from convert.checkpoint import INDEX_NAME
from convert.direct_write import DirectStream, open_direct
from convert.durable import AtomicDir, WriteFailed
from convert.ledger import LEDGER_NAME, Ledger
from convert.safetensors_io import DTYPE_NAMES

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
LEDGER_VERSION = 3  # 3: the common ledger header; 2: region digests are XXH3-128 (1: sha256)
HASH_CHUNK = 64 << 20
log = logging.getLogger("stepq.writer")


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PlannedFile:
    """One output file: its header bytes, then each tensor at its offset after the header; `size` the whole file."""

    name: str
    head: bytes
    tensors: list[tuple[OutSpec, int]]
    size: int


def _shard_layout(specs: list[OutSpec], max_shard_bytes: int) -> list[tuple[bytes, list[tuple[OutSpec, int]]]]:
    """Greedy fill up to `max_shard_bytes` -> per shard: (header bytes, [(spec, data offset)])."""
    groups: list[list[OutSpec]] = []
    used = 0
    for s in specs:
        if not groups or (used and used + s.nbytes > max_shard_bytes):
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += s.nbytes
    shards = []
    for members in groups:
        header, offset, layout = {"__metadata__": {"format": "pt"}}, 0, []
        for s in members:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            layout.append((s, offset))
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment for mmap'd readers
        shards.append((struct.pack("<Q", len(raw)) + raw, layout))
    return shards


class ArtifactWriter:
    def __init__(self, final_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                 resumable: bool = False):
        self._dir = AtomicDir(final_dir, force, resumable)
        self._dir.scratch.append(LEDGER_NAME)
        self.final, self.tmp = self._dir.final, self._dir.tmp
        self.max_shard_bytes = max_shard_bytes
        self._specs: list[OutSpec] = []
        self._shard_names: list[str] = []
        self._kind = "safetensors"
        self._weight_map: dict[str, str] = {}
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, OutSpec]] = {}
        self._written: dict[str, int] = {}
        self._streamed: dict[str, list] = {}  # name -> [digest of its bytes written front to back, bytes covered]
        self._ledger: Ledger | None = None  # resumable writers: the finished units, this run's and an earlier one's
        # Bytes go to disk through O_DIRECT staging buffers (convert.direct_write) where the filesystem allows:
        # one stream at a time (shards are filled one after another), an O_DIRECT descriptor per shard (or None).
        self._direct_io = os.environ.get("STEPQ_DIRECT_IO", "1") != "0"
        self._stream: DirectStream | None = None
        self._stream_path: Path | None = None  # the shard the stream writes, for error messages
        self._direct_fds: dict[int, int | None] = {}
        self.reused_units = 0

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
                if isinstance(e, OSError):
                    raise self._write_failed(e, self.tmp) from e
                raise
        else:
            self._abort()
        self._dir.__exit__(exc_type, exc, tb)

    def _abort(self) -> None:
        if self._stream is not None:
            self._stream.abandon()
            self._stream = None
        self._close_direct_fds()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._ledger is not None:
            self._ledger.close()

    def _write_failed(self, e: OSError, where: Path | str) -> WriteFailed:
        kept = (f"finished work kept in {self.tmp}: re-run the same command to resume, --force to start over"
                if self._dir.keep_on_error else "nothing kept")
        return WriteFailed(f"{e.filename or where}: cannot write ({e.strerror}); {kept}")

    # -- planning ---------------------------------------------------------------------------------------
    def plan(self, specs: list[OutSpec]) -> None:
        """Fix every tensor's shard and offset (greedy fill up to `max_shard_bytes`); create the shard files with
        their headers and their full size reserved, so a full disk shows up here rather than mid-conversion.
        Resuming: reopen the shard files of an earlier run of this very plan instead."""
        shards = _shard_layout(specs, self.max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.plan_files([PlannedFile(n, head, layout, len(head) + sum(s.nbytes for s, _ in layout))
                         for n, (head, layout) in zip(names, shards)], kind="safetensors")

    def plan_files(self, files: list[PlannedFile], kind: str) -> None:
        """`plan` for files laid out by the caller (a GGUF's header, tensor table and aligned data): each file's
        header is written when it is created, tensors then go to their offsets; `kind` names the format in the
        ledger. Only safetensors plans get a `model.safetensors.index.json`."""
        specs = [s for f in files for s, _ in f.tensors]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate output tensor names in the plan")
        self._kind = kind
        self._shard_names = [f.name for f in files]
        plan_id = hashlib.sha256(b"".join(f.head for f in files)).hexdigest()  # headers fix every offset
        if self._dir.resumable:
            self._ledger = Ledger(self.tmp / LEDGER_NAME, {"stepq_ledger": kind, "version": LEDGER_VERSION,
                                                           "plan": plan_id, "shards": self._shard_names}, sync=False)
        try:
            if not (self._dir.resuming and self._reopen(files)):
                self._create(files)
        except OSError as e:
            self._abort()
            raise self._write_failed(e, self.tmp) from e
        for fd, f in zip(self._fds, files):
            for s, off in f.tensors:
                self._where[s.name] = (fd, len(f.head) + off, s)
                self._written.setdefault(s.name, 0)
        self._specs = specs
        self._weight_map = {s.name: f.name for f in files for s, _ in f.tensors}

    def _create(self, files: list[PlannedFile]) -> None:
        if self._dir.resuming:
            log.info("%s: earlier partial output is for another plan (or unusable); starting over", self.tmp)
            for p in self.tmp.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for f in files:
            fd = os.open(self.tmp / f.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            try:
                os.posix_fallocate(fd, 0, f.size)  # also the zero padding between tensors of a GGUF
                os.pwrite(fd, f.head, 0)
            except OSError as e:
                e.filename = e.filename or str(self.tmp / f.name)
                raise
        if self._ledger is not None:
            self._ledger.resumed = False  # whatever an earlier run recorded is for other shard files
            self._ledger.start()

    def _reopen(self, files: list[PlannedFile]) -> bool:
        if not self._ledger.resumed:  # another plan, or an older ledger
            return False
        fds, intact = [], False
        try:
            for f in files:
                path = self.tmp / f.name
                if not path.is_file() or path.stat().st_size != f.size:
                    return False
                fds.append(os.open(path, os.O_RDWR))
                if os.pread(fds[-1], len(f.head), 0) != f.head:
                    return False
            intact = True
        finally:
            if not intact:
                for fd in fds:
                    os.close(fd)
        self._fds = fds
        for p in self.tmp.iterdir():  # config, tokenizer, provenance of the earlier run: rewritten at the end
            if p.name not in self._shard_names and p.name != LEDGER_NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self._ledger.start()
        self._dir.keep_on_error = self._ledger.has_work
        log.info("%s: resuming (%d finished units recorded)", self.tmp, len(self._ledger.units))
        return True

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
            try:
                self._put(fd, offset + start, data, self.tmp / self._weight_map[name])
            except OSError as e:
                raise self._write_failed(e, self.tmp / self._weight_map[name]) from e
            self._written[name] += len(data)
            self._stream_hash(name, start, data)

    def _put(self, fd: int, offset: int, data: memoryview, path: Path) -> None:
        """`data` to `offset` of shard `fd`: appended to the direct stream when there is one, else pwrite."""
        stream = self._direct_stream(fd, path)
        if stream is None:
            done = 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(fd, data[done:], offset + done)
            return
        if stream.end != offset:  # a new shard, or out of order: flushed, and a new run of bytes starts here
            stream.begin(offset)
        stream.append(data)

    def _direct_stream(self, fd: int, path: Path) -> DirectStream | None:
        if self._stream is not None and self._stream.fd == fd:
            return self._stream
        if not self._direct_io:
            return None
        if fd not in self._direct_fds:
            self._direct_fds[fd] = open_direct(path)
        if self._direct_fds[fd] is None:
            return None
        self._flush_stream(close=True)
        self._stream, self._stream_path = DirectStream(fd, self._direct_fds[fd]), path
        return self._stream

    def _flush_stream(self, close: bool = False) -> None:
        """Buffered bytes into the shard file (before reading it back, recording a unit, fsync)."""
        if self._stream is None:
            return
        try:
            if close:
                stream, self._stream = self._stream, None
                stream.close()
            else:
                self._stream.flush()
        except OSError as e:  # the bytes were the stream's shard's: name it in the message
            e.filename = e.filename or str(self._stream_path)
            raise

    def _close_direct_fds(self) -> None:
        for dfd in self._direct_fds.values():
            if dfd is not None:
                os.close(dfd)
        self._direct_fds = {}

    def _stream_hash(self, name: str, start: int, data) -> None:
        """Digest a tensor's bytes as they are written, when they arrive front to back (whole tensors, and expert
        slices in row order): `commit` then needs no second pass over the output. Any other order drops it, and
        `commit` reads the region back instead."""
        if start == 0:
            self._streamed[name] = [_region_hash(), 0]
        h = self._streamed.get(name)
        if h is None:
            return
        if h[1] != start:
            del self._streamed[name]
            return
        h[0].update(data)
        h[1] += len(data)

    # -- progress (resumable writers) ----------------------------------------------------------------------
    def _region_digest(self, name: str, written: bool = False) -> str:
        """Digest of a tensor's bytes in its shard; `written`: of the bytes this run wrote, from the streamed digest
        when it covers them all."""
        fd, offset, spec = self._where[name]
        streamed = self._streamed.pop(name, None) if written else None
        if streamed is not None and streamed[1] == spec.nbytes:
            return streamed[0].hexdigest()
        self._flush_stream()
        h = _region_hash()
        for pos in range(0, spec.nbytes, HASH_CHUNK):
            h.update(os.pread(fd, min(HASH_CHUNK, spec.nbytes - pos), offset + pos))
        return h.hexdigest()

    def reuse(self, unit: str, key: str, outputs: list[str]) -> bool:
        """True when an earlier run finished `unit` with the same `key` (inputs + settings) and the bytes of its
        `outputs` still hash to what it recorded; they then count as written."""
        rec = self._ledger.units.get(unit) if self._ledger is not None else None
        if rec is None:
            return False
        if rec.get("key") != key or sorted(rec["outputs"]) != sorted(outputs):
            log.info("%s: inputs or settings changed since the earlier run; converting it again", unit)
            return False
        for name in outputs:
            if self._region_digest(name) != rec["outputs"][name]:
                log.warning("%s: output %s differs from what the earlier run recorded; converting it again",
                            unit, name)
                return False
        for name in outputs:
            self._written[name] = self._where[name][2].nbytes
        self.reused_units += 1
        return True

    def commit(self, unit: str, key: str, outputs: list[str]) -> None:
        """Record `unit` as finished: from here on an interrupted run keeps its temporary folder to resume."""
        if self._ledger is None:
            return
        try:
            self._flush_stream()  # a unit recorded as finished has all its bytes in the file
        except OSError as e:
            raise self._write_failed(e, self.tmp) from e
        try:
            digests = {n: self._region_digest(n, written=True) for n in outputs}
            self._ledger.record(unit, key, digests)
        except OSError as e:
            raise self._write_failed(e, self.tmp / LEDGER_NAME) from e
        self._dir.keep_on_error = True

    def memoized(self, kind: str, key: str) -> bool:
        return self._ledger is not None and (kind, key) in self._ledger.memos

    def memo(self, kind: str, key: str, compute):
        """`compute()`, remembered in the progress file under (kind, key): for slow derived facts (e.g. the sha256
        of a 5 GB source shard) that a resumed run should not recompute."""
        return compute() if self._ledger is None else self._ledger.memo(kind, key, compute)

    # -- the rest of the folder ---------------------------------------------------------------------------
    def _close_shards(self) -> None:
        self._flush_stream(close=True)
        self._close_direct_fds()
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if self._ledger is not None:
            self._ledger.close()

    def write_json(self, rel: str, obj) -> None:
        try:
            (self.tmp / rel).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        except OSError as e:
            raise self._write_failed(e, self.tmp / rel) from e

    def copy_file(self, src: Path, rel: str | None = None) -> None:
        try:
            shutil.copyfile(src, self.tmp / (rel or src.name))
        except OSError as e:
            raise self._write_failed(e, self.tmp / (rel or src.name)) from e

    @property
    def shard_names(self) -> list[str]:
        return list(self._shard_names)

    def _finish(self) -> None:
        self._close_shards()
        for s in self._specs:
            if self._written[s.name] != s.nbytes:
                raise ValueError(f"tensor {s.name}: {self._written[s.name]} of {s.nbytes} planned bytes written")
        if self._kind != "safetensors":
            return
        total = sum(s.nbytes for s in self._specs)
        self.write_json(INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": self._weight_map})


def _region_hash():
    # Resume records only need to notice damaged or half-written bytes, not resist forgery: XXH3-128 runs ~5x faster
    # than sha256, whose read-back at commit cost ~20% of a conversion's CPU (bench/convert_real.py).
    return xxhash.xxh3_128()
