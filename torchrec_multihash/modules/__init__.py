"""Modules (unsharded): configs, partitions and the multi-hash EmbeddingBagCollection."""

from torchrec_multihash.modules.config import (  # noqa: F401
    MultiHashConfigError,
    MultiHashEmbeddingBagConfig,
)
from torchrec_multihash.modules.id_transform import InvalidInputError  # noqa: F401
from torchrec_multihash.modules.learned_mapping import UnfittedMappingError  # noqa: F401
from torchrec_multihash.modules.multihash_embedding_bag import (  # noqa: F401
    MultiHashEmbeddingBagCollection,
)
from torchrec_multihash.modules.strategies.names import Compose, Operation, StrategyName  # noqa: F401
