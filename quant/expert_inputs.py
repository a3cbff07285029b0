"""Input scales of routed experts that calibration never reached.

An expert no calibration token was routed to has no input statistics of its own, yet the engine may route tokens
to it at run time. Its static input scale then comes from the largest input absmax among its siblings in the same
layer and projection: its activations do not saturate, at the price of a coarser scale. Pure functions over the
per-expert statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

FALLBACK_REASON = "no calibration tokens; input scale from the max over the layer's experts"


def expert_input_amax(own: torch.Tensor, tokens: int, siblings: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
    """The input absmax an expert's static scale is computed from: its own (`own`, over `tokens` calibration
    tokens) when it saw any, else the max of `siblings()`, the input absmaxes of every expert of the same layer and
    projection (asked for only then: 288 per stack on the real model)."""
    return own if tokens > 0 else torch.stack(list(siblings())).amax()
