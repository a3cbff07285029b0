"""Read an artifact back in source terms: each source tensor, dequantized from the files on disk.

What was quantized and how comes from the artifact's `stepq.json`, never re-derived from names or recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from convert.checkpoint import INDEX_NAME
from convert.errors import BadInput
from convert.safetensors_io import SafetensorsFile
from quant.layouts import layout_for


class ArtifactReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.provenance = json.loads((self.path / "stepq.json").read_text())
            weight_map = json.loads((self.path / INDEX_NAME).read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise BadInput(f"{self.path}: not a stepq artifact ({e.__class__.__name__}: {e})")
        self.scheme = self.provenance["scheme"]
        self.decisions: dict[str, dict] = self.provenance["tensors"]
        self._files = {s: SafetensorsFile(self.path / s) for s in sorted(set(weight_map.values()))}
        self._where = weight_map
        self.layout = layout_for(self.scheme)

    def stored(self, name: str) -> torch.Tensor:
        """An output tensor as stored (packed codes, scales, ...)."""
        try:
            return self._files[self._where[name]].read(name)
        except KeyError:
            raise BadInput(f"{self.path}: tensor {name}: missing from the artifact")

    def source_names(self) -> list[str]:
        return list(self.decisions)

    def read(self, source_name: str) -> torch.Tensor:
        """The source tensor `source_name` as this artifact represents it (float32 if it was quantized)."""
        d = self.decisions[source_name]
        if d["action"] == "kept":
            return self.stored(source_name)
        module = source_name.removesuffix(".weight")
        if len(d["shape"]) == 3:  # a routed-expert stack
            return self.layout.decode_experts(self.stored, module, d["shape"][0])
        return self.layout.decode_linear(self.stored, module)

    def read_expert(self, source_name: str, expert: int) -> torch.Tensor:
        """Expert `expert` of the routed-expert stack `source_name`, dequantized from its own bytes only."""
        d = self.decisions[source_name]
        if d["action"] == "kept":
            return self.stored(source_name)[expert]
        return self.layout.decode_expert(self.stored, source_name.removesuffix(".weight"), expert)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
