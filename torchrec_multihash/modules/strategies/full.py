"""``full``: one table of N rows, as TorchRec's own (the baseline, and small tables)."""

from typing import List, Tuple

from torchrec_multihash.modules.strategies.base import Sizing, Strategy
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.FULL)
class FullTable(Strategy):
    """Every id has a row of its own; the table's name is kept as is."""

    def sizes(self) -> List[int]:
        return [self.domain]

    def suffixes(self) -> List[str]:
        return [""]

    def partition_spec(self) -> List[Tuple[int, int]]:
        return [(1, 0)]

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        return Sizing({}, 1.0)
