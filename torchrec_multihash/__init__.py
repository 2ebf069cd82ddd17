"""torchrec-multihash: compositional (multi-hash) embedding tables for TorchRec and DLRM."""

from torchrec.modules.embedding_configs import PoolingType  # noqa: F401  re-exported for configs

from torchrec_multihash.distributed import (  # noqa: F401
    CheckpointError,
    load_checkpoint,
    model_constraints,
    save_checkpoint,
    sharders,
    sub_table_constraints,
)
from torchrec_multihash.errors import MultiHashError  # noqa: F401
from torchrec_multihash.learned.fit import FitOptions, apply_mappings, fit_learned_mappings, load_mappings, save_mappings  # noqa: F401
from torchrec_multihash.modules import (  # noqa: F401
    Compose,
    InvalidInputError,
    MultiHashConfigError,
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
    Operation,
    StrategyName,
    UnfittedMappingError,
)
from torchrec_multihash.modules.convert import stack_add_tables, to_multihash_configs  # noqa: F401
from torchrec_multihash.modules.deeprec import get_multihash_variable  # noqa: F401
from torchrec_multihash.modules.interop import (  # noqa: F401
    composed_embeddings,
    from_embedding_bag_collection,
    to_embedding_bag_collection,
)

__version__ = "0.1.0"
