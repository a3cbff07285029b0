"""Images for a Step-3.7 checkpoint: preprocessing, the placeholder tokens an image becomes, and its features.

What the engines do with an image, step by step (transformers 5.17 `models/step3p7/`; vLLM 0.33 `step3p7.py` does
the same):
- `Step3p7ImageProcessor` plans a global view (the image resized to 728 x 728) and zero or more local patches (a
  sliding window over the image, each resized to 504 x 504), both normalised with CLIP's mean/std;
- `Step3p7Processor.replace_image_token` writes each image as, per local patch, `<patch_start>` + 81 x
  `<im_patch>` + `<patch_end>` (+ `<patch_newline>` after a row's last patch but the last row), then `<im_start>` +
  169 x `<im_patch>` + `<im_end>`;
- `Step3p7Model.get_image_features` runs the vision tower and the projector on the local patches and the global view
  and concatenates their features, local patches first; `Step3p7Model.forward` puts them in place of the text
  embedding at the `<im_patch>` (image_token_id) positions with `masked_scatter`, in order.

The image processor cannot run here: it is built on transformers' torchvision backend, and torchvision cannot be
installed beside this CPU build of torch. So stepq preprocesses with PIL: the patch plan is transformers' own pure
`Step3p7ImageProcessor._plan_patches`; resizes are PIL bilinear on 8-bit RGB, as transformers' PIL backend
(`image_transforms.resize`) does them, and the normalisation is the torchvision backend's arithmetic (mean and std
fused with the 1/255 rescale, float32), both checked bit for bit in the tests. The one step not measured against
the processor is torchvision's own antialiased bilinear resize (the library that could not be installed), which
approximates PIL's to about one level of 255.

The vision tower is transformers' `Step3p7VisionModel` with the projector as an `nn.Linear`, given the checkpoint's
`vision_model.*` / `vit_large_projector.*` tensors only (never the 400 GB whole model). transformers renames those
tensors and splits each fused `attn.in_proj_*` into q/k/v with a RoPE permutation when it loads a checkpoint
(conversion_mapping.py "step3p5_vision": Chunk + PermuteForRope); `vision_state_dict` applies that very mapping, its
own `WeightRenaming` / `WeightConverter` objects, to the tensors. With `engine_rope=False` the features are
bit-identical to `Step3p7ForConditionalGeneration.from_pretrained(...).model.get_image_features` (tested on the
fixture); by default the tower's 2-D RoPE takes the axis order vLLM and llama.cpp use, which transformers 5.17 swaps
(`EngineOrderRope`), so calibration and eval see the features the engines serve.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from convert.errors import BadInput

VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "vit_large_projector."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# the processor's placeholder tokens (processing_step3p7.py)
IMAGE_TOKEN, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"
PLACEHOLDER_TOKENS = (IMAGE_TOKEN, IM_START, IM_END, PATCH_START, PATCH_END, PATCH_NEWLINE)
MAX_PIXELS = 64_000_000  # larger images are refused (PIL's decompression-bomb limit is 89M); the plan caps at 3024


# ---- preprocessing ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessor:
    """preprocessor_config.json of a Step-3.7 checkpoint (defaults: transformers' Step3p7ImageProcessor)."""

    image_size: int = 728          # global view side
    patch_size: int = 504          # local patch side
    max_image_size: int = 3024
    vision_patch_size: int = 14
    downsampler_stride: int = 4
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Preprocessor:
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise BadInput(f"{path}: missing (a Step-3.7 checkpoint ships its image preprocessor's settings)")
        try:
            raw = json.loads(path.read_text())
            size = raw.get("size", {})
            pre = cls(image_size=int(size.get("height", cls.image_size)),
                      patch_size=int(raw.get("patch_size", cls.patch_size)),
                      max_image_size=int(raw.get("max_image_size", cls.max_image_size)),
                      vision_patch_size=int(raw.get("vision_patch_size", cls.vision_patch_size)),
                      downsampler_stride=int(raw.get("downsampler_stride", cls.downsampler_stride)),
                      rescale_factor=float(raw.get("rescale_factor", cls.rescale_factor)) if raw.get(
                          "do_rescale", True) else 1.0,
                      mean=tuple(map(float, raw.get("image_mean", cls.mean))),
                      std=tuple(map(float, raw.get("image_std", cls.std))))
            if size and size.get("width", pre.image_size) != pre.image_size:
                raise ValueError("size must be square")
            if raw.get("resample", 2) != 2 or raw.get("do_normalize", True) is not True:
                raise ValueError("only bilinear resampling with normalisation is supported")
        except (ValueError, TypeError, AttributeError) as e:
            raise BadInput(f"{path}: unusable image preprocessor settings ({e})")
        return pre

    @property
    def stride(self) -> int:
        return self.vision_patch_size * self.downsampler_stride

    @property
    def global_tokens(self) -> int:
        return (self.image_size // self.stride) ** 2

    @property
    def patch_tokens(self) -> int:
        return (self.patch_size // self.stride) ** 2


@dataclass(frozen=True)
class Plan:
    """`Step3p7ImageProcessor._plan_patches` for one image, and what follows from it."""

    global_wh: tuple[int, int]
    crop_wh: tuple[int, int]
    window: int        # local patch side in the (padded) image; 0: no local patches
    nx: int
    ny: int
    square_pad: bool

    @property
    def num_patches(self) -> int:
        return self.nx * self.ny if self.window else 0

    def newlines(self) -> list[bool]:
        """After which local patch a `<patch_newline>` follows (a row's last patch, except in the last row)."""
        return [col == self.nx - 1 and row < self.ny - 1 for row in range(self.ny) for col in range(self.nx)]


def plan(width: int, height: int, pre: Preprocessor) -> Plan:
    """transformers' own patch plan (its pure `_plan_patches`, called on a stand-in for the processor)."""
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor as P

    shim = SimpleNamespace(max_image_size=pre.max_image_size, _is_extreme_aspect=P._is_extreme_aspect)
    g, c, window, nx, ny, pad = P._plan_patches(shim, width, height, pre.image_size, pre.patch_size)
    return Plan(tuple(g), tuple(c), window, nx, ny, pad)


def open_image(path: Path, where: str):
    """The image at `path` decoded whole, as RGB (PIL); BadInput naming `where` when it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadInput(f"{where}: image {path.name} is {im.width}x{im.height}, larger than "
                               f"{MAX_PIXELS // 1_000_000}M pixels")
            im.load()  # the whole file decodes now, not at the first resize
            return im.convert("RGB")
    except BadInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad files
        raise BadInput(f"{where}: cannot decode image {path} ({e.__class__.__name__}: {str(e).splitlines()[0]})")


def _resize(im, wh: tuple[int, int]):
    from PIL import Image

    return im if im.size == tuple(wh) else im.resize(tuple(wh), resample=Image.BILINEAR)


def fused_mean_std(pre: Preprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, as the processor's torchvision backend fuses the rescale into them
    (`_fuse_mean_std_and_rescale_factor`: float32 tensors times 1 / rescale_factor)."""
    return torch.tensor(pre.mean) * (1.0 / pre.rescale_factor), torch.tensor(pre.std) * (1.0 / pre.rescale_factor)


def _normalise(ims: list, pre: Preprocessor) -> torch.Tensor:
    """8-bit RGB images of one size -> [n, 3, H, W] float32, (x - mean') / std' with the fused mean' and std'
    (torchvision's normalize: a subtraction, then a division)."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).to(torch.float32)
    mean, std = fused_mean_std(pre)
    return ((x - mean[None, :, None, None]) / std[None, :, None, None]).contiguous()


@dataclass
class Pixels:
    global_view: torch.Tensor         # [1, 3, S, S]
    local: torch.Tensor | None        # [P, 3, p, p], or None without local patches
    plan: Plan


def preprocess(im, pre: Preprocessor) -> Pixels:
    """One RGB image -> the global view and local patches, as Step3p7ImageProcessor._get_image_patches makes them
    (square zero-padding of extreme aspect ratios at the top left; global: resize to the planned size, then to
    S x S; local: resize to the crop size, cut row by row into window x window tiles, each resized to p x p)."""
    from PIL import Image

    p = plan(im.width, im.height, pre)
    if p.square_pad:
        side = max(im.width, im.height)
        padded = Image.new("RGB", (side, side))
        padded.paste(im, (0, 0))
        im = padded
    global_view = _normalise([_resize(_resize(im, p.global_wh), (pre.image_size, pre.image_size))], pre)
    if not p.window:
        return Pixels(global_view, None, p)
    crop = _resize(im, p.crop_wh)
    tiles = [crop.crop((x, y, min(x + p.window, crop.width), min(y + p.window, crop.height)))
             for y in range(0, crop.height, p.window) for x in range(0, crop.width, p.window)]
    local = _normalise([_resize(t, (pre.patch_size, pre.patch_size)) for t in tiles], pre)
    return Pixels(global_view, local, p)


# ---- placeholder tokens ----------------------------------------------------------------------------------------

def placeholder_text(p: Plan, pre: Preprocessor) -> str:
    """What `Step3p7Processor.replace_image_token` writes for the image."""
    out = ""
    for newline in p.newlines()[:p.num_patches]:
        out += PATCH_START + IMAGE_TOKEN * pre.patch_tokens + PATCH_END + (PATCH_NEWLINE if newline else "")
    return out + IM_START + IMAGE_TOKEN * pre.global_tokens + IM_END


def placeholder_ids(p: Plan, pre: Preprocessor, token_ids: dict[str, int]) -> list[int]:
    """`placeholder_text` as token ids (`token_ids`: the six placeholder tokens' ids, see `image_token_ids`)."""
    t = token_ids
    out: list[int] = []
    for newline in p.newlines()[:p.num_patches]:
        out += [t[PATCH_START], *[t[IMAGE_TOKEN]] * pre.patch_tokens, t[PATCH_END]]
        if newline:
            out.append(t[PATCH_NEWLINE])
    return out + [t[IM_START], *[t[IMAGE_TOKEN]] * pre.global_tokens, t[IM_END]]


def feature_count(p: Plan, pre: Preprocessor) -> int:
    """How many features (= `<im_patch>` tokens) the image has."""
    return p.num_patches * pre.patch_tokens + pre.global_tokens


def image_token_ids(tok, model_dir: str | Path, image_token_id: int) -> dict[str, int]:
    """The placeholder tokens' ids from the checkpoint's tokenizer; `<im_patch>` must be the config's image_token_id."""
    ids = {}
    for t in PLACEHOLDER_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        if i is None or i == tok.unk_token_id:
            raise BadInput(f"{Path(model_dir) / 'tokenizer.json'}: no {t} token (needed to place image features)")
        ids[t] = i
    if ids[IMAGE_TOKEN] != image_token_id:
        raise BadInput(f"{Path(model_dir) / 'config.json'}: image_token_id {image_token_id} is not the tokenizer's "
                       f"{IMAGE_TOKEN} ({ids[IMAGE_TOKEN]})")
    return ids


# ---- the vision tower ----------------------------------------------------------------------------------------

def vision_names(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.startswith((VISION_PREFIX, PROJECTOR_PREFIX)))


def hf_config(full_config: dict):
    """transformers' `Step3p7Config` of a Step-3.7 config.json (its vision_config is what the tower needs)."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7Config

    kw = {k: v for k, v in full_config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return Step3p7Config(**kw)


def vision_state_dict(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`vision_model.*` checkpoint tensors -> `Step3p7VisionModel` parameter names and layout, through transformers'
    own conversion mapping for the tower ("step3p5_vision": renames, then q/k/v split + RoPE permutation)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    out = {}
    for name, t in tensors.items():
        mapping = get_checkpoint_conversion_mapping(config.vision_config.model_type)  # fresh copies: they collect
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        key = name.removeprefix(VISION_PREFIX)
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            out[target] = t
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        conv.add_tensor(target, key, pattern, t)
        for k, v in conv.convert(target, config=config).items():
            out[k] = v[0] if isinstance(v, list) else v
    return out


class EngineOrderRope(nn.Module):
    """transformers 5.17's tower rotates the first half of each head's RoPE dims with the patch row, where vLLM
    (`step_vl.py`, a copy of perception_models' `pe.py`, the code the weights were trained with) and llama.cpp
    (`step3vl.cpp`: `build_rope_2d(pos_w, pos_h)`) rotate it with the column. Feeding transformers' rotary embedding
    (col, row) positions gives the engines' features to float32 rounding (tests/test_gguf_step37.py measures
    5e-7 against vLLM's formula; as shipped, transformers is 1.7e-2 away): calibration and eval see what the
    engines serve."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.rope(x, position_ids[..., [1, 0]])


def use_engine_rope_order(vision_model: nn.Module) -> None:
    """Give a transformers `Step3p7VisionModel` the engines' RoPE axis order (see EngineOrderRope), in place."""
    if not isinstance(vision_model.rotary_emb, EngineOrderRope):
        vision_model.rotary_emb = EngineOrderRope(vision_model.rotary_emb)


class VisionTower(nn.Module):
    """transformers' Step3p7VisionModel + the projector: pixels -> features in the text embedding space."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionModel

        vc = config.vision_config
        vc._attn_implementation = "sdpa"  # what from_pretrained picks on CPU; eager differs in the last bits
        self.vision_model = Step3p7VisionModel(vc)
        self.projector = nn.Linear(vc.hidden_size * 4, config.text_config.hidden_size, bias=config.projector_bias)

    @torch.inference_mode()
    def features(self, pixels: Pixels) -> torch.Tensor:
        """[n features, H]: local patches first, then the global view (Step3p7Model.get_image_features)."""
        dev, dtype = self.projector.weight.device, self.projector.weight.dtype
        glob = self.projector(self.vision_model(pixels.global_view.to(dev, dtype)).last_hidden_state)
        parts = []
        if pixels.local is not None:
            parts.append(self.projector(self.vision_model(pixels.local.to(dev, dtype)).last_hidden_state))
        parts.append(glob)
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


def load_tower(full_config: dict, read: Callable[[str], torch.Tensor], names: Iterable[str],
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", where: str = "",
               engine_rope: bool = True) -> VisionTower:
    """The tower over the checkpoint's tensors (`read(name)` for every `vision_model.*` / `vit_large_projector.*`
    name in `names`), strict: a missing or extra tensor is BadInput naming it. `engine_rope`: the RoPE axis order
    vLLM and llama.cpp use (EngineOrderRope); False gives transformers' own, bit for bit."""
    config = hf_config(full_config)
    names = vision_names(names)
    if not any(n.startswith(PROJECTOR_PREFIX) for n in names) or not any(n.startswith(VISION_PREFIX) for n in names):
        what = "vision tower (vision_model.*)" if not any(n.startswith(VISION_PREFIX) for n in names) else (
            "projector (vit_large_projector.*)")
        raise BadInput(f"{where}: no {what}: image inputs need the checkpoint's vision part")
    with torch.device("meta"):
        tower = VisionTower(config)
    tensors = {n: read(n) for n in names if n.startswith(VISION_PREFIX)}
    state = {f"vision_model.{k}": v for k, v in vision_state_dict(tensors, config).items()}
    state |= {f"projector.{n.removeprefix(PROJECTOR_PREFIX)}": read(n) for n in names if n.startswith(PROJECTOR_PREFIX)}
    want = dict(tower.state_dict())
    if extra := sorted(set(state) - set(want)):
        raise BadInput(f"{where}: tensor {extra[0]}: not part of the vision tower")
    if missing := sorted(set(want) - set(state)):
        raise BadInput(f"{where}: tensor {missing[0]}: missing from the vision tower")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise BadInput(f"{where}: vision tensor {k}: shape {list(v.shape)}, expected {list(want[k].shape)}")
        state[k] = v.to(device=device, dtype=dtype)
    tower.load_state_dict(state, strict=True, assign=True)
    # buffers are not in the state dict (non-persistent): made again on the device
    vm = tower.vision_model
    vm.embeddings.position_ids = torch.arange(vm.embeddings.num_positions, device=device).expand((1, -1))
    rope = type(vm.rotary_emb)(config.vision_config)
    vm.rotary_emb = rope.to(device)
    if engine_rope:
        use_engine_rope_order(vm)
    return tower.eval()


def load_tower_from_dir(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", engine_rope: bool = True) -> VisionTower:
    """The tower of a checkpoint folder, its vision tensors read with safetensors (tests; stepq's forward reads them
    through its checkpoint reader)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(model_dir / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    names = vision_names(weight_map)
    handles = {}

    def read(name: str) -> torch.Tensor:
        shard = weight_map[name]
        if shard not in handles:
            handles[shard] = safe_open(model_dir / shard, "pt")
        return handles[shard].get_tensor(name)

    return load_tower(json.loads((model_dir / "config.json").read_text()), read, names, dtype, device,
                      str(model_dir), engine_rope)


# ---- image features in place of the placeholder embeddings ----------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    path: Path
    where: str      # the sample naming it, for messages
    plan: Plan
    features: int   # its `<im_patch>` tokens


@dataclass
class ImageRows:
    """Which image features fill each row of a [N, L] token batch: `rows[r]` lists (image index, lo, hi) in position
    order; the row's `<im_patch>` positions take features lo..hi-1 of each in turn (an image cut at the row's end
    keeps its first features, as masked_scatter fills positions in order)."""

    images: list[ImageRef]
    rows: list[list[tuple[int, int, int]]]
    pre: Preprocessor
    image_token_id: int

    def check(self, ids: torch.Tensor) -> None:
        """Each row holds exactly as many `<im_patch>` tokens as features are placed in it."""
        for r, placed in enumerate(self.rows):
            have, want = int((ids[r] == self.image_token_id).sum()), sum(hi - lo for _, lo, hi in placed)
            if have != want:
                raise ValueError(f"row {r}: {have} image tokens, {want} image features")


class ImageEmbedder:
    """Puts image features at the `<im_patch>` positions of embedded rows, the tower built once over the weights'
    `vision_model.*` / `vit_large_projector.*` tensors. Features of an image are computed once and kept while the
    next rows may need them (a window's last sample starts the next window)."""

    KEEP = 16

    def __init__(self, images: ImageRows, weights, device, dtype: torch.dtype):
        self.images, self.device, self.dtype = images, device, dtype
        full = getattr(weights.config, "full_raw", None) or json.loads((Path(weights.dir) / "config.json").read_text())
        self.tower = load_tower(full, weights.read, weights.tensors, dtype, device, str(weights.dir))
        self.cache: dict[int, torch.Tensor] = {}
        self.runs = 0

    def features(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            ref = self.images.images[i]
            feats = self.tower.features(preprocess(open_image(ref.path, ref.where), self.images.pre))
            if feats.shape[0] != ref.features:
                raise ValueError(f"{ref.path}: {feats.shape[0]} features, {ref.features} planned")
            self.runs += 1
            if len(self.cache) >= self.KEEP:
                self.cache.pop(next(iter(self.cache)))
            self.cache[i] = feats.cpu()
        return self.cache[i]

    def scatter(self, first_row: int, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [b, L, H] (embeddings of ids [b, L], rows first_row..) with the features in place (masked_scatter)."""
        for r in range(ids.shape[0]):
            placed = self.images.rows[first_row + r]
            if not placed:
                continue
            feats = torch.cat([self.features(i)[lo:hi] for i, lo, hi in placed]).to(x.dtype)
            mask = (ids[r] == self.images.image_token_id).to(x.device)
            x[r] = x[r].masked_scatter(mask[:, None], feats.to(x.device))
        return x

    def close(self) -> None:
        self.tower = None
        self.cache.clear()
