"""A small decoder-only transformer over tokens (UTF-8 bytes by default) with PEER layers.

Pre-norm blocks, causal attention through ``F.scaled_dot_product_attention``; each block's FFN is
either dense (4·dim hidden, GELU) or a PEER layer. The paper replaces the FFN of one middle block
(§3: block 6 of 12), which is our default; ``peer_blocks="all"`` puts PEER everywhere and
``"none"`` gives the dense baseline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .peer import PEER, PEERConfig, active_params_per_token


@dataclass
class ModelConfig:
    """Shape of the language model; checkpointed with the weights (nanoGPT-style)."""

    vocab_size: int = 256
    """Tokens in the vocabulary (256 for the UTF-8 byte tokenizer)."""
    dim: int = 128
    """Model width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads per block (must divide dim)."""
    context: int = 256
    """Longest sequence the position embedding covers."""
    ffn_mult: int = 4
    """Hidden width of dense FFNs as a multiple of dim."""
    peer_blocks: str = "middle"
    """Blocks whose FFN is a PEER layer: middle, all, none, or comma-separated block indices (0-based)."""
    peer: PEERConfig = field(default_factory=lambda: PEERConfig(dim=128, num_subkeys=32, heads=4, topk=8, dim_key=64))
    """PEER layer template (its dim is forced to the model's dim)."""
    peer_subkeys: list[int] | None = None
    """Current sub-keys per PEER block, in block order; follows growth. None: all at peer.num_subkeys."""
    peer_generations: list[list[list[int]]] | None = None
    """Grown generations per PEER block, in block order (``PEERConfig.generations``); follows growth. None: none."""

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            self.peer = PEERConfig(**self.peer)
        if not isinstance(self.peer, PEERConfig):
            raise ValueError(f"ModelConfig.peer must be a table of PEER settings, got {self.peer!r}")
        for name in ("vocab_size", "dim", "layers", "heads", "context", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"ModelConfig.heads ({self.heads}) must divide dim ({self.dim})")
        if self.peer.dim != self.dim:
            self.peer = dataclasses.replace(self.peer, dim=self.dim)
        blocks = self.peer_block_indices()  # validates peer_blocks
        if self.peer_subkeys is not None:
            if len(self.peer_subkeys) != len(blocks):
                raise ValueError(
                    f"ModelConfig.peer_subkeys has {len(self.peer_subkeys)} entries for {len(blocks)} PEER blocks"
                )
            for n in self.peer_subkeys:
                dataclasses.replace(self.peer, num_subkeys=n)  # validates each size
        if self.peer_generations is not None:
            if len(self.peer_generations) != len(blocks):
                raise ValueError(
                    f"ModelConfig.peer_generations has {len(self.peer_generations)} entries for {len(blocks)} PEER blocks"
                )
            for pos in range(len(blocks)):
                self.peer_config(pos)  # validates each layer's generations against its size

    def peer_block_indices(self) -> list[int]:
        spec = str(self.peer_blocks).strip().lower()
        if spec == "middle":
            return [self.layers // 2]
        if spec == "all":
            return list(range(self.layers))
        if spec in ("none", ""):
            return []
        try:
            blocks = sorted({int(s) for s in spec.split(",")})
        except ValueError:
            raise ValueError(
                f"ModelConfig.peer_blocks must be middle, all, none or block indices like 1,3; got {self.peer_blocks!r}"
            ) from None
        if blocks[0] < 0 or blocks[-1] >= self.layers:
            raise ValueError(
                f"ModelConfig.peer_blocks indices must lie in [0, {self.layers}), got {self.peer_blocks!r}"
            )
        return blocks

    def peer_config(self, position: int) -> PEERConfig:
        """The PEERConfig of the ``position``-th PEER block (0-based among PEER blocks)."""
        n = self.peer.num_subkeys if self.peer_subkeys is None else self.peer_subkeys[position]
        gens = self.peer.generations if self.peer_generations is None else self.peer_generations[position]
        return dataclasses.replace(self.peer, num_subkeys=n, generations=gens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        if isinstance(data.get("peer"), dict):
            peer_known = {f.name for f in dataclasses.fields(PEERConfig)}
            bad = set(data["peer"]) - peer_known
            if bad:
                raise ValueError(f"unknown PEER config keys: {', '.join(sorted(bad))}")
            data["peer"] = PEERConfig(**data["peer"])
        return cls(**data)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class FFN(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.up = nn.Linear(dim, mult * dim, bias=False)
        self.down = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.heads)
        self.ln2 = nn.LayerNorm(config.dim)
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class LanguageModel(nn.Module):
    """tokens (B, T) → logits (B, T, vocab). ``forward(idx, targets)`` also returns the mean NLL."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Embedding(c.context, c.dim)
        peer_at = {b: i for i, b in enumerate(c.peer_block_indices())}
        self.blocks = nn.ModuleList(
            Block(c, PEER(c.peer_config(peer_at[b])) if b in peer_at else FFN(c.dim, c.ffn_mult))
            for b in range(c.layers)
        )
        self.ln_f = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        # GPT-2 init for the dense weights; PEER layers keep their own (paper / Lample et al.) init
        in_peer = {id(m) for p in self.peer_layers() for m in p.modules()}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in in_peer:
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) int64 → logits (B, T, V) and, with targets (B, T), the mean NLL (nats/token).

        Targets equal to -1 are ignored (padding).
        """
        T = idx.shape[1]
        if self.config.context < T:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.config.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def peer_layers(self) -> list[PEER]:
        """The PEER layers, in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, PEER)]

    def grow(self, num_new: int, layer: int | None = None, **kwargs) -> dict[int, Tensor]:
        """Grow every PEER layer (or the ``layer``-th one) by ``num_new`` sub-keys per half.

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

    def active_params_per_token(self) -> int:
        """Parameters a token touches: everything but other tokens' embeddings and unretrieved experts."""
        total = self.num_params() - self.tok.weight.numel() + self.config.dim
        for p in self.peer_layers():
            total += active_params_per_token(p.config) - sum(t.numel() for t in p.parameters())
        return total
