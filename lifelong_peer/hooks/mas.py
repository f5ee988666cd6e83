"""MAS, Memory Aware Synapses (Aljundi et al. 2018): protect the shared weights the model's output is
most sensitive to, whatever the loss — importance needs no labels.

    Ω = mean over batches of |∂‖f(x)‖²/∂θ|     f(x): the logits (B, T, V); ‖·‖² summed over V, averaged over tokens
    penalty = mas · Σ Ω (θ − θ_prev)²           (the paper's Eq. 3, on shared weights)

Ω is measured at each phase's end on ``ewc_batches`` batches of the slice just trained and accumulated
across phases (the paper's cumulative importance); θ_prev is the model at the phase's start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import regularize
from .regularizers import ImportanceWeighted


def mas_importance(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Ω of every shared weight: mean over ``batches`` (B, T+1) of |∂‖f(x)‖²/∂θ|, in eval mode."""
    params = regularize.shared_parameters(model)
    omega = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    for batch in batches:
        logits, _ = model(batch[:, :-1])
        sensitivity = logits.float().pow(2).sum(-1).mean()  # ‖f(x)‖² per token, averaged
        grads = torch.autograd.grad(sensitivity, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                omega[name] += g.detach().abs() / len(batches)
    model.train(was_training)
    return omega


def mas_penalty(model: nn.Module, anchor: dict[str, Tensor], omega: dict[str, Tensor]) -> Tensor:
    """Σ Ω (θ − θ_anchor)² over shared weights."""
    terms = [
        (omega[name] * (p - anchor[name]).pow(2)).sum()
        for name, p in regularize.shared_parameters(model).items()
        if name in omega and name in anchor
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class MAS(ImportanceWeighted):
    name = "mas"
    salt = -3

    @classmethod
    def from_config(cls, tc) -> MAS | None:
        return cls(tc.mas, tc.ewc_batches) if tc.mas > 0 else None

    def measure(self, model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
        return mas_importance(model, batches)

    def formula(self, model: nn.Module, anchor: dict[str, Tensor], importance: dict[str, Tensor]) -> Tensor:
        return mas_penalty(model, anchor, importance)
