"""Load one safetensors artifact with vLLM's own loader on CPU: the trunk and the MTP drafter.

Runs INSIDE the separate vLLM venv (`make vllm-env`), never in the project's venv, so it imports only the
standard library, torch and vllm (nothing of stepq).

    python eval/vllm_runner.py ARTIFACT --json

vLLM builds the model from the artifact's config.json (its own Step-3.5 config class and quantization config),
creates every parameter, and runs the model's `load_weights` with its real weight iterator. On top of vLLM's own
strictness (which only checks that each *parameter* received something) every parameter is filled with a
sentinel before loading and checked afterwards, so a fused parameter with a missing shard is caught too. The
drafter is built the way vLLM's speculative decoding builds it (`SpeculativeConfig(method="step3p5_mtp")`).

Prints one JSON object (stdout); vLLM's own logging goes to stderr. Exit code 0 when both loads pass, 1 when a
check failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path

# Before vLLM is imported: its CPU platform (otherwise the platform is "unspecified"), and its log on stderr so
# stdout carries the JSON alone.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import torch  # noqa: E402

FLOAT_SENTINEL = float("nan")
INT_SENTINEL = 0xA5  # packed FP4 bytes: 3.0 and -1.0 alternating along a whole row: practically never real data
# vLLM creates these for kv-cache quantization and falls back to defaults when a checkpoint has none.
OPTIONAL_PARAM = re.compile(r"\.attn\.(k|v|q|prob)_(scale|zero_point)$")
# Log records that matter for an artifact (a warning about its weights or its quantization), by logger name.
RELEVANT_LOGGERS = ("vllm.model_executor",)
NOISE = ("Disable custom fused all reduce",)  # logged by every Step-3.5 build, says nothing about the weights
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MAX_LISTED = 20


# ---- overrides: kernel CHOICE only, and no post-load repacking ------------------------------------------------
FALLBACKS_USED: dict[str, int] = {}  # override note -> how many layers took the fallback, for the report


def _with_fallback(selector, fallback, note: str, caught=(ValueError, NotImplementedError)):
    """`selector` as vLLM wrote it; `fallback(*args, **kwargs)` only where it finds no kernel for the CPU it runs on."""

    def select(*args, **kwargs):
        try:
            return selector(*args, **kwargs)
        except caught:
            FALLBACKS_USED[note] = FALLBACKS_USED.get(note, 0) + 1
            return fallback(*args, **kwargs)

    return select


def _patch(modules: list[str], name: str, replacement) -> None:
    """Replace `name` in the module defining it and in every module that imported it by name."""
    import importlib

    for mod in modules:
        setattr(importlib.import_module(mod), name, replacement)


SHIMS = Path(__file__).resolve().parent / "vllm_shims"
SHIMMED_IMPORTERS = ("vllm.transformers_utils.processors.step3_vl",)


def _torchvision_importable() -> bool:
    """PyPI's torchvision is a CUDA build: beside a CPU torch its ops library does not load and the import fails."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install_torchvision_shim() -> list[str]:
    """vLLM's Step-3.7 model module imports its Step-3 VL image processor, which imports torchvision.transforms at
    module level. The load check never preprocesses an image, so where torchvision cannot be imported those
    modules are imported once against the shim in eval/vllm_shims (every name raises when used). The shim is in
    sys.modules only while they import: transformers must keep seeing no torchvision (it would take its
    torchvision code paths). vLLM inspects a model class in a child process only to keep CUDA out of the parent,
    which is moot on CPU, so that is done in-process, where the shimmed modules are already imported."""
    import importlib
    import importlib.util

    import transformers.image_utils  # noqa: F401  (decides torchvision's absence before the shim exists)
    from vllm.model_executor.models import registry

    if _torchvision_importable():
        return []
    added = []
    try:
        for name in ("torchvision", "torchvision.transforms.functional", "torchvision.transforms"):
            parts = name.split(".")
            path = SHIMS.joinpath(*parts[:-1], parts[-1] + ".py")
            if not path.is_file():
                path = SHIMS.joinpath(*parts, "__init__.py")
            spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=(
                [str(path.parent)] if path.name == "__init__.py" else None))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            added.append(name)
            spec.loader.exec_module(module)
        for importer in SHIMMED_IMPORTERS:
            importlib.import_module(importer)
    finally:
        for name in added:
            sys.modules.pop(name, None)
    registry._run_in_subprocess = lambda fn: fn()
    return [("torchvision: vLLM's Step-3 VL image processor imported against an import shim (eval/vllm_shims; no "
             "image is preprocessed by a load; PyPI's CUDA torchvision does not import beside CPU torch)"),
            "model class inspection: in-process (vLLM uses a child process only to keep CUDA out of the parent)"]


