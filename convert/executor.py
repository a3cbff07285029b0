"""Executors: run quantization units (a tensor, or one expert's slice of a 3-D stack) and hand back their outputs in
submission order, so the caller writes each output shard sequentially while the work runs in parallel.

A `Task` splits a unit into its I/O half (`read`, e.g. mmap views of the unit's source bytes) and its CPU half
(`compute`, e.g. the layout quantizing those tensors). `LocalExecutor` runs `read` one or more tasks ahead on a
reader thread and faults the pages in there, so the disk works while the cores quantize the previous unit; the
quantize kernels release the GIL (numba `nogil`) and spread each call over all cores themselves. Memory stays
bounded: at most `prefetch` read-ahead units plus `workers + 1` results exist at once.

A multi-node executor implements the same `map`: `convert.ray_executor.RayExecutor`. For that, a task's `read` and `compute`
must be picklable (module-level functions or `functools.partial`s of them over plain arguments: a shard path and
byte range, a tensor name and expert index, the layout object), not closures over open files.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Task:
    """One quantization unit. `key` is opaque to the executor (the caller's handle for writing the results);
    `nbytes` is the source bytes `read` touches (progress, and a budget for distributed schedulers)."""

    key: Any
    read: Callable[[], Any]
    compute: Callable[[Any], Any]
    nbytes: int = field(default=0, compare=False)


class Executor(Protocol):
    def map(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        """Run every task; yield `(task, compute(read()))` in the order the tasks were given. An exception in any
        task is raised here, and the remaining tasks are abandoned."""
        ...

    def close(self) -> None:
        ...


def describe(executor: Executor) -> dict:
    """Where the pieces ran, for stepq.json (the bytes do not depend on it)."""
    return getattr(executor, "label", None) or {"executor": "local"}


def run_inline(task: Task) -> Any:
    """What every executor does with one task, wherever it runs it."""
    return task.compute(task.read())


class SerialExecutor:
    """No threads: read, compute, yield, one task after another (the baseline, and for debugging)."""

    def map(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        for t in tasks:
            yield t, run_inline(t)

    def close(self) -> None:
        pass


def touch_pages(obj: Any) -> None:
    """Fault in every page of the CPU tensors in `obj` (tensors, or lists / tuples / dicts of them) by reading one
    byte per page. For mmap views this is the actual disk read; done on the reader thread it overlaps with compute.
    The strided read is a torch op, which releases the GIL while it runs."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu" and obj.numel() and obj.is_contiguous():
            flat = obj.reshape(-1).view(torch.uint8)
            flat[:: mmap.PAGESIZE].sum()  # one byte per page (the first and every 4096th)
            flat[-1:].sum()  # and the last page
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            touch_pages(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            touch_pages(o)


_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class LocalExecutor:
    """Read-ahead on one thread, compute on a bounded pool, results in order.

    `prefetch`: tasks read ahead of the one being computed (each is typically one expert slice, ~10 MB of bf16).
    `workers`: tasks computed concurrently. 1 is right when the compute already uses every core (the fused
    kernels do); more helps when `compute` is partly serial Python (many tiny tensors).
    """

    def __init__(self, prefetch: int = 2, workers: int = 1, warm: Callable[[Any], None] = touch_pages):
        if prefetch < 1 or workers < 1:
            raise ValueError("prefetch and workers must be >= 1")
        self.prefetch, self.workers, self.warm = prefetch, workers, warm
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stepq-compute")

    def _reader(self, tasks: Iterable[Task], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for t in tasks:
                if stop.is_set():
                    return
                data = t.read()
                self.warm(data)
                while not stop.is_set():
                    try:
                        out.put((t, data), timeout=0.1)
                        break
                    except queue.Full:
                        continue
            item: Any = _END
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            item = _Failed(e)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def map(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(tasks, ready, stop), name="stepq-reader", daemon=True)
        reader.start()
        pending: deque = deque()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                t, data = item
                pending.append((t, self._pool.submit(t.compute, data)))
                del data, item
                while len(pending) > self.workers:  # the oldest result goes out while the next ones compute
                    t0, fut = pending.popleft()
                    yield t0, fut.result()
            while pending:
                t0, fut = pending.popleft()
                yield t0, fut.result()
        finally:
            stop.set()
            for _, fut in pending:
                fut.cancel()
            reader.join()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
