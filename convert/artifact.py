"""Read an artifact back in source terms: each source tensor, dequantized from the files on disk.

What was quantized and how comes from the artifact's `stepq.json`, never re-derived from names or recipes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from convert.checkpoint import INDEX_NAME, _safe_relative
from convert.errors import BadInput
from convert.safetensors_io import SafetensorsFile
from quant.layouts import layout_for


class ArtifactReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.provenance = read_json_object(self.path / "stepq.json")
        index = read_json_object(self.path / INDEX_NAME)
        prov = self.path / "stepq.json"
        self.scheme = self.provenance.get("scheme")
        self.decisions: dict[str, dict] = self.provenance.get("tensors")
        if not isinstance(self.decisions, dict) or not all(isinstance(d, dict) for d in self.decisions.values()):
            raise BadInput(f"{prov}: tensors must map tensor names to decision objects")
        try:
            self.layout = layout_for(self.scheme)
        except (ValueError, TypeError):  # unknown or not a string
            raise BadInput(f"{prov}: scheme {self.scheme!r} is not one stepq writes")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(f"{self.path / INDEX_NAME}: weight_map must map tensor names to file names")
        # the same rule as a source checkpoint's index: no file outside the folder, no unusable names
        shards = {s: _safe_relative(self.path, s, self.path / INDEX_NAME) for s in set(weight_map.values())}
        self._files = {}
        try:
            for s in sorted(shards):
                self._files[s] = SafetensorsFile(self.path / shards[s])
        except BadInput:
            self.close()
            raise
        self._where = weight_map

    def stored(self, name: str) -> torch.Tensor:
        """An output tensor as stored (packed codes, scales, ...)."""
        try:
            return self._files[self._where[name]].read(name)
        except KeyError:
            raise BadInput(f"{self.path}: tensor {name}: missing from the artifact")

    def stored_names(self) -> list[str]:
        return list(self._where)

    def source_names(self) -> list[str]:
        return list(self.decisions)

    def read(self, source_name: str) -> torch.Tensor:
        """The source tensor `source_name` as this artifact represents it (float32 if it was quantized)."""
        d = self._decision(source_name)
        if d["action"] == "kept":
            return self.stored(source_name)
        module = source_name.removesuffix(".weight")
        with self._decoding(source_name):
            if len(d["shape"]) == 3:  # a routed-expert stack
                return self.layout.decode_experts(self.stored, module, d["shape"][0])
            return self.layout.decode_linear(self.stored, module)

    def read_expert(self, source_name: str, expert: int) -> torch.Tensor:
        """Expert `expert` of the routed-expert stack `source_name`, dequantized from its own bytes only."""
        d = self._decision(source_name)
        if d["action"] == "kept":
            return self.stored(source_name)[expert]
        with self._decoding(source_name):
            return self.layout.decode_expert(self.stored, source_name.removesuffix(".weight"), expert)

    def _decision(self, name: str) -> dict:
        d = self.decisions.get(name)
        shape = d.get("shape") if isinstance(d, dict) else None
        if not (isinstance(d, dict) and isinstance(d.get("action"), str) and
                (d["action"] == "kept" or isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape))):
            raise BadInput(f"{self.path / 'stepq.json'}: tensor {name}: no decision with an action and a shape")
        return d

    @contextmanager
    def _decoding(self, name: str):
        """Stored tensors that disagree with the decision (shapes, dtypes, counts) fail in the layout's arithmetic."""
        try:
            yield
        except (ValueError, RuntimeError, IndexError, TypeError) as e:
            raise BadInput(f"{self.path / 'stepq.json'}: tensor {name}: stored tensors do not decode as recorded "
                           f"({e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def read_json_object(path: Path) -> dict:
    """An artifact's JSON file (stepq.json, the index) as a dict, or a one-line BadInput naming it."""
    try:
        obj = json.loads(path.read_text())
    # ValueError: bad JSON, bad UTF-8, an integer literal past Python's digit limit; RecursionError: deep nesting
    except (OSError, ValueError, RecursionError) as e:
        raise BadInput(f"{path}: not a stepq artifact ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0]})")
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: not a stepq artifact (not a JSON object)")
    return obj
