"""lm-eval tasks through `eval.tasks`: the custom LM's three request types, the bundled fixture's tasks (BF16 scores
clearly above chance, a damaged model's recovery clearly below 1), and recovery arithmetic."""

import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from calib.data import load_tokenizer
from calib.reference import load_reference
from convert.fixtures import BUNDLED_FIXTURE
from eval.tasks import FIXTURE_TASK_DIR, FIXTURE_TASKS, StepqLM, compare_tasks, run_tasks

# Items per task in the fixture runs (the task files hold 200 / 100 / 50; rows are stored in random order).
LIMIT = 60
BOS, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matrices run faster on one thread


class ReferenceLogits:
    """LogitsModel over calib.reference's ReferenceModel (eval.forward is the real backend)."""

    def __init__(self, model, name="bf16"):
        self.model, self.name, self.vocab_size = model, name, model.config.vocab_size

    def logits(self, ids):
        return self.model(ids)[0].float()

    def close(self):
        pass


class BigramLogits:
    """Logits that depend only on the current token: every score has a closed form, whatever the windowing."""

    name = "bigram"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(0)) * 3
        self.calls = 0

    def logits(self, ids):
        self.calls += 1
        return self.table[ids]

    def close(self):
        pass

    def logprob(self, prev: int, nxt: int) -> float:
        return F.log_softmax(self.table[prev], -1)[nxt].item()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_FIXTURE)


@pytest.fixture(scope="module")
def chance():
    return json.loads((FIXTURE_TASK_DIR / "baselines.json").read_text())


@pytest.fixture(scope="module")
def bf16_scores(tokenizer):
    return run_tasks(ReferenceLogits(load_reference(BUNDLED_FIXTURE)), tokenizer, FIXTURE_TASKS, FIXTURE_TASK_DIR,
                     limit=LIMIT)


# ---- the LM on a model with closed-form answers ----------------------------------------------------------------

def test_registered_under_stepq():
    assert get_model("stepq") is StepqLM


def test_loglikelihood_matches_closed_form(tokenizer):
    """Context + continuation tokenized as one text; every continuation token is scored, including one that a
    merge across the boundary makes ("):\n"), conditioned on the tokens before it."""
    bigram = BigramLogits(1536)
    lm = StepqLM(bigram, tokenizer, batch_size=3)
    pairs = [("def f(x):", "\n    return x"), ("import os", "\nimport sys"), ("a = 1", " + 2"), ("x", ".y")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        whole = [BOS] + tokenizer.encode(context + continuation, add_special_tokens=False)
        ends = [len(tokenizer.decode(whole[1:t + 1])) for t in range(1, len(whole))]  # ASCII: chars = bytes
        first = 1 + sum(end <= len(context) for end in ends)  # first token reaching into the continuation
        want = sum(bigram.logprob(whole[t - 1], whole[t]) for t in range(first, len(whole)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert tokenizer.decode(whole[first:]).endswith(continuation)
        want_greedy = all(bigram.table[whole[t - 1]].argmax() == whole[t] for t in range(first, len(whole)))
        assert greedy == want_greedy
    assert bigram.calls == 2  # 4 requests in batches of 3


def test_loglikelihood_rolling_windows_cover_every_token_once(tokenizer):
    """Windows of max_length tokens: a bigram model gives the same total as one pass over BOS + the text."""
    bigram = BigramLogits(1536)
    text = (FIXTURE_TASK_DIR / "perplexity.jsonl").read_text().splitlines()[0]
    ids = [BOS] + tokenizer.encode(text, add_special_tokens=False)
    want = sum(bigram.logprob(ids[t - 1], ids[t]) for t in range(1, len(ids)))
    lm = StepqLM(bigram, tokenizer, max_length=16)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert len(ids) > 3 * 16  # several windows
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_is_greedy_and_stops(tokenizer):
    bigram = BigramLogits(1536)
    bigram.table[:, EOS] = -1e9  # no early EOS: the stop rules below decide
    lm = StepqLM(bigram, tokenizer)
    context = "def f(x):\n    return"
    chain = [tokenizer.encode(context, add_special_tokens=False)[-1]]
    for _ in range(8):
        chain.append(int(bigram.table[chain[-1]].argmax()))
    greedy_text = tokenizer.decode(chain[1:])
    five = tokenizer.decode(chain[1:6])
    stop = greedy_text[len(five) - 2:len(five)]  # a string that first shows up within the first 5 tokens
    first = greedy_text.find(stop)
    reqs = [Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 5}), 0),
            Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 8}), 1)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert got[0] == five
    assert got[1] == greedy_text[:first] and stop not in got[1]


