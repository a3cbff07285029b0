"""What the evals run: anything that turns token ids into next-token logits.

Backends: the BF16 source and safetensors artifacts through stepq's forward (`eval.forward`), GGUF through
llama.cpp (`eval.gguf_logits`). lm-eval tasks (`eval.tasks`) and the accuracy metrics only see this interface.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LogitsModel(Protocol):
    name: str
    vocab_size: int

    def logits(self, ids: torch.LongTensor) -> torch.Tensor:
        """ids [B, T] -> float32 logits [B, T, V]; position t predicts token t+1."""
        ...

    def close(self) -> None: ...
