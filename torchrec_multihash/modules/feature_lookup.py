"""How the id transform looks up one feature of one logical table (its strategy, mapping and checks)."""

from dataclasses import dataclass
from typing import List, Optional

from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.strategies import StackedRows, Strategy


@dataclass
class FeatureLookup:
    """How one logical feature of one table is turned into sub-features."""

    feature: str
    table: str
    num_embeddings: int
    strategy: Strategy  # the table's id -> rows partition
    sub_features: List[str]
    mapping: Optional[LearnedMapping] = None  # learned id -> row, applied before the partitions
    max_ids_per_bag: Optional[int] = None  # checked with the ids; 1: one-hot
    pooled_mult: bool = False  # one-hot mult looked up pooled: only the first part carries the weight
    # stacked parts: where each part's rows lie in the one stacked table; the feature is then one
    # sub-feature whose bags hold each id's k rows (pooled by SUM: the add)
    stacked_rows: Optional[List[StackedRows]] = None
    # add, mult: the combine composes the parts column block by column block, so the sub-features
    # come part by part among the lookup's group (see ``sub_feature_order``)
    part_major: bool = False
