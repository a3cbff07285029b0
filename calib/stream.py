"""Layer-streamed forward: one decoder layer's weights at a time, all calibration (or eval) activations through it.

Each layer is built by `calib.layers` (transformers' Step3p7 layer over the checkpoint's own tensors, the MoE block
`calib.moe.GroupedMoE`, GEMMs and attention through `calib.compute`: device, bf16 activations, GEMM dtype); the
next layer is built (its bytes read ahead, or copied to the GPU) on a background thread while the current one runs.
Masks and RoPE follow `calib.reference.ReferenceModel`. Activations live on the device or in RAM below
`spill_bytes` and in a numpy memmap on disk above it. An observer (calib.stats) sees each layer while it runs;
logits are only computed when a `HeadSink` asks for them (eval, the golden tests), never during calibration. With
`checkpoints` (calib.resume) each finished layer's output is persisted, and a re-run starts after the last one.

Images (a Step-3.7 checkpoint, `images` from calib.data): the vision tower runs while the first hidden states are
embedded, and its features replace the text embedding at the `<im_patch>` positions (Step3p7Model.forward's
masked_scatter), so every layer, router and expert sees the image tokens as the engines feed them. The MTP layers
embed the token ids as text, image positions too: vLLM's Step-3.5 MTP drafter takes no multimodal embeddings
(llm_base_proposer.py: "using text-only draft inputs").
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
from transformers.models.step3p7.modeling_step3p7 import Step3p7RMSNorm, Step3p7RotaryEmbedding

from calib.compute import Compute, gemm, on_device, resolve
from calib.images import ImageEmbedder, ImageRows
from calib.layers import LayerPipeline
from calib.reference import mtp_rope_problem, text_config
from convert.checkpoint import Checkpoint
from convert.durable import replace_durably, write_atomic
from convert.errors import BadInput

SPILL_BYTES = 512 << 20         # an activation tensor above this goes to disk (a layer holds its input and output)
TOKENS_PER_EXPERT = 512         # micro-batches are sized so that each routed expert's GEMMs see about this many rows
MIN_MICRO_BATCH_TOKENS = 4096   # ... and never smaller (dense layers, attention)
MAX_MICRO_BATCH_TOKENS = 32768  # ... nor larger (bounds the micro-batch's activations)
HEAD_TOKENS = 1024              # logits are computed (and handed to the sink) this many positions at a time
DEVICE_ACTIVATION_SHARE = 0.5   # on a GPU, activations stay on the device up to this share of its free memory
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 stored raw


class Observer(Protocol):
    """Statistics hooks: `attach` before a layer runs (names are ReferenceModel parameter prefixes such as
    `model.layers.3.` or `mtp.0.`), `detach` after; `head_input` for lm_head / shared_head.output inputs."""

    def attach(self, module: nn.Module, prefix: str, layer: int) -> None: ...
    def detach(self, layer: int) -> None: ...
    def head_input(self, module: str, x: torch.Tensor) -> None: ...


class LayerDriver(Protocol):
    """An observer that runs each layer itself (calib.gptq: passes that collect Hessians, then quantizes the layer
    and runs it once more): `run_layer` calls `run(note)` as often as it needs; each call runs every micro-batch
    through `module` as it is then and writes the layer's output, so the last call's output is the next layer's
    input. Not with a `HeadSink`: each run would hand its logits over again."""

    def run_layer(self, module: nn.Module, prefix: str, layer: int, run) -> None: ...


def _run_observed(observer, module: nn.Module, prefix: str, layer: int, run) -> None:
    if observer is None:
        run("")
    elif hasattr(observer, "run_layer"):
        observer.run_layer(module, prefix, layer, run)
    else:
        observer.attach(module, prefix, layer)
        run("")
        observer.detach(layer)


class ShardRunner(Protocol):
    """Runs layer `i` over x's rows as shards on other workers, writes y, merges their statistics into observer
    (calib.distributed.RayShards)."""

    def run_layer(self, i: int, x: Activations, y: Activations, ids: torch.Tensor, observer, bar) -> None: ...


class Checkpoints(Protocol):
    """Per-layer checkpoints (calib.resume.LayerCheckpoints). Layers are numbered as in the checkpoint: trunk, then
    MTP. A layer's checkpoint covers what the observer recorded since the previous one: the lm_head inputs go with
    the first MTP layer's (or stay in memory when there is none)."""

    def resume(self, spill_bytes: int) -> tuple[int, Activations] | None: ...  # (last finished layer, its output)
    def spill_file(self, layer: int) -> Path: ...  # where `layer`'s output goes when it is spilled to disk
    def commit(self, layer: int, output: Activations) -> None: ...


