"""Test-only sharders that offer CUDA's sharding types on CPU, so that row_wise and table_row_wise
run under gloo: TorchRec's CPU sharders offer only data_parallel, table_wise, column_wise and
table_column_wise, though the sharding itself (bucketizing ids by row, the all-to-alls) has no
CUDA-only code. Only tests use them; users on CPU keep TorchRec's lists."""

from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder

from torchrec_multihash import sharders


class CudaTypesEBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder, offering on every device what it offers on CUDA."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return super().sharding_types("cuda")


def cuda_type_sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """The app's ``sharders(fused_params)``, with the one that shards multi-hash sub-tables replaced
    by the one above."""
    replaced: Dict[type, ModuleSharder[nn.Module]] = {EmbeddingBagCollectionSharder: CudaTypesEBCSharder(fused_params=fused_params)}
    out = [replaced.get(type(s), s) for s in sharders(fused_params=fused_params)]
    assert sum(isinstance(s, CudaTypesEBCSharder) for s in out) == 1
    return out
