"""``crt``: Chinese-remainder partitions, ``x mod m_j`` for pairwise coprime ``moduli``."""

import math
from typing import Iterable, Iterator, List, Tuple

from torchrec_multihash.modules.strategies.base import ceil_div
from torchrec_multihash.modules.strategies.composed import ModuliStrategy, small_radix_limit
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


def coprime_from(start: int, others: Iterable[int]) -> int:
    """The smallest int >= max(start, 2) coprime to every one of ``others``."""
    m = max(start, 2)
    while any(math.gcd(m, o) != 1 for o in others):
        m += 1
    return m


@register(StrategyName.CRT)
class ChineseRemainder(ModuliStrategy):
    """Distinct ids below the product of the moduli get distinct residue tuples."""

    default_partitions = 2

    def partition_spec(self) -> List[Tuple[int, int]]:
        return [(1, m) for m in self.sizes()]

    def validate(self) -> None:
        super().validate()
        moduli = self.sizes()
        for i, a in enumerate(moduli):
            for b in moduli[i + 1 :]:
                if math.gcd(a, b) != 1:
                    self.config.fail(
                        f"crt moduli must be pairwise coprime, but {a} and {b} share the factor "
                        f"{math.gcd(a, b)}: ids x and x + lcm of the moduli would collide (not complementary)"
                    )

    @classmethod
    def candidates(cls, n: int, k: int) -> Iterator[List[int]]:
        for m in range(2, small_radix_limit(n, k) + 1):
            small: List[int] = []  # k - 1 small pairwise-coprime moduli from m up
            for _ in range(k - 1):
                small.append(coprime_from(small[-1] + 1 if small else m, small))
            yield small + [coprime_from(ceil_div(n, math.prod(small)), small)]
