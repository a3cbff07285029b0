"""GGUF measurements through llama.cpp: logits for every position (`LlamaCppModel`, an `eval.models.LogitsModel`)
and the acceptance rate of the GGUF's own MTP head as llama.cpp drafts with it (`gguf_mtp_acceptance`).

Logits go through llama-cpp-python's `Llama`. Its `llama_cpp/` package is pure Python over ctypes; `make llama-cpp`
extracts it from the same llama-cpp-python sdist whose vendored llama.cpp it builds, into `<LLAMA_CPP_DIR>/python`,
and `llama_cpp/llama_cpp.py` loads the library from `$LLAMA_CPP_LIB_PATH` at import, which points it at that build.
So the ctypes structs always match the library (one sdist), and nothing is compiled twice.

MTP acceptance goes through `llama-speculative-simple --spec-type draft-mtp`: the Python binding does not expose
the MTP draft API (`llama_set_embeddings_nextn`, ...), and the tool is llama.cpp's own driver of it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from convert.errors import BadInput
from convert.gguf_tools import LLAMA_CPP_PYTHON_VERSION, STAMP, llama_cpp_dir, run
from eval.schema import not_measured

PYTHON_STAMP = ".stepq-extracted"  # written by `make llama-cpp` once the package is in place


def cpu_threads() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def import_llama_cpp():
    """The `llama_cpp` module from the cache, bound to the cached libllama.so; a clear error if either is missing."""
    d = llama_cpp_dir()
    py_dir, lib_dir = d / "python", d / "src" / "build" / "bin"
    missing = [p for p in (py_dir / PYTHON_STAMP, py_dir / "llama_cpp" / "__init__.py", d / STAMP,
                           lib_dir / "libllama.so") if not p.is_file()]
    if missing:
        raise BadInput(f"{missing[0]}: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} and its llama.cpp build are not "
                       f"in {d}; run `make llama-cpp` (LLAMA_CPP_DIR= moves the cache)")
    loaded = sys.modules.get("llama_cpp")
    if loaded is not None and Path(loaded.__file__).resolve().parent != (py_dir / "llama_cpp").resolve():
        raise BadInput(f"{loaded.__file__}: another llama_cpp is already imported; stepq needs the one in {py_dir}")
    # Read once, at the binding's import: set before it, and never let an outside value pick another library.
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    if str(py_dir) not in sys.path:
        sys.path.insert(0, str(py_dir))
    import llama_cpp

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise BadInput(f"{llama_cpp.__file__}: llama-cpp-python {llama_cpp.__version__}, stepq is pinned to "
                       f"{LLAMA_CPP_PYTHON_VERSION}; rerun `make llama-cpp` after removing {py_dir}")
    return llama_cpp


class LlamaCppModel:
    """A GGUF (single file or the first shard of a split) as a `LogitsModel`, on CPU.

    Token ids go in as they are (no tokenizer, no BOS added): the caller feeds the same ids to the reference. Each
    row is one sequence decoded from an empty cache in a single batch of T tokens with logits for every position.
    The llama.cpp context is sized to T (n_ctx = n_batch = n_ubatch = T) and rebuilt when T changes.
    """

    def __init__(self, gguf_path: str | Path, threads: int | None = None):
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such GGUF file")
        self.name = self.path.stem
        self.threads = threads or cpu_threads()
        self._llama_cpp = import_llama_cpp()
        self._llm = None
        self._n_ctx = 0
        # Read the header and vocabulary now (a file llama.cpp cannot read fails here, not mid-eval); the weights
        # are loaded once, by the first logits() call, which knows T.
        self.vocab_size = self._read_vocab_size()

    def _read_vocab_size(self) -> int:
        try:
            probe = self._llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise BadInput(f"{self.path}: llama.cpp cannot load this GGUF ({e})") from e
        try:
            return probe.n_vocab()
        finally:
            probe.close()

    def _open(self, n_ctx: int) -> None:
        self.close()
        self._llm = self._llama_cpp.Llama(
            model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=self.threads,
            n_threads_batch=self.threads, logits_all=True, n_gpu_layers=0, verbose=False)
        self._n_ctx = n_ctx

    @torch.no_grad()
    def logits(self, ids: torch.LongTensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        b, t = ids.shape
        if not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab_size:
            raise ValueError(f"token ids outside the vocabulary of {self.path.name} ({self.vocab_size})")
        if t != self._n_ctx:
            self._open(t)
        out = torch.empty(b, t, self.vocab_size, dtype=torch.float32)
        for row, seq in enumerate(ids.tolist()):
            self._llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache before decoding
            self._llm.eval(seq)
            out[row] = torch.from_numpy(self._llm.scores[:t])  # float32 [T, V], copied into out
        return out

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._n_ctx = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- MTP acceptance ----------------------------------------------------------------------------------------------

@dataclass
class MtpDraftRun:
    drafted: int
    accepted: int
    log: str


def has_mtp_tensors(gguf_path: str | Path) -> bool:
    """Whether the GGUF (with its split siblings) holds `blk.N.nextn.*` tensors: read from the headers, because
    llama.cpp's "doesn't contain MTP layers" message can be lost from its asynchronous log at exit."""
    from gguf import GGUFReader

    path = Path(gguf_path)
    split = re.fullmatch(r"(.*)-\d{5}-of-(\d{5})\.gguf", path.name)
    files = sorted(path.parent.glob(f"{split[1]}-*-of-{split[2]}.gguf")) if split else [path]
    return any(".nextn." in t.name for f in files for t in GGUFReader(f).tensors)


