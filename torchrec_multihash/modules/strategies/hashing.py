"""``hash``: the hashing trick, ``x mod ceil(N / num_collisions)`` rows."""

from typing import List, Tuple

from torchrec_multihash.modules.strategies.base import SingleTableStrategy, Sizing, ceil_div, within_budget
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.HASH)
class HashingTrick(SingleTableStrategy):
    """About ``num_collisions`` ids share each row; any int64 id is accepted."""

    uses = ("num_collisions",)
    accepts_any_id = True

    def rows(self) -> int:
        assert self.config.num_collisions is not None
        return ceil_div(self.domain, self.config.num_collisions)

    def partition_spec(self) -> List[Tuple[int, int]]:
        return [(1, self.sizes()[0])]

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        n, c = num_embeddings, max(1, int(compression))
        while not within_budget(ceil_div(n, c) * dim, n * dim, compression) and c < n:
            c += 1
        return Sizing({"num_collisions": c}, n / ceil_div(n, c))
