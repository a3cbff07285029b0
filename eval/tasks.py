"""lm-eval task scores for any `LogitsModel`, offline.

`StepqLM` is a custom lm-eval LM (registered as "stepq") over a `LogitsModel` and the model's tokenizer: lm-eval
builds the requests and does all the scoring, this module only turns requests into forward passes.
`run_tasks` runs a list of tasks and keeps one headline metric per task; `compare_tasks` sets a quantized model's
headline scores against the BF16 reference's.

Tasks: local task YAMLs in a folder (the bundled fixture's are in `FIXTURE_TASK_DIR`, built by
`fixtures/make_tasks.py`), or lm-eval's own task names (gsm8k, mmlu, ...) for the real model. lm-eval's own tasks
are only indexed when one of them is asked for, and need their datasets already in the Hugging Face datasets cache:
everything runs with HF_HUB_OFFLINE=1, so a missing dataset fails at once instead of downloading.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from eval.models import LogitsModel

log = logging.getLogger(__name__)

FIXTURE_TASK_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-step35-data" / "tasks"
FIXTURE_TASKS = ["tiny_step35_word_order", "tiny_step35_next_symbol", "tiny_step35_perplexity"]
# Task templates write this where lm-eval needs the folder's absolute path (data_files resolve against the CWD).
TASK_DIR_PLACEHOLDER = "@TASK_DIR@"
# Metrics where a lower score is better, for score dicts that do not say (lm-eval's own flag is used when known).
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
DEFAULT_MAX_LENGTH = 2048


class _TextTokenizer:
    """Encode/decode without special tokens, from a `tokenizers.Tokenizer` or a transformers tokenizer.

    BOS/EOS: a transformers tokenizer knows them; a bare `tokenizers.Tokenizer` does not (pass them explicitly,
    e.g. from generation_config.json).
    """

    def __init__(self, tokenizer, bos_token_id: int | None, eos_token_ids: list[int] | None):
        backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers' fast tokenizers wrap one
        self.tok = backend if backend is not None else tokenizer
        if bos_token_id is None:
            bos_token_id = getattr(tokenizer, "bos_token_id", None)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.bos_token_id, self.eos_token_ids = bos_token_id, list(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def split_encode(self, text: str, at: int) -> tuple[list[int], list[int]]:
        """Tokenize text whole -> (tokens ending at or before character `at`, the rest)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        n = sum(1 for _, end in enc.offsets if end <= at)
        return enc.ids[:n], enc.ids[n:]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@register_model("stepq")