class Activations:
    """[N, T, H] activations: a tensor on `device` (a GPU, up to `device_bytes`), else in RAM up to `spill_bytes`
    (pinned when a GPU reads it), above that a numpy memmap of `file` (kept on close: a checkpoint) or of a file in a
    private temp dir (removed on close). `create=False` reads back a file from `save` (read-only when
    memory-mapped)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, spill_bytes: int, tmp_dir: str | None = None,
                 file: Path | None = None, create: bool = True, device: torch.device | None = None,
                 device_bytes: int = 0):
        self.shape, self.dtype = tuple(shape), dtype
        self.dir: Path | None = None
        self.file: Path | None = None
        self._t: torch.Tensor | None = None
        self._mm: np.memmap | None = None
        nbytes = prod(shape) * dtype.itemsize
        gpu = device is not None and device.type != "cpu"
        if gpu and nbytes <= device_bytes:
            self._t = torch.empty(shape, dtype=dtype, device=device)
            if not create:
                self._t.copy_(Activations(shape, dtype, nbytes, file=file, create=False).tensor())
            return
        if nbytes <= spill_bytes:
            self._t = torch.empty(shape, dtype=dtype, pin_memory=gpu)
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
        """The tensor's bytes, as a flat uint8 array (sharing its memory when it is in RAM)."""
        return self._t.reshape(-1).view(torch.uint8).cpu().numpy()

    def __getitem__(self, idx) -> torch.Tensor:
        if self._t is not None:
            return self._t[idx]
        return torch.from_numpy(np.array(self._mm[idx])).view(self.dtype)  # a copy: memmap pages stay evictable

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        value = value.detach().to(self.dtype)
        if self._t is not None:
            self._t[idx] = value.to(self._t.device, non_blocking=True)
        else:
            raw = value.view(torch.uint16) if self.dtype == torch.bfloat16 else value
            self._mm[idx] = raw.contiguous().cpu().numpy()

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


class HeadSink(Protocol):
    """Receives logits as the stream computes them, fp32 on the device, at most HEAD_TOKENS positions of one
    sequence at a time: `trunk(row, start, logits [t, V])` for positions start..start+t-1 of sequence `row`, and
    `mtp(depth, row, start, logits [t, V])` for MTP depth `depth` (positions 0..L-depth-1). A stream with a sink
    reads the lm_head and runs the MTP heads' output projections; without one it never does."""

    def trunk(self, row: int, start: int, logits: torch.Tensor) -> None: ...
    def mtp(self, depth: int, row: int, start: int, logits: torch.Tensor) -> None: ...


@dataclass
class StreamResult:
    hidden: torch.Tensor | None = None          # trunk output before model.norm [N, L, H] (keep_outputs only)
    logits: torch.Tensor | None = None          # [N, L, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [N, L-k, V]
    spilled: bool = False
    micro_batch_tokens: int = 0
    vision_runs: int = 0                        # images through the vision tower (once each, where it could keep them)
    timings: dict = field(default_factory=dict)


class _KeepLogits:
    """The sink behind keep_outputs=True: every logit in host memory (the tests and the fixture only)."""

    def __init__(self):
        self.parts: dict[int, dict[int, list[torch.Tensor]]] = {}  # depth (0: trunk) -> row -> blocks in order

    def trunk(self, row, start, logits):
        self.parts.setdefault(0, {}).setdefault(row, []).append(logits.cpu())

    def mtp(self, depth, row, start, logits):
        self.parts.setdefault(depth, {}).setdefault(row, []).append(logits.cpu())

    def stacked(self, depth: int) -> torch.Tensor:
        rows = self.parts[depth]
        return torch.stack([torch.cat(rows[r]) for r in sorted(rows)])


