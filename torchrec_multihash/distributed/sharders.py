"""The sharders to hand to both EmbeddingShardingPlanner and DistributedModelParallel."""

from typing import Any, Dict, List, Optional, cast

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder


def sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders, with ``fused_params`` (e.g. the fused optimizer) on the two
    that shard multi-hash sub-tables.

    ``MultiHashEmbeddingBagCollection`` needs no sharder of its own: it holds a stock
    ``EmbeddingBagCollection`` (add, concat, full, hash tables) and ``EmbeddingCollection`` (mult
    tables), which the planner and ``DistributedModelParallel`` find inside it and shard like any
    other table, while its parameter-free id transform and combine stay unsharded.
    """
    ours: List[ModuleSharder[nn.Module]] = [
        cast(ModuleSharder[nn.Module], EmbeddingBagCollectionSharder(fused_params=fused_params)),
        cast(ModuleSharder[nn.Module], EmbeddingCollectionSharder(fused_params=fused_params)),
    ]
    types = {s.module_type for s in ours}
    return ours + [s for s in get_default_sharders() if s.module_type not in types]