def install_text_config_override() -> str:
    """vLLM 0.33.0's `get_hf_text_config` checks a multimodal model's text config with
    `hasattr(text_config, "num_attention_heads")`. Step-3.7's text config (transformers' Step3p7TextConfig, 5.17
    to 5.20 alike) gives the sliding layers their own head count (`attention_other_setting`) as a per-layer
    override, so that read raises AmbiguousGlobalPerLayerAttributeError (a RuntimeError, which hasattr lets
    through) and no Step-3.7 ModelConfig can be built at all, whatever the weights. The same presence check is
    kept, made through the per-layer view; everything after it (vLLM's per-layer arch config, step3p5.py's
    per-layer head counts) already reads the heterogeneous config correctly. Not an artifact problem."""
    import vllm.transformers_utils.config as tu_config

    orig = tu_config.get_hf_text_config

    def get_hf_text_config(config):
        text_config = config.get_text_config()
        if text_config is config or not getattr(text_config, "is_heterogeneous", False):
            return orig(config)
        layers = text_config.per_layer_config
        if not len(layers) or not all(hasattr(layers[i], "num_attention_heads") for i in range(len(layers))):
            return orig(config)  # vLLM's own error
        return text_config

    _patch(["vllm.transformers_utils.config", "vllm.config.model", "vllm.config.speculative"],
           "get_hf_text_config", get_hf_text_config)
    return ("get_hf_text_config: the text config's num_attention_heads checked per layer (a heterogeneous "
            "Step-3.7 text config raises on the global read)")