def _heads(hidden: torch.Tensor, weight: torch.Tensor, compute: Compute, first_row: int, emit) -> None:
    """Logits of hidden [b, t, H] through `weight`, HEAD_TOKENS positions of a sequence at a time -> emit(row, start,
    logits): a [micro-batch, V] fp32 block would be 9.5 GB on the real vocabulary."""
    for r in range(hidden.shape[0]):
        for p in range(0, hidden.shape[1], HEAD_TOKENS):
            emit(first_row + r, p, gemm(hidden[r, p:p + HEAD_TOKENS], weight, compute, torch.float32))


def masks(t: int, sliding_window: int | None, device=None) -> dict[str, torch.Tensor]:
    """As ReferenceModel._masks: bool, True = attend; a sliding layer sees the last `sliding_window` keys."""
    q = torch.arange(t, device=device)[:, None]
    kv = torch.arange(t, device=device)[None, :]
    causal = kv <= q
    sliding = causal & (q - kv < sliding_window) if sliding_window else causal
    return {"full_attention": causal[None, None], "sliding_attention": sliding[None, None]}


def micro_batch_tokens_for(cfg, seq_len: int) -> int:
    """Tokens per forward call: enough that each routed expert's GEMMs get ~TOKENS_PER_EXPERT rows (tokens x top-k
    spread over the experts), whole sequences, within [MIN, MAX]_MICRO_BATCH_TOKENS."""
    want = TOKENS_PER_EXPERT * cfg.num_experts // cfg.top_k if cfg.moe_layers and cfg.top_k else 0
    want = min(max(want, MIN_MICRO_BATCH_TOKENS), MAX_MICRO_BATCH_TOKENS)
    return max(seq_len, want // seq_len * seq_len)


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


@dataclass
class Frame:
    """What every layer call of a run needs besides its weights and rows: built alike on the driver and on a Ray
    worker running a shard of the rows (calib.distributed)."""

    config: object  # the trunk's transformers config
    rope: dict      # layer type -> (cos, sin) on the device
    pos: torch.Tensor
    mask: dict
    embed: torch.Tensor
    compute: Compute
    bsz: int        # sequences per micro-batch


def frame_for(ckpt: Checkpoint, compute: Compute, seq_len: int, bsz: int) -> Frame:
    trunk_config = text_config(ckpt.config.raw)
    rotary = Step3p7RotaryEmbedding(trunk_config)  # MTP layers reuse the trunk's sliding table
    pos = torch.arange(seq_len)[None]
    dummy = torch.empty(0, dtype=compute.dtype)
    rope = {lt: tuple(t.to(compute.device) for t in rotary(dummy, pos, lt)) for lt in set(trunk_config.layer_types)}
    return Frame(trunk_config, rope, pos.to(compute.device), masks(seq_len, trunk_config.sliding_window,
                                                                    compute.device),
                 ckpt.read("model.embed_tokens.weight"), compute, bsz)


def run_trunk_rows(fr: Frame, layer: nn.Module, i: int, x, y, bar) -> None:
    """Trunk layer `i` over every row of x [n, L, H] (Activations or a tensor), a micro-batch at a time, into y."""
    lt, n, dev = fr.config.layer_types[i], x.shape[0], fr.compute.device
    for b in range(0, n, fr.bsz):
        r = slice(b, min(b + fr.bsz, n))
        y[r] = layer(x[r].to(dev, non_blocking=True), attention_mask=fr.mask[lt], position_embeddings=fr.rope[lt],
                     position_ids=fr.pos)
        bar.update((r.stop - b) * x.shape[1])


def run_mtp_rows(fr: Frame, layer: nn.Module, k: int, prefix: str, x, y, ids: torch.Tensor, observer,
                 heads: HeadSink | None, bar) -> None:
    """MTP depth k over every row: at position t it sees tokens <= t+k, so its input is the previous hidden
    x[:, :L-k] and embed(ids[:, k:]); the head's input goes to the observer, its logits to `heads`."""
    n, t, dev = x.shape[0], ids.shape[1] - k, fr.compute.device
    swa, rope_swa = fr.mask["sliding_attention"], fr.rope["sliding_attention"]
    for b in range(0, n, fr.bsz):
        r = slice(b, min(b + fr.bsz, n))
        e = F.embedding(ids[r, k:], fr.embed).to(fr.compute.dtype).to(dev, non_blocking=True)
        out = layer(e, x[r, :t].to(dev, non_blocking=True), swa[..., :t, :t], (rope_swa[0][:, :t], rope_swa[1][:, :t]),
                    fr.pos[:, :t])
        y[r] = out
        head = layer.transformer.shared_head
        if observer or heads is not None:
            h = head.norm(out)
            if observer:
                observer.head_input(f"{prefix}transformer.shared_head.output", h)
            if heads is not None:
                _heads(h, head.output.weight, fr.compute, b,
                       lambda row, start, logits: heads.mtp(k, row, start, logits))
        bar.update((r.stop - b) * t)


def _device_bytes(compute: Compute) -> int:
    if compute.device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(compute.device)
    return int(free * DEVICE_ACTIVATION_SHARE) // 2  # a layer holds its input and its output


@torch.inference_mode()
def stream_forward(ckpt: Checkpoint, ids: torch.Tensor, observer: Observer | None = None, *,
                   keep_outputs: bool = False, heads: HeadSink | None = None, compute: Compute | None = None,
                   spill_bytes: int = SPILL_BYTES, micro_batch_tokens: int | None = None,
                   tmp_dir: str | None = None, progress: bool = True,
                   checkpoints: Checkpoints | None = None, images: ImageRows | None = None,
                   shards: ShardRunner | None = None) -> StreamResult:
    """Run `ids` [N, L] through every layer of the checkpoint (trunk, then MTP), one layer's weights at a time.

    heads: receives the trunk and MTP logits per micro-batch (eval). keep_outputs=True keeps them all, and the trunk
    hidden state, in the result (tests, the fixture). compute: device and dtypes (default: CPU, float32).
    checkpoints: persist each finished layer and start after the last one an earlier run finished (calibration;
    not with logits, which need every layer run in this call). images: the image features each row takes at its
    `<im_patch>` positions (an image set; the vision tower is read from `ckpt`). shards: run each layer as
    data-parallel shards of the rows elsewhere (calib.distributed: Ray) and merge their statistics into `observer`
    (calibration only: no logits, no LayerDriver)."""
    if shards is not None and (keep_outputs or heads is not None or hasattr(observer, "run_layer")):
        raise ValueError("shards run calibration statistics only: no logits, no LayerDriver")
    if (keep_outputs or heads is not None) and checkpoints is not None:
        raise ValueError("logits need every layer run in this call: no checkpoints")
    if (keep_outputs or heads is not None) and hasattr(observer, "run_layer"):
        raise ValueError("a LayerDriver runs layers more than once: no logits")
    compute = compute or resolve("cpu", "float32")
    dev, dtype = compute.device, compute.dtype
    if keep_outputs:
        heads = _KeepLogits()
    cfg = ckpt.config
    _check_mtp_rope(cfg)
    n_seq, seq_len = ids.shape
    h_dim = cfg.hidden_size
    micro_batch_tokens = micro_batch_tokens or micro_batch_tokens_for(cfg, seq_len)
    bsz = max(1, micro_batch_tokens // seq_len)
    # the embedding output is the largest activation: it decides, whatever layer a resumed run starts at
    res = StreamResult(spilled=n_seq * seq_len * h_dim * dtype.itemsize > spill_bytes, micro_batch_tokens=bsz * seq_len)
    fr = frame_for(ckpt, compute, seq_len, bsz)
    trunk_config, embed = fr.config, fr.embed
    device_bytes = _device_bytes(compute)
    t_start = time.time()

    def new(t: int, layer: int | None = None) -> Activations:
        file = checkpoints.spill_file(layer) if checkpoints is not None and layer is not None else None
        return Activations((n_seq, t, h_dim), dtype, spill_bytes, tmp_dir, file, device=dev, device_bytes=device_bytes)

    def finish(layer: int, x: Activations, y: Activations) -> Activations:
        if checkpoints is not None:
            checkpoints.commit(layer, y)
        x.close()
        return y

    def rows(b: int) -> slice:
        return slice(b, min(b + bsz, n_seq))

    resumed = checkpoints.resume(spill_bytes) if checkpoints is not None else None
    if resumed:
        done, x = resumed
    else:
        done, x = -1, new(seq_len)
        embedder = ImageEmbedder(images, ckpt, dev, dtype) if images is not None else None
        with _Progress(n_seq * seq_len, "embed + vision tower", progress and embedder is not None) as bar:
            for b in range(0, n_seq, bsz):
                e = F.embedding(ids[rows(b)], embed).to(dtype)
                x[rows(b)] = embedder.scatter(b, ids[rows(b)], e) if embedder else e
                bar.update((rows(b).stop - b) * seq_len)
        if embedder:
            res.vision_runs = embedder.runs
            embedder.close()
        res.timings["embed_s"] = time.time() - t_start

    order = [i for i in range(cfg.num_layers) if i > done]
    # With shards (calib.distributed) the workers build and run the layers; the driver only merges
    pipeline = LayerPipeline(ckpt, order if shards is None else [], compute, heads is not None)

    def one_layer(i: int, t: int, desc: str, run_rows) -> None:
        """Layer i over every row's t positions, on the shards or here (`run_rows(layer, prefix, x, y, bar)`); its
        output becomes x."""
        nonlocal x
        t0 = time.time()
        y = new(t, i)
        if shards is not None:
            with _Progress(n_seq * t, desc, progress) as bar:
                shards.run_layer(i, x, y, ids, observer, bar)
        else:
            layer, prefix = pipeline.get(i)
            res.timings[f"layer_{i}_wait_s"] = time.time() - t0

            def run(note: str) -> None:
                with _Progress(n_seq * t, desc + note, progress) as bar:
                    run_rows(layer, prefix, x, y, bar)

            _run_observed(observer, layer, prefix, i, run)
            del layer, run
        x = finish(i, x, y)
        res.timings[f"layer_{i}_s"] = time.time() - t0

    try:
        for i in range(done + 1, cfg.num_trunk_layers):
            one_layer(i, seq_len, f"layer {i + 1}/{cfg.num_layers}",
                      lambda layer, prefix, x, y, bar, i=i: run_trunk_rows(fr, layer, i, x, y, bar))

        # Final norm + lm_head: the head input is recorded; logits only for a sink. An earlier run that finished an
        # MTP layer has recorded the head inputs already (in that layer's checkpoint).
        if done < cfg.num_trunk_layers:
            t0 = time.time()
            norm = Step3p7RMSNorm(h_dim, eps=trunk_config.rms_norm_eps)
            norm.weight = nn.Parameter(on_device(ckpt.read("model.norm.weight"), compute), requires_grad=False)
            lm_head = ckpt.read("lm_head.weight") if heads is not None else None
            hidden = []
            with _Progress(n_seq * seq_len, "lm_head", progress and lm_head is not None) as bar:
                for b in range(0, n_seq, bsz):
                    xb = x[rows(b)].to(dev, non_blocking=True)
                    h = norm(xb)
                    if observer:
                        observer.head_input("lm_head", h)
                    if lm_head is not None:
                        _heads(h, lm_head, compute, b, heads.trunk)
                    if keep_outputs:
                        hidden.append(xb.cpu())
                    bar.update((rows(b).stop - b) * seq_len)
            if keep_outputs:
                res.hidden = torch.cat(hidden)
            res.timings["lm_head_s"] = time.time() - t0

        # MTP depth k at position t sees tokens <= t+k (run_mtp_rows)
        for k, i in enumerate(cfg.mtp_layers, start=1):
            if i > done:
                one_layer(i, seq_len - k, f"layer {i + 1}/{cfg.num_layers} (MTP {k})",
                          lambda layer, prefix, x, y, bar, k=k: run_mtp_rows(fr, layer, k, prefix, x, y, ids,
                                                                              observer, heads, bar))
    finally:
        pipeline.close()
    x.close()
    if keep_outputs:
        res.logits = heads.stacked(0)
        res.mtp_logits = [heads.stacked(k) for k in range(1, len(cfg.mtp_layers) + 1)]
    res.timings["stream_s"] = time.time() - t_start
    return res
