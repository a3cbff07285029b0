"""Step-3.5 and Step-3.7 `config.json`, including the legacy hub keys and the MTP tail that transformers trims.

Step-3.7-Flash is Step-3.5's text stack (its legacy keys under `text_config`, the same tensor names) plus a vision
tower and projector (`vision_config`, the Perception Encoder's own keys: `width`, `layers`, `heads`, ...)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from convert.errors import BadInput

SUPPORTED_MODEL_TYPES = ("step3p5", "step3p7")
# Far above any Step model (45 + 3); bounds the per-layer tables a config implies before any weight is read.
MAX_LAYERS = 10_000
# Files of a model folder besides weights and config that stages read or copy into artifacts.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class VisionConfig:
    """Step-3.7's vision tower (a Perception Encoder with two stride-2 downsampling convolutions) and projector."""

    raw: dict
    width: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    intermediate: int
    layer_norm_eps: float
    use_cls_token: bool
    use_ln_pre: bool
    use_ln_post: bool
    projector_bias: bool
    image_token_id: int
    projector_stride: int

    @property
    def grid(self) -> int:
        """Patches per side of the global view."""
        return self.image_size // self.patch_size


def parse_vision(raw: dict, text_hidden: int, vocab_size: int, path: Path) -> VisionConfig:
    """`vision_config` plus the top-level projector keys; legacy names (`width`, `layers`, `heads`) first, as the
    checkpoint and vLLM's PerceptionEncoder spell them, transformers' names as a fallback."""
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise BadInput(f"{path}: model_type step3p7 needs a 'vision_config' object")
    try:
        width = int(vision.get("width", vision.get("hidden_size", 1536)))
        layers = int(vision.get("layers", vision.get("num_hidden_layers", 47)))
        heads = int(vision.get("heads", vision.get("num_attention_heads", 16)))
        image_size, patch_size = int(vision.get("image_size", 728)), int(vision.get("patch_size", 14))
        # every engine sizes the MLP as int(width * mlp_ratio) (vLLM, transformers; llama.cpp rounds, same here)
        intermediate = int(vision.get("intermediate_size") or width * float(vision.get("mlp_ratio", 8960 / 1536)))
        image_token_id = int(raw.get("image_token_id", 151679))
        cfg = VisionConfig(
            raw=vision, width=width, layers=layers, heads=heads, image_size=image_size, patch_size=patch_size,
            intermediate=intermediate, layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
            use_cls_token=bool(vision.get("use_cls_token", False)), use_ln_pre=bool(vision.get("use_ln_pre", True)),
            use_ln_post=bool(vision.get("use_ln_post", False)), projector_bias=bool(raw.get("projector_bias", False)),
            image_token_id=image_token_id, projector_stride=int(raw.get("understand_projector_stride", 2)),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"{path}: vision_config: malformed value ({e})")
    if min(width, layers, heads, patch_size, intermediate) <= 0 or image_size < patch_size or width % heads \
            or layers > MAX_LAYERS:
        raise BadInput(f"{path}: vision_config: width {width}, layers {layers}, heads {heads}, image_size "
                       f"{image_size}, patch_size {patch_size}: not a vision tower stepq reads")
    if not 0 <= image_token_id < vocab_size:
        raise BadInput(f"{path}: image_token_id {image_token_id} is outside the text vocabulary (0..{vocab_size - 1})")
    if cfg.projector_stride != 2:
        raise BadInput(f"{path}: understand_projector_stride {cfg.projector_stride}: Step-3.7's projector "
                       f"downsamples by 2 twice (stride 2); other strides are not supported")
    return cfg


@dataclass(frozen=True)
class Step35Config:
    """Structural facts of a Step-3.5 checkpoint; per-layer lists cover trunk + MTP layers."""

    raw: dict
    path: Path
    hidden_size: int
    vocab_size: int
    num_trunk_layers: int
    num_mtp_layers: int
    intermediate_size: int
    moe_layers: frozenset[int]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    head_dim: int
    num_kv_heads: int
    heads_full: int
    heads_sliding: int
    layer_types: tuple[str, ...]
    rope_theta: tuple[float, ...]
    partial_rotary_factors: tuple[float, ...]
    swiglu_limits: tuple[float, ...]
    swiglu_limits_shared: tuple[float, ...]
    # Step-3.7: the whole config.json (`raw` above is its `text_config`) and the vision tower
    model_type: str = "step3p5"
    full_raw: dict | None = None
    vision: VisionConfig | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def file_raw(self) -> dict:
        """config.json as the model folder holds it (what artifacts write back, with their quantization config)."""
        return self.full_raw if self.full_raw is not None else self.raw

    @property
    def num_layers(self) -> int:
        return self.num_trunk_layers + self.num_mtp_layers

    @property
    def mtp_layers(self) -> range:
        return range(self.num_trunk_layers, self.num_layers)

    def is_mtp(self, layer: int) -> bool:
        return layer >= self.num_trunk_layers

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def num_heads(self, layer: int) -> int:
        return self.heads_full if self.layer_types[layer] == "full_attention" else self.heads_sliding

    def hf_text_config(self):
        """transformers' native Step-3.5 text config (it keeps the MTP tail as `mtp_*_layer_types`)."""
        from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

        kwargs = {k: v for k, v in self.raw.items() if k not in ("architectures", "model_type", "auto_map")}
        return Step3p7TextConfig(**kwargs)


