"""Regularisers for continual training — each a small function of (model, anchors, batch) (issue 4).

"Shared" weights are everything outside the PEER expert tables and sub-keys: attention, dense FFNs,
embeddings, norms, query networks. RESEARCH.md: forgetting lives mostly in them, and old inputs can be
re-routed when they drift (routing interference), so they are what L2-SP, EWC and distillation protect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXPERT_TABLES = ("U", "V", "subkeys")


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name → parameter for every trainable weight that is not a PEER expert table or sub-key set."""
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and name.rsplit(".", 1)[-1] not in EXPERT_TABLES
    }


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm of ``model`` in eval mode: it normalises with, and no longer updates, its running
    statistics. Frozen shared weights need this (``train_shared=False``): in training mode the PEER query
    BatchNorm re-estimates them on the new slice, which re-routes old tokens although no weight moved."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the shared weights: the anchor of L2-SP and EWC."""
    return {name: p.detach().clone() for name, p in shared_parameters(model).items()}


def l2sp(model: nn.Module, anchor: dict[str, Tensor]) -> Tensor:
    """½ Σ ‖θ − θ_anchor‖² over shared weights (L2-SP, Li et al. 2018)."""
    terms = [(p - anchor[name]).pow(2).sum() for name, p in shared_parameters(model).items() if name in anchor]
    return 0.5 * torch.stack(terms).sum() if terms else torch.zeros(())


def ewc(model: nn.Module, anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> Tensor:
    """½ Σ F (θ − θ_anchor)² over shared weights (EWC, Kirkpatrick et al. 2017, diagonal Fisher)."""
    terms = [
        (fisher[name] * (p - anchor[name]).pow(2)).sum()
        for name, p in shared_parameters(model).items()
        if name in fisher and name in anchor
    ]
    return 0.5 * torch.stack(terms).sum() if terms else torch.zeros(())


def distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """KL(teacher ‖ student) on softened distributions, scaled by T² (Hinton et al. 2015); logits (..., V).

    The mean over positions; with ``mask`` (...) bool, positions outside it count as zero (still in the mean).
    """
    t = temperature
    student, teacher = (
        F.log_softmax(student_logits.flatten(0, -2) / t, dim=-1),
        F.log_softmax(teacher_logits.flatten(0, -2) / t, dim=-1),
    )
    if mask is None:
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * mask.flatten()
    return kl.sum() / kl.shape[0] * t * t


def forgotten(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """(...) bool: positions whose true next token ``targets`` (...) the teacher gave more probability than the
    student does (at temperature 1): what the student is losing. Logits (..., V)."""
    with torch.no_grad():
        s = F.log_softmax(student_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        t = F.log_softmax(teacher_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return t > s


def fisher_diagonal(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Empirical diagonal Fisher of the shared weights: mean over batches of the squared gradient.

    batches: token windows (B, T+1) each. The model is put in eval mode so BatchNorm statistics stay put.
    """
    params = shared_parameters(model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name] += g.detach().pow(2) / len(batches)
    model.train(was_training)
    return fisher
