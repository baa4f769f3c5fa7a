"""Merging S replicas of a stochastic defense into one prediction (Yoon et al. 2021, step 3).

Three rules, all recorded by the benchmark (the configured one is shown in the table):
`softmax` (mean of the replicas' probabilities, the default), `logits` (mean logits) and `vote`
(majority of the replicas' argmax).
"""

from __future__ import annotations

import torch
from torch import nn

MERGE_RULES = ("softmax", "logits", "vote")


def merge_scores(chain_logits: torch.Tensor, rule: str) -> torch.Tensor:
    """(S, B, K) logits of S replicas -> (B, K) merged scores (probabilities, logits or vote shares).
    Raises ValueError for an unknown rule."""
    if rule == "softmax":
        return chain_logits.float().softmax(-1).mean(0)
    if rule == "logits":
        return chain_logits.float().mean(0)
    if rule == "vote":
        k = chain_logits.shape[-1]
        return nn.functional.one_hot(chain_logits.argmax(-1), k).float().mean(0)
    raise ValueError(f"unknown merge rule '{rule}'; allowed: {', '.join(MERGE_RULES)}")


def merge_predict(chain_logits: torch.Tensor, rule: str) -> torch.Tensor:
    """(S, B, K) -> (B,) predicted classes. Ties: lowest class index for softmax/logits (argmax);
    for vote, the tied class with the highest mean softmax, then the lowest index."""
    scores = merge_scores(chain_logits, rule)
    if rule != "vote":
        return scores.argmax(-1)
    tied = scores == scores.max(-1, keepdim=True).values
    mean_prob = chain_logits.float().softmax(-1).mean(0)
    return torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(-1)


def correct_by_merge(grouped_logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n, S, B, K) logits -> {rule: (n, B) bool} correctness of each of the n merged predictions."""
    return {rule: torch.stack([merge_predict(g, rule) == y for g in grouped_logits]) for rule in MERGE_RULES}


__all__ = ["MERGE_RULES", "correct_by_merge", "merge_predict", "merge_scores"]
