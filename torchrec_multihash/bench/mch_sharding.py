"""Sharding TorchRec's ManagedCollisionEmbeddingBagCollection (the MCH remapper) on the CPU.

TorchRec's ``ManagedCollisionEmbeddingBagCollectionSharder`` offers only row-wise sharding (the
remapper's), which its EmbeddingBagCollection sharder offers only on CUDA, and on eviction it resets
the evicted rows' weights and row-wise Adagrad state with an FBGEMM op that has no CPU kernel. The
sharder here offers row-wise sharding with the fused kernel on any device and resets evicted rows on
the CPU with plain tensor writes (the same result: optimizer state zeroed, weights drawn again from
the table's ``init_fn``). The new weights are drawn from a generator seeded by the seed the module
was sharded under, the table and the remapper's iteration (saved in its state), not from the global
RNG, so a run resumed from a checkpoint draws what the uninterrupted run draws. On CUDA it is
TorchRec's sharder unchanged.
"""

import zlib
from typing import Any, Dict, List, Optional, cast

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from torchrec_multihash.distributed.sharding import sharders


class CPUShardedManagedCollisionEmbeddingBagCollection(ShardedManagedCollisionEmbeddingBagCollection):
    """TorchRec's sharded MC-EBC whose evictions reset the evicted rows without FBGEMM's CUDA op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._evict_seed = torch.initial_seed()  # the seed the model is built and sharded under (train.seed in the app)

    def _draw_seed(self, table: str) -> int:
        remapper = self._managed_collision_collection._managed_collision_modules[table]
        iteration = int(getattr(remapper, "_current_iter", 0))
        return (self._evict_seed * 1_000_003 + zlib.crc32(table.encode()) * 7919 + iteration) % (2**63)

    def _evict(self, evictions_per_table: Dict[str, Optional[torch.Tensor]]) -> None:
        if self._device.type == "cuda":
            super()._evict(evictions_per_table)
            return
        for table, evicted in evictions_per_table.items():
            if evicted is None or evicted.numel() == 0:
                continue
            tbe, logical_ids = self._table_to_tbe_and_index[table]
            t = int(logical_ids.reshape(-1)[0].item())
            rows = evicted.long()
            with torch.no_grad():
                for state in tbe.split_optimizer_states()[t]:  # row-wise Adagrad: one value per row
                    state[rows] = 0
                weight = tbe.split_embedding_weights()[t]
                init_fn = self._embedding_module._table_name_to_config[table].init_fn
                assert init_fn is not None  # EmbeddingBagConfig fills in a uniform init
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self._draw_seed(table))
                    weight[rows] = init_fn(weight[rows])


class MCHSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder, usable on the CPU (row-wise, fused kernel; see the module doc)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        if compute_device_type == "cuda":
            return super().sharding_types(compute_device_type)
        return [ShardingType.ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if compute_device_type == "cuda":
            return super().compute_kernels(sharding_type, compute_device_type)
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedManagedCollisionEmbeddingBagCollection:
        device = device or torch.device("cuda")
        if device.type == "cuda":
            return super().shard(module, params, env, device, module_fqn)
        return CPUShardedManagedCollisionEmbeddingBagCollection(
            module, params, ebc_sharder=self._e_sharder, mc_sharder=self._mc_sharder, env=env, device=device
        )


def mch_sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """``sharders(fused_params)`` with ``MCHSharder`` for the baseline's MC-EBC (``shard_model``'s ``make_sharders``)."""
    mch = cast(ModuleSharder[nn.Module], MCHSharder(fused_params=fused_params))
    return [mch, *(s for s in sharders(fused_params) if s.module_type is not mch.module_type)]
