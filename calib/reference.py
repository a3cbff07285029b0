"""Reference forward of a Step-3.5 checkpoint (trunk + MTP head) in transformers' Step3p7 classes.

Whole model in memory: meant for the tiny fixture and for oracle checks, not for the real 199B model.
The trunk is transformers' `Step3p7TextModel`; the MTP layers, which transformers' loader never builds
(`_keys_to_ignore_on_load_unexpected`), are built here from its `Step3p7DecoderLayer` (how they run: quant/mtp.py).
Parameter names come from the role table (convert/arch/step35.py `transformers_name`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
from transformers.models.step3p7.modeling_step3p7 import Step3p7DecoderLayer, Step3p7RMSNorm, Step3p7TextModel

from convert.arch.step35 import checkpoint_names, transformers_name


def text_config(cfg: dict, with_mtp: bool = False) -> Step3p7TextConfig:
    """`Step3p7TextConfig` from a legacy hub config dict.

    with_mtp=True counts the MTP layers as ordinary layers, so per-layer lists (`layer_types`, head counts via
    `per_layer_config`, `swiglu_limits*`, dense/MoE) are indexed by the real layer id (45.. on the real model).
    transformers' own `get_mtp_config()` restarts indexing at 0 and drops `per_layer_config`, which would give
    the MTP layers the full-attention head count instead of the sliding one.
    """
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    if with_mtp:
        kw["num_hidden_layers"] = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
        kw["num_nextn_predict_layers"] = 0
    config = Step3p7TextConfig(**kw)
    config._attn_implementation = "sdpa"  # bool masks below; eager would need additive float masks
    return config


class MtpLayer(nn.Module):
    """One MTP depth: h' = eh_proj([enorm(embed(tok)), hnorm(h_prev)]) -> decoder layer; logits via shared_head."""

    def __init__(self, config: Step3p7TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = Step3p7RMSNorm(h, eps=eps)
        self.hnorm = Step3p7RMSNorm(h, eps=eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.mtp_block = Step3p7DecoderLayer(config, layer_idx)
        # Checkpoint nesting `transformer.shared_head.{norm,output}` kept as module names.
        self.transformer = nn.Module()
        self.transformer.shared_head = nn.Module()
        self.transformer.shared_head.norm = Step3p7RMSNorm(h, eps=eps)
        self.transformer.shared_head.output = nn.Linear(h, config.vocab_size, bias=False)

    def forward(self, embeds, prev_hidden, mask, rope, position_ids):
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))
        return self.mtp_block(x, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)

    def logits(self, hidden):
        head = self.transformer.shared_head
        return head.output(head.norm(hidden))


def mtp_rope_problem(layer_types: list[str], per_layer: dict, mtp_layers) -> str | None:
    """Why the MTP layers cannot run with the trunk's sliding-attention RoPE table, as this forward (like the
    engines) runs them, or None. `per_layer`: rope_theta / partial_rotary_factors, per-layer lists or one value."""
    for i in mtp_layers:
        if layer_types[i] != "sliding_attention":
            return f"MTP layer {i} is {layer_types[i]}; only sliding_attention is supported"
        first_swa = layer_types.index("sliding_attention")
        for key, vals in per_layer.items():
            if isinstance(vals, list) and vals[i] != vals[first_swa]:
                return f"{key}[{i}] = {vals[i]} differs from the trunk's sliding layers"
    return None


class ReferenceModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.config = text_config(cfg)
        self.model = Step3p7TextModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        n, k = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)
        mtp_config = text_config(cfg, with_mtp=True)
        rope = {key: cfg.get(key) for key in ("rope_theta", "partial_rotary_factors")}
        if problem := mtp_rope_problem(mtp_config.layer_types, rope, range(n, n + k)):
            raise ValueError(problem)
        self.mtp = nn.ModuleList(MtpLayer(mtp_config, i) for i in range(n, n + k))
        # None disables the window (tests use this to show it matters).
        self.sliding_window = self.config.sliding_window

    # ---- masks and positions -------------------------------------------------------------------------------
    def _masks(self, t: int, device) -> dict:
        """Causal masks per layer type (True = attend); sliding layers see the last `sliding_window` keys incl. self."""
        q = torch.arange(t, device=device)[:, None]
        kv = torch.arange(t, device=device)[None, :]
        causal = kv <= q
        sliding = causal & (q - kv < self.sliding_window) if self.sliding_window else causal
        return {"full_attention": causal[None, None], "sliding_attention": sliding[None, None]}

    def _rope(self, x, t: int):
        pos = torch.arange(t, device=x.device)[None]
        return pos, {lt: self.model.rotary_emb(x, pos, lt) for lt in set(self.config.layer_types)}

    # ---- forward -------------------------------------------------------------------------------------------
    def trunk(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Hidden state after the last trunk layer, before `model.norm`."""
        return self.trunk_from(self.model.embed_tokens(input_ids), 0)

    def trunk_from(self, x: torch.Tensor, start: int, replace: dict[int, nn.Module] | None = None,
                   layer_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden state after the last trunk layer, from `x` [B,T,H] entering layer `start`. `replace` runs other
        modules in place of some layers (eval.sensitivity: one layer with quantized weights); `layer_inputs`
        collects each layer's input."""
        t = x.shape[1]
        masks = self._masks(t, x.device)
        pos, rope = self._rope(x, t)
        for i in range(start, len(self.model.layers)):
            if layer_inputs is not None:
                layer_inputs.append(x)
            layer, lt = (replace or {}).get(i, self.model.layers[i]), self.config.layer_types[i]
            x = layer(x, attention_mask=masks[lt], position_embeddings=rope[lt], position_ids=pos)
        return x

    def forward(self, input_ids: torch.LongTensor):
        """-> (logits [B,T,V], hidden [B,T,H]); hidden is the pre-`model.norm` trunk output that feeds MTP depth 1."""
        hidden = self.trunk(input_ids)
        return self.lm_head(self.model.norm(hidden)), hidden

    def mtp_from_hidden(self, input_ids: torch.LongTensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced MTP logits: depth k at position t sees tokens <= t+k and predicts token t+1+k."""
        t = input_ids.shape[1]
        masks = self._masks(t, hidden.device)
        pos, rope = self._rope(hidden, t)
        swa = masks["sliding_attention"]
        rope_swa = rope["sliding_attention"]
        out, h = [], hidden
        for k, layer in enumerate(self.mtp, start=1):
            n = t - k
            # vLLM step3p5{,_mtp}.py: depth 1 takes the trunk output before model.norm, depth k>1 the last mtp_block's.
            h = layer(
                self.model.embed_tokens(input_ids[:, k:]),
                h[:, :n],
                swa[..., :n, :n],
                (rope_swa[0][:, :n], rope_swa[1][:, :n]),
                pos[:, :n],
            )
            out.append(layer.logits(h))
        return out

    def forward_with_mtp(self, input_ids: torch.LongTensor):
        """One trunk pass -> (logits, hidden, [mtp logits per depth])."""
        logits, hidden = self(input_ids)
        return logits, hidden, self.mtp_from_hidden(input_ids, hidden)

    def mtp_logits(self, input_ids: torch.LongTensor) -> list[torch.Tensor]:
        """-> [logits [B,T-k,V] for k = 1..num_nextn_predict_layers]."""
        return self.mtp_from_hidden(input_ids, self.trunk(input_ids))

    # ---- checkpoint naming ---------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under the real Step-3.5 checkpoint names (3-D experts split back into gate/up)."""
        return to_checkpoint_names(self.state_dict(), self.cfg)

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(from_checkpoint_names(tensors, self.cfg), strict=True)


def from_checkpoint_names(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ReferenceModel names, from the role table (convert/arch/step35.py `transformers_name`)."""
    n = cfg["num_hidden_layers"]
    out, fused = {}, {}
    for name, w in tensors.items():
        ref, part = transformers_name(name, n)
        if part is None:
            out[ref] = w
        else:
            fused.setdefault(ref, {})[part] = w
    for ref, parts in fused.items():  # e.g. experts [E, 2*I, H]: gate rows first, then up
        out[ref] = torch.cat([parts[i] for i in range(len(parts))], dim=1)
    return out


def to_checkpoint_names(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Inverse of `from_checkpoint_names`."""
    n = cfg["num_hidden_layers"]
    out = {}
    for name, w in state.items():
        names = checkpoint_names(name, n)
        parts = [w] if len(names) == 1 else w.chunk(len(names), dim=1)
        out.update(zip(names, parts))
    return out


def load_reference(model_dir, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Build the reference model from `config.json` + every `*.safetensors` in `model_dir` (strict load)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    model = ReferenceModel(cfg)
    model.load_checkpoint_tensors(tensors)
    model.to(dtype).eval()
    for mod in model.modules():  # router_bias stays F32 as stored: it is added to fp32 sigmoid scores
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias = mod.e_score_correction_bias.float()
    return model
