"""A lookup group: an id transform in front of one stock TorchRec embedding module.

The transform is a direct child of the group, next to the (sharded) embedding module, so
TrainPipelineSparseDist(pipeline_postproc=True) finds it and runs it in the input-dist stage.
"""

from typing import Dict

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.id_transform import IdTransform


class PooledLookup(nn.Module):
    """Sub-tables looked up pooled (add, concat and single-table strategies): a SUM-pooled
    ``EmbeddingBagCollection`` of the transformed KJT."""

    def __init__(self, transform: IdTransform, tables: EmbeddingBagCollection) -> None:
        super().__init__()
        self.transform = transform
        self.tables = tables

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.tables(self.transform(features))


class PerIdLookup(nn.Module):
    """Sub-tables looked up one row per id (mult): an ``EmbeddingCollection`` of one dim."""

    def __init__(self, transform: IdTransform, tables: EmbeddingCollection) -> None:
        super().__init__()
        self.transform = transform
        self.tables = tables

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        return self.tables(self.transform(features))
