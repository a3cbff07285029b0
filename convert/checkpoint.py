"""A Step-3.5 checkpoint folder: config, validated shards, every tensor mapped to its role.

Opening does all the cheap checks up front (headers, index, paths, roles, shapes), so a conversion fails before
it writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from convert.arch.step35 import TensorInfo, classify, expected_tensors
from convert.config import SIDE_FILES, Step35Config, load_config, model_file, model_roots
from convert.errors import BadInput
from convert.provenance import file_identity
from convert.reopen import reopened, sizes
from convert.safetensors_io import Entry, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class SourceTensor:
    info: TensorInfo
    entry: Entry
    shard: str  # file name relative to the model folder


class Checkpoint:
    def __init__(self, model_dir: Path, config: Step35Config, shards: dict[str, SafetensorsFile],
                 tensors: dict[str, SourceTensor]):
        self.dir = model_dir
        self.config = config
        self.shards = shards
        self.tensors = tensors

    def __iter__(self):
        """Tensors in on-disk order (shard, offset): sequential reads for the page cache and the disk."""
        return iter(sorted(self.tensors.values(), key=lambda t: (t.shard, t.entry.start)))

    def read(self, name: str) -> torch.Tensor:
        return self.shards[self.tensors[name].shard].read(name)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        return self.shards[self.tensors[name].shard].read_expert(name, expert)

    def shard_path(self, shard: str) -> Path:
        return self.dir / shard

    def shard_identity(self, shard: str) -> dict:
        """What says a shard is unchanged without reading it: a Hub cache blob is named by its sha256; a plain file
        by its size, modification time and header hash (what a resumed run compares)."""
        return file_identity(self.dir / shard, self.shards[shard].header_sha256)

    def close(self) -> None:
        for f in self.shards.values():
            f.close()

    def __reduce__(self):
        """Pickled by name (a Ray task): the receiving process opens the folder itself (convert.reopen)."""
        if type(self) is not Checkpoint:
            raise TypeError(f"{type(self).__name__} cannot be sent to another process")
        folder = self.dir.resolve()
        files = [folder / "config.json", *(folder / s for s in sorted(self.shards))]
        return reopened, ("checkpoint", open_checkpoint, sizes(files), str(folder))


def _safe_relative(model_dir: Path, rel: str, where: Path, tensor: str | None = None) -> str:
    """A shard path from an index must stay inside the model folder, even through symlinks."""
    p = Path(rel)
    what = f"tensor {tensor}: " if tensor else ""
    if p.is_absolute() or ".." in p.parts or rel.strip() == "":
        raise BadInput(f"{where}: {what}weight_map path {rel!r} leaves the model folder")
    try:  # NUL bytes, lone surrogates and over-long names fail in the OS calls, not as BadInput
        if not rel.isprintable():
            raise ValueError("non-printable characters")
        real = (model_dir / p).resolve()
        (model_dir / p).exists()
    except (OSError, ValueError) as e:
        raise BadInput(f"{where}: {what}weight_map path {rel!r} is not a usable file name ({e.__class__.__name__})")
    if not any(real.is_relative_to(r) for r in model_roots(model_dir)):
        raise BadInput(f"{model_dir / p}: symlink points outside the model folder ({real})")
    return p.as_posix()


def _weight_map(model_dir: Path) -> dict[str, str] | None:
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    try:
        wm = json.loads(index.read_text())["weight_map"]
    # ValueError: besides JSONDecodeError, an integer literal past Python's digit limit; RecursionError: deep nesting
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise BadInput(f"{index}: not a valid safetensors index ({e.__class__.__name__}: {e})")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise BadInput(f"{index}: weight_map must map tensor names to file names")
    for name in wm:
        if not name.isprintable():  # it would break the one-line error messages that name it
            raise BadInput(f"{index}: tensor {name!r}: name holds non-printable characters")
    return {name: _safe_relative(model_dir, rel, index, name) for name, rel in wm.items()}


def _shard_names(model_dir: Path, weight_map: dict[str, str] | None) -> list[str]:
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    names = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not names:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            # No --allow-pickle on purpose: loading a pickle runs code (torch.load's weights_only guard has had
            # bypasses, CVE-2025-32434), and Step-3.5 is published as safetensors.
            raise BadInput(f"{model_dir}: only pickle weights ({', '.join(pickles[:3])}); stepq reads safetensors "
                           f"only and never unpickles (convert them to safetensors in a sandbox first)")
        raise BadInput(f"{model_dir}: no *.safetensors files")
    return [_safe_relative(model_dir, n, model_dir) for n in names]


def _undeclared_hint(name: str, cfg: Step35Config) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= cfg.num_layers:
        return (f"; config.json declares {cfg.num_trunk_layers} layers + {cfg.num_mtp_layers} MTP "
                f"(num_nextn_predict_layers), an undeclared MTP layer?")
    return ""


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BadInput(f"{model_dir}: not a directory")
    cfg = load_config(model_dir)
    for name in SIDE_FILES:  # read by the tokenizer or copied into artifacts: must not lead out of the folder
        model_file(model_dir, name)
    weight_map = _weight_map(model_dir)
    shards: dict[str, SafetensorsFile] = {}
    try:
        for shard in _shard_names(model_dir, weight_map):
            if not (model_dir / shard).is_file():
                raise BadInput(f"{model_dir / shard}: shard listed in {INDEX_NAME} is missing")
            shards[shard] = SafetensorsFile(model_dir / shard)
        tensors = _index_tensors(model_dir, cfg, shards, weight_map)
    except BaseException:
        for f in shards.values():
            f.close()
        raise
    return Checkpoint(model_dir, cfg, shards, tensors)


def _index_tensors(model_dir: Path, cfg: Step35Config, shards: dict[str, SafetensorsFile],
                   weight_map: dict[str, str] | None) -> dict[str, SourceTensor]:
    located: dict[str, str] = {}
    for shard, f in shards.items():
        for name in f.entries:
            if name in located:
                raise BadInput(f"{model_dir / shard}: tensor {name}: also in {located[name]}")
            if weight_map is not None and weight_map.get(name) != shard:
                raise BadInput(f"{model_dir / shard}: tensor {name}: not listed for this shard in {INDEX_NAME}")
            located[name] = shard
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in located:
                raise BadInput(f"{model_dir / shard}: tensor {name}: listed in {INDEX_NAME} but not in the shard")
    tensors = {}
    for name, shard in located.items():
        try:
            info = classify(name, cfg)
        except BadInput as e:  # the role table knows the tensor, not where it came from
            raise BadInput(f"{model_dir / shard}: {e}{_undeclared_hint(name, cfg)}")
        tensors[name] = SourceTensor(info, shards[shard].entries[name], shard)
    listing = model_dir / INDEX_NAME if weight_map is not None else model_dir
    for spec in expected_tensors(cfg):
        name = spec.info.name
        if name not in tensors:
            what = "MTP layer declared by num_nextn_predict_layers but" if spec.info.mtp else "expected by config.json but"
            raise BadInput(f"{listing}: tensor {name}: {what} missing from the checkpoint")
        t = tensors[name]
        if t.entry.shape != spec.shape:
            raise BadInput(f"{model_dir / t.shard}: tensor {name}: shape {list(t.entry.shape)} disagrees with "
                           f"config.json ({list(spec.shape)})")
        if t.entry.dtype not in FLOAT_DTYPES:
            raise BadInput(f"{model_dir / t.shard}: tensor {name}: dtype {t.entry.dtype} (source checkpoints must "
                           f"be BF16/F16/F32)")
    return tensors
