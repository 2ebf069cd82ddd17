"""A DeepRec-style entry point (``get_multihash_variable``) mapped onto MultiHashEmbeddingBagConfig.

DeepRec's Multi-Hash Variable has exactly two Q-R partitions and a ``dims`` list: one entry means
``add`` or ``mul`` of two full-width parts, several mean ``concat`` with those widths.
"""

import math
from typing import List, Optional

from torchrec.modules.embedding_configs import PoolingType

from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig

_OPERATIONS = {"add": "add", "mul": "mult", "mult": "mult", "concat": "concat"}


def get_multihash_variable(
    name: str,
    num_embeddings: int,
    dims: List[int],
    feature_names: Optional[List[str]] = None,
    num_of_partitions: int = 2,
    complementary_strategy: str = "Q-R",
    operation: str = "add",
    num_collisions: Optional[int] = None,
    pooling: PoolingType = PoolingType.SUM,
) -> MultiHashEmbeddingBagConfig:
    """DeepRec's multi-hash variable as a table config.

    ``num_collisions`` (the remainder table's rows, used as both divisor and modulus so the
    partitions stay complementary) defaults to ceil(sqrt(num_embeddings)): two tables of about
    sqrt(N) rows each, as in DeepRec. ``feature_names`` defaults to ``[name]``.
    """
    where = f"get_multihash_variable('{name}')"
    if complementary_strategy != "Q-R":
        raise MultiHashConfigError(f"{where}: complementary_strategy must be 'Q-R', got {complementary_strategy!r}")
    if num_of_partitions != 2:
        raise MultiHashConfigError(
            f"{where}: DeepRec's Q-R has 2 partitions, got num_of_partitions={num_of_partitions}; "
            "use MultiHashEmbeddingBagConfig(strategy='generalized_qr') for more"
        )
    if operation not in _OPERATIONS:
        raise MultiHashConfigError(f"{where}: operation must be 'add', 'mul' or 'concat', got {operation!r}")
    op = _OPERATIONS[operation]
    if not dims:
        raise MultiHashConfigError(f"{where}: dims must be a non-empty list")
    if len(dims) == 1 and op == "concat":
        raise MultiHashConfigError(f"{where}: concat needs one dim per partition, got dims={dims}")
    if len(dims) > 1 and op != "concat":
        raise MultiHashConfigError(f"{where}: dims={dims} has several entries, which means concat, but operation={operation!r}")
    m = num_collisions if num_collisions is not None else max(2, math.isqrt(num_embeddings - 1) + 1)
    return MultiHashEmbeddingBagConfig(
        name=name,
        num_embeddings=num_embeddings,
        embedding_dim=sum(dims),
        feature_names=feature_names or [name],
        strategy="qr",
        operation=op,
        num_collisions=m,
        dims=list(dims) if op == "concat" else None,
        pooling=pooling,
    )
