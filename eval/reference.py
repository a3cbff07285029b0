"""The BF16 reference outputs on the eval tokens: computed once per source + tokens + compute, kept on disk, read
through a memory map by every eval of a variant of that source.

`OUT/<model>-evalref/<key>/` holds

    logprobs.npy           [N, T, V] float32: log_softmax of the reference's fp32 trunk logits, per position (8.4 GB
                           for the real model's default eval set: never in RAM as a whole)
    positions.safetensors  greedy [N, T] (argmax of the trunk logits), nll [N, T-1] (-log P(next token)),
                           mtp.<k> [N, T-k] (argmax of MTP depth k's logits)

The folder is filled by `ReferenceSink` under a temporary name and renamed into place once whole (another eval of the
same source may be reading or writing it); one that does not read back whole is computed again. Before computing,
the disk must hold it: a one-line BadInput otherwise, before any work.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from convert.checkpoint import Checkpoint
from convert.durable import fsync_path, swap_in
from convert.errors import BadInput, WriteFailed
from convert.ledger import TEMP_MARK
from eval.metrics import SUB_ROWS, next_token_nll

LOGPROBS = "logprobs.npy"
POSITIONS = "positions.safetensors"
HEADER_BYTES = 4096  # an upper bound of the .npy header (numpy pads it to 64 or 4096 bytes)
log = logging.getLogger("stepq.evaluate")


@dataclass
class Reference:
    logprobs: np.ndarray        # [N, T, V] float32, memory-mapped read-only
    greedy: torch.Tensor        # [N, T] argmax of the trunk logits
    nll: torch.Tensor           # [N, T-1] -log P(next token)
    drafts: list[torch.Tensor]  # depth k: [N, T-k] argmax of MTP depth k's logits


def reference_bytes(n: int, t: int, vocab: int, depths: int) -> int:
    """What the folder takes on disk: the log-probs, and the small per-position arrays (8 bytes each at most)."""
    return HEADER_BYTES + n * t * vocab * 4 + 8 * n * (3 * t + sum(t - k for k in range(1, depths + 1)))


class ReferenceSink:
    """`calib.stream.HeadSink` writing the reference's log-probs into `logprobs` (a writable memory map) and keeping
    its per-position arrays."""

    def __init__(self, logprobs: np.ndarray, ids: torch.Tensor, depths: int):
        n, t = ids.shape
        self.logprobs, self.ids = logprobs, ids
        self.greedy = torch.full((n, t), -1, dtype=torch.long)
        self.nll = torch.full((n, t - 1), float("nan"))
        self.drafts = [torch.full((n, t - k), -1, dtype=torch.long) for k in range(1, depths + 1)]

    def trunk(self, row: int, start: int, logits: torch.Tensor) -> None:
        for a in range(0, logits.shape[0], SUB_ROWS):
            x = logits[a:a + SUB_ROWS].float()
            p = slice(start + a, start + a + x.shape[0])
            lp = F.log_softmax(x, -1)
            self.logprobs[row, p] = lp.cpu().numpy()
            nll = next_token_nll(lp, self.ids[row], p.start)
            self.nll[row, p.start:p.start + nll.shape[0]] = nll.cpu()
            self.greedy[row, p] = x.argmax(-1).cpu()

    def mtp(self, depth: int, row: int, start: int, logits: torch.Tensor) -> None:
        self.drafts[depth - 1][row, start:start + logits.shape[0]] = logits.argmax(-1).cpu()

    def tensors(self) -> dict[str, torch.Tensor]:
        if (self.greedy < 0).any() or self.nll.isnan().any() or any((d < 0).any() for d in self.drafts):
            raise RuntimeError("the reference forward left positions without logits")
        return {"greedy": self.greedy, "nll": self.nll,
                **{f"mtp.{k}": d for k, d in enumerate(self.drafts, start=1)}}


def open_reference(folder: Path, shape: tuple[int, int, int], depths: int) -> Reference | None:
    """The cached outputs in `folder` when they are whole and of `shape` (N, T, V); None when missing or damaged."""
    if not folder.is_dir():
        return None
    n, t, _ = shape
    try:
        logprobs = np.load(folder / LOGPROBS, mmap_mode="r")  # ValueError when the file is shorter than its header says
        if logprobs.shape != tuple(shape) or logprobs.dtype != np.float32:
            raise ValueError(f"log-probs {logprobs.dtype} {logprobs.shape}, expected float32 {tuple(shape)}")
        small = load_file(folder / POSITIONS)
        want = {"greedy": (n, t), "nll": (n, t - 1), **{f"mtp.{k}": (n, t - k) for k in range(1, depths + 1)}}
        got = {name: tuple(v.shape) for name, v in small.items()}
        if got != want:
            raise ValueError(f"{POSITIONS} holds {got}, expected {want}")
    except (OSError, ValueError, SafetensorError) as e:
        log.warning("%s: cached reference outputs unreadable (%s); computing them again", folder, e)
        return None
    return Reference(logprobs, small["greedy"], small["nll"], [small[f"mtp.{k}"] for k in range(1, depths + 1)])


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_space(cache_dir: Path, need: int) -> None:
    """BadInput, one line, when the disk holding `cache_dir` has less than `need` bytes free."""
    free = shutil.disk_usage(_existing(cache_dir)).free
    if need > free:
        raise BadInput(f"{cache_dir}: the BF16 reference outputs need {_size(need)}, {_size(free)} free")


def _drop_abandoned(cache_dir: Path) -> None:
    """Temporary folders of evals that died while writing (8 GB each on the real model); live writers' stay."""
    for p in cache_dir.glob(f".*{TEMP_MARK}*"):
        try:
            os.kill(int(p.name.rsplit(TEMP_MARK, 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass  # not ours, or another user's live process


def reference_outputs(source: Checkpoint, ids: torch.Tensor, cache_dir: Path, key: str, progress: bool,
                      compute, images=None) -> Reference:
    """The reference outputs of `source` on `ids` from `cache_dir/key/`, computed first when missing or damaged.
    `images`: an image set's features at the image-token positions (then `key` must cover the images too)."""
    from eval.forward import source_forward

    folder = cache_dir / key
    depths = len(source.config.mtp_layers)
    shape = (*ids.shape, source.config.raw["vocab_size"])
    ref = open_reference(folder, shape, depths)
    if ref is not None:
        return ref
    if cache_dir.is_dir():
        _drop_abandoned(cache_dir)
    check_space(cache_dir, reference_bytes(*shape, depths))
    tmp = cache_dir / f".{key}{TEMP_MARK}{os.getpid()}"
    try:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            logprobs = np.lib.format.open_memmap(tmp / LOGPROBS, mode="w+", dtype=np.float32, shape=shape)
            # every block now, so a full disk is an error here and not a SIGBUS when a page of the map is written
            fd = os.open(tmp / LOGPROBS, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as e:
            raise WriteFailed(f"{e.filename or tmp}: cannot write the BF16 reference outputs ({e.strerror})") from e
        sink = ReferenceSink(logprobs, ids, depths)
        source_forward(source, ids, sink, progress, compute, images)
        try:
            logprobs.flush()
            save_file({k: v.contiguous() for k, v in sink.tensors().items()}, tmp / POSITIONS)
            for f in tmp.iterdir():
                fsync_path(f)
            swap_in(tmp, folder)
        except OSError as e:
            raise WriteFailed(f"{e.filename or tmp}: cannot write the BF16 reference outputs ({e.strerror})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = open_reference(folder, shape, depths)
    if ref is None:
        raise WriteFailed(f"{folder}: the BF16 reference outputs just written do not read back")
    return ref
