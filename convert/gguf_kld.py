"""Quality of a GGUF against a base GGUF through llama.cpp's own tools, shared by the GGUF tests and
bench/gguf_quality.py: `llama-perplexity --kl-divergence-base / --kl-divergence` (mean and percentile KLD,
"Same top p" = top-1 agreement, PPL), `llama-perplexity` PPL, `llama-imatrix`, `llama-quantize`.

The summaries are parsed from the tools' logs. llama.cpp logs through an asynchronous worker that can lose the
last lines at exit (exit code 0 nonetheless), and "Same top p" is the very last line: a run whose log misses a
field is repeated (the figures are deterministic for fixed -c/-b/-t and backend).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convert.gguf_tools import run

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
KLD_FIELDS = {  # name -> pattern of its line in llama-perplexity's KL-divergence summary (perplexity.cpp)
    "ppl": re.compile(rf"Mean PPL\(Q\)\s*:\s*{_NUM}"),
    "ppl_base": re.compile(rf"Mean PPL\(base\)\s*:\s*{_NUM}"),
    "kld_mean": re.compile(rf"Mean\s+KLD:\s*{_NUM}"),
    "kld_mean_se": re.compile(rf"Mean\s+KLD:\s*\S+\s*±\s*{_NUM}"),
    "kld_max": re.compile(rf"Maximum KLD:\s*{_NUM}"),
    "kld_p99_9": re.compile(rf"99\.9%\s+KLD:\s*{_NUM}"),
    "kld_p99": re.compile(rf"99\.0%\s+KLD:\s*{_NUM}"),
    "kld_median": re.compile(rf"Median\s+KLD:\s*{_NUM}"),
    "rms_dp_pct": re.compile(rf"RMS Δp\s*:\s*{_NUM}"),
    "same_top_pct": re.compile(rf"Same top p:\s*{_NUM}"),
}
PPL_RE = re.compile(rf"Final estimate: PPL = {_NUM}")


def threads() -> int:
    return int(os.environ.get("STEPQ_LLAMA_THREADS") or min(2, os.cpu_count() or 1))


def tool_fields(name: str, args: list, patterns: dict[str, re.Pattern], tries: int = 8) -> dict[str, float]:
    """Run a llama.cpp tool until its log holds every pattern; -> {field: value}."""
    out = ""
    for _ in range(tries):
        p = run(name, [*args, "-t", threads()])
        out = p.stdout + p.stderr
        found = {k: pat.search(out) for k, pat in patterns.items()}
        if all(found.values()):
            return {k: float(m.group(1)) for k, m in found.items()}
    missing = [k for k, pat in patterns.items() if not pat.search(out)]
    raise RuntimeError(f"{name} {' '.join(map(str, args))}: no {missing} in its log after {tries} runs:\n"
                       f"{out[-2000:]}")


def perplexity(model: Path, text: Path, ctx: int, chunks: int) -> float:
    return tool_fields("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks],
                       {"ppl": PPL_RE})["ppl"]


def kld_base(model: Path, text: Path, ctx: int, chunks: int, out: Path) -> float:
    """Save the base model's log-probs on `chunks` x `ctx` tokens of `text` to `out`; -> its PPL."""
    return tool_fields("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks,
                                            "--kl-divergence-base", out], {"ppl": PPL_RE})["ppl"]


def kld(model: Path, base: Path) -> dict[str, float]:
    """KLD / top-1 / PPL of `model` against the saved base (same tokens, same -c as the base run)."""
    return tool_fields("llama-perplexity", ["-m", model, "--kl-divergence-base", base, "--kl-divergence"],
                       KLD_FIELDS)


def llama_imatrix(model: Path, text: Path, ctx: int, chunks: int, out: Path) -> Path:
    """llama.cpp's own importance matrix of `model` on `chunks` x `ctx` tokens of `text` (GGUF format)."""
    run("llama-imatrix", ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "--no-ppl", "-o", out,
                          "-t", threads()])
    return out


def quantize(src: Path, dst: Path, qtype: str, imatrix: Path | None = None, extra_args: list[str] = ()) -> Path:
    """`llama-quantize [--imatrix F] [extra_args] src dst qtype`."""
    run("llama-quantize", [*(["--imatrix", imatrix] if imatrix else []), *extra_args, src, dst, qtype, threads()])
    return dst
