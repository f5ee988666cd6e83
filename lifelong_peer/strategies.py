"""Strategies: named presets over the one phase loop — data, not subclasses (issue 4).

Each preset is a set of ``TrainConfig`` overrides (and, for ``dense``, model overrides). Anything a
preset sets can be overridden again by the user (``--config FILE.toml`` or command-line options).
The resolved config chooses the run's phase hooks (``lifelong_peer.hooks.build_hooks``): a preset is
config, and its hooks follow from it (``preset_hooks`` names them).
"""

from __future__ import annotations

from .errors import UserError

STRATEGIES: dict[str, dict] = {
    # fine-tune everything on each slice, fixed pool
    "naive": {},
    # ours at equal memory (issue 24): continue a base of the memory budget's size (start big:
    # scripts/train_base.py --num-subkeys), replay half of every batch from earlier slices and distil the
    # previous phase's model on the replayed rows only, so that old slices' outputs are held where they were
    # learnt while the new slice's rows learn freely. Chosen on the SOTU validation splits (a 16,384-expert
    # first-era base, RESULTS.md "Equal memory"): means of 2 seeds, distillation weight 0.5 1.895 against
    # 0.25 1.897, 1 1.902 and replay at 50% alone 1.913; seed 0 only, weight 0.1 1.902, replay at 40% 1.923
    # and 60% 1.907, 40% or 60% replay with weight 0.5 1.902 and 1.899, distilling only the tokens the old
    # model predicted better (distill_tokens=forgotten) 1.905. Growing from a small base (the earlier preset,
    # below as `lifelong-grow`), freezing the experts old slices use (usage:99: 2.006) and training the
    # ones they barely use at 1e-2 (1.952) all did worse at this memory. The newest slice pays for it (2 seeds: 2.315 against
    # 2.277 without distillation, 2.353 at weight 1)
    # Expert tables and sub-keys train at 3e-3, 3x the rest: in 80 steps each of 16,384 experts sees few
    # tokens, and the higher rate helped every strategy on the same validation splits (seed 0, sweep24d:
    # this recipe 1.851 against 1.895 at the one rate, 1.871 at 1e-2; replay at 50% 1.868, naive 1.946)
    # The replay share grows with the number k of earlier slices, 1 - 0.5 k^-0.1 (replay_growth): 50% with one,
    # 57% with five, 67% with 58. Chosen on the validation splits of both SOTU protocols (seed 0, sweep24e):
    # six eras 1.848 against 1.850 at a constant 50% (0.05: 1.850, 0.2: 1.853); 59 four-year slices 1.840
    # against 1.864 (0.05: 1.847), forgetting 12% of naive's against 22%, the newest slice 3% worse (2.495
    # against 2.418)
    "lifelong": {"replay": 0.5, "replay_growth": 0.1, "distill": 0.5, "distill_on": "replay", "expert_lr": 3e-3},
    # the earlier lifelong (issue 16): a new generation of 16 sub-keys per half at each slice (its own
    # retrieval, nested gate: the function is unchanged by growth), every old expert and its sub-keys frozen,
    # new experts at 10x the rate, 40% replay — within a budget of 16,384 experts per layer (what it reached
    # on the six SOTU eras). Best from a small base (2.036 vs replay-40 2.054 on test); at equal memory a
    # big fixed pool from the start beats it (RESULTS.md)
    "lifelong-grow": {
        "grow": "16",
        "grow_gate": "nested",
        "grow_topk": 4,
        "freeze": "all-old",
        "freeze_subkeys": True,
        "expert_lr": 1e-2,
        "replay": 0.4,
        "max_experts": 16384,
    },
    # naive + a quarter of every batch from earlier slices (TiC-LM's strongest simple baseline)
    "replay": {"replay": 0.25},
    # naive + EWC on every shared weight (diagonal Fisher at the end of each phase, online). The
    # Fisher is of batch-mean gradients, tiny per weight, so the weight is large: 3e5 had the best
    # final average on the SOTU validation splits among 1e3…1e7 (seed 0; 100 did nothing, RESULTS.md)
    "ewc": {"ewc": 3e5},
    # naive + MAS (Aljundi et al. 2018) on every shared weight: importance from the output's
    # sensitivity, no labels needed (hooks/mas.py). Ω is ~1e7× the Fisher, so the weight is small:
    # 0.01 had the best final average on the SOTU validation splits among 1e-3…1e-1 (seed 0, issue 15)
    "mas": {"mas": 0.01},
    # sparse memory finetuning (Lin et al. 2025): fixed pool, only the tables (u, v) of the experts
    # ranked highest by TF-IDF of the new slice's usage against the base's data train, at a high rate;
    # everything else — shared weights, query nets and their BatchNorm statistics, sub-keys, all other
    # expert rows — is frozen. expert_lr 1e-2 had the best validation final average among 3e-3…1e-1
    # (first-era SOTU base, 40 steps per era, seed 0: 2.218 / 2.202 / 2.221 / 2.291; benchmarks/smf_lr.py)
    "smf": {
        "freeze": "tfidf:256",
        "train_shared": False,
        "train_subkeys": False,
        "tfidf_background": "base",
        "expert_lr": 1e-2,
    },
    # the earlier smf: the same selection against the old slices, but every shared weight trains too
    "smf-shared": {"freeze": "tfidf:256", "tfidf_background": "old"},
    # the same transformer with dense FFNs, naive fine-tuning: the baseline a user would pick
    "dense": {"model": {"peer_blocks": "none"}},
    # one model trained on all slices' train data at once, for reference (not continual)
    "joint": {"joint": True},
}


def strategy_overrides(name: str) -> dict:
    """The preset of ``name``, or a UserError listing the strategies."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in STRATEGIES[name].items()}


def preset_hooks(name: str) -> list[str]:
    """The phase hooks preset ``name`` turns on (class names, in loop order), e.g. ewc → ["EWC"]."""
    from .config import resolve_config
    from .hooks import build_hooks

    _, train = resolve_config(name)
    return [type(hook).__name__ for hook in build_hooks(train)]
