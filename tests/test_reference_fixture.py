"""The bundled trained fixture loads in transformers' Step3p7 classes and behaves like a trained Step-3.5."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from calib.reference import load_reference

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny-step35"
DATA = ROOT / "fixtures" / "tiny-step35-data"
SEQ = 256
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|im_end|>", "<|im_start|>",
            "<think>", "</think>"]


@pytest.fixture(scope="module")
def cfg():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_reference(FIXTURE)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def eval_ids():
    from tokenizers import Tokenizer

    text = (DATA / "eval.txt").read_text()[:60_000]
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)


def test_checkpoint_layout(cfg):
    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    with safe_open(FIXTURE / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    assert set(index["weight_map"]) == names
    n, k, e = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"], cfg["moe_num_experts"]
    moe = [int(i) for i in cfg["moe_layers_enum"].split(",")]
    # 3 global + 12 per dense layer + 17 per MoE layer + 17 per MTP layer (reference §3.6)
    assert len(names) == 3 + 12 * (n - len(moe)) + 17 * len(moe) + 17 * k
    for i in moe:
        assert dtypes[f"model.layers.{i}.moe.router_bias"] == "F32"
        assert shapes[f"model.layers.{i}.moe.gate_proj.weight"] == [e, cfg["moe_intermediate_size"], cfg["hidden_size"]]
        assert f"model.layers.{i}.share_expert.up_proj.weight" in names
    for i in range(n, n + k):
        assert f"model.layers.{i}.transformer.shared_head.output.weight" in names
        assert shapes[f"model.layers.{i}.self_attn.q_proj.weight"][0] == 6 * cfg["head_dim"]  # sliding head count
    assert {d for name, d in dtypes.items() if not name.endswith("router_bias")} == {"BF16"}
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) <= 25_000_000


def test_loads_in_step3p7_classes(model, cfg):
    from transformers.models.step3p7.modeling_step3p7 import Step3p7DecoderLayer, Step3p7TextModel

    assert isinstance(model.model, Step3p7TextModel)
    assert all(isinstance(m.mtp_block, Step3p7DecoderLayer) for m in model.mtp)
    ids = torch.randint(6, cfg["vocab_size"], (2, 40))
    with torch.no_grad():
        logits, hidden = model(ids)
        mtp = model.mtp_logits(ids)
    assert logits.shape == (2, 40, cfg["vocab_size"]) and hidden.shape == (2, 40, cfg["hidden_size"])
    assert [m.shape[1] for m in mtp] == [39, 38]
    assert torch.isfinite(logits).all() and all(torch.isfinite(m).all() for m in mtp)


def test_heldout_quality(model, eval_ids, cfg):
    windows = eval_ids[: 8 * SEQ].view(8, SEQ)
    with torch.no_grad():
        logits, _, mtp = model.forward_with_mtp(windows)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    ppl = nll.exp().item()
    # Random weights give ~1590 on these windows; the trained fixture measures 131.5 (bound: trained vs untrained).
    assert ppl < 0.2 * cfg["vocab_size"], ppl
    # Depth 1 drafts token t+2; measured 0.214 against a most-common-token baseline of 0.050.
    chance = torch.bincount(windows[:, 2:].flatten()).max().item() / windows[:, 2:].numel()
    acc1 = (mtp[0][:, :-1].argmax(-1) == windows[:, 2:]).float().mean().item()
    assert acc1 > max(3 * chance, chance + 0.1), (acc1, chance)


def test_sliding_window_is_applied(model):
    ids = torch.randint(6, 1536, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        windowed, _ = model(ids)
        windowed_mtp = model.mtp_logits(ids)[0]
        # transformers' own forward builds its masks from config.sliding_window: must agree with ours.
        own = model.lm_head(model.model(ids).last_hidden_state)
        model.sliding_window = None
        try:
            full, _ = model(ids)
            full_mtp = model.mtp_logits(ids)[0]
        finally:
            model.sliding_window = model.config.sliding_window
    w = model.config.sliding_window
    assert w == 64
    torch.testing.assert_close(own, windowed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full[:, :w], windowed[:, :w], atol=1e-4, rtol=1e-4)
    assert (full[:, w:] - windowed[:, w:]).abs().amax() > 1e-2
    assert (full_mtp[:, w:] - windowed_mtp[:, w:]).abs().amax() > 1e-2


def test_no_future_leak(model):
    """Trunk logits at t see tokens <= t; MTP depth k at t sees tokens <= t+k."""
    ids = torch.randint(6, 1536, (1, 48), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    j = 30
    changed[0, j] = (ids[0, j] + 1) % 1536
    with torch.no_grad():
        (a, _, am), (b, _, bm) = model.forward_with_mtp(ids), model.forward_with_mtp(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j])
    assert (a[:, j] - b[:, j]).abs().amax() > 0
    for k, (x, y) in enumerate(zip(am, bm), start=1):
        torch.testing.assert_close(x[:, : j - k], y[:, : j - k])
        assert (x[:, j - k] - y[:, j - k]).abs().amax() > 0


def test_mtp_chain_matches_single_pass(model):
    ids = torch.randint(6, 1536, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, mtp = model.forward_with_mtp(ids)
        again = model.mtp_logits(ids)
    for a, b in zip(mtp, again):
        torch.testing.assert_close(a, b)


def test_tokenizer(tokenizer, cfg):
    for i, s in enumerate(SPECIALS):
        assert tokenizer.convert_tokens_to_ids(s) == i
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    assert len(tokenizer) == cfg["vocab_size"]
    text = "def f(x):\n    return x ** 2  # héllo 世界 12345\r\n\tpass\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # merges learned
    user = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert chat == "<｜begin▁of▁sentence｜><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    gen = json.loads((FIXTURE / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == [1, 2] == cfg["eos_token_id"]


def test_pretokenizer_is_deepseek_v3():
    from tokenizers import Tokenizer

    spec = json.loads((FIXTURE / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "Split", "Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == r"\p{N}{1,3}"
    assert pre["pretokenizers"][-1]["use_regex"] is False
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x 12345 .foo")]
    assert pieces == ["x", "Ġ", "123", "45", "Ġ.", "foo"]
