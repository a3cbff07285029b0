"""The Ray executor: the same `map` as `convert.executor.LocalExecutor`, with the tasks run as Ray tasks on a
cluster's workers (`--executor ray`). Ray is an optional extra (`pip install -e '.[ray]'`); nothing else imports it.

A task travels by name: its `read` and `compute` are partials of module-level functions over plain data and over
objects that pickle as "open this file again" (`convert.reopen`: the checkpoint, the statistics, the GPTQ store), so
each worker reads the source where it is (shared storage, or the same path on every node) and returns only the
outputs, which the driver writes in submission order through the same `ArtifactWriter` as a local run: the artifact
and its resume ledger are the local executor's, byte for byte.

Submission is a sliding window (at most `2 x` the cluster's CPUs tasks, and `window_bytes` of source, in flight);
results come back in order. A worker process that dies mid-task is Ray's to retry (`max_retries`): a task is a pure
function of its inputs, so the retry gives the same bytes. An exception raised by a task (bad input found on a
worker) is raised on the driver as itself.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from convert.errors import BadInput
from convert.executor import Task, run_inline
from convert.reopen import check_sizes, sizes

INSTALL_HINT = "pip install -e '.[ray]' (make setup installs it)"
WINDOW_BYTES = 2 << 30   # source bytes in flight (one expert slice of the real model is 10.5 MB)
MAX_RETRIES = 3          # a task whose worker process died is run again this many times
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(f"--executor ray: Ray is not installed in this environment ({INSTALL_HINT})") from None
    return ray


def connect(address: str | None = None):
    """Join the cluster at `address` (else RAY_ADDRESS; neither: start a local one) -> the ray module.

    An address nothing answers at is bad input in one line, checked with a plain TCP connect first: ray.init
    itself retries an unreachable address for a minute before it fails."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():  # a library caller connected already
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--ray-address {address}" if address else "--executor ray"
        raise BadInput(f"{where}: cannot start or join a Ray cluster ({str(e).splitlines()[0]})") from None
    return ray


def _check_reachable(address: str) -> None:
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--ray-address {address}: expected host:port (the address `ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BadInput(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def _see(expected: tuple[tuple[str, int], ...]) -> str | None:
    """On one node: None when it sees every file as the driver does, else the one-line reason."""
    try:
        check_sizes(expected)
    except BadInput as e:
        return str(e)
    return None


def check_nodes_see(paths: list[Path]) -> None:
    """BadInput (one line, naming the file and the node) unless every live worker node sees `paths` with the sizes
    the driver sees: asked before anything is written."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = sizes(paths)
    nodes = cpu_nodes(ray)
    if not nodes:
        raise BadInput("--executor ray: the Ray cluster has no live node with CPUs")
    see = ray.remote(num_cpus=0)(_see)
    refs = [see.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(expected)
            for n in nodes]
    for node, problem in zip(nodes, ray.get(refs), strict=True):
        if problem:
            raise BadInput(f"{problem} (Ray node {node.get('NodeManagerAddress', node['NodeID'])})")


def cpu_nodes(ray) -> list[dict]:
    """The cluster's live nodes that can run tasks."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def use_threads(threads: int) -> None:
    """On a worker: the kernels and torch ops on the CPUs Ray gave the task (the kernels' pool is sized once per
    process from STEPQ_THREADS; Ray sets OMP_NUM_THREADS the same way)."""
    os.environ.setdefault("STEPQ_THREADS", str(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def get(ray, ref) -> Any:
    """ray.get, raising what the task raised (BadInput found on a worker) as itself rather than wrapped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def _run_task(task: Task, threads: int) -> Any:
    """A task on a worker, on `threads` CPUs."""
    use_threads(threads)
    return _pack(run_inline(task))


class _Wire:
    """A tensor as plain bytes + dtype + shape for the trip back to the driver: torch 2.13 cannot unpickle float8
    tensors (its legacy storage loader asks UntypedStorage for a dtype), and a kept unit's tensor is a view of the
    worker's memory-mapped source, whose storage does not pickle either."""

    def __init__(self, t):
        self.dtype, self.shape = str(t.dtype).removeprefix("torch."), tuple(t.shape)
        self.data = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # pickled as a copy of these bytes

    def tensor(self) -> torch.Tensor:
        """A view of the bytes as Ray handed them over (read-only: the object store's memory), never written to."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(self.data).view(getattr(torch, self.dtype)).reshape(self.shape)


def _pack(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _Wire(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(o) for o in obj)
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, _Wire):
        return obj.tensor()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(o) for o in obj)
    return obj


class RayExecutor:
    """`Executor` over a Ray cluster (`connect` first). `cpus_per_task`: CPUs Ray reserves for each task (the
    kernels spread a call over that many threads); `window_bytes`: source bytes in flight."""

    def __init__(self, cpus_per_task: int = 1, window_bytes: int = WINDOW_BYTES, max_retries: int = MAX_RETRIES):
        self.ray = import_ray()
        if not self.ray.is_initialized():
            raise RuntimeError("RayExecutor: call convert.ray_executor.connect() first")
        self.cpus, self.window_bytes = cpus_per_task, window_bytes
        self._remote = self.ray.remote(num_cpus=cpus_per_task, max_retries=max_retries)(_run_task)
        cpus = self.ray.cluster_resources().get("CPU", 1)
        self.window = max(2, 2 * int(cpus // cpus_per_task))
        self.label = {"executor": "ray", "nodes": len(cpu_nodes(self.ray)), "cpus": int(cpus), "cpus_per_task": cpus_per_task}

    def map(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        window: deque = deque()
        in_flight = 0
        try:
            for t in tasks:
                window.append((t, self._remote.remote(t, self.cpus)))
                in_flight += t.nbytes
                while len(window) >= self.window or (in_flight > self.window_bytes and len(window) > 1):
                    t0, ref = window.popleft()
                    in_flight -= t0.nbytes
                    yield t0, _unpack(get(self.ray, ref))
            while window:
                t0, ref = window.popleft()
                yield t0, _unpack(get(self.ray, ref))
        finally:
            for _, ref in window:  # an error, or the consumer stopped: the rest is not wanted
                self.ray.cancel(ref, force=False)

    def close(self) -> None:
        pass

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
