"""The index manager: a FAISS-backed view of the expert pool, used between phases (issue 5).

It decides *what* to grow or freeze; the PEER layer knows *how* (``PEER.grow``, ``PEER.freeze``).

* **Usage ledger.** For every (slice, PEER-layer position): how often each expert was retrieved
  and the router-weight mass (softmax gate, Eq. 8) it received. Sparse — memory ∝ experts used,
  not N — saved as safetensors + JSON, merged across phases. ``layer_stats`` turns it into the
  paper's Table 2 numbers: usage % and unevenness KL(z ‖ uniform) = log N + Σ z log z over the
  accumulated router mass z.
* **Coverage and growth.** ``coverage`` gives each token/head query's best sub-key score per half
  (FAISS inner-product search over the sub-keys). A new slice whose query halves score worse than
  the old slices' are *poorly served*; ``decide_growth`` turns their excess into K, and
  ``place_subkeys`` puts the K new sub-keys at ``faiss.Kmeans`` centroids of those halves instead
  of at random. ``grow_model`` does both and measures the fraction of old-slice tokens whose
  retrieved set the growth changed (``changed_fraction``).
* **Freezing policies** between phases: ``none``, ``all-old``, ``usage:P``, ``tfidf:T`` (Sparse
  Memory Finetuning, Lin et al. 2025) — ``freeze_ids`` picks the ids, ``set_frozen`` applies them.
* **ExpertIndex.** FAISS over expert vectors (keys [c_i; c'_j], or u / v rows): nearest experts
  and near-duplicates; exact flat index for small pools, IVF for large ones, on GPU when faiss has
  GPUs. Every FAISS result is tested against brute force in ``tests/test_index.py``.
The index manager knows models, ledgers and FAISS, never runs: the run-level commands behind
``lpeer inspect / grow / freeze`` live in ``lifelong_peer.runops``, beside the phase loop.

Layers are addressed by their position among the model's PEER layers (``model.peer_layers()``).
"""

from ..policies import POLICY_HELP, FreezePolicy, parse_policy  # noqa: F401
from .core import (  # noqa: F401
    LEDGER_FORMAT,
    ExpertIndex,
    T,
    Usage,
    UsageLedger,
    _eval,
    _np,
    _search_ip,
    collect_usage,
    expert_vectors,
    faiss_gpus,
    inspect_expert,
    inspect_model,
    inspect_text,
    kl_unevenness,
    layer_stats,
    overlap,
    top_experts,
)
from .freezing import (
    document_frequency,
    freeze_ids,
    freeze_model,
    frozen_report,
    set_frozen,
    tfidf_scores,
)
from .growth import (  # noqa: F401
    GROW_MODES,
    GrowthRule,
    _safe_norms,
    budget_subkeys,
    changed_fraction,
    coverage,
    decide_growth,
    grow_model,
    growth_need,
    growth_shock,
    loss_need,
    new_hit,
    place_subkeys,
    poorly_served,
    retrieved_ids,
    subkeys_for_need,
)

__all__ = [
    "GROW_MODES",
    "ExpertIndex",
    "FreezePolicy",
    "GrowthRule",
    "Usage",
    "UsageLedger",
    "budget_subkeys",
    "changed_fraction",
    "collect_usage",
    "coverage",
    "decide_growth",
    "document_frequency",
    "expert_vectors",
    "freeze_ids",
    "freeze_model",
    "frozen_report",
    "grow_model",
    "growth_need",
    "growth_shock",
    "inspect_expert",
    "inspect_model",
    "inspect_text",
    "kl_unevenness",
    "layer_stats",
    "loss_need",
    "new_hit",
    "overlap",
    "parse_policy",
    "place_subkeys",
    "poorly_served",
    "retrieved_ids",
    "set_frozen",
    "subkeys_for_need",
    "tfidf_scores",
    "top_experts",
]
