"""The tensors a GPTQ pass (calib.gptq) wrote, one safetensors file per layer, read by the export in place of
quantizing the source: GPTQ already produced every quantized tensor the artifact holds, in the layout's own encoding.
Files are memory-mapped and read a piece at a time, so the export streams from them as it streams from a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from convert.errors import BadInput
from convert.reopen import reopened, sizes

RECORDS_KEY = "stepq.gptq.records"  # calib.gptq: how each module / expert of the layer was quantized (JSON bytes)
LAYER_FILES = "stats-*.safetensors"  # calib.resume names each layer's checkpoint so


def row_key(name: str, row: int | None) -> str:
    """A whole output tensor by its name, one expert's row of a 3-D stack as name@row."""
    return name if row is None else f"{name}@{row}"


class GptqStore:
    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key
        self._files = [safe_open(str(p), "pt") for p in sorted(self.folder.glob(LAYER_FILES))]
        self._where = {k: f for f in self._files for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)

    def get(self, name: str, row: int | None = None) -> torch.Tensor:
        k = row_key(name, row)
        f = self._where.get(k)
        if f is None:
            raise BadInput(f"{self.folder}: the GPTQ pass wrote no tensor {k} (run with --force to redo it)")
        return f.get_tensor(k)

    def emits(self, planned: list[tuple[str, torch.Tensor, int | None]]) -> list[tuple[str, torch.Tensor, int | None]]:
        """The stored tensors for a piece whose outputs `planned` lists (name, meta tensor, row), in that order."""
        out = []
        for name, meta, row in planned:
            t = self.get(name, row)
            if t.dtype != meta.dtype or t.shape != meta.shape:
                raise BadInput(f"{self.folder}: tensor {row_key(name, row)} is {t.dtype} {tuple(t.shape)}, the plan "
                               f"says {meta.dtype} {tuple(meta.shape)} (run with --force to redo it)")
            out.append((name, t, row))
        return out

    def close(self) -> None:
        self._files, self._where = [], {}

    def __reduce__(self):
        """Pickled by name (a Ray task): the receiving process opens the folder itself (convert.reopen)."""
        folder = self.folder.resolve()
        return reopened, ("gptq", GptqStore, sizes(sorted(folder.glob(LAYER_FILES))), str(folder), self.key)

    def records(self) -> list[dict]:
        """Every module's / expert's record, in layer order."""
        return [r for f in self._files if RECORDS_KEY in f.keys()  # noqa: SIM118
                for r in json.loads(bytes(f.get_tensor(RECORDS_KEY).numpy()).decode())]
