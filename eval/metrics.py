"""Accuracy against the BF16 reference on the same tokens (definitions: reference/eval-and-publish.md §4).

P = reference, Q = variant, teacher-forced; position t predicts token t+1. Full-vocabulary KL in nats.

Logits are never kept ([N, T, V] is 8.4 GB per side on the real model). `PositionSink` receives the variant's
logits a block of positions at a time (from the streamed forward, or llama.cpp one sequence at a time), compares
each block with the same rows of the reference's log-probabilities (a memory map, `eval.reference`) and keeps a few
numbers per position (`Positions`). The report's figures come from those: `token_figures`, `acceptance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SUB_ROWS = 256  # positions compared at once: each [SUB_ROWS, V] fp32 temporary is 132 MB on the real vocabulary


@dataclass
class Positions:
    """Per-position figures of a variant against the reference: all the eval keeps of its logits."""

    kl: torch.Tensor            # [N, T] float32: KL(P || Q), every position
    top1: torch.Tensor          # [N, T] bool: argmax log P == argmax log Q
    nll: torch.Tensor           # [N, T-1] float32: -log Q(next token); the last position has no next token
    greedy: torch.Tensor        # [N, T] int64: argmax of the trunk logits (the greedy next token)
    drafts: list[torch.Tensor]  # depth k: [N, T-k] int64, argmax of MTP depth k's logits (token t+1+k)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {"kl": self.kl, "top1": self.top1, "nll": self.nll, "greedy": self.greedy,
                **{f"mtp.{k}": d for k, d in enumerate(self.drafts, start=1)}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Positions:
        depths = sum(1 for name in t if name.startswith("mtp."))
        return cls(t["kl"], t["top1"], t["nll"], t["greedy"], [t[f"mtp.{k}"] for k in range(1, depths + 1)])


def next_token_nll(logprobs: torch.Tensor, ids_row: torch.Tensor, start: int) -> torch.Tensor:
    """-log p(next token) for the positions start.. of `logprobs` [t, V] that have a next token in `ids_row` [T]."""
    targets = ids_row[start + 1:start + 1 + logprobs.shape[0]].to(logprobs.device)
    return -logprobs[:targets.shape[0]].gather(-1, targets[:, None]).squeeze(-1)


class PositionSink:
    """`calib.stream.HeadSink` for a variant: each block of its logits against the reference's log-probabilities
    `ref_logprobs` [N, T, V] (read a block of rows at a time), reduced to `Positions`. `depths`: the MTP depths to
    record (0 for llama.cpp, which hands over trunk logits only)."""

    def __init__(self, ref_logprobs: np.ndarray, ids: torch.Tensor, depths: int):
        n, t = ids.shape
        if tuple(ref_logprobs.shape[:2]) != (n, t):
            raise ValueError(f"reference log-probs {tuple(ref_logprobs.shape)} do not match the tokens {(n, t)}")
        self.ref, self.ids = ref_logprobs, ids
        self.kl = torch.full((n, t), math.nan)  # NaN / -1: not handed over yet
        self.top1 = torch.zeros((n, t), dtype=torch.bool)
        self.nll = torch.full((n, t - 1), math.nan)
        self.greedy = torch.full((n, t), -1, dtype=torch.long)
        self.drafts = [torch.full((n, t - k), -1, dtype=torch.long) for k in range(1, depths + 1)]

    def trunk(self, row: int, start: int, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.ref.shape[-1]:
            raise ValueError(f"vocabulary sizes differ: variant {logits.shape[-1]}, reference {self.ref.shape[-1]}")
        for a in range(0, logits.shape[0], SUB_ROWS):
            q = logits[a:a + SUB_ROWS].float()
            p = slice(start + a, start + a + q.shape[0])
            lp_r = torch.from_numpy(np.array(self.ref[row, p])).to(q.device)  # a copy: the map's pages stay evictable
            lp_q = F.log_softmax(q, -1)
            self.kl[row, p] = (lp_r.exp() * (lp_r - lp_q)).sum(-1).clamp(min=0).cpu()  # rounding can give -1e-9
            self.top1[row, p] = (lp_r.argmax(-1) == lp_q.argmax(-1)).cpu()
            nll = next_token_nll(lp_q, self.ids[row], p.start)
            self.nll[row, p.start:p.start + nll.shape[0]] = nll.cpu()
            self.greedy[row, p] = q.argmax(-1).cpu()

    def mtp(self, depth: int, row: int, start: int, logits: torch.Tensor) -> None:
        if depth <= len(self.drafts):
            self.drafts[depth - 1][row, start:start + logits.shape[0]] = logits.argmax(-1).cpu()

    def positions(self) -> Positions:
        """The figures, once every position was handed over (else RuntimeError: a forward that skipped some)."""
        missing = int(self.kl.isnan().sum()) + int((self.greedy < 0).sum()) + sum(
            int((d < 0).sum()) for d in self.drafts)
        if missing:
            raise RuntimeError(f"{missing} positions never received logits")
        return Positions(self.kl, self.top1, self.nll, self.greedy, self.drafts)


def token_figures(q: Positions, ref_nll: torch.Tensor) -> dict:
    """KLD (mean, median, p99, max), top-1 agreement, PPL of both and their ratio. KL and top-1 use every position,
    perplexity positions 0..T-2 (`ref_nll` [N, T-1]: the reference's NLL of the next token)."""
    kl = q.kl.reshape(-1).double()
    mean_r, mean_q = ref_nll.reshape(-1).double().mean().item(), q.nll.reshape(-1).double().mean().item()
    return {
        "kld": {"mean": kl.mean().item(), "median": kl.median().item(),
                # numpy's quantile (the same linear interpolation): torch.quantile refuses more than 16M positions
                "p99": float(np.quantile(kl.numpy(), 0.99)), "max": kl.max().item()},
        "top1": q.top1.reshape(-1).double().mean().item(),
        "ppl": math.exp(mean_q), "ppl_ref": math.exp(mean_r), "ppl_ratio": math.exp(mean_q - mean_r),
        "positions": int(kl.numel()),
    }


def acceptance(greedy: torch.Tensor, drafts: list[torch.Tensor]) -> list[float]:
    """Per MTP depth k: how often the greedy draft equals the model's own greedy next token.

    Depth k at position t drafts token t+1+k; the trunk at position t+k predicts that same token. Teacher-forced
    (the true tokens feed both), so it is the acceptance of each depth given a correct prefix, not a chained run.
    """
    return [(d == greedy[:, k:]).double().mean().item() for k, d in enumerate(drafts, start=1)]


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """10 log10(sum w^2 / sum (w - w_q)^2); inf for an exact copy."""
    if noise_sq == 0:
        return math.inf
    return 10 * math.log10(signal_sq / noise_sq) if signal_sq > 0 else -math.inf