def mtp_draft_run(gguf_path: str | Path, prompt: str, n_predict: int, n_draft: int = 1, threads: int | None = None,
                  n_ctx: int = 4096, draft_model: str | Path | None = None, attempts: int = 6) -> MtpDraftRun:
    """One greedy `llama-speculative-simple --spec-type draft-mtp` generation drafting with the GGUF's MTP head
    (or with the draft-only GGUF `draft_model`, passed as `--spec-draft-model`).

    n_draft tokens are drafted per step (llama.cpp chains Step-3.5's heads, one per draft token, and caps n_draft at
    their count). The tool prints its n_drafted/n_accept summary through an asynchronous logger that can lose the
    last lines at exit; greedy generation is deterministic, so a run whose summary was lost is repeated.
    """
    if draft_model is None and not has_mtp_tensors(gguf_path):
        raise BadInput(f"{gguf_path}: no MTP layers (written with --no-mtp?); MTP drafting needs them")
    args = ["-m", gguf_path, "--spec-type", "draft-mtp", "--spec-draft-n-max", n_draft, "-p", prompt,
            "-n", n_predict, "--temp", 0, "-c", n_ctx, "-t", threads or cpu_threads(), "--seed", 1,
            *(["--spec-draft-model", draft_model] if draft_model else [])]
    for _ in range(attempts):
        p = run("llama-speculative-simple", args)
        log = p.stdout + p.stderr
        if "creating MTP draft context" not in log:  # drafting any other way would measure something else
            raise RuntimeError(f"{gguf_path}: llama-speculative-simple did not draft with the MTP head:\n"
                               f"{log[-3000:]}")
        drafted, accepted = re.search(r"n_drafted\s*=\s*(\d+)", log), re.search(r"n_accept\s*=\s*(\d+)", log)
        if drafted and accepted:
            return MtpDraftRun(int(drafted.group(1)), int(accepted.group(1)), log)
    raise RuntimeError(f"llama-speculative-simple printed no n_drafted/n_accept summary in {attempts} runs on "
                       f"{gguf_path}:\n{log[-3000:]}")


def gguf_mtp_acceptance(gguf_path: str | Path, prompts_text: str | Sequence[str], n_predict: int = 64,
                        n_draft: int = 1, threads: int | None = None, n_ctx: int = 4096) -> dict:
    """MTP draft acceptance of a GGUF in llama.cpp over held-out prompts, greedy: accepted / drafted tokens summed
    over the prompts (one generation of n_predict tokens each). n_draft=1 measures the first MTP head alone."""
    prompts = [prompts_text] if isinstance(prompts_text, str) else list(prompts_text)
    if not prompts:
        raise ValueError("no prompts")
    runs = [mtp_draft_run(gguf_path, p, n_predict, n_draft, threads, n_ctx) for p in prompts]
    drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    acceptance = accepted / drafted if drafted else not_measured(f"nothing drafted in {n_predict} tokens")
    return {"drafted": drafted, "accepted": accepted, "acceptance": acceptance,
            "n_draft": n_draft, "n_predict": n_predict, "prompts": len(prompts)}
