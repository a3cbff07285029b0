"""Layer-streamed forward: one decoder layer in memory at a time, all calibration activations through it.

Each layer is transformers' `Step3p7DecoderLayer` (or `calib.reference.MtpLayer` for the MTP head) built on the
meta device and given the checkpoint's tensors with `load_state_dict(assign=True)`, named by
`calib.reference.from_checkpoint_names`; masks and RoPE follow `calib.reference.ReferenceModel`. Activations live
in RAM below `spill_bytes` and in a numpy memmap on disk above it. An observer (calib.stats) sees each layer while it
runs; logits are only computed when asked for (the golden test), never during calibration. With `checkpoints`
(calib.resume) each finished layer's output is persisted, and a re-run starts after the last finished layer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.step3p7.modeling_step3p7 import Step3p7DecoderLayer, Step3p7RMSNorm, Step3p7RotaryEmbedding

from calib.reference import MtpLayer, from_checkpoint_names, mtp_rope_problem, text_config
from convert.checkpoint import Checkpoint
from convert.durable import replace_durably, write_atomic
from convert.errors import BadInput

SPILL_BYTES = 4 << 30           # activations above this go to disk
MICRO_BATCH_TOKENS = 4096       # tokens per forward call; bounds attention scores and MoE scratch
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 stored raw


class Observer(Protocol):
    """Statistics hooks: `attach` before a layer runs (names are ReferenceModel parameter prefixes such as
    `model.layers.3.` or `mtp.0.`), `detach` after; `head_input` for lm_head / shared_head.output inputs."""

    def attach(self, module: nn.Module, prefix: str, layer: int) -> None: ...
    def detach(self, layer: int) -> None: ...
    def head_input(self, module: str, x: torch.Tensor) -> None: ...


class Checkpoints(Protocol):
    """Per-layer checkpoints (calib.resume.LayerCheckpoints). Layers are numbered as in the checkpoint: trunk, then
    MTP. A layer's checkpoint covers what the observer recorded since the previous one: the lm_head inputs go with
    the first MTP layer's (or stay in memory when there is none)."""

    def resume(self, spill_bytes: int) -> tuple[int, Activations] | None: ...  # (last finished layer, its output)
    def spill_file(self, layer: int) -> Path: ...  # where `layer`'s output goes when it is spilled to disk
    def commit(self, layer: int, output: Activations) -> None: ...


class Activations:
    """[N, T, H] activations: a tensor in RAM up to `spill_bytes`, above it a numpy memmap of `file` (kept on close: a
    checkpoint) or of a file in a private temp dir (removed on close). `create=False` reads back a file from `save`
    (read-only when memory-mapped)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, spill_bytes: int, tmp_dir: str | None = None,
                 file: Path | None = None, create: bool = True):
        self.shape, self.dtype = tuple(shape), dtype
        self.dir: Path | None = None
        self.file: Path | None = None
        self._t: torch.Tensor | None = None
        self._mm: np.memmap | None = None
        if prod(shape) * dtype.itemsize <= spill_bytes:
            self._t = torch.empty(shape, dtype=dtype)
            if not create:
                with open(file, "rb") as f:
                    f.readinto(self._raw())
            return
        if file is None:
            self.dir = Path(tempfile.mkdtemp(prefix="stepq-act-", dir=tmp_dir))
            file = self.dir / "act.bin"
        self.file = Path(file)
        self._mm = np.memmap(self.file, dtype=_NP_DTYPES[dtype], mode="w+" if create else "r", shape=self.shape)

    @property
    def on_disk(self) -> bool:
        return self._mm is not None

    def _raw(self) -> np.ndarray:
        """The RAM tensor's bytes, as a flat uint8 array sharing its memory."""
        return self._t.reshape(-1).view(torch.uint8).numpy()

    def __getitem__(self, idx) -> torch.Tensor:
        if self._t is not None:
            return self._t[idx]
        return torch.from_numpy(np.array(self._mm[idx])).view(self.dtype)  # a copy: memmap pages stay evictable

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        value = value.detach().to(self.dtype)
        if self._t is not None:
            self._t[idx] = value
        else:
            raw = value.view(torch.uint16) if self.dtype == torch.bfloat16 else value
            self._mm[idx] = raw.contiguous().numpy()

    def tensor(self) -> torch.Tensor:
        return self._t if self._t is not None else self[:]

    def save(self, path: Path) -> None:
        """Persist as the file `path`: written under a temporary name (a spilled file is its own), fsynced and renamed
        into place, so after a crash `path` is whole or absent. A spilled file stays mapped under its new name."""
        if self._mm is not None:
            self._mm.flush()
            replace_durably(self.file, path)
            self.file = path
        else:
            write_atomic(path, self._raw())

    def close(self) -> None:
        self._mm = self._t = None  # the memory map closes with its last reference
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass
class StreamResult:
    hidden: torch.Tensor | None = None          # trunk output before model.norm [N, L, H] (keep_outputs only)
    logits: torch.Tensor | None = None          # [N, L, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [N, L-k, V]
    spilled: bool = False
    timings: dict = field(default_factory=dict)


