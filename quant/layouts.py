"""On-disk layouts: how each scheme names and shapes its tensors, and the `quantization_config` it declares.

Tensors in, (name, tensor, row) out; `row` is set when the tensor is one expert's slice of a 3-D output stack.
`decode_*` invert a layout from the stored tensors (float32), for read-back and evals.
Ignore lists are written for vLLM's matching: native `fp8` matches module prefixes exactly (fused shards must all
be listed), compressed-tensors accepts names and `re:` regexes. The names come with each `KeptModule` (the caller
takes them from the architecture's role table); `mtp_layers` passed to the config builders are the MTP layers kept
entirely unquantized (quant/mtp.py `layers_kept_whole`; one pattern covers each), modules kept inside quantized MTP
layers are listed one by one under their runtime names.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from quant import activations
from quant.fp8 import (
    dequantize_fp8_block, dequantize_fp8_channel, dequantize_fp8_tensor, encode_fp8_block, encode_fp8_channel,
    fp8_tensor_scale, quantize_fp8_block, quantize_fp8_channel, quantize_fp8_tensor,
)
from quant.gptq import Grid
from quant.nvfp4 import dequantize_nvfp4, encode_nvfp4, global_scale, quantize_nvfp4, shared_global_scale
from quant.nvfp4_search import quantize_nvfp4_search

Emit = tuple[str, torch.Tensor, int | None]
Read = Callable[[str], torch.Tensor]  # output tensor name -> tensor, as stored
Act = list[torch.Tensor] | None  # calibrated input absmax per module (0-dim), for schemes with static activations
InputQuant = Callable[[torch.Tensor], torch.Tensor] | None  # what the engine does to a linear's input; None = nothing
Grids = list[Grid] | None  # GPTQ's fixed grid per member: the weights are on it already, encode them there

_LAYER_MODULE = re.compile(r"^(model\.layers\.\d+)\.(.+)$")


@dataclass(frozen=True)
class KeptModule:
    """A linear module left unquantized: its checkpoint name and the names vLLM may give it at run time (fused,
    inside the MTP drafter), from the architecture's table (convert/arch: `vllm_names`)."""

    module: str
    role: str
    mtp: bool
    runtime_names: tuple[str, ...]

    @property
    def ignore_names(self) -> list[str]:
        return list(self.runtime_names)


def expert_module(stack_module: str, expert: int) -> str:
    """`model.layers.L.moe.gate_proj` -> `model.layers.L.moe.experts.<e>.gate_proj` (vLLM's per-expert names)."""
    head, proj = stack_module.rsplit(".", 1)
    return f"{head}.experts.{expert}.{proj}"


def _in_layers(module: str, layers: list[int]) -> bool:
    m = _LAYER_MODULE.match(module)
    return m is not None and int(m.group(1).rsplit(".", 1)[1]) in layers


def _mtp_regex(mtp_layers: list[int]) -> list[str]:
    if not mtp_layers:
        return []
    return [r"re:^model\.layers\.(" + "|".join(str(i) for i in sorted(mtp_layers)) + r")\..*"]


METHODS = ("rtn", "search", "gptq", "gptq+search")
SEARCH_METHODS = ("search", "gptq+search")


