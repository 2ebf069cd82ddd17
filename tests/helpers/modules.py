"""Small modules the tests build."""

import torch

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig


def one_table_ebc(**kw) -> torch.nn.Module:
    """A collection of one table t_C1 (1000 ids, dim 16, feature C1): Q-R mult with 8 collisions,
    or the table options ``kw``."""
    args = kw or {"strategy": "qr", "operation": "mult", "num_collisions": 8}
    return MultiHashEmbeddingBagCollection(
        [MultiHashEmbeddingBagConfig(name="t_C1", num_embeddings=1000, embedding_dim=16, feature_names=["C1"], **args)]
    )