def masks(t: int, sliding_window: int | None) -> dict[str, torch.Tensor]:
    """As ReferenceModel._masks: bool, True = attend; a sliding layer sees the last `sliding_window` keys."""
    q = torch.arange(t)[:, None]
    kv = torch.arange(t)[None, :]
    causal = kv <= q
    sliding = causal & (q - kv < sliding_window) if sliding_window else causal
    return {"full_attention": causal[None, None], "sliding_attention": sliding[None, None]}


def _layer_tensors(ckpt: Checkpoint, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This layer's checkpoint tensors under ReferenceModel names, in the compute dtype (router kept fp32)."""
    names = [n for n, t in ckpt.tensors.items() if t.info.layer == layer]
    mapped = from_checkpoint_names({n: ckpt.read(n) for n in names}, ckpt.config.raw)
    out = {}
    for name, w in mapped.items():
        fp32 = name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))  # engines route in fp32
        out[name] = w.to(torch.float32 if fp32 else dtype)
    return out


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def build_layer(ckpt: Checkpoint, layer: int, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """One decoder layer (trunk) or MtpLayer (MTP head) with its checkpoint weights; -> (module, name prefix)."""
    cfg = ckpt.config
    tensors = _layer_tensors(ckpt, layer, dtype)
    if cfg.is_mtp(layer):
        prefix = f"mtp.{layer - cfg.num_trunk_layers}."
        with torch.device("meta"):
            module = MtpLayer(text_config(cfg.raw, with_mtp=True), layer)
    else:
        prefix = f"model.layers.{layer}."
        with torch.device("meta"):
            module = Step3p7DecoderLayer(text_config(cfg.raw), layer)
    module.load_state_dict(_strip(tensors, prefix), strict=True, assign=True)
    return module.eval(), prefix


def _check_mtp_rope(cfg) -> None:
    """MTP layers run with the trunk's sliding-attention RoPE table (as in ReferenceModel): refuse configs where
    that would be wrong."""
    per_layer = {"rope_theta": list(cfg.rope_theta), "partial_rotary_factors": list(cfg.partial_rotary_factors)}
    if problem := mtp_rope_problem(list(cfg.layer_types), per_layer, cfg.mtp_layers):
        raise BadInput(f"{cfg.path}: {problem}")


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not enabled,
                        dynamic_ncols=True)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