class StepqLM(TemplateLM):
    """lm-eval LM over a `LogitsModel`.

    Contexts start with BOS (how Step-3.5 sees a document); sequences longer than `max_length` keep their last
    `max_length` tokens; `loglikelihood_rolling` scores a document in windows of `max_length` tokens.
    `generate_until` is greedy (sampling settings are ignored): it recomputes the whole sequence's logits every
    step, which is fine for the tiny fixture and for backends without a KV cache.
    Batches are right-padded: the models are causal, so padding after a sequence never changes its logits.
    Built in Python (`StepqLM(model, tokenizer)`); lm-eval's CLI cannot pass a LogitsModel through --model_args.
    """

    def __init__(self, model: LogitsModel, tokenizer, max_length: int | None = None, batch_size: int = 8,
                 bos_token_id: int | None = None, eos_token_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.text = _TextTokenizer(tokenizer, bos_token_id, eos_token_ids)
        self._max_length = max_length or getattr(model, "max_length", None) or DEFAULT_MAX_LENGTH
        self.batch_size = int(batch_size)

    # ---- what TemplateLM needs ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.text.eos_token_ids[0] if self.text.eos_token_ids else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (or the first rolling window) is conditioned on: BOS, else EOS."""
        if self.text.bos_token_id is not None:
            return self.text.bos_token_id
        if self.text.eos_token_ids:
            return self.text.eos_token_ids[0]
        raise ValueError("the tokenizer has neither BOS nor EOS: pass bos_token_id or eos_token_ids")

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.text.encode(string)
        bos = self.text.bos_token_id
        if add_special_tokens is not False and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.text.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize context + continuation as one text; a token straddling the boundary belongs to the continuation.

        lm-eval's default takes `whole[len(encode(context)):]`, which drops the first continuation tokens when a
        merge crosses the boundary (this tokenizer makes one token of "):\n": a context ending in "):" + a
        continuation "\n    return x" would be scored as " return x" only).
        """
        ctx, cont = self.text.split_encode(context + continuation, len(context))
        bos = self.text.bos_token_id
        return ([bos] if bos is not None else []) + ctx, cont

    # ---- forward passes ----------------------------------------------------------------------------------------
    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Right-padded batch -> float32 logits [B, T, V]."""
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.prefix_token_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        with torch.inference_mode():
            return self.model.logits(ids).float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key, context ids, continuation ids)] -> [(sum log p(continuation), all greedy)]."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first: similar lengths share a batch, so little padding
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            # input = (context + continuation)[:-1], left-truncated to max_length; the last len(cont) positions
            # predict the continuation
            if any(len(requests[i][2]) > self.max_length for i in idx):
                raise ValueError(f"a continuation is longer than max_length={self.max_length} tokens")
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in idx]
            logits = self._logits(inputs)
            for row, i in enumerate(idx):
                cont = requests[i][2]
                end = len(inputs[row])
                logprobs = F.log_softmax(logits[row, end - len(cont):end], dim=-1)
                target = torch.tensor(cont, dtype=torch.long)
                ll = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, text in zip(idx, self._generate_batch([requests[i].args for i in idx])):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate_batch(self, args: list[tuple[str, dict]]) -> list[str]:
        """Greedy decoding of a batch; a sequence stops at EOS, at the first `until` string or after max_gen_toks."""
        settings = [normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256) for _, gen_kwargs in args]
        if any(s.get("do_sample") for s in settings):
            log.warning("stepq LM decodes greedily: do_sample / temperature are ignored")
        seqs, generated, texts = [], [], [""] * len(args)
        for (context, _), s in zip(args, settings):
            keep = max(self.max_length - s["max_gen_toks"], 1)  # room for the answer, as lm-eval's HF backend
            seqs.append(self.tok_encode(context)[-keep:])
            generated.append([])
        active = list(range(len(args)))
        while active:
            logits = self._logits([seqs[i] + generated[i] for i in active])
            still = []
            for row, i in enumerate(active):
                token = int(logits[row, len(seqs[i]) + len(generated[i]) - 1].argmax())
                if token in self.text.eos_token_ids:
                    continue
                generated[i].append(token)
                texts[i] = self.tok_decode(generated[i])
                stops = [texts[i].find(u) for u in settings[i]["until"] if u and u in texts[i]]
                if stops:
                    texts[i] = texts[i][:min(stops)]
                elif len(generated[i]) < settings[i]["max_gen_toks"]:
                    still.append(i)
            active = still
        return texts


# ---- running tasks ---------------------------------------------------------------------------------------------

def _render_task_dir(task_dir: Path, out: Path) -> None:
    """Copy the task YAMLs with the placeholder replaced by task_dir's absolute path."""
    for template in sorted(task_dir.glob("*.yaml")):
        text = template.read_text(encoding="utf-8")
        (out / template.name).write_text(text.replace(TASK_DIR_PLACEHOLDER, str(task_dir.resolve())), "utf-8")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 for the duration, also for huggingface_hub and datasets if they were
    imported already (both read the variables once, at import)."""
    import datasets.config
    import huggingface_hub.constants

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(mod, name) for mod, name in flags]
    os.environ.update({k: "1" for k in env})
    for mod, name in flags:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for (mod, name), value in zip(flags, saved):
            setattr(mod, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_manager(tasks: list[str], include_path: str | None):
    """Local tasks only, unless a task is not defined there: indexing lm-eval's ~thousands of tasks takes seconds."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if local is not None and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=include_path, include_defaults=True)


