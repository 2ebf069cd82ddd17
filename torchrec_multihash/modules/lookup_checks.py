"""Checks of how a model around our module was sharded and pipelined, made on its first forward:
what TorchRec itself would let pass silently (a table left unsharded, lookups not pipelined). They
take the module's lookup groups: group name -> the inner EmbeddingBagCollection, or what DMP made
of it."""

import warnings
from typing import Dict

import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardedModule

from torchrec_multihash.errors import MultiHashError

PIPELINE_HINT = (
    "TrainPipelineSparseDist did not pipeline the multi-hash tables' lookups (their input passes through "
    "the id transform): build it with pipeline_postproc=True, e.g. TrainPipelineSparseDist(model, optimizer, "
    "device, pipeline_postproc=True), to overlap their input dist with compute. Training is correct either way."
)


class ShardingSetupError(MultiHashError):
    """A model whose multi-hash tables were sharded in a way that cannot be right."""


SHARDER = "EmbeddingBagCollectionSharder"  # what shards every lookup group's inner tables


def check_sharding(lookups: Dict[str, nn.Module]) -> None:
    """Raises ShardingSetupError if some of the module's inner tables were sharded and others not
    (DistributedModelParallel had no sharder for them: they would be silently replicated); warns
    if none is sharded while several ranks run (each would hold a replica)."""
    sharded = {name: isinstance(tables, ShardedModule) for name, tables in lookups.items()}
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not any(sharded.values()) and world > 1:
        warnings.warn(
            f"the multi-hash tables are not sharded although {world} ranks run: each rank holds and trains a full "
            "replica. To shard them, pass torchrec_multihash.sharders() to DistributedModelParallel and the planner "
            f"(or add {SHARDER} to your sharder list).",
            stacklevel=3,
        )
    if any(sharded.values()) and not all(sharded.values()):
        names = ", ".join(f"'{n}'" for n, s in sharded.items() if not s)
        raise ShardingSetupError(
            f"the multi-hash tables of lookup group(s) {names} were not sharded while the others were: "
            f"DistributedModelParallel (and the planner) got no {SHARDER}, so those "
            "tables would be replicated on every rank. Pass torchrec_multihash.sharders() to both (TorchRec's "
            "default sharders include it), or add the missing sharder to your list."
        )
    _warn_row_wise_over_gloo(lookups)


ROW_WISE_GLOO_HINT = (
    "lookup group '{group}' (mult tables, looked up per id) is sharded {types} over gloo: its batch is the largest "
    "number of ids of a mult feature in the rank's batch, and gloo's row-wise backward (an all_gather) fails "
    "with 'ProcessGroupGloo::allgather: invalid tensor size' when ranks differ in it. Feed every rank batches "
    "with the same number of ids per mult feature, or shard those tables table_wise / column_wise (NCCL has no such limit)."
)


def _warn_row_wise_over_gloo(lookups: Dict[str, nn.Module]) -> None:
    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() > 1):
        return
    for name, tables in lookups.items():
        types = getattr(tables, "_sharding_types", None) or list(getattr(tables, "_sharding_type_to_sharding", {}))
        row = sorted(t for t in types if t in ("row_wise", "table_row_wise"))
        if name.startswith("per_id") and row:
            warnings.warn(ROW_WISE_GLOO_HINT.format(group=name, types=" / ".join(row)), stacklevel=4)


def warn_if_not_pipelined(lookups: Dict[str, nn.Module]) -> None:
    """Warns (once per pipeline) if a TrainPipelineSparseDist traced the model but left the
    module's sharded lookups unpipelined (built without pipeline_postproc=True)."""
    sharded = [tables for tables in lookups.values() if isinstance(tables, ShardedModule)]
    if sharded and not all(getattr(t, "is_pipelined", False) for t in sharded):
        warnings.warn(PIPELINE_HINT, stacklevel=3)