def test_generate_until_stops_at_eos(tokenizer):
    bigram = BigramLogits(1536)
    bigram.table[:, EOS] = 1e9  # EOS always wins
    lm = StepqLM(bigram, tokenizer)
    (got,) = lm.generate_until([Instance("generate_until", {}, ("x = ", {"until": ["\n"], "max_gen_toks": 9}), 0)],
                               disable_tqdm=True)
    assert got == ""


# ---- the fixture's tasks ---------------------------------------------------------------------------------------

def test_bf16_fixture_scores_clearly_above_chance(bf16_scores, chance):
    assert set(bf16_scores) == set(FIXTURE_TASKS)
    word_order, symbol, ppl = (bf16_scores[t] for t in FIXTURE_TASKS)
    assert (word_order["metric"], symbol["metric"], ppl["metric"]) == (
        "acc,none", "exact_match,first_run", "bits_per_byte,none")
    assert [word_order["n"], symbol["n"], ppl["n"]] == [LIMIT, LIMIT, 50]
    # Measured: 0.883 / 0.367 / 2.07 on these items, 0.895 / 0.40 / 2.07 on the full files (chance 0.25 / 0.19 / 3.59)
    assert word_order["score"] > 2.5 * chance["tiny_step35_word_order"]["chance"]
    assert symbol["score"] > 1.5 * chance["tiny_step35_next_symbol"]["chance"]
    assert ppl["score"] < 0.7 * chance["tiny_step35_perplexity"]["chance"]
    assert not ppl["higher_is_better"] and word_order["higher_is_better"]


def test_damaged_model_recovers_clearly_less(bf16_scores, tokenizer):
    """Noise with twice each matrix's own std on every weight matrix: every task's recovery drops below 0.9.

    (Noise on the routed experts alone barely moves these scores: the tiny model's skill sits mostly in its
    embeddings, attention and shared experts.)
    """
    model = load_reference(BUNDLED_FIXTURE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 2)
    damaged = run_tasks(ReferenceLogits(model, "noisy"), tokenizer, FIXTURE_TASKS, FIXTURE_TASK_DIR, limit=LIMIT)
    recovery = compare_tasks(damaged, bf16_scores)
    assert set(recovery) == set(FIXTURE_TASKS)
    for task, r in recovery.items():
        assert r["recovery"] < 0.9, (task, r)
    assert damaged["tiny_step35_perplexity"]["score"] > bf16_scores["tiny_step35_perplexity"]["score"]
    assert all(r["recovery"] == 1.0 for r in compare_tasks(bf16_scores, bf16_scores).values())


# ---- recovery arithmetic ---------------------------------------------------------------------------------------

def test_compare_tasks_direction_and_missing_tasks():
    ref = {"mc": {"metric": "acc,none", "score": 0.8, "n": 10},
           "ppl": {"metric": "bits_per_byte,none", "score": 2.0, "n": 10},
           "only_ref": {"metric": "acc,none", "score": 0.5, "n": 10}}
    quant = {"mc": {"metric": "acc,none", "score": 0.6, "n": 10},
             "ppl": {"metric": "bits_per_byte,none", "score": 2.5, "n": 10},  # direction from the metric name
             "only_quant": {"metric": "acc,none", "score": 0.5, "n": 10}}
    got = compare_tasks(quant, ref)
    assert set(got) == {"mc", "ppl"}
    assert got["mc"] == {"metric": "acc,none", "score": 0.6, "score_ref": 0.8, "recovery": pytest.approx(0.75)}
    assert got["ppl"]["recovery"] == pytest.approx(0.8)  # worse perplexity: recovery < 1 as for accuracy
    flagged = {"mc": {**quant["mc"], "higher_is_better": False}}  # lm-eval's own flag wins over the name
    assert compare_tasks(flagged, ref)["mc"]["recovery"] == pytest.approx(0.8 / 0.6)
    zero = compare_tasks({"mc": {**quant["mc"], "score": 0.0}}, {"mc": {**ref["mc"], "score": 0.0}})
    assert zero["mc"]["recovery"] == 1.0