def install_cpu_overrides() -> list[str]:
    """Let vLLM build quantized layers on a CPU-only machine. Parameter creation and weight loading stay vLLM's
    own: only which kernel class a layer is given (and only where vLLM finds none for the CPU), and the
    repacking after loading, are changed. Returns one line per override, for the report."""
    import vllm.model_executor.kernels.linear as kl
    import vllm.model_executor.layers.fused_moe.oracle.nvfp4 as nvfp4_oracle
    import vllm.model_executor.layers.fused_moe.oracle.unquantized as unq_oracle
    import vllm.model_executor.model_loader.base_loader as base_loader
    import vllm.model_executor.model_loader.utils as loader_utils

    applied = [install_text_config_override(), *install_torchvision_shim()]

    # Unquantized fused MoE: vLLM's CPU experts do not implement Step-3.5's "swiglustep" activation (layers with a
    # routed swiglu limit), so the backend choice raises on CPU. Use the portable CPU experts class; the layer's
    # parameters do not depend on it.
    def portable_cpu_experts(*args, **kwargs):
        backend = unq_oracle.UnquantizedMoeBackend.CPU
        return backend, unq_oracle.backend_to_kernel_cls(backend)[-1]

    note = "unquantized MoE experts: portable CPU class where no CPU kernel supports the activation"
    _patch(["vllm.model_executor.layers.fused_moe.oracle.unquantized",
            "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"], "select_unquantized_moe_backend",
           _with_fallback(unq_oracle.select_unquantized_moe_backend, portable_cpu_experts, note))
    applied.append(note)

    # FP8 linear: the CPU kernels need AMX (Sapphire Rapids or newer) and the torch kernels refuse non-CUDA
    # platforms in is_supported. Where nothing qualifies, take the first torch kernel that can implement the
    # layer's config (block-wise for 128x128 blocks, per-tensor / channel-wise otherwise).
    torch_fp8 = {id(kl._POSSIBLE_FP8_BLOCK_KERNELS): [kl.BlockWiseTorchFP8ScaledMMLinearKernel],
                 id(kl._POSSIBLE_FP8_KERNELS): [kl.PerTensorTorchFP8ScaledMMLinearKernel,
                                                kl.ChannelWiseTorchFP8ScaledMMLinearKernel]}

    def torch_scaled_mm(config, possible_kernels, *args, **kwargs):
        for kernel in torch_fp8.get(id(possible_kernels), []):
            if kernel.can_implement(config)[0]:
                return kernel
        raise ValueError("no torch FP8 kernel can implement this layer")

    note = "FP8 linear: torch scaled-mm kernel where no CPU kernel is supported (they need AMX)"
    kl.choose_scaled_mm_linear_kernel = _with_fallback(kl.choose_scaled_mm_linear_kernel, torch_scaled_mm, note)
    applied.append(note)

    # NVFP4 linear: no CPU entry at all, and for W4A16 vLLM forces Marlin (CUDA only). Use the emulation kernel.
    def nvfp4_emulation(*args, **kwargs):
        return kl.EmulationNvFp4LinearKernel(kl.NvFp4LinearLayerConfig())

    note = "NVFP4 linear: emulation kernel (no CPU kernel; Marlin, forced for W4A16, is CUDA only)"
    _patch(["vllm.model_executor.kernels.linear",
            "vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_nvfp4",
            "vllm.model_executor.layers.quantization.modelopt"], "init_nvfp4_linear_kernel",
           _with_fallback(kl.init_nvfp4_linear_kernel, nvfp4_emulation, note))
    applied.append(note)

    # NVFP4 fused MoE: same, the emulation experts.
    def nvfp4_moe_emulation(*args, **kwargs):
        backend = nvfp4_oracle.NvFp4MoeBackend.EMULATION
        return backend, nvfp4_oracle.backend_to_kernel_cls(backend)[0]

    note = "NVFP4 MoE experts: emulation backend (no CPU backend)"
    _patch(["vllm.model_executor.layers.fused_moe.oracle.nvfp4",
            "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe."
            "compressed_tensors_moe_w4a4_nvfp4",
            "vllm.model_executor.layers.quantization.modelopt"], "select_nvfp4_moe_backend",
           _with_fallback(nvfp4_oracle.select_nvfp4_moe_backend, nvfp4_moe_emulation, note))
    applied.append(note)

    # Quick GELU (Step-3.7's vision tower): on a CPU platform the layer binds vLLM's compiled `_C.gelu_quick`
    # (used on POWER only; x86 runs forward_native), which this CUDA wheel does not ship for CPU. No parameters.
    import vllm.model_executor.layers.activation as act

    quick_gelu_init = act.QuickGELU.__init__

    def quick_gelu_without_op(self):
        try:
            quick_gelu_init(self)  # CustomOp.__init__ has run when the op lookup raises
        except AttributeError:
            FALLBACKS_USED[note_gelu] = FALLBACKS_USED.get(note_gelu, 0) + 1

    note_gelu = "QuickGELU: no compiled op bound (x86 CPU runs its native forward)"
    act.QuickGELU.__init__ = quick_gelu_without_op
    applied.append(note_gelu)

    # The repacking after loading (process_weights_after_loading) converts the loaded tensors for the kernels
    # above, which this wheel cannot run on CPU; the loaded tensors are what is checked, so stop right after
    # load_weights. base_loader holds its own reference to the function.
    def no_post_processing(model, model_config, target_device):
        return None

    for mod in (base_loader, loader_utils):
        mod.process_weights_after_loading = no_post_processing
    applied.append("process_weights_after_loading: skipped (repacks for kernels that do not run here)")

    # load_model calls torch.accelerator.empty_cache(), which raises without an accelerator.
    if not torch.accelerator.is_available():
        torch.accelerator.empty_cache = lambda: None
        applied.append("torch.accelerator.empty_cache: no-op (no accelerator)")
    return applied