def _headline(task: str, results: dict) -> tuple[str, float, bool]:
    """(metric key, score, higher_is_better): the task config's first metric under its first filter.

    Groups (e.g. mmlu) have no config of their own: their first aggregated metric.
    """
    scores = results["results"][task]
    config = results.get("configs", {}).get(task)
    if config and config.get("metric_list"):
        metric = config["metric_list"][0]["metric"]
        filters = config.get("filter_list") or [{"name": "none"}]
        key = f"{metric},{filters[0]['name']}"
    else:
        key = next(k for k, v in scores.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float)))
    metric = key.split(",")[0]
    higher = results.get("higher_is_better", {}).get(task, {}).get(metric, metric not in LOWER_IS_BETTER)
    return key, float(scores[key]), bool(higher)


def _n_items(task: str, results: dict) -> int:
    n_samples = results.get("n-samples", {})
    if task in n_samples:
        return int(n_samples[task]["effective"])
    leaves = results.get("group_subtasks", {}).get(task, [])
    return sum(_n_items(t, results) for t in leaves)


def run_tasks(model: LogitsModel, tokenizer, tasks: list[str], task_dir: Path | None, limit: int | None = None,
              *, max_length: int | None = None, batch_size: int = 8, bos_token_id: int | None = None,
              eos_token_ids: list[int] | None = None) -> dict[str, dict]:
    """Run lm-eval tasks on `model` offline -> {task: {"metric", "score", "n", "higher_is_better"}}.

    tokenizer: the model's tokenizer (transformers, as `calib.data.load_tokenizer` returns it, or a bare
    `tokenizers.Tokenizer` plus bos_token_id / eos_token_ids). task_dir: a folder of task YAML templates
    (`FIXTURE_TASK_DIR` for the fixture); tasks not defined there are looked up among lm-eval's own, whose
    datasets must already be in the local cache. limit: at most this many items per task, the first ones (the
    fixture's rows are stored in random order). The headline metric of a task is the first of its YAML's
    metric_list under its first filter ("acc,none", "exact_match,first_run", "bits_per_byte,none"); "n" counts
    the items scored.
    """
    import lm_eval

    lm = StepqLM(model, tokenizer, max_length=max_length, batch_size=batch_size, bos_token_id=bos_token_id,
                 eos_token_ids=eos_token_ids)
    with _offline(), tempfile.TemporaryDirectory(prefix="stepq-tasks-") as rendered:
        if task_dir is not None:
            _render_task_dir(Path(task_dir), Path(rendered))
        manager = _task_manager(tasks, rendered if task_dir is not None else None)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
            bootstrap_iters=0,  # no stderr: the gate compares point scores, and bootstrapping perplexities is slow
            log_samples=False, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
            fewshot_random_seed=1234)
    out = {}
    for task in tasks:
        key, score, higher = _headline(task, results)
        out[task] = {"metric": key, "score": score, "n": _n_items(task, results), "higher_is_better": higher}
    return out


def compare_tasks(scores: dict[str, dict], ref_scores: dict[str, dict]) -> dict[str, dict]:
    """Headline scores of a model against the reference's -> {task: {"metric", "score", "score_ref", "recovery"}}.

    recovery = score / score_ref when higher is better (accuracy, exact match) and score_ref / score when lower is
    better (perplexity, bits per byte): either way recovery < 1 means worse than the reference, 1 means as good.
    Direction: the entry's `higher_is_better` (from lm-eval), else the metric name (`LOWER_IS_BETTER`).
    A zero denominator gives nan (undefined) unless both scores are equal (then 1). Tasks missing from
    ref_scores, or scored with another metric, are left out.
    """
    out = {}
    for task, entry in scores.items():
        ref = ref_scores.get(task)
        if ref is None or ref["metric"] != entry["metric"]:
            continue
        metric = entry["metric"].split(",")[0]
        higher = entry.get("higher_is_better", metric not in LOWER_IS_BETTER)
        num, den = (entry["score"], ref["score"]) if higher else (ref["score"], entry["score"])
        recovery = 1.0 if num == den else num / den if den else math.nan
        out[task] = {"metric": entry["metric"], "score": entry["score"], "score_ref": ref["score"],
                     "recovery": recovery}
    return out
