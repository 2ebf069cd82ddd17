"""Sharding models that hold multi-hash tables: TorchRec's sharders, planner and
``DistributedModelParallel``, with the tables trained by a fused optimizer."""

import os
from typing import Any, Callable, Dict, List, Optional, cast

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder

from torchrec_multihash.distributed.constraints import model_constraints


def sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders, with ``fused_params`` (e.g. the fused optimizer) on the one
    that shards multi-hash sub-tables; hand the same list to the planner and to
    ``DistributedModelParallel``.

    ``MultiHashEmbeddingBagCollection`` needs no sharder of its own: it holds a stock
    ``EmbeddingBagCollection`` per lookup group (pooled; per id, for mult tables), which the
    planner and ``DistributedModelParallel`` find inside it and shard like any other table,
    while its parameter-free id transform and combine stay unsharded.

    Plan with ``sub_table_constraints`` (or ``model_constraints``): TorchRec's planner would
    otherwise replicate small sub-tables (data_parallel), whose weights the fused optimizer
    leaves to the dense optimizer, so one table's parts would be trained two ways.
    """
    ours = cast(ModuleSharder[nn.Module], EmbeddingBagCollectionSharder(fused_params=fused_params))
    return [ours, *(s for s in get_default_sharders() if s.module_type is not ours.module_type)]


SharderList = Callable[[Optional[Dict[str, Any]]], List[ModuleSharder[nn.Module]]]


def shard_model(
    model: nn.Module,
    device: torch.device,
    embedding_lr: float,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    batch_size: Optional[int] = None,
    make_sharders: SharderList = sharders,
) -> DistributedModelParallel:
    """``model`` sharded over the default process group; call it on every rank.

    TorchRec's planner places the tables (one plan, agreed by all ranks) under ``constraints``
    (default: ``model_constraints(model)``, which keeps every multi-hash table off
    data_parallel, so that the fused optimizer trains all of them) on a topology of the group's ranks, ``LOCAL_WORLD_SIZE`` of
    them per node; the tables are updated in the backward pass by a fused row-wise Adagrad at
    ``embedding_lr`` (``dmp.fused_optimizer`` holds its learning rate and state). ``make_sharders``
    gives the sharders for those fused parameters (default: ``sharders``).
    """
    shard = make_sharders({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": embedding_lr, "eps": 1e-8})
    world = dist.get_world_size()
    topology = Topology(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), compute_device=device.type)
    if constraints is None:
        constraints = model_constraints(model)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    plan = planner.collective_plan(model, shard, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, env=None, device=device, plan=plan, sharders=shard)
