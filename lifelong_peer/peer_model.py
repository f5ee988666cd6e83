"""What "a model with PEER layers" means to the trainer, the index manager and checkpoints (issue 15).

The byte-level ``LanguageModel`` and the attached Hugging Face model (``AttachedLM``) both derive from
``PEERModel``: ``forward(idx (B, T), targets (B, T) | None) → (logits (B, T, V), mean NLL | None)``
(targets of -1 ignored), a ``config`` with ``context``, ``peer_subkeys`` and ``to_dict()``, and the
methods below. A subclass says where its PEER layers are and which parameters no token touches.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .peer import PEER, PEERConfig, active_params_per_token


class PEERModelConfig:
    """What the configs of both kinds of ``PEERModel`` share (a dataclass mixin): a PEER layer template
    ``peer``, ``peer_subkeys``, the sub-keys per half of each PEER layer once grown (None: the template's),
    and ``peer_generations``, each PEER layer's grown generations (``PEERConfig.generations``; None: none)."""

    def peer_config(self, position: int) -> PEERConfig:
        """The PEERConfig of the ``position``-th PEER layer (0-based among PEER layers)."""
        n = self.peer.num_subkeys if self.peer_subkeys is None else self.peer_subkeys[position]
        gens = self.peer.generations if self.peer_generations is None else self.peer_generations[position]
        return dataclasses.replace(self.peer, num_subkeys=n, generations=gens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def check_keys(cls, data: dict, what: str) -> None:
        """ValueError naming the keys of ``data`` that are not fields of this config."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {what} config keys: {', '.join(sorted(unknown))}")


class PEERModel(nn.Module):
    def peer_layers(self) -> list[PEER]:
        """The PEER layers, in block order."""
        raise NotImplementedError

    def untouched_params(self) -> int:
        """Parameters outside PEER that a token never touches (the other tokens' input-embedding rows)."""
        raise NotImplementedError

    def grow(self, num_new: int, layer: int | None = None, **kwargs) -> dict[int, Tensor]:
        """Grow every PEER layer (or the ``layer``-th one) by ``num_new`` sub-keys per half; see ``PEER.grow``.

        Returns {position among PEER layers: new expert ids}; updates ``config.peer_subkeys``.
        """
        layers = self.peer_layers()
        if not layers:
            raise ValueError("this model has no PEER layers to grow")
        positions = range(len(layers)) if layer is None else [layer]
        for pos in positions:
            if not 0 <= pos < len(layers):
                raise ValueError(
                    f"PEER layer {pos} does not exist; this model has {len(layers)} (0..{len(layers) - 1})"
                )
        new = {pos: layers[pos].grow(num_new, **kwargs) for pos in positions}
        self.config.peer_subkeys = [p.config.num_subkeys for p in layers]
        if any(p.config.generations for p in layers):
            self.config.peer_generations = [p.config.generations for p in layers]
            gates = {p.config.generation_gate for p in layers if p.config.generations}
            if len(gates) > 1:
                raise ValueError(
                    f"PEER layers of one model cannot gate their generations differently, got {sorted(gates)}"
                )
            self.config.peer = dataclasses.replace(self.config.peer, generation_gate=gates.pop())
        return new

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def nll(self, windows: Tensor, batch_size: int = 32) -> tuple[float, int]:
        """(summed NLL in nats, tokens predicted) on token windows (n, T + 1) — the one scorer of
        evaluation and of the growth shock. Eval mode (BatchNorm on its running statistics), the
        previous mode restored after."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        total = 0.0
        try:
            for chunk in windows.split(batch_size):
                chunk = chunk.to(device)
                logits, _ = self(chunk[:, :-1])
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
        finally:
            self.train(was_training)
        return total, windows[:, 1:].numel()

    def active_params_per_token(self) -> int:
        """Parameters a token touches: everything but ``untouched_params`` and unretrieved experts."""
        total = self.num_params() - self.untouched_params()
        for p in self.peer_layers():
            total += active_params_per_token(p.config) - sum(t.numel() for t in p.parameters())
        return total
