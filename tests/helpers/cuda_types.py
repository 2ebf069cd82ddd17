"""Test-only sharders that offer CUDA's sharding types on CPU, so that row_wise and table_row_wise
run under gloo: TorchRec's CPU sharders offer only data_parallel, table_wise, column_wise and
table_column_wise, though the sharding itself (bucketizing ids by row, the all-to-alls) has no
CUDA-only code. Only tests use them; users on CPU keep TorchRec's lists."""

from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder

from torchrec_multihash import sharders


class CudaTypesEBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder, offering on every device what it offers on CUDA."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return super().sharding_types("cuda")


class CudaTypesECSharder(EmbeddingCollectionSharder):
    """The same for EmbeddingCollection (per-id mult tables). In torchrec 1.8 its list does not
    depend on the device (table_wise, column_wise, row_wise, data_parallel; no table_row_wise),
    so this only keeps the tests independent of that."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return super().sharding_types("cuda")


def cuda_type_sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """The app's ``sharders(fused_params)``, with the two that shard multi-hash sub-tables replaced
    by the ones above."""
    replaced: Dict[type, ModuleSharder[nn.Module]] = {
        EmbeddingBagCollectionSharder: CudaTypesEBCSharder(fused_params=fused_params),
        EmbeddingCollectionSharder: CudaTypesECSharder(fused_params=fused_params),
    }
    out = [replaced.get(type(s), s) for s in sharders(fused_params=fused_params)]
    assert sum(isinstance(s, (CudaTypesEBCSharder, CudaTypesECSharder)) for s in out) == 2
    return out
