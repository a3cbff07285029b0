"""Step-3.7's vision tower and projector -> the mmproj GGUF llama.cpp's multimodal tools load beside the text GGUF
(`llama-mtmd-cli -m <text>.gguf --mmproj mmproj-<model>-F16.gguf`, `llama-server --mmproj`; projector `step3vl`).

Identical, key for key and tensor for tensor, to llama.cpp's converter run with `--mmproj` (`Step3VLVisionModel` in
`conversion/step3.py` on `MmprojModel` in `conversion/base.py`, the tree stepq builds its tools from); the tensors
go through the same streamed pieces as the text file (`convert.gguf_quantize`), so one export pass writes both.
tests/test_gguf_step37.py compares against the converter itself.

The converter asserts the vision dims of Step3-VL-10B (width 1536, 47 layers): every other input fails there. That
check guards its own validation, not the format -- the graph (`tools/mtmd/models/step3vl.cpp`) reads every size
from the file -- so stepq writes any tower the config describes, and the comparison runs the converter with that
one assert removed (`convert.gguf_tools.CONVERTER_HARNESS`).

Type: F16 by default, what llama.cpp's own releases publish for mmproj files; the converter keeps 1-D tensors,
biases, norms and the position embedding F32, and the patch embedding and downsampling convolutions F16 (F32 for
any other type: ggml's conv kernels take F16 or F32).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from gguf.gguf_writer import GGUFValue

from convert.checkpoint import Checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.gguf_export import StreamedTensor, general_metadata, write_whole
from convert.gguf_names import QT, PlannedTensor
from quant.roles import VISION_ROLES

PREFIX = "mmproj-"  # llama.cpp's converter's name for these files; how tools and readers tell them from the model
DEFAULT_TYPE = "F16"
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# clip.vision.preproc_image_size: the converter writes Step3-VL-10B's longest edge (its processor's
# max_image_size, 3024, as Step-3.7's preprocessor_config.json has it too); llama.cpp scales larger images to it.
PREPROC_IMAGE_SIZE = 3024
# CLIP's mean/std: what the converter falls back to without them in the preprocessor files
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DOWNSAMPLER = re.compile(r"^vision_model\.vit_downsampler(\d+)\.(weight|bias)$")


def mmproj_stem(model_dir, outtype: str = DEFAULT_TYPE) -> str:
    """`mmproj-<model>-<TYPE>` (file name without .gguf), beside `<model>-<QTYPE>.gguf` in the variant folder."""
    return f"{PREFIX}{model_name(model_dir)}-{outtype.upper()}"


def is_mmproj(file_name: str) -> bool:
    return file_name.startswith(PREFIX)


def _outtype(outtype: str) -> QT:
    key = outtype.upper()
    if key not in FILE_TYPES:
        raise BadInput(f"mmproj type {outtype!r}: stepq writes {', '.join(FILE_TYPES)}")
    return QT[key]


def gguf_vision_name(name: str, tensor_map: gguf.TensorNameMap) -> str:
    """The clip GGUF name of a vision-side checkpoint tensor, by the converter's renames then gguf-py's table."""
    if (m := _DOWNSAMPLER.match(name)) is not None:
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=int(m.group(1)) - 1)}.{m.group(2)}"
    if name == "vit_large_projector.weight":
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_FC] + ".weight"
    src = name
    if name == "vision_model.positional_embedding":
        name += ".weight"
    elif name.endswith(".gamma") and ".ls_" in name:
        name = name.removesuffix(".gamma") + ".weight"
    name = name.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
    out = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise BadInput(f"tensor {src}: no name in llama.cpp's clip GGUF (step3vl); the converter cannot map it either")
    return out


def storage_type(name: str, shape: tuple[int, ...], outtype: QT) -> QT:
    """The converter's type for an mmproj tensor: Step3VLVisionModel's and MmprojModel's forced types, then
    ModelBase's rules (1-D, norms, non-`.weight` -> F32), then the export type, F16 where a row does not fill
    whole blocks (its QuantError fallback)."""
    conv = outtype if outtype == QT.F16 else QT.F32
    if ".position_embd." in name:
        return QT.F32
    if ("mm.0." in name or "mm.1." in name) and name.endswith(".weight"):
        return conv
    if ".patch_embd.weight" in name:
        return conv
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    block, _ = gguf.GGML_QUANT_SIZES[outtype]
    return outtype if shape[-1] % block == 0 else QT.F16


def plan_mmproj(ckpt: Checkpoint, outtype: str = DEFAULT_TYPE) -> list[PlannedTensor]:
    """The vision tower's and projector's tensors in the converter's order (shard by shard, by name), named and
    typed as it writes them."""
    qt = _outtype(outtype)
    vision = ckpt.config.vision
    if vision is None:
        raise BadInput(f"{ckpt.dir}: model_type {ckpt.config.model_type} has no vision tower: no mmproj to write")
    if vision.projector_bias or "vit_large_projector.bias" in ckpt.tensors:
        # the converter drops it without a word and llama.cpp's step3vl graph has no projector bias: the mmproj
        # would compute other image embeddings than the checkpoint
        raise BadInput(f"{ckpt.dir / 'config.json'}: projector_bias true (vit_large_projector.bias): llama.cpp's "
                       f"step3vl projector has no bias, an mmproj without it would change every image embedding")
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.layers)
    plan = []
    for t in sorted(ckpt.tensors.values(), key=lambda t: (t.shard, t.info.name)):
        if t.info.role not in VISION_ROLES:
            continue
        name = gguf_vision_name(t.info.name, tensor_map)
        shape = tuple(t.entry.shape)
        plan.append(PlannedTensor(name, shape, storage_type(name, shape, qt), t.info.name, t.info.label))
    if not plan:
        raise BadInput(f"{ckpt.dir}: no vision tensors (vision_model.*, vit_large_projector.*) in the checkpoint")
    return plan


def mmproj_metadata(ckpt: Checkpoint, plan: list[PlannedTensor], outtype: str = DEFAULT_TYPE,
                    name: str | None = None) -> list[tuple[str, GGUFValue]]:
    """Every key of the mmproj file in the converter's order."""
    return list(mmproj_writer(ckpt, plan, outtype, name).kv_data[0].items())