class _Layout:
    """`method`: "rtn" (round to nearest, bit-identical to compressed-tensors), "search" (NVFP4 only: group scales
    searched against calibration importance, see quant.nvfp4_search), "gptq" (llm-compressor's GPTQ on
    round-to-nearest's scales, quant.gptq) or "gptq+search" (GPTQ on the searched scales).

    GPTQ runs in calibration (calib.gptq): it asks the layout for each fused group's `grids` (the scales, tied as
    the format ties them), then hands the GPTQ-rounded weights back to `linear` / `experts` with those grids, which
    encode them on exactly that grid."""

    supports_search = False
    static_activations = False  # the config carries calibrated input scales: the scheme needs statistics

    def __init__(self, method: str = "rtn"):
        methods = METHODS if self.supports_search else tuple(m for m in METHODS if m not in SEARCH_METHODS)
        if method not in methods:
            raise ValueError(f"--method {method}: not available for {self.scheme} (methods: {', '.join(methods)})")
        self.method = method

    @property
    def searches(self) -> bool:
        return self.method in SEARCH_METHODS

    @property
    def gptq(self) -> bool:
        return self.method.startswith("gptq")

    def extra_tensors(self, mtp_layers: list[int]) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Tensors an engine needs beyond the quantized source tensors: (name, tensor, why). None by default."""
        return iter(())

    def extra_files(self, kept: list[KeptModule], mtp_layers: list[int]) -> dict[str, dict]:
        """JSON files beside config.json that the format's readers expect. None by default."""
        return {}

    def decode_expert(self, read: Read, stack_module: str, expert: int) -> torch.Tensor:
        """One expert of a routed-expert stack, reading only its slice. Default: every output of the stack is stored
        3-D, one row per expert (fp8 block, ModelOpt)."""
        return self.decode_linear(lambda name: read(name)[expert], stack_module)

    def input_quant(self, read: Read, module: str) -> InputQuant:
        """The engine's input fake-quantization for a quantized linear `module`, scales read from the artifact."""
        return None

    def expert_input_quant(self, read: Read, stack_module: str, expert: int) -> InputQuant:
        return self.input_quant(read, expert_module(stack_module, expert))

    def _nvfp4(self, weights: list[torch.Tensor], gs: torch.Tensor, importance: Act, grids: Grids = None):
        if grids:
            return [(encode_nvfp4(w, gs, g.scale), g.scale) for w, g in zip(weights, grids)]
        if self.searches:
            return [quantize_nvfp4_search(w, gs, imp) for w, imp in zip(weights, importance or [None] * len(weights))]
        return [quantize_nvfp4(w, gs) for w in weights]

    def _nvfp4_grids(self, weights: list[torch.Tensor], importance: Act) -> list[Grid]:
        gs = shared_global_scale(*weights)
        return [Grid("nvfp4", scale, gs) for _, scale in self._nvfp4(weights, gs, importance)]


class Fp8BlockLayout(_Layout):
    """vLLM native `fp8` (StepFun's Step-3.5-FP8 layout): E4M3 weights, F32 `weight_scale_inv` per 128x128 block,
    routed experts kept as 3-D stacks."""

    scheme = "fp8-block"

    def grids(self, weights: list[torch.Tensor], act: Act = None, importance: Act = None) -> list[Grid]:
        return [Grid("fp8_block", quantize_fp8_block(w)[1]) for w in weights]

    def _quantize(self, weights: list[torch.Tensor], grids: Grids):
        if grids:
            return [(encode_fp8_block(w, g.scale), g.scale) for w, g in zip(weights, grids)]
        return [quantize_fp8_block(w) for w in weights]

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        for module, (q, s) in zip(modules, self._quantize(weights, grids)):
            yield f"{module}.weight", q, None
            yield f"{module}.weight_scale_inv", s, None

    def experts(self, modules: list[str], expert: int, weights: list[torch.Tensor], act: Act = None,
                importance: Act = None, grids: Grids = None) -> Iterator[Emit]:
        for module, (q, s) in zip(modules, self._quantize(weights, grids)):
            yield f"{module}.weight", q.unsqueeze(0), expert
            yield f"{module}.weight_scale_inv", s.unsqueeze(0), expert

    def decode_linear(self, read: Read, module: str) -> torch.Tensor:
        return dequantize_fp8_block(read(f"{module}.weight"), read(f"{module}.weight_scale_inv"))

    def decode_experts(self, read: Read, module: str, num_experts: int) -> torch.Tensor:
        return self.decode_linear(read, module)  # the stack is stored 3-D, scales [E, rows, cols]

    def input_quant(self, read: Read, module: str) -> InputQuant:
        return activations.fp8_per_token_group  # `activation_scheme: dynamic` with 128x128 weight blocks

    def quantization_config(self, kept: list[KeptModule], mtp_layers: list[int]) -> dict:
        skip = ["lm_head", "model.embed_tokens", "model.norm"]
        for k in kept:
            skip += k.ignore_names
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": list(dict.fromkeys(skip))}


