"""convert.executor: the local executor that pipelines reads with the fast quantize kernels.

Results in submission order, bounded read-ahead, errors surface at the consumer, early exit stops the reader, the
reader thread really faults the pages in; and an expert-by-expert NVFP4 conversion through it gives the same bytes
as the serial path.
"""

import ctypes
import mmap
import os
import threading
import time
from functools import partial

import pytest
import torch

from quant.nvfp4 import quantize_nvfp4, shared_global_scale
from convert.executor import LocalExecutor, SerialExecutor, Task, touch_pages


def _slow_square(x, delay=0.0):
    time.sleep(delay)
    return x * x


def _tasks(n, delay=0.0, on_read=None):
    def read(i):
        if on_read:
            on_read(i)
        return torch.tensor([float(i)])
    return [Task(i, partial(read, i), partial(_slow_square, delay=delay * ((i * 7) % 3))) for i in range(n)]


@pytest.mark.parametrize("workers", [1, 3])
def test_results_in_submission_order(workers):
    with LocalExecutor(prefetch=2, workers=workers) as ex:
        out = [(t.key, r.item()) for t, r in ex.map(_tasks(20, delay=0.002))]
    assert out == [(i, float(i * i)) for i in range(20)]
    assert [(t.key, r.item()) for t, r in SerialExecutor().map(_tasks(5))] == [(i, float(i * i)) for i in range(5)]


def test_read_ahead_is_bounded():
    reads, consumed = [], []
    lock = threading.Lock()

    def on_read(i):
        with lock:
            reads.append(i)
            # reads may run ahead of consumption by at most prefetch (queue) + workers (computing) + 2 (in hand)
            assert len(reads) - len(consumed) <= 2 + 1 + 2

    with LocalExecutor(prefetch=2, workers=1) as ex:
        for t, _ in ex.map(_tasks(30, on_read=on_read)):
            time.sleep(0.003)
            with lock:
                consumed.append(t.key)
    assert consumed == list(range(30))


def test_errors_reach_the_consumer_and_stop_the_reader():
    def boom(_):
        raise RuntimeError("compute failed")

    tasks = _tasks(10)
    tasks[3] = Task(3, tasks[3].read, boom)
    with LocalExecutor() as ex, pytest.raises(RuntimeError, match="compute failed"):
        list(ex.map(tasks))

    def bad_read():
        raise OSError("read failed")

    tasks = _tasks(10)
    tasks[5] = Task(5, bad_read, tasks[5].compute)
    with LocalExecutor() as ex, pytest.raises(OSError, match="read failed"):
        list(ex.map(tasks))


def test_early_exit_joins_the_reader():
    before = threading.active_count()
    with LocalExecutor(prefetch=1) as ex:
        for t, _ in ex.map(_tasks(1000)):
            if t.key == 3:
                break
    time.sleep(0.05)
    assert threading.active_count() <= before


def _resident(t: torch.Tensor) -> tuple[int, int]:
    """(pages of `t`'s memory in the page cache, pages it spans), from mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = t.data_ptr() + t.numel() * t.element_size() - start
    vec = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    assert libc.mincore(start, length, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec), len(vec)


def test_touch_pages_faults_in_mapped_tensors_nested_anywhere(tmp_path):
    """The reader thread's job: every page of a memory-mapped tensor is in memory afterwards, wherever the tensor
    sits in the read's result; tensors it cannot or need not touch (empty, non-contiguous, bool) pass through."""
    pages = 64
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(pages * mmap.PAGESIZE))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: a cold read
    mapped = torch.from_file(str(path), shared=True, size=pages * mmap.PAGESIZE // 2, dtype=torch.bfloat16)
    odd = (torch.empty(0), torch.zeros(4, 4).t(), torch.ones(3, dtype=torch.bool))
    touch_pages([{"experts": (odd, [mapped[: mapped.numel() // 2], mapped[mapped.numel() // 2:]])}])
    resident, total = _resident(mapped)
    assert total == pages and resident == pages


def test_expert_by_expert_nvfp4_through_the_executor_matches_serial():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(6, 64, 128, generator=g) * 0.02).to(torch.bfloat16)
    up = (torch.randn(6, 64, 128, generator=g) * 0.05).to(torch.bfloat16)

    def compute(ws):
        gs = shared_global_scale(*ws)
        return [quantize_nvfp4(w, gs) for w in ws], gs

    tasks = [Task(e, partial(lambda e: (gate[e], up[e]), e), compute) for e in range(6)]
    with LocalExecutor(prefetch=2, workers=2) as ex:
        fast = [r for _, r in ex.map(tasks)]
    serial = [r for _, r in SerialExecutor().map(tasks)]
    for (a, ga), (b, gb) in zip(fast, serial):
        assert torch.equal(ga, gb)
        for (pa, sa), (pb, sb) in zip(a, b):
            assert torch.equal(pa, pb) and torch.equal(sa.view(torch.uint8), sb.view(torch.uint8))
