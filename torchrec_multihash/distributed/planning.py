"""Plans a model's sub-tables for a topology (real or not) and reports where each part went."""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, BaseEmbeddingConfig

from torchrec_multihash.distributed.constraints import model_constraints
from torchrec_multihash.distributed.sharding import sharders as default_sharders
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection


@dataclass
class ShardReport:
    """One sub-table's placement: its sharding type and the bytes of weights on each rank."""

    table: str  # sub-table, e.g. t_C1 (the main one), t_C1__r
    logical_table: str  # e.g. t_C1
    module: str  # FQN of the sharded inner module
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    bytes: int  # weights of this sub-table, counted once
    bytes_per_rank: Dict[int, int] = field(default_factory=dict)  # replicas counted on each rank


@dataclass
class PlanReport:
    world_size: int
    local_world_size: int
    compute_device: str
    shards: List[ShardReport]
    bytes_per_rank: List[int]
    embedding_bytes: int  # memory_bytes() of the multi-hash modules
    full_embedding_bytes: int  # the same logical tables uncompressed
    mapping_bytes: int = 0  # learned mappings, held whole by every rank (in bytes_per_rank)

    def to_dict(self) -> Dict:
        return asdict(self)


def plan_model(
    model: nn.Module,
    topology: Topology,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    batch_size: int = 512,
    sharders: Optional[list] = None,
) -> ShardingPlan:
    """Runs TorchRec's planner (no process group needed: plans for any topology); ``constraints``
    default to ``model_constraints(model)``."""
    if constraints is None:
        constraints = model_constraints(model)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    return planner.plan(model, sharders or default_sharders())


def describe_plan(plan: ShardingPlan, model: nn.Module, topology: Topology) -> PlanReport:
    """Where every sub-table of every MultiHashEmbeddingBagCollection in ``model`` went."""
    logical: Dict[str, str] = {}  # sub-table -> logical table
    subs: Dict[str, BaseEmbeddingConfig] = {}  # sub-table -> its config, in module order
    embedding_bytes = full_bytes = mapping_bytes = 0
    for mod in model.modules():
        if isinstance(mod, MultiHashEmbeddingBagCollection):
            embedding_bytes += mod.memory_bytes()
            full_bytes += mod.full_memory_bytes()
            for t in mod.multihash_configs():
                shape = t.mapping_shape()
                mapping_bytes += shape.nbytes() if shape is not None else 0
                logical.update((s.name, t.name) for s in t.strategy_impl().stored_tables())
            subs.update((c.name, c) for c in mod.sub_table_configs())
    world = topology.world_size
    per_rank = [mapping_bytes] * world
    shards: List[ShardReport] = []
    for module_fqn, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            c = subs.get(table)
            elem = DATA_TYPE_NUM_BITS[c.data_type] // 8 if c else 4
            nbytes = c.num_embeddings * c.embedding_dim * elem if c else 0
            on_rank: Dict[int, int] = {}
            if ps.sharding_spec is not None:
                for shard in ps.sharding_spec.shards:
                    r = shard.placement.rank()
                    on_rank[r] = on_rank.get(r, 0) + shard.shard_sizes[0] * shard.shard_sizes[1] * elem
            else:  # data parallel: a full replica on every rank
                on_rank = {r: nbytes for r in (ps.ranks or range(world))}
            for r, b in on_rank.items():
                per_rank[r] += b
            shards.append(
                ShardReport(
                    table=table,
                    logical_table=logical.get(table, table),
                    module=module_fqn,
                    sharding_type=ps.sharding_type,
                    compute_kernel=ps.compute_kernel,
                    ranks=sorted(on_rank),
                    bytes=nbytes,
                    bytes_per_rank=dict(sorted(on_rank.items())),
                )
            )
    order = {name: i for i, name in enumerate(subs)}
    shards.sort(key=lambda s: order.get(s.table, len(order)))
    return PlanReport(
        world_size=world,
        local_world_size=topology.local_world_size,
        compute_device=topology.compute_device,
        shards=shards,
        bytes_per_rank=per_rank,
        embedding_bytes=embedding_bytes,
        full_embedding_bytes=full_bytes,
        mapping_bytes=mapping_bytes,
    )
