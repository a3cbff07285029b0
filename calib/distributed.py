"""Calibration on Ray: each layer runs data-parallel over shards of the calibration sequences.

The driver keeps what a local run keeps (the activations between layers, the per-layer checkpoints of
calib.resume, the statistics); for each layer it sends every shard its rows, a worker builds the layer over its
own view of the source (calib.layers.build_layer; the checkpoint travels by name, convert.reopen), runs the rows a
micro-batch at a time with a fresh `StatsCollector`, and returns the layer's output rows and raw accumulators. The
driver writes the rows back and merges the accumulators in shard order (`StatsCollector.merge_state`).

Shards are whole micro-batches, the very row groups a local run feeds the layer, so every micro-batch's output and
reduction is the local run's. Maxima, token counts and expert loads merge exactly. Sums of squares are float64
sums of the micro-batches' float32 sums: a local run adds them one at a time, a sharded one adds each shard's
subtotal, which may round differently in the last float64 place (relative difference at most
(micro-batches) x 2^-53); stored as float32, they differ by at most one unit in the last place, and on the fixture
not at all (tests/test_ray.py).

A worker process killed mid-shard is retried by Ray from the same inputs; a killed driver resumes from its layer
checkpoints like a local run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from calib.compute import resolve
from calib.layers import build_layer
from calib.stats import StatsCollector
from calib.stream import Frame, frame_for, run_mtp_rows, run_trunk_rows
from convert.checkpoint import Checkpoint
from convert.ray_executor import get, use_threads

MAX_RETRIES = 3


class _Bar:
    """A progress sink that ignores updates (a worker's rows show on the driver's bar when the shard returns)."""

    def update(self, n: int) -> None:
        pass


def run_shard(ckpt: Checkpoint, i: int, x: torch.Tensor, ids: torch.Tensor, device: str, dtype: str,
              all_experts: bool, bsz: int, threads: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """On a worker: layer `i` over the shard's rows x [n, T, H] (ids [n, L]: the MTP layers embed them) ->
    (the layer's raw accumulators, its output rows)."""
    use_threads(threads)
    compute = resolve(device, dtype)
    fr: Frame = frame_for(ckpt, compute, ids.shape[1], bsz)
    layer, prefix = build_layer(ckpt, i, compute)
    collector = StatsCollector(ckpt.config, all_experts=all_experts)
    cfg = ckpt.config
    with torch.inference_mode():
        collector.attach(layer, prefix, i)
        if cfg.is_mtp(i):
            k = cfg.mtp_layers.index(i) + 1
            y = torch.empty(x.shape[0], ids.shape[1] - k, x.shape[2], dtype=compute.dtype)
            run_mtp_rows(fr, layer, k, prefix, x.to(compute.dtype), y, ids, collector, None, _Bar())
        else:
            y = torch.empty(x.shape, dtype=compute.dtype)
            run_trunk_rows(fr, layer, i, x.to(compute.dtype), y, _Bar())
        collector.detach(i)
    return collector.take_state(), y


def shard_rows(n_seq: int, bsz: int, shards: int) -> list[slice]:
    """Contiguous row ranges of whole micro-batches, as even as they go; never more shards than micro-batches."""
    batches = math.ceil(n_seq / bsz)
    shards = max(1, min(shards, batches))
    bounds = [k * batches // shards for k in range(shards + 1)]
    return [slice(bounds[k] * bsz, min(bounds[k + 1] * bsz, n_seq)) for k in range(shards)]


class RayShards:
    """`calib.stream.ShardRunner` on a connected Ray cluster: as many shards as the cluster has task slots
    (`cpus_per_task` CPUs each, the torch threads of a shard)."""

    def __init__(self, ray, ckpt: Checkpoint, device: str, dtype: str, all_experts: bool, bsz: int,
                 cpus_per_task: int = 1):
        self.ray, self.ckpt, self.device, self.dtype = ray, ckpt, device, dtype
        self.all_experts, self.bsz, self.cpus = all_experts, bsz, cpus_per_task
        # a GPU per shard where the cluster has GPUs (Ray hides them from tasks that do not ask): not run on a GPU
        resources = ray.cluster_resources()
        self.gpus = 1 if device != "cpu" and resources.get("GPU", 0) >= 1 else 0
        if self.gpus:
            self.device = "cuda"  # the one GPU Ray gives the task is cuda:0 there, whatever --device named here
        self.slots = int(resources["GPU"]) if self.gpus else max(1, int(resources.get("CPU", 1) // cpus_per_task))
        self._remote = ray.remote(num_cpus=cpus_per_task, num_gpus=self.gpus, max_retries=MAX_RETRIES)(run_shard)

    def plan(self, n_seq: int) -> list[slice]:
        return shard_rows(n_seq, self.bsz, self.slots)

    def run_layer(self, i: int, x, y, ids: torch.Tensor, observer: StatsCollector, bar) -> None:
        ray = self.ray
        parts = self.plan(x.shape[0])
        refs = []
        for r in parts:  # each shard's rows into the object store in turn (spilled to disk there when large)
            rows = ray.put(x[r].contiguous())
            refs.append(self._remote.remote(self.ckpt, i, rows, ids[r].contiguous(), self.device, self.dtype,
                                            self.all_experts, self.bsz, self.cpus))
            del rows
        for k, (r, ref) in enumerate(zip(parts, refs, strict=True)):  # in shard order: the merge order is fixed
            try:
                state, out = get(ray, ref)
            except BaseException:
                for rest in refs[k + 1:]:  # the layer failed: its other shards are not wanted
                    ray.cancel(rest, force=False)
                raise
            y[r] = out
            observer.merge_state(state)
            bar.update(out.shape[0] * out.shape[1])
            del state, out

    def describe(self, n_seq: int) -> dict[str, Any]:
        return {"executor": "ray", "shards": len(self.plan(n_seq)), "cpus_per_shard": self.cpus,
                **({"gpus_per_shard": self.gpus} if self.gpus else {})}
