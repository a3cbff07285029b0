"""Weight error of a safetensors artifact against its source: SQNR per layer, per routed expert and per role.

Streams one source tensor (one expert of a stack) at a time; the artifact side is read back from disk.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from convert.artifact import ArtifactReader
from convert.checkpoint import Checkpoint
from eval.metrics import sqnr_db


def _sums(w: torch.Tensor, wq: torch.Tensor) -> tuple[float, float]:
    w = w.float()
    return float((w * w).sum()), float(((w - wq.float()) ** 2).sum())


def weight_error(source: Checkpoint, artifact: str | Path, progress: bool = True) -> dict:
    """-> {"per_layer": [{"layer", "sqnr_db"}], "per_expert": [{"layer", "expert", "sqnr_db"}],
    "per_role": {role: sqnr_db}} over the quantized tensors (kept tensors are byte copies)."""
    reader = ArtifactReader(artifact)
    layer_acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    expert_acc: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    role_acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    quantized = [n for n, d in reader.decisions.items() if d["action"] != "kept"]
    try:
        for name in tqdm(quantized, desc="weight error", unit="tensor", disable=not progress, dynamic_ncols=True):
            info = source.tensors[name].info
            shape = reader.decisions[name]["shape"]
            if len(shape) == 3:  # a routed-expert stack: one expert at a time on both sides
                for e in range(shape[0]):
                    s, n = _sums(source.read_expert(name, e), reader.read_expert(name, e))
                    for acc in (expert_acc[(info.layer, e)], layer_acc[info.layer], role_acc[info.label]):
                        acc[0] += s
                        acc[1] += n
            else:
                s, n = _sums(source.read(name), reader.read(name))
                for acc in ([layer_acc[info.layer]] if info.layer is not None else []) + [role_acc[info.label]]:
                    acc[0] += s
                    acc[1] += n
    finally:
        reader.close()
    return {
        "per_layer": [{"layer": k, "sqnr_db": _finite(sqnr_db(*v))} for k, v in sorted(layer_acc.items())],
        "per_expert": [{"layer": k[0], "expert": k[1], "sqnr_db": _finite(sqnr_db(*v))}
                       for k, v in sorted(expert_acc.items())],
        "per_role": {str(k): _finite(sqnr_db(*v)) for k, v in sorted(role_acc.items())},
    }


def _finite(x: float) -> float | None:
    """JSON has no infinity: an exact copy (no noise) is reported as null."""
    return None if x in (float("inf"), float("-inf")) else round(x, 3)
