"""A lookup group: an id transform in front of one stock TorchRec ``EmbeddingBagCollection``.

The transform is a direct child of the group, next to the (sharded) embedding module, so
TrainPipelineSparseDist(pipeline_postproc=True) finds it and runs it in the input-dist stage.
"""

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.id_transform import IdTransform


class Lookup(nn.Module):
    """Sub-tables looked up in a SUM-pooled ``EmbeddingBagCollection`` of the transformed KJT:
    pooled bags (add, concat, one-hot mult and single-table strategies), or bags of one id each
    (per-id mult lookups, whose transform explodes the bags)."""

    def __init__(self, transform: IdTransform, tables: EmbeddingBagCollection) -> None:
        super().__init__()
        self.transform = transform
        self.tables = tables

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.tables(self.transform(features))