def _per_layer(raw: dict, key: str, n: int, default, path: Path) -> tuple:
    value = raw.get(key, default)
    if not isinstance(value, list):
        return (value,) * n
    if len(value) < n:
        # vLLM's MTP drafter indexes these lists at the MTP layer indices without a bounds check.
        raise BadInput(f"{path}: '{key}' has {len(value)} entries, need {n} (trunk + MTP layers)")
    return tuple(value[:n])


def _parse_moe_layers(raw: dict, path: Path) -> frozenset[int]:
    value = raw.get("moe_layers_enum")
    if value is None:
        return frozenset()
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        return frozenset(int(x) for x in items if str(x).strip() != "")
    except (TypeError, ValueError):
        raise BadInput(f"{path}: 'moe_layers_enum' must be a comma-separated list of layer indices, got {value!r}")


def parse_config(raw: dict, path: Path) -> Step35Config:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BadInput(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "step3p7":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise BadInput(f"{path}: model_type step3p7 needs a 'text_config' object")
        cfg = _parse_text(text, path)
        vision = parse_vision(raw, cfg.hidden_size, cfg.vocab_size, path)
        return dataclasses.replace(cfg, model_type=model_type, full_raw=raw, vision=vision)
    return _parse_text(raw, path)


def _parse_text(raw: dict, path: Path) -> Step35Config:
    try:
        n_trunk = int(raw["num_hidden_layers"])
        n_mtp = int(raw.get("num_nextn_predict_layers", 0) or 0)
        n = n_trunk + n_mtp
        if not (n_trunk >= 0 and n_mtp >= 0 and n <= MAX_LAYERS):  # before any per-layer table is built
            raise BadInput(f"{path}: num_hidden_layers {n_trunk} + num_nextn_predict_layers {n_mtp}: not a layer "
                           f"count stepq reads (0..{MAX_LAYERS} in all)")
        other = raw.get("attention_other_setting") or {}
        moe_layers = _parse_moe_layers(raw, path)
        if any(not 0 <= i < n_trunk for i in moe_layers):
            raise BadInput(f"{path}: 'moe_layers_enum' names layers outside 0..{n_trunk - 1}: {sorted(moe_layers)}")
        layer_types = raw.get("layer_types") or [
            "full_attention" if i % 4 == 0 and i < n_trunk else "sliding_attention" for i in range(n)
        ]
        return Step35Config(
            raw=raw,
            path=path,
            hidden_size=int(raw["hidden_size"]),
            vocab_size=int(raw["vocab_size"]),
            num_trunk_layers=n_trunk,
            num_mtp_layers=n_mtp,
            intermediate_size=int(raw["intermediate_size"]),
            moe_layers=moe_layers,
            num_experts=int(raw.get("moe_num_experts", 0) or 0),
            top_k=int(raw.get("moe_top_k", 0) or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 0) or 0),
            share_expert_dim=int(raw.get("share_expert_dim", raw.get("moe_intermediate_size", 0)) or 0),
            head_dim=int(raw.get("head_dim", 128)),
            num_kv_heads=int(raw["num_attention_groups"]),
            heads_full=int(raw["num_attention_heads"]),
            heads_sliding=int(other.get("num_attention_heads", raw["num_attention_heads"])),
            layer_types=_per_layer({"layer_types": layer_types}, "layer_types", n, None, path),
            rope_theta=_per_layer(raw, "rope_theta", n, 10000.0, path),
            partial_rotary_factors=_per_layer(raw, "partial_rotary_factors", n, 1.0, path),
            swiglu_limits=tuple(float(x or 0.0) for x in _per_layer(raw, "swiglu_limits", n, 0.0, path)),
            swiglu_limits_shared=tuple(
                float(x or 0.0) for x in _per_layer(raw, "swiglu_limits_shared", n, 0.0, path)
            ),
        )
    except KeyError as e:
        raise BadInput(f"{path}: missing required key {e.args[0]!r}")
    # OverflowError: int(inf); AttributeError: a section that should be an object is not
    except (TypeError, ValueError, OverflowError, AttributeError) as e:
        raise BadInput(f"{path}: malformed value ({e})")


def model_roots(model_dir: str | Path) -> list[Path]:
    """Where the files of a model folder may really live: the folder itself and, for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/`, whose files are symlinks to `../../blobs/<sha256>`), that repo's blobs."""
    root = Path(model_dir).resolve()
    return [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]


def model_name(model_dir: str | Path) -> str:
    """The model's name for output folders: the folder's name, or for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<commit>/`) the repo's name, not the commit hash."""
    root = Path(model_dir).resolve()
    repo = root.parent.parent.name
    if root.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo.removeprefix("models--").split("--", 1)[1]  # Hub user/org names cannot hold "--"
    return root.name


def model_file(model_dir: str | Path, name: str) -> Path | None:
    """`model_dir/name` if it is a file that stays inside the model folder once symlinks are followed, None if it
    does not exist; BadInput if it leads elsewhere (a file copied into an artifact or parsed must not come from
    outside the folder the user named)."""
    path = Path(model_dir) / name
    if not path.is_file():
        return None
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in model_roots(model_dir)):
        raise BadInput(f"{path}: symlink points outside the model folder ({real})")
    return path


def load_config(model_dir: Path) -> Step35Config:
    path = Path(model_dir) / "config.json"
    if model_file(model_dir, "config.json") is None:
        raise BadInput(f"{path}: no config.json in the model folder")
    try:
        raw = json.loads(path.read_text())
    # ValueError: besides JSONDecodeError, an integer literal past Python's digit limit; RecursionError: deep nesting
    except (ValueError, RecursionError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})")
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return parse_config(raw, path)
