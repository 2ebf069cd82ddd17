"""``full``: one table of N rows, as TorchRec's own (the baseline, and small tables)."""

from torchrec_multihash.modules.strategies.base import SingleTableStrategy, Sizing
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.FULL)
class FullTable(SingleTableStrategy):
    """Every id has a row of its own; the table's name is kept as is."""

    compresses = False

    def rows(self) -> int:
        return self.domain

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        return Sizing({}, 1.0)
