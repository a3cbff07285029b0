"""Accuracy against the BF16 reference on the same tokens (definitions: reference/eval-and-publish.md §4).

P = reference, Q = quantized, teacher-forced; position t predicts token t+1. Full-vocabulary KL in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 4096  # log-softmax of [chunk, V] at a time


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def token_stats(ref_logits: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """ref/q logits [N, T, V], ids [N, T] -> KLD (mean, median, p99, max), top-1 agreement, PPL of both, ratio.

    The last position has no next token: KL and top-1 use every position, perplexity positions 0..T-2."""
    if ref_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(q_logits.shape)}")
    n, t, _ = ref_logits.shape
    targets = torch.cat([ids[:, 1:], torch.full((n, 1), -1, dtype=ids.dtype)], dim=1).reshape(-1)
    ref, q = _flat(ref_logits), _flat(q_logits)
    kl, same, nll_r, nll_q = [], [], [], []
    for a in range(0, ref.shape[0], CHUNK_TOKENS):
        lp_r = F.log_softmax(ref[a:a + CHUNK_TOKENS].float(), -1)
        lp_q = F.log_softmax(q[a:a + CHUNK_TOKENS].float(), -1)
        kl.append((lp_r.exp() * (lp_r - lp_q)).sum(-1).clamp(min=0))  # rounding can give -1e-9
        same.append(lp_r.argmax(-1) == lp_q.argmax(-1))
        tgt = targets[a:a + CHUNK_TOKENS]
        keep = tgt >= 0
        nll_r.append(-lp_r[keep].gather(-1, tgt[keep, None]).squeeze(-1))
        nll_q.append(-lp_q[keep].gather(-1, tgt[keep, None]).squeeze(-1))
    kl_all = torch.cat(kl).double()
    mean_r, mean_q = torch.cat(nll_r).double().mean().item(), torch.cat(nll_q).double().mean().item()
    return {
        "kld": {"mean": kl_all.mean().item(), "median": kl_all.median().item(),
                "p99": torch.quantile(kl_all, 0.99).item(), "max": kl_all.max().item()},
        "top1": torch.cat(same).double().mean().item(),
        "ppl": math.exp(mean_q), "ppl_ref": math.exp(mean_r), "ppl_ratio": math.exp(mean_q - mean_r),
        "positions": int(kl_all.numel()),
    }


def mtp_acceptance(trunk_logits: torch.Tensor, mtp_logits: list[torch.Tensor]) -> list[float]:
    """Per MTP depth k: how often the greedy draft equals the model's own greedy next token.

    Depth k at position t drafts token t+1+k; the trunk at position t+k predicts that same token. Teacher-forced
    (the true tokens feed both), so it is the acceptance of each depth given a correct prefix, not a chained run.
    """
    own = trunk_logits.argmax(-1)
    out = []
    for k, m in enumerate(mtp_logits, start=1):
        draft = m.argmax(-1)                        # [N, T-k]
        out.append((draft == own[:, k:]).double().mean().item())
    return out


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """10 log10(sum w^2 / sum (w - w_q)^2); inf for an exact copy."""
    if noise_sq == 0:
        return math.inf
    return 10 * math.log10(signal_sq / noise_sq) if signal_sq > 0 else -math.inf