def write_mmproj(ckpt: Checkpoint, out_file: str | Path, outtype: str = DEFAULT_TYPE) -> Path:
    """The mmproj file alone, through gguf-py's writer (the export writes it in its one pass instead)."""
    w = mmproj_writer(ckpt, plan_mmproj(ckpt, outtype), outtype)
    out_file = Path(out_file)
    write_whole(w, out_file)
    return out_file


def mmproj_writer(ckpt: Checkpoint, plan: list[PlannedTensor], outtype: str = DEFAULT_TYPE,
                  name: str | None = None) -> gguf.GGUFWriter:
    """A gguf-py writer holding the plan's tensors (streamed when written) and every key in the converter's order:
    general.* (the tensors' parameter count decides size_label), then MmprojModel's and Step3VLVisionModel's
    clip.* keys, then the quantization version."""
    cfg, vision = ckpt.config, ckpt.config.vision
    raw = vision.raw
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    for p in plan:
        w.add_tensor(p.name, StreamedTensor(ckpt, p), raw_dtype=p.qtype)
    general_metadata(w, ckpt.dir, name, gguf.GGUFType.MMPROJ)

    width = raw.get("hidden_size") or raw.get("width") or 0
    ffn = raw.get("intermediate_size") or round(width * float(raw.get("mlp_ratio", 8960 / 1536)))
    pre = _preprocessor(ckpt)
    w.add_file_type(FILE_TYPES[outtype.upper()])
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(cfg.hidden_size)
    w.add_vision_image_size(_first(raw, ["image_size"]))
    w.add_vision_patch_size(_first(raw, ["patch_size"]))
    w.add_vision_embedding_length(_first(raw, ["hidden_size", "width", "vt_hidden_size"]))
    w.add_vision_feed_forward_length(ffn)
    w.add_vision_block_count(_first(raw, ["n_layers", "num_hidden_layers", "n_layer", "num_layers", "depth",
                                          "layers", "encoder_layers", "vt_num_hidden_layers"]))
    w.add_vision_head_count(_first(raw, ["num_attention_heads", "num_heads", "heads", "vt_num_attention_heads"]))
    w.add_vision_image_mean(pre.get("image_mean", list(CLIP_MEAN)))
    w.add_vision_image_std(pre.get("image_std", list(CLIP_STD)))
    w.add_clip_projector_type(gguf.VisionProjectorType.STEP3VL)
    w.add_vision_attention_layernorm_eps(float(raw.get("layer_norm_eps", 1e-5)))
    w.add_vision_projector_scale_factor(vision.projector_stride ** 2)
    w.add_vision_preproc_image_size(PREPROC_IMAGE_SIZE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def _first(raw: dict, keys: list[str]):
    key = next((k for k in keys if k in raw), None)
    if key is None:
        raise BadInput(f"vision_config: none of {', '.join(keys)} (the mmproj needs it)")
    return raw[key]


def _preprocessor(ckpt: Checkpoint) -> dict:
    """preprocessor_config.json (its `media_proc_cfg` lifted), then processor_config.json (its `image_processor`
    lifted) over it: the converter's merge, where image_mean/std come from."""
    import json

    out: dict = {}
    for file, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = ckpt.dir / file
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadInput(f"{path}: not readable JSON ({e.__class__.__name__})")
        if not isinstance(cfg, dict):
            raise BadInput(f"{path}: not a JSON object")
        if isinstance(cfg.get(nested), dict):
            cfg = {**cfg, **cfg[nested]}
        out = {**out, **cfg}
    for key in ("image_mean", "image_std"):
        v = out.get(key)
        if key in out and not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise BadInput(f"{ckpt.dir}: {key} {v!r} in the preprocessor config: three numbers expected")
    return out
