"""``qr``: quotient-remainder, rows ``x // m`` and ``x % m`` (Shi et al., KDD 2020)."""

from typing import Any, Dict, Iterator, List, Tuple

from torchrec_multihash.modules.strategies.base import ceil_div
from torchrec_multihash.modules.strategies.composed import PartitionedStrategy, small_radix_limit
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.QR)
class QuotientRemainder(PartitionedStrategy):
    """Two sub-tables: ``ceil(N / m)`` quotient rows and ``m = num_collisions`` remainder rows."""

    uses = ("num_collisions",)

    def sizes(self) -> List[int]:
        m = self.config.num_collisions
        assert m is not None
        return [ceil_div(self.domain, m), m]

    def suffixes(self) -> List[str]:
        return ["", "__r"]  # the quotient table, the big one, keeps the logical name

    def partition_spec(self) -> List[Tuple[int, int]]:
        m = self.sizes()[1]
        return [(m, 0), (1, m)]

    def validate(self) -> None:
        c, n = self.config, self.domain
        assert c.num_collisions is not None
        if c.num_collisions >= n > 1:
            c.fail(f"num_collisions={c.num_collisions} must be smaller than {c.domain_name()}={n}, else the quotient table has a single row")

    @classmethod
    def check_num_partitions(cls, k: int) -> None:
        if k != 2:
            raise ValueError("qr has exactly 2 partitions; use generalized_qr for more")

    @classmethod
    def candidates(cls, n: int, k: int) -> Iterator[List[int]]:
        for m in range(2, small_radix_limit(n, 2) + 1):
            yield [ceil_div(n, m), m]

    @classmethod
    def fields_for(cls, sizes: List[int]) -> Dict[str, Any]:
        return {"num_collisions": sizes[1]}
