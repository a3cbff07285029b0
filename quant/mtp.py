"""The MTP head: what every format does with the MTP layers, decided here and nowhere else.

The MTP layers are layers `num_hidden_layers .. num_hidden_layers + num_nextn_predict_layers - 1` of the checkpoint
(`Step35Config.mtp_layers`): a decoder block (the trunk's roles, dense MLP) plus their own tensors `eh_proj`,
`enorm`, `hnorm`, `transformer.shared_head.{norm,output}` (`MTP_OWN_ROLES`). Every artifact carries them.

- safetensors, every scheme: the recipe's `mtp:` (`MODES`). `keep` (the default) copies the MTP layers BF16 byte
  for byte, and the config's ignore rules cover those layers whole (`layers_kept_whole`: one regex / glob per
  layer). `quantize` gives their decoder block the trunk's roles and scheme, with the MTP layers' own calibration
  statistics; their own linears `eh_proj` and `shared_head.output` stay BF16 (`ALWAYS_BF16`), as do the norms.
- vLLM ignore names: inside a quantized MTP layer, kept modules are listed one by one under the drafter's runtime
  names (`step3p5_mtp`: `model.layers.N.mtp_block.*`, `model.layers.N.shared_head.head`); the names come from the
  architecture's role table (convert/arch/step35.py, `vllm_names`).
- GGUF: the MTP layers are blocks `blk.N` with their own tensors as `blk.N.nextn.*` (convert/gguf_names.py);
  `--no-mtp` drops them, `--mtp-only` writes them alone with what the draft graph shares with the trunk: the
  embedding, the final norm and the output head (`in_gguf`).
- calibration and the reference forward: the MTP layers run after the trunk, depth 1 fed the trunk's hidden state
  before `model.norm`, depth k > 1 the previous depth's block output, each with the next token's embedding; their
  statistics are their own. transformers never builds them, so the reference builds them from its decoder layer,
  nested as vLLM nests them (`mtp.<k>.mtp_block.*`, convert/arch/step35.py `transformers_name`).

It lives in `quant` because recipes decide with it and `quant` imports nothing of ours; convert and calib call it.
"""

from __future__ import annotations

from quant.roles import Role

MODES = ("keep", "quantize")
KEPT_REASON = "MTP head kept BF16 (drafter accuracy; engines load it unquantized)"
# The MTP layers' own linears, BF16 whatever the mode: the drafter's input projection and output head.
ALWAYS_BF16 = frozenset({Role.MTP_EH_PROJ, Role.MTP_HEAD})
# What a draft-only GGUF keeps of the trunk: llama.cpp's MTP graph embeds with `token_embd`, falls back to `output`
# for a block without its own head, and its step35 loader requires `output_norm` in every file.
DRAFT_SHARED_ROLES = frozenset({Role.EMBED, Role.NORM, Role.LM_HEAD})


def kept_bf16(mode: str, mtp: bool) -> bool:
    """Whether a tensor (inside an MTP layer when `mtp`) is kept BF16 by the MTP rule alone."""
    return mtp and mode == "keep"


def layers_kept_whole(mode: str, mtp_layers) -> list[int]:
    """The MTP layers a safetensors artifact keeps entirely BF16: the ignore rules cover them by one pattern each."""
    return list(mtp_layers) if mode == "keep" else []


def in_gguf(role: str, layer: int | None, mtp: bool, with_mtp: bool = True, mtp_only: bool = False) -> bool:
    """Whether a checkpoint tensor goes into a GGUF written with (`with_mtp`) or without the MTP layers, or into the
    draft-only one (`mtp_only`). Global tensors have `layer` None."""
    if mtp:
        return with_mtp
    return not mtp_only or (layer is None and role in DRAFT_SHARED_ROLES)