class _CompressedTensorsLayout(_Layout):
    """compressed-tensors: per-expert tensors `moe.experts.<e>.<proj>.*` (the layout vLLM's Step-3.5 loader maps
    for compressed-tensors), config groups targeting Linear with an `ignore` list."""

    def experts(self, modules: list[str], expert: int, weights: list[torch.Tensor], act: Act = None,
                importance: Act = None, grids: Grids = None) -> Iterator[Emit]:
        yield from self.linear([expert_module(m, expert) for m in modules], weights, act, importance, grids)

    def decode_expert(self, read: Read, stack_module: str, expert: int) -> torch.Tensor:
        return self.decode_linear(read, expert_module(stack_module, expert))

    def decode_experts(self, read: Read, module: str, num_experts: int) -> torch.Tensor:
        return torch.stack([self.decode_expert(read, module, e) for e in range(num_experts)])

    def extra_tensors(self, mtp_layers: list[int]) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Neutral kv-cache scales for the MTP layers' attention. vLLM 0.33.0 gives every attention of a
        compressed-tensors model `{q,k,v}_scale` / `_zero_point` parameters, and its Step-3.5 MTP loader treats
        them as required (the trunk's loader does not), so without these the drafter refuses to load.
        1.0 / 0.0 are the values vLLM initialises them to."""
        why = "vLLM step3p5_mtp requires MTP attention kv-cache scales for compressed-tensors (neutral values)"
        for n in mtp_layers:
            for k in "qkv":
                yield f"model.layers.{n}.self_attn.attn.{k}_scale", torch.ones(1), why
                yield f"model.layers.{n}.self_attn.attn.{k}_zero_point", torch.zeros(1), why

    def ignore(self, kept: list[KeptModule], mtp_layers: list[int]) -> list[str]:
        names = ["lm_head"]
        for k in kept:
            if not _in_layers(k.module, mtp_layers):
                names += k.ignore_names
        return list(dict.fromkeys(names)) + _mtp_regex(mtp_layers)

    def quantization_config(self, kept: list[KeptModule], mtp_layers: list[int]) -> dict:
        # The installed version from package metadata: importing compressed_tensors for its __version__ pulls in
        # transformers and pandas, ~4 s of one core at the end of every conversion.
        ct_version = importlib.metadata.version("compressed-tensors")
        return {"quant_method": "compressed-tensors", "format": self.format, "quantization_status": "compressed",
                "version": ct_version, "config_groups": {"group_0": {"format": self.format, "targets": ["Linear"],
                                                                     **self.group}},
                "ignore": self.ignore(kept, mtp_layers), "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "transform_config": {}}


class CtFp8DynamicLayout(_CompressedTensorsLayout):
    scheme = "fp8-dynamic"
    format = "float-quantized"
    group = {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True,
                    "observer": "memoryless_minmax", "group_size": None, "block_structure": None},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                              "symmetric": True, "observer": None},
        "output_activations": None,
    }

    def grids(self, weights: list[torch.Tensor], act: Act = None, importance: Act = None) -> list[Grid]:
        return [Grid("fp8_channel", quantize_fp8_channel(w)[1]) for w in weights]

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        for i, (module, w) in enumerate(zip(modules, weights)):
            q, s = (encode_fp8_channel(w, grids[i].scale), grids[i].scale) if grids else quantize_fp8_channel(w)
            yield f"{module}.weight", q, None
            yield f"{module}.weight_scale", s, None

    def decode_linear(self, read: Read, module: str) -> torch.Tensor:
        return dequantize_fp8_channel(read(f"{module}.weight"), read(f"{module}.weight_scale"))

    def input_quant(self, read: Read, module: str) -> InputQuant:
        return activations.fp8_per_token


class CtNvfp4A16Layout(_CompressedTensorsLayout):
    scheme = "nvfp4a16"
    supports_search = True
    format = "nvfp4-pack-quantized"
    group = {
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                    "dynamic": False, "observer": "memoryless_minmax", "scale_dtype": "torch.float8_e4m3fn",
                    "zp_dtype": None, "block_structure": None, "actorder": None},
        "input_activations": None,
        "output_activations": None,
    }

    def grids(self, weights: list[torch.Tensor], act: Act = None, importance: Act = None) -> list[Grid]:
        return self._nvfp4_grids(weights, importance)

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        # One global scale for the whole fused group: vLLM keeps a single one per fused parameter.
        gs = grids[0].global_scale if grids else shared_global_scale(*weights)
        for module, (packed, scale) in zip(modules, self._nvfp4(weights, gs, importance, grids)):
            yield f"{module}.weight_packed", packed, None
            yield f"{module}.weight_scale", scale, None
            yield f"{module}.weight_global_scale", gs, None

    def decode_linear(self, read: Read, module: str) -> torch.Tensor:
        return dequantize_nvfp4(read(f"{module}.weight_packed"), read(f"{module}.weight_scale"),
                                read(f"{module}.weight_global_scale"))


def _group_amax(act: Act) -> torch.Tensor:
    """One input absmax for a fused group: the members see the same input; a max is exact and safe."""
    if not act:
        raise ValueError("this scheme needs calibrated activation statistics (input absmax per module)")
    return torch.stack([a.reshape(()) for a in act]).amax()


_NVFP4_WEIGHTS = CtNvfp4A16Layout.group["weights"]


class CtNvfp4Layout(CtNvfp4A16Layout):
    """compressed-tensors NVFP4 W4A4: as NVFP4A16 plus a static `input_global_scale` (2688 / calibrated input
    absmax) per linear and per expert; the per-16 activation scales are computed at run time."""

    scheme = "nvfp4"
    static_activations = True
    group = {
        "weights": _NVFP4_WEIGHTS,
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "symmetric": True, "dynamic": "local", "observer": "static_minmax",
                              "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None, "block_structure": None,
                              "actorder": None},
        "output_activations": None,
    }

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        igs = global_scale(_group_amax(act))
        for name, t, row in super().linear(modules, weights, None, importance, grids):
            yield name, t, row
            if name.endswith(".weight_global_scale"):
                yield name.replace(".weight_global_scale", ".input_global_scale"), igs, None

    def input_quant(self, read: Read, module: str) -> InputQuant:
        igs = read(f"{module}.input_global_scale")
        return lambda x: activations.nvfp4(x, igs)


class CtFp8StaticLayout(_CompressedTensorsLayout):
    """compressed-tensors FP8 static: per-tensor weight scale (tied across a fused group) and a static per-tensor
    input scale from calibration, both in the model dtype."""

    scheme = "fp8-static"
    static_activations = True
    format = "float-quantized"
    group = {
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
                    "observer": "memoryless_minmax", "group_size": None, "block_structure": None},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                              "symmetric": True, "observer": "static_minmax"},
        "output_activations": None,
    }

    @staticmethod
    def _weight_scale(weights: list[torch.Tensor]) -> torch.Tensor:
        return fp8_tensor_scale(torch.stack([w.abs().amax().float() for w in weights]).amax(), weights[0].dtype)

    def grids(self, weights: list[torch.Tensor], act: Act = None, importance: Act = None) -> list[Grid]:
        scale = self._weight_scale(weights)  # tied across the fused group
        return [Grid("fp8_tensor", scale) for _ in weights]

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        # GPTQ's weights are float32 on the grid: divided in float32 they give back their codes exactly
        scale = grids[0].scale if grids else self._weight_scale(weights)
        input_scale = fp8_tensor_scale(_group_amax(act), grids[0].scale.dtype if grids else weights[0].dtype)
        for module, w in zip(modules, weights):
            yield f"{module}.weight", quantize_fp8_tensor(w, scale), None
            yield f"{module}.weight_scale", scale, None
            yield f"{module}.input_scale", input_scale, None

    def decode_linear(self, read: Read, module: str) -> torch.Tensor:
        return dequantize_fp8_tensor(read(f"{module}.weight"), read(f"{module}.weight_scale"))

    def input_quant(self, read: Read, module: str) -> InputQuant:
        scale = read(f"{module}.input_scale")
        return lambda x: activations.fp8_static(x, scale)


class ModeloptNvfp4Layout(_Layout):
    """NVIDIA ModelOpt NVFP4 (`modelopt_fp4` in vLLM, native in SGLang / TensorRT-LLM): the same bytes as
    compressed-tensors, with reciprocal scales (`weight_scale_2 = 1/weight_global_scale`, `input_scale =
    1/input_global_scale`) and routed experts as 3-D stacks with one scale pair per expert (`[E]`)."""

    scheme = "nvfp4-modelopt"
    supports_search = True
    static_activations = True

    def _quantize(self, weights, act, importance, grids: Grids = None):
        gs = grids[0].global_scale if grids else shared_global_scale(*weights)
        input_scale = 1.0 / global_scale(_group_amax(act))
        return gs, 1.0 / gs, input_scale, self._nvfp4(weights, gs, importance, grids)

    def grids(self, weights: list[torch.Tensor], act: Act = None, importance: Act = None) -> list[Grid]:
        return self._nvfp4_grids(weights, importance)

    def linear(self, modules: list[str], weights: list[torch.Tensor], act: Act = None, importance: Act = None,
               grids: Grids = None) -> Iterator[Emit]:
        _, scale_2, input_scale, packed = self._quantize(weights, act, importance, grids)
        for module, (p, s) in zip(modules, packed):
            yield f"{module}.weight", p, None
            yield f"{module}.weight_scale", s, None
            yield f"{module}.weight_scale_2", scale_2.reshape(()), None
            yield f"{module}.input_scale", input_scale.reshape(()), None

    def experts(self, modules: list[str], expert: int, weights: list[torch.Tensor], act: Act = None,
                importance: Act = None, grids: Grids = None) -> Iterator[Emit]:
        _, scale_2, input_scale, packed = self._quantize(weights, act, importance, grids)
        for module, (p, s) in zip(modules, packed):
            yield f"{module}.weight", p.unsqueeze(0), expert
            yield f"{module}.weight_scale", s.unsqueeze(0), expert
            yield f"{module}.weight_scale_2", scale_2.reshape(1), expert
            yield f"{module}.input_scale", input_scale.reshape(1), expert

    def decode_linear(self, read: Read, module: str) -> torch.Tensor:
        return dequantize_nvfp4(read(f"{module}.weight"), read(f"{module}.weight_scale"),
                                1.0 / read(f"{module}.weight_scale_2").float().reshape(-1))

    def decode_experts(self, read: Read, module: str, num_experts: int) -> torch.Tensor:
        return self.decode_linear(read, module)  # one weight_scale_2 per expert, broadcast by dequantize_nvfp4

    def input_quant(self, read: Read, module: str) -> InputQuant:
        igs = 1.0 / read(f"{module}.input_scale").float().reshape(1)
        return lambda x: activations.nvfp4(x, igs)

    def expert_input_quant(self, read: Read, stack_module: str, expert: int) -> InputQuant:
        igs = 1.0 / read(f"{stack_module}.input_scale")[expert].float().reshape(1)  # stack [E]: one per expert
        return lambda x: activations.nvfp4(x, igs)

    def exclude_modules(self, kept: list[KeptModule], mtp_layers: list[int]) -> list[str]:
        names = ["lm_head"] + [n for k in kept if not _in_layers(k.module, mtp_layers)
                               for n in k.ignore_names]
        return list(dict.fromkeys(names)) + [f"model.layers.{i}.*" for i in sorted(mtp_layers)]

    def quantization_config(self, kept: list[KeptModule], mtp_layers: list[int]) -> dict:
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None,
                "exclude_modules": self.exclude_modules(kept, mtp_layers)}

    def extra_files(self, kept: list[KeptModule], mtp_layers: list[int]) -> dict[str, dict]:
        """ModelOpt's own `hf_quant_config.json`, which SGLang and TensorRT-LLM read."""
        return {"hf_quant_config.json": {
            "producer": {"name": "stepq", "version": "modelopt-compatible"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": self.exclude_modules(kept, mtp_layers)}}}


LAYOUTS = {cls.scheme: cls for cls in (Fp8BlockLayout, CtFp8DynamicLayout, CtFp8StaticLayout, CtNvfp4A16Layout,
                                       CtNvfp4Layout, ModeloptNvfp4Layout)}
NEEDS_ACTIVATION_STATS = frozenset(scheme for scheme, cls in LAYOUTS.items() if cls.static_activations)


def layout_for(scheme: str, method: str = "rtn"):
    if scheme not in LAYOUTS:
        raise ValueError(f"scheme {scheme!r} has no layout (known: {sorted(LAYOUTS)})")
    return LAYOUTS[scheme](method)
