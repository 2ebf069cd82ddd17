"""Initial ranges of the sub-tables, chosen so composed embeddings have a standard table's scale.

A standard TorchRec table of N rows draws weights from U(-sqrt(1/N), sqrt(1/N)) (or the config's
``weight_init_min/max``): mean mu, std sigma. We give every *composed* embedding that same mean and
std, so swapping a full table for a compressed one leaves the scale the dense layers see unchanged
(the original DLRM code instead draws Q-R weights all-positive in [sqrt(1/n), 1], which makes the
composed embeddings of a 10M-row table thousands of times larger than the full table's; the paper's
author advises a standard init).

- one partition (full, hash) and concat: each element is already one logical element: U(lo, hi).
- add of k parts: part means mu/k and variances sigma^2/k add up to mu and sigma^2.
- mult of k parts with mean c and variance s^2 each: the product has mean c^k and variance
  (c^2 + s^2)^k - c^(2k); solving for mean mu and variance sigma^2 gives c = |mu|^(1/k),
  s^2 = (sigma^2 + mu^2)^(1/k) - c^2 (the sign of mu goes to the first part).
"""

import math
from typing import List, Protocol, Tuple


class InitRange(Protocol):
    """A table config's initial range (``EmbeddingBagConfig``'s methods)."""

    def get_weight_init_min(self) -> float: ...

    def get_weight_init_max(self) -> float: ...


def logical_init_range(config: InitRange) -> Tuple[float, float]:
    """The [min, max] a standard TorchRec table of this config would draw its weights from."""
    return config.get_weight_init_min(), config.get_weight_init_max()


def composed_init_ranges(config: InitRange, k: int, operation: str) -> List[Tuple[float, float]]:
    """Uniform [min, max] of each of ``k`` sub-tables combined by ``operation``."""
    lo, hi = logical_init_range(config)
    if k == 1 or operation == "concat":
        return [(lo, hi)] * k
    mu = (lo + hi) / 2.0
    sigma2 = (hi - lo) ** 2 / 12.0
    if operation == "add":
        half = math.sqrt(3.0 * sigma2 / k)
        return [(mu / k - half, mu / k + half)] * k
    # mult
    c = abs(mu) ** (1.0 / k)
    s2 = max((sigma2 + mu * mu) ** (1.0 / k) - c * c, 0.0)
    half = math.sqrt(3.0 * s2)
    ranges = [(c - half, c + half)] * k
    if mu < 0:
        ranges[0] = (-c - half, -c + half)
    return ranges
