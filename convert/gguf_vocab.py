"""Tokenizer -> GGUF `tokenizer.*` metadata for a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`).

Tokens, token types and the pre-tokenizer name are read from `tokenizer.json` with the `tokenizers` library (no
transformers round trip: transformers 5 cannot load Step-3.5's 48-entry per-layer config, and AutoTokenizer asks
for it). Merges, special token ids, add_bos/add_eos and the chat template come from gguf-py's `SpecialVocab`,
as in llama.cpp's converter.

llama.cpp selects its pre-tokenizer regexes by name (`tokenizer.ggml.pre`). Its converter finds the name from a
hash of token ids, which only works for vocabularies it has seen; stepq identifies the pre-tokenizer itself, by
comparing the `pre_tokenizer` section of tokenizer.json with the definitions llama.cpp implements.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from convert.errors import BadInput

TT = gguf.TokenType

# tokenizer.json `pre_tokenizer` definitions -> the llama.cpp name whose regexes (src/llama-vocab.cpp) split
# text the same way. DeepSeek-V3's is the one Step-3.5 (and the bundled fixture) use.
# llama.cpp's spelling, which DeepSeek-V3's tokenizer.json shares once JSON-decoded: ordinary strings, so `\r` `\n`
# are literal CR LF characters and `\"` is a bare quote.
_DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
# The same regexes with regex escapes instead (`\r`, `\n`, `\"` as two characters each), as tokenizers written
# from raw strings have them (the fixture's first revision did). They match the same characters.
_DEEPSEEK_V3_SPLITS_ESCAPED = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)
KNOWN_PRE_TOKENIZERS: dict[tuple, str] = {
    (*(("Split", r, "Isolated", False) for r in splits), ("ByteLevel", False)): "deepseek-v3"
    for splits in (_DEEPSEEK_V3_SPLITS, _DEEPSEEK_V3_SPLITS_ESCAPED)
}


def _pre_tokenizer_signature(pre: dict | None) -> tuple:
    """What decides how text is split: the Split regexes (with behaviour) and a non-regex ByteLevel step."""
    if pre is None:
        return ()
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for s in steps:
        if s.get("type") == "Split":
            pattern = s.get("pattern", {})
            sig.append(("Split", pattern.get("Regex", pattern.get("String")), s.get("behavior"),
                        bool(s.get("invert", False))))
        elif s.get("type") == "ByteLevel":
            sig.append(("ByteLevel", bool(s.get("use_regex", True))))
        else:
            sig.append((s.get("type"),))
    return tuple(sig)


def pre_tokenizer_name(tokenizer_json: dict, path: Path) -> str:
    sig = _pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    if sig not in KNOWN_PRE_TOKENIZERS:
        known = ", ".join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))
        raise BadInput(f"{path}: pre-tokenizer not recognised (stepq knows: {known}); "
                       f"llama.cpp would split text differently from the Hugging Face tokenizer")
    return KNOWN_PRE_TOKENIZERS[sig]


def _looks_special(text: str) -> bool:
    # llama.cpp's converter marks these CONTROL even when the tokenizer does not flag them special
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def load_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens by id, token types, pre-tokenizer name); ids the tokenizer lacks become `[PAD<i>]` UNUSED."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise BadInput(f"{path}: GGUF export needs a tokenizer.json (byte-level BPE)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise BadInput(f"{path}: cannot load the tokenizer ({e.__class__.__name__}: {str(e).splitlines()[0]})")
    model = raw.get("model") or {}
    if model.get("type") != "BPE":
        raise BadInput(f"{path}: tokenizer model {model.get('type')!r}; the GGUF writer handles byte-level BPE only")
    pre = pre_tokenizer_name(raw, path)
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise BadInput(f"{path}: token id {max(vocab.values())} outside config.json vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            a = added[i]
            if not a.normalized:  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.special or _looks_special(text):
                types.append(TT.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
        tokens.append(text)
    return tokens, types, pre


def _has_bytelevel_post_processor(tokenizer_json: dict) -> bool:
    pp = tokenizer_json.get("post_processor") or {}
    steps = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    return any(s.get("type") == "ByteLevel" for s in steps)


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> dict:
    """Write the tokenizer keys in llama.cpp's converter order; returns a summary for provenance."""
    model_dir = Path(model_dir)
    tokens, types, pre = load_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        raise BadInput(f"{model_dir / 'tokenizer.json'}: no BPE merges (llama.cpp refuses a gpt2 vocab without them)")
    raw = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if _has_bytelevel_post_processor(raw):
        # The llama.cpp tree stepq targets reads a ByteLevel post-processor as "adds no BOS/EOS" and lets it win
        # over tokenizer_config.json; gguf 0.19.0 on PyPI does not, so apply that rule here.
        special.add_special_token["bos"] = False
        special.add_special_token["eos"] = False
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids),
            "add_special_token": dict(special.add_special_token),
            "chat_template": special.chat_template is not None}