# ---- sentinels ------------------------------------------------------------------------------------------------
def fill_sentinels(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if p.is_floating_point():
                p.data.fill_(FLOAT_SENTINEL)
            elif p.dtype == torch.bool:
                continue
            else:
                p.data.fill_(INT_SENTINEL if p.dtype == torch.uint8 else _int_sentinel(p.dtype))


def _int_sentinel(dtype: torch.dtype) -> int:
    info = torch.iinfo(dtype)
    return info.min + 7 if info.min < 0 else min(info.max, INT_SENTINEL)


def unwritten(name: str, p: torch.Tensor) -> str | None:
    """Why `p` still holds its sentinel somewhere, or None."""
    if p.numel() == 0 or p.dtype == torch.bool:
        return None
    data = p.detach()
    if data.is_floating_point():
        nan = torch.isnan(data.float())
        n = int(nan.sum())
        return f"{name}: {n} of {data.numel()} values never written" if n else None
    sentinel = INT_SENTINEL if data.dtype == torch.uint8 else _int_sentinel(data.dtype)
    rows = (data == sentinel).reshape(-1, data.shape[-1]).all(dim=-1) if data.ndim else (data == sentinel)
    n = int(rows.sum())
    return f"{name}: {n} of {rows.numel()} rows never written" if n else None


# ---- weight-consumption tracking ------------------------------------------------------------------------------
class Consumption:
    """Which checkpoint tensors reached some parameter's weight loader. The iterator vLLM hands to
    `load_weights` is wrapped to know the tensor being processed; every parameter's weight loader is wrapped to
    mark it. Nothing vLLM does is changed."""

    def __init__(self):
        self.current: str | None = None
        self.seen: list[str] = []
        self.used: set[str] = set()

    def iterate(self, weights):
        for name, tensor in weights:
            self.current = name
            self.seen.append(name)
            yield name, tensor
        self.current = None

    def wrap_loaders(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        for _, p in model.named_parameters():
            orig = getattr(p, "weight_loader", None) or default_weight_loader
            p.weight_loader = self._marking(orig)

    def _marking(self, fn):
        def loader(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out is not False and self.current is not None:
                self.used.add(self.current)
            return out

        return loader


# ---- one load -------------------------------------------------------------------------------------------------
class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if record.name.startswith(RELEVANT_LOGGERS) and not record.getMessage().startswith(NOISE):
            msg = record.getMessage().strip().splitlines()[0]
            if msg not in self.messages:
                self.messages.append(msg)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}{': ' + text[:400] if text else ''}{where}"


def weight_only_activation_scales(model: torch.nn.Module) -> set[str]:
    """Activation-scale parameters of weight-only (A16) quantized modules: vLLM creates them uninitialised and
    never reads them (e.g. `w13_input_global_scale` of compressed-tensors NVFP4A16 experts), so a checkpoint
    without them is complete."""
    out = set()
    for mod_name, module in model.named_modules():
        if getattr(getattr(module, "quant_method", None), "use_a16", False) is True:
            for p_name, _ in module.named_parameters(recurse=False):
                if "input_global_scale" in p_name or p_name.endswith("input_scale"):
                    out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def post_load_warnings(model: torch.nn.Module) -> list[str]:
    """What vLLM's process_weights_after_loading (skipped here) would warn about, checked on the loaded
    tensors: fused shards and MoE gate/up halves whose global scales differ (vLLM keeps one of them)."""
    out = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "global_scale" not in leaf:
            continue
        data = p.detach().float()
        if torch.isnan(data).any():  # never written: already a problem
            continue
        if leaf == "w13_weight_global_scale" and data.ndim == 2 and data.shape[1] == 2:
            bad = ~torch.isclose(data[:, 0], data[:, 1])
            if bad.any():
                out.append(f"{name}: gate/up global scales differ for {int(bad.sum())} of {data.shape[0]} experts "
                           "(vLLM keeps the gate's: w1_weight_global_scale must match w3_weight_global_scale)")
        elif leaf in ("weight_global_scale", "input_global_scale") and data.numel() > 1:
            if not torch.allclose(data, data.flatten()[0].expand_as(data)):
                out.append(f"{name}: fused shards have different global scales {data.flatten().tolist()} "
                           "(vLLM takes the max and the other shards saturate)")
    return out


QUANT_PARAM = re.compile(r"(scale|zero_point)(_inv)?$|weight_packed$")


def parts_of(params) -> dict[str, dict[str, int]]:
    """Per top-level submodule (`vision_model`, `vit_large_projector`, `language_model`; `model`, `lm_head` for a
    text-only model): how many parameters vLLM built, how many are integer (packed FP4) or FP8, and how many are
    quantization scales. A module vLLM built unquantized has none of the last three; every one of them was
    checked against its sentinel like the rest."""
    parts: dict[str, dict[str, int]] = {}
    for name, p in params:
        part = parts.setdefault(name.split(".", 1)[0], {"params": 0, "int_params": 0, "fp8_params": 0,
                                                         "quant_params": 0})
        part["params"] += 1
        part["int_params"] += not p.is_floating_point()
        part["fp8_params"] += p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        part["quant_params"] += bool(QUANT_PARAM.search(name)) and not OPTIONAL_PARAM.search(name)
    return parts


def load_one(vllm_config, model_config, owns) -> dict:
    """Build and load one model; `owns(name)` says which checkpoint tensors this model must consume (the trunk
    skips the MTP layers, the drafter everything else)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model

    result = {"ok": False, "class": None, "quant_method": None, "params": 0, "float_params": 0, "int_params": 0,
              "elements": 0, "checkpoint_tensors_seen": 0, "problems": [], "warnings": [], "seconds": 0.0}
    tracker = Consumption()
    done = False
    orig_load_weights = DefaultModelLoader.load_weights

    def load_weights(self, model, mc):
        # Sentinels go in after vLLM created (and initialised) the parameters, right before its load_weights.
        fill_sentinels(model)
        tracker.wrap_loaders(model)
        orig_all = self.get_all_weights
        self.get_all_weights = lambda m_cfg, m: tracker.iterate(orig_all(m_cfg, m))
        try:
            orig_load_weights(self, model, mc)
        finally:
            del self.get_all_weights

    capture = LogCapture()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(capture)
    t0 = time.time()
    DefaultModelLoader.load_weights = load_weights
    result["class"] = (model_config.architectures or [None])[0]
    qc = getattr(vllm_config, "quant_config", None)
    result["quant_method"] = qc.get_name() if qc is not None else model_config.quantization
    try:
        with set_current_vllm_config(vllm_config):
            model = get_model(vllm_config=vllm_config, model_config=model_config)
        done = True
        result["class"] = type(model).__name__
        qc = getattr(vllm_config, "quant_config", None)  # the drafter's is set while it is built
        result["quant_method"] = qc.get_name() if qc is not None else None
        params = list(model.named_parameters())
        result["params"] = len(params)
        result["float_params"] = sum(p.is_floating_point() for _, p in params)
        result["int_params"] = len(params) - result["float_params"]
        result["elements"] = sum(p.numel() for _, p in params)
        result["parts"] = parts_of(params)
        exempt = weight_only_activation_scales(model)
        result["exempt_params"] = len(exempt)
        for name, p in params:
            if OPTIONAL_PARAM.search(name) or name in exempt:
                continue
            why = unwritten(name, p)
            if why:
                result["problems"].append(f"unwritten parameter {why}")
        result["warnings"] = post_load_warnings(model)
    except Exception as e:  # one clear line per failure; the full trace goes to stderr
        traceback.print_exc(file=sys.stderr)
        during = f" while loading checkpoint tensor {tracker.current}" if tracker.current else ""
        result["problems"].append(one_line(e) + during)
    finally:
        DefaultModelLoader.load_weights = orig_load_weights
        vllm_logger.removeHandler(capture)
        gc.collect()
    result["seconds"] = round(time.time() - t0, 2)
    result["vllm_log_warnings"] = capture.messages
    result["checkpoint_tensors_seen"] = len(tracker.seen)
    result["skipped_tensors"] = sorted(n for n in tracker.seen if owns(n) and n not in tracker.used) if done else []
    if result["skipped_tensors"]:
        result["problems"].append(f"{len(result['skipped_tensors'])} checkpoint tensor(s) loaded into no parameter "
                                  f"(vLLM skipped them), e.g. {result['skipped_tensors'][0]}")
    if len(result["problems"]) > MAX_LISTED:
        extra = len(result["problems"]) - MAX_LISTED
        result["problems"] = result["problems"][:MAX_LISTED] + [f"... and {extra} more"]
    result["ok"] = not result["problems"]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(artifact: Path, hf_overrides: dict | None = None) -> dict:
    """Build and load the trunk, then the drafter. `hf_overrides` as vLLM's `--hf-overrides` (what the artifact's
    config.json needs on top for this vLLM; eval/vllm_conformance.py decides it)."""
    import vllm
    from vllm.config import (DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig,
                             set_current_vllm_config)
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    hf_overrides = hf_overrides or {}
    report = {"artifact": str(artifact), "vllm": vllm.__version__, "torch": torch.__version__, "ok": False,
              "overrides": install_cpu_overrides(), "hf_overrides": hf_overrides, "trunk": None, "mtp": None,
              "problems": []}

    def configs(spec: bool):
        mc = ModelConfig(model=str(artifact), tokenizer=str(artifact), skip_tokenizer_init=True, dtype="bfloat16",
                         enforce_eager=True, max_model_len=512, hf_overrides=hf_overrides)
        kwargs = {}
        if spec:
            kwargs["speculative_config"] = SpeculativeConfig(method="step3p5_mtp", num_speculative_tokens=1,
                                                             target_model_config=mc,
                                                             target_parallel_config=ParallelConfig())
        vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"),
                        load_config=LoadConfig(load_format="auto"), **kwargs)
        return vc

    try:
        trunk_cfg = configs(spec=False)
        with set_current_vllm_config(trunk_cfg):
            init_distributed_environment(world_size=1, rank=0, backend="gloo", local_rank=0,
                                         distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
            initialize_model_parallel(1, 1)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        report["problems"].append(f"config: {one_line(e)}")
        return report

    n_layers = trunk_cfg.model_config.hf_text_config.num_hidden_layers

    def in_mtp_layer(name: str) -> bool:
        m = LAYER.match(name)
        return bool(m) and int(m.group(1)) >= n_layers

    report["trunk"] = load_one(trunk_cfg, trunk_cfg.model_config, owns=lambda n: not in_mtp_layer(n))
    gc.collect()
    try:
        spec_cfg = configs(spec=True)
        draft = spec_cfg.speculative_config.draft_model_config
        report["mtp"] = load_one(spec_cfg, draft, owns=lambda n: in_mtp_layer(n) or n == "model.embed_tokens.weight")
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        report["mtp"] = {"ok": False, "problems": [f"draft config: {one_line(e)}"]}
    report["fallbacks_used"] = dict(FALLBACKS_USED)
    report["ok"] = bool(report["trunk"]["ok"] and report["mtp"]["ok"] and not report["problems"])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (the default)")
    ap.add_argument("--hf-overrides", type=json.loads, default=None, metavar="JSON",
                    help="config overrides, as vLLM's --hf-overrides (Step-3.7: see eval/vllm_conformance.py)")
    args = ap.parse_args(argv)
    if not (args.artifact / "config.json").is_file():
        print(json.dumps({"artifact": str(args.artifact), "ok": False,
                          "problems": [f"{args.artifact}: no config.json"]}))
        return 2
    try:
        report = check(args.artifact.resolve(), args.hf_overrides)
    except Exception as e:  # e.g. an override that no longer fits this vLLM: still one JSON object, one line
        traceback.print_exc(file=sys.stderr)
        report = {"artifact": str(args.artifact), "ok": False, "trunk": None, "mtp": None,
                  "problems": [f"runner: {one_line(e)}"]}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
