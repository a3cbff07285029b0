"""Logits of the BF16 source and of safetensors artifacts, through the same layer-streamed forward.

An artifact is read back from its files on disk (`convert.artifact.ArtifactReader`, dequantized as `stepq.json`
says) and run in `calib.stream.stream_forward`, one decoder layer in memory at a time, with the engine's input
quantization applied to every quantized linear and expert (NVFP4 W4A4 with the stored input global scales, FP8
static with the stored input scales, FP8 dynamic per token / per 1x128 group). So a W4A4 artifact is measured with
the activation error the engine adds, not as a weight-only model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.step3p7.modeling_step3p7 import Step3p7Experts

from calib.moe import ExpertInputQuant, GroupedMoE, HookSet
from calib.reference import to_checkpoint_names
from calib.stream import stream_forward
from convert.arch.step37_vision import PREFIXES as VISION_PREFIXES
from convert.artifact import ArtifactReader
from convert.checkpoint import Checkpoint
from convert.errors import BadInput


@dataclass
class Outputs:
    """Every logit in memory: the tests only ([N, T, V] is 8.4 GB on the real model's eval set)."""

    logits: torch.Tensor                 # [N, T, V] float32
    mtp_logits: list[torch.Tensor]       # depth k: [N, T-k, V]


class ArtifactWeights:
    """The source checkpoint's table of tensors, each read from the artifact instead (dequantized, float32)."""

    def __init__(self, source: Checkpoint, reader: ArtifactReader):
        extra = set(reader.source_names()) - set(source.tensors)
        missing = set(source.tensors) - set(reader.source_names())
        if extra or missing:
            name = sorted(extra or missing)[0]
            raise BadInput(f"{reader.path / 'stepq.json'}: tensor {name}: "
                           f"{'not in the source' if extra else 'missing from the artifact'} "
                           f"({len(extra)} extra, {len(missing)} missing): not a variant of {source.dir}")
        self.config, self.tensors, self.dir = source.config, source.tensors, reader.path
        self.reader = reader

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(name)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """One routed expert, decoded from its own bytes when the layer runs (never a whole stack)."""
        return self.reader.read_expert(name, expert)


class InputQuantizer:
    """`calib.stream.Observer` that fake-quantizes the inputs of an artifact's quantized linears and experts."""

    def __init__(self, reader: ArtifactReader, raw_config: dict):
        self.reader, self.raw_config = reader, raw_config
        self.layout = reader.layout
        self.hooked: list[str] = []
        self._hooks = HookSet()

    def _quantized(self, module: str) -> bool:
        d = self.reader.decisions.get(f"{module}.weight")
        return d is not None and d["action"] != "kept"

    def _module_name(self, ref_name: str) -> str:
        (name,) = to_checkpoint_names({ref_name + ".weight": None}, self.raw_config)
        return name.removesuffix(".weight")

    def attach(self, module: nn.Module, prefix: str, layer: int) -> None:
        for path, m in module.named_modules():
            if isinstance(m, nn.Linear):
                name = self._module_name(prefix + path)
                fq = self._quantized(name) and self.layout.input_quant(self.reader.stored, name)
                if fq:
                    self._hooks.add(m.register_forward_pre_hook(
                        lambda mod, args, fq=fq: (fq(args[0]),) + tuple(args[1:])))
                    self.hooked.append(name)
            elif isinstance(m, (Step3p7Experts, GroupedMoE)):
                stack = f"model.layers.{layer}.moe."
                fqs = []
                for e in range(m.num_experts):
                    up = self._quantized(stack + "gate_proj") and self.layout.expert_input_quant(
                        self.reader.stored, stack + "gate_proj", e)
                    down = self._quantized(stack + "down_proj") and self.layout.expert_input_quant(
                        self.reader.stored, stack + "down_proj", e)
                    fqs.append((up or None, down or None))
                if not any(a or b for a, b in fqs):
                    continue
                if isinstance(m, GroupedMoE):  # the streamed forward: the block hands each expert's inputs over
                    self._hooks.add_expert_hook(m, ExpertInputQuant(fqs))
                else:  # transformers' experts (InMemoryModel): its forward with the inputs quantized
                    m.forward = types.MethodType(_experts_forward(fqs), m)
                self.hooked.append(stack + "experts")

    def detach(self, layer: int) -> None:
        self._hooks.remove()

    def head_input(self, module: str, x: torch.Tensor) -> None:
        pass  # lm_head stays BF16 in every bundled recipe; the MTP shared_head.output is a hooked nn.Linear


def _experts_forward(fqs):
    """`Step3p7Experts.forward` (transformers 5.17) with each expert's inputs quantized as the engine does."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            top_k_pos, token_idx = torch.where(top_k_index.T == e)  # rows of top_k_index pick distinct experts
            fq_in, fq_down = fqs[e]
            x = hidden_states[token_idx]
            x = fq_in(x) if fq_in else x
            h = self._apply_gate(F.linear(x, self.gate_up_proj[e]))
            h = fq_down(h) if fq_down else h
            out = F.linear(h, self.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    return forward


def source_forward(source: Checkpoint, ids: torch.Tensor, heads, progress: bool = True, compute=None,
                   images=None) -> None:
    """The source's trunk and MTP logits handed to `heads` (a `calib.stream.HeadSink`), a block at a time. `images`:
    an image set's features at the image-token positions (calib.data.CalibData.images)."""
    stream_forward(source, ids, heads=heads, progress=progress, compute=compute, images=images)


def artifact_forward(source: Checkpoint, artifact: str | Path, ids: torch.Tensor, heads,
                     progress: bool = True, compute=None, images=None) -> list[str]:
    """The artifact's logits handed to `heads` -> the modules whose inputs were quantized. With `images`, the vision
    tower is the artifact's own (kept BF16 by every scheme)."""
    return _artifact_stream(source, artifact, ids, progress, compute, heads=heads, images=images)[1]


def _artifact_stream(source: Checkpoint, artifact: str | Path, ids: torch.Tensor, progress: bool, compute,
                     **stream_kw):
    reader = ArtifactReader(artifact)
    try:
        quantizer = InputQuantizer(reader, source.config.raw)
        res = stream_forward(ArtifactWeights(source, reader), ids, quantizer, progress=progress, compute=compute,
                             **stream_kw)
    finally:
        reader.close()
    return res, quantizer.hooked


def source_outputs(source: Checkpoint, ids: torch.Tensor, progress: bool = True, compute=None,
                   images=None) -> Outputs:
    """Every logit in memory (the tests, on the fixture): `source_forward` is what the eval runs."""
    res = stream_forward(source, ids, keep_outputs=True, progress=progress, compute=compute, images=images)
    return Outputs(res.logits.float(), [m.float() for m in res.mtp_logits])


def artifact_outputs(source: Checkpoint, artifact: str | Path, ids: torch.Tensor,
                     progress: bool = True, compute=None, images=None) -> tuple[Outputs, list[str]]:
    """-> (every logit in memory, the modules whose inputs were quantized); the tests' `artifact_forward`."""
    res, hooked = _artifact_stream(source, artifact, ids, progress, compute, keep_outputs=True, images=images)
    return Outputs(res.logits.float(), [m.float() for m in res.mtp_logits]), hooked


class InMemoryModel:
    """`eval.models.LogitsModel` over the whole model in memory (the fixture; lm-eval's per-request calls would
    rebuild every streamed layer each time). Same weights and input quantization as the streamed forward."""

    def __init__(self, name: str, weights, quantizer: InputQuantizer | None = None):
        from calib.reference import ReferenceModel

        cfg = weights.config.raw
        self.name, self.vocab_size = name, cfg["vocab_size"]
        self.model = ReferenceModel(cfg)
        # the text stack: lm-eval's tasks are text (a Step-3.7 vision tower is not part of this model)
        text = [n for n in weights.tensors if not n.startswith(VISION_PREFIXES)]
        self.model.load_checkpoint_tensors({n: weights.read(n).float() for n in text})
        self.model.float().eval()
        if quantizer is not None:  # hooks stay for the model's lifetime
            for i, layer in enumerate(self.model.model.layers):
                quantizer.attach(layer, f"model.layers.{i}.", i)
            for k, layer in enumerate(self.model.mtp):
                quantizer.attach(layer, f"mtp.{k}.", weights.config.num_trunk_layers + k)

    @torch.inference_mode()
    def logits(self, ids: torch.LongTensor) -> torch.Tensor:
        return self.model(ids)[0].float()

    def close(self) -> None:
        self.model = None


def in_memory_model(source: Checkpoint, artifact: str | Path | None = None) -> InMemoryModel:
    """The BF16 source (artifact None) or an artifact read back from disk, with its input quantization."""
    if artifact is None:
        return InMemoryModel("bf16", source)
    reader = ArtifactReader(artifact)
    try:
        return InMemoryModel(Path(artifact).name, ArtifactWeights(source, reader),
                             InputQuantizer(reader, source.config.raw))
    finally:
        reader.close()  # InputQuantizer read its scales at attach time