@torch.inference_mode()
def stream_forward(ckpt: Checkpoint, ids: torch.Tensor, observer: Observer | None = None, *,
                   keep_outputs: bool = False, dtype: torch.dtype = torch.float32,
                   spill_bytes: int = SPILL_BYTES, micro_batch_tokens: int = MICRO_BATCH_TOKENS,
                   tmp_dir: str | None = None, progress: bool = True,
                   checkpoints: Checkpoints | None = None) -> StreamResult:
    """Run `ids` [N, L] through every layer of the checkpoint (trunk, then MTP), one layer in memory at a time.

    keep_outputs=True also returns the trunk hidden state, the final logits and the MTP logits (tests).
    checkpoints: persist each finished layer and start after the last one an earlier run finished (calibration;
    not with keep_outputs, which needs every layer's outputs)."""
    if keep_outputs and checkpoints is not None:
        raise ValueError("keep_outputs needs every layer run in this call: no checkpoints")
    cfg = ckpt.config
    _check_mtp_rope(cfg)
    n_seq, seq_len = ids.shape
    h_dim = cfg.hidden_size
    bsz = max(1, micro_batch_tokens // seq_len)
    # the embedding output is the largest activation: it decides, whatever layer a resumed run starts at
    res = StreamResult(spilled=n_seq * seq_len * h_dim * dtype.itemsize > spill_bytes)
    trunk_config = text_config(cfg.raw)
    rotary = Step3p7RotaryEmbedding(trunk_config)  # MTP layers reuse the trunk's sliding table, as the reference does
    pos = torch.arange(seq_len)[None]
    dummy = torch.empty(0, dtype=dtype)
    rope = {lt: rotary(dummy, pos, lt) for lt in set(trunk_config.layer_types)}
    mask = masks(seq_len, trunk_config.sliding_window)
    embed = ckpt.read("model.embed_tokens.weight")
    t_start = time.time()

    def new(t: int, layer: int | None = None) -> Activations:
        file = checkpoints.spill_file(layer) if checkpoints is not None and layer is not None else None
        return Activations((n_seq, t, h_dim), dtype, spill_bytes, tmp_dir, file)

    def finish(layer: int, x: Activations, y: Activations) -> Activations:
        if checkpoints is not None:
            checkpoints.commit(layer, y)
        x.close()
        return y

    resumed = checkpoints.resume(spill_bytes) if checkpoints is not None else None
    if resumed:
        done, x = resumed
    else:
        done, x = -1, new(seq_len)
        for b in range(0, n_seq, bsz):
            x[b:b + bsz] = F.embedding(ids[b:b + bsz], embed).to(dtype)
        res.timings["embed_s"] = time.time() - t_start

    total_layers = cfg.num_layers
    for i in range(done + 1, cfg.num_trunk_layers):
        t0 = time.time()
        layer, prefix = build_layer(ckpt, i, dtype)
        lt = trunk_config.layer_types[i]
        if observer:
            observer.attach(layer, prefix, i)
        y = new(seq_len, i)
        with _Progress(n_seq * seq_len, f"calib layer {i + 1}/{total_layers}", progress) as bar:
            for b in range(0, n_seq, bsz):
                y[b:b + bsz] = layer(x[b:b + bsz], attention_mask=mask[lt], position_embeddings=rope[lt],
                                     position_ids=pos)
                bar.update(min(bsz, n_seq - b) * seq_len)
        if observer:
            observer.detach(i)
        del layer
        x = finish(i, x, y)
        res.timings[f"layer_{i}_s"] = time.time() - t0

    # Final norm + lm_head: the head input is recorded; logits only when asked for. An earlier run that finished an
    # MTP layer has recorded the head inputs already (in that layer's checkpoint).
    if done < cfg.num_trunk_layers:
        t0 = time.time()
        norm = Step3p7RMSNorm(h_dim, eps=trunk_config.rms_norm_eps)
        norm.weight = nn.Parameter(ckpt.read("model.norm.weight").to(dtype), requires_grad=False)
        lm_head = ckpt.read("lm_head.weight").to(dtype) if keep_outputs else None
        logits = []
        for b in range(0, n_seq, bsz):
            h = norm(x[b:b + bsz])
            if observer:
                observer.head_input("lm_head", h)
            if lm_head is not None:
                logits.append(F.linear(h, lm_head))
        if keep_outputs:
            res.hidden, res.logits = x.tensor().clone(), torch.cat(logits)
        res.timings["lm_head_s"] = time.time() - t0

    # MTP depth k at position t sees tokens <= t+k: input = previous hidden[:, :L-k] and embed(ids[:, k:]).
    rope_swa, swa = rope["sliding_attention"], mask["sliding_attention"]
    for k, i in enumerate(cfg.mtp_layers, start=1):
        if i <= done:
            continue
        t0 = time.time()
        layer, prefix = build_layer(ckpt, i, dtype)
        if observer:
            observer.attach(layer, prefix, i)
        t = seq_len - k
        y, mtp_logits = new(t, i), []
        with _Progress(n_seq * t, f"calib layer {i + 1}/{total_layers} (MTP {k})", progress) as bar:
            for b in range(0, n_seq, bsz):
                e = F.embedding(ids[b:b + bsz, k:], embed).to(dtype)
                out = layer(e, x[b:b + bsz, :t], swa[..., :t, :t], (rope_swa[0][:, :t], rope_swa[1][:, :t]),
                            pos[:, :t])
                y[b:b + bsz] = out
                head = layer.transformer.shared_head
                if observer or keep_outputs:
                    h = head.norm(out)
                    if observer:
                        observer.head_input(f"{prefix}transformer.shared_head.output", h)
                    if keep_outputs:
                        mtp_logits.append(head.output(h))
                bar.update(min(bsz, n_seq - b) * t)
        if observer:
            observer.detach(i)
        if keep_outputs:
            res.mtp_logits.append(torch.cat(mtp_logits))
        del layer
        x = finish(i, x, y)
        res.timings[f"layer_{i}_s"] = time.time() - t0
    x.close()
    res.timings["stream_s"] = time.time() - t_start
    return res


def compute_dtype_for(ckpt: Checkpoint, dtype: str) -> torch.dtype:
    """'auto': float32 (exact statistics) unless the largest layer in float32 would not fit in half the free RAM."""
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise BadInput(f"--dtype {dtype}: use auto, float32 or bfloat16")
    per_layer: dict = {}
    for t in ckpt.tensors.values():
        if t.info.layer is not None:
            per_layer[t.info.layer] = per_layer.get(t.info.layer, 0) + t.entry.nbytes
    fp32_bytes = 2 * max(per_layer.values(), default=0)  # BF16 on disk -> F32 in memory
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return torch.float32
    return torch.float32 if fp32_bytes < avail // 2 else torch.bfloat16
