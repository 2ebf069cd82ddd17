"""A small DLRM over every kind of multi-hash table, sharded with TorchRec's planner, and helpers to
compare it sharded and not."""

from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import (
    MultiHashEmbeddingBagCollection,
    MultiHashEmbeddingBagConfig,
    PoolingType,
    sharders,
    sub_table_constraints,
)
from torchrec_multihash.datasets.synthetic import SyntheticCriteo

from tests.helpers.cuda_types import cuda_type_sharders

DIM = 16
VOCAB = [300, 200, 120, 50, 500, 400, 600]


def tables(one_hot: bool = False) -> List[MultiHashEmbeddingBagConfig]:
    """One table per kind of lookup: per-id mult (EC), pooled add / concat / full / hash (EBC),
    learned mappings (alone, pooled; before Q-R mult, per id). ``one_hot``: every table declared
    ``max_ids_per_bag=1`` (mult looked up pooled; feed it ``batches(..., max_bag=1)``)."""

    def t(i, **kw):
        one = {"max_ids_per_bag": 1} if one_hot else {}
        return MultiHashEmbeddingBagConfig(name=f"t_f{i}", num_embeddings=VOCAB[i], embedding_dim=DIM, feature_names=[f"f{i}"], **one, **kw)

    return [
        t(0, strategy="qr", operation="mult", num_collisions=7),
        t(1, strategy="crt", operation="concat", moduli=[13, 17], dims=[8, 8]),
        t(2, strategy="generalized_qr", operation="add", moduli=[4, 5, 6], pooling=PoolingType.MEAN),
        t(3, strategy="full"),
        t(4, strategy="hash", num_collisions=3),
        t(5, strategy="learned", num_collisions=4, fallback_rows=20),
        t(6, strategy="qr", operation="mult", mapping_rows=100, num_collisions=10, mapping_ids=300),
    ]


def stacked_tables() -> List[MultiHashEmbeddingBagConfig]:
    """``tables()`` with every composed table an add whose parts are stacked in one table
    (``stack_parts``): Q-R, CRT, generalized Q-R (MEAN) and Q-R behind a learned mapping, next to
    the full, hash and learned tables."""

    def t(i, **kw):
        return MultiHashEmbeddingBagConfig(
            name=f"t_f{i}", num_embeddings=VOCAB[i], embedding_dim=DIM, feature_names=[f"f{i}"], operation="add", stack_parts=True, **kw
        )

    plain = tables()
    return [
        t(0, strategy="qr", num_collisions=7),
        t(1, strategy="crt", moduli=[13, 17]),
        t(2, strategy="generalized_qr", moduli=[4, 5, 6], pooling=PoolingType.MEAN),
        *plain[3:6],
        t(6, strategy="qr", mapping_rows=100, num_collisions=10, mapping_ids=300),
    ]


def assign_mappings(ebc: MultiHashEmbeddingBagCollection, seed: int) -> None:
    """A random learned mapping per learned table (a different one for every seed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    for c in ebc.multihash_configs():
        if c.has_mapping():
            known = torch.randperm(c.num_embeddings, generator=g)[: c.mapping_ids]
            rows = torch.randint(0, c.mapping_shape().known_rows(), (known.numel(),), generator=g)
            ebc.learned_mappings()[c.name].assign(known, rows)


def build_model(seed: int = 0, device: torch.device = torch.device("cpu"), stacked: bool = False, one_hot: bool = False) -> DLRMTrain:
    """The test model, its learned mappings assigned from ``seed``; none on the meta device (a
    mapping is assigned once DistributedModelParallel materialised the module). ``stacked``: the
    tables of ``stacked_tables()``; ``one_hot``: of ``tables(one_hot=True)``."""
    torch.manual_seed(seed)
    ebc = MultiHashEmbeddingBagCollection(stacked_tables() if stacked else tables(one_hot), device=device)
    if device.type != "meta":
        assign_mappings(ebc, seed)
    return DLRMTrain(
        DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1], dense_device=device)
    )


def batches(rank: int, world_size: int, n: int, batch_size: int = 8, max_bag: int = 3) -> Iterator[Batch]:
    """Rank ``rank``'s share of ``n`` global batches (the last feature's bags of 1..``max_bag`` ids)."""
    task = SyntheticCriteo.toy(VOCAB, seed=3, max_bag=max_bag)
    for i in range(n):
        yield task.batch(batch_size, i * world_size + rank)


def equal_id_counts(per_rank: List[List[Batch]]) -> List[List[Batch]]:
    """Every rank's batches with rank 0's bag lengths (and so the same number of ids per feature:
    the same per-id lookup batch on every rank, which gloo's row-wise backward needs) and other ids:
    rank 0's shifted by ``7 * rank`` modulo the feature's vocabulary."""
    out = [per_rank[0]]
    for r in range(1, len(per_rank)):
        batches = []
        for mine, first in zip(per_rank[r], per_rank[0]):
            kjt = first.sparse_features
            by_key = kjt.to_dict()
            values = torch.cat([(by_key[k].values() + 7 * r) % VOCAB[int(k[1:])] for k in kjt.keys()])
            sparse = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), weights=kjt.weights_or_none())
            batches.append(Batch(dense_features=mine.dense_features, sparse_features=sparse, labels=mine.labels))
        out.append(batches)
    return out


def shard_with(model, sharding_type, world_size, fused_params, device: torch.device = torch.device("cpu")):
    """``model`` under DistributedModelParallel on ``device``, every sub-table sharded with
    ``sharding_type`` where TorchRec offers it (the app's sub-table constraints); returns (model,
    plan, constraints). On CPU, types TorchRec offers only on CUDA (row_wise, table_row_wise) use the
    test-only sharders of ``cuda_types``; the others, and every type on CUDA, the app's own."""
    configs = next(m for m in model.modules() if isinstance(m, MultiHashEmbeddingBagCollection)).multihash_configs()
    constraints = sub_table_constraints(
        configs,
        {t.name: ParameterConstraints(sharding_types=[sharding_type], min_partition=8) for t in configs},
        small_table_sharding_types=None,
    )
    offered = EmbeddingBagCollectionSharder().sharding_types(device.type)
    shard = sharders(fused_params=fused_params) if sharding_type in offered else cuda_type_sharders(fused_params)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device=device.type), constraints=constraints)
    plan = planner.collective_plan(model, shard, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, plan=plan, sharders=shard, device=device), plan, constraints


def start_from(dmp: DistributedModelParallel, ref: torch.nn.Module, lr: float) -> CombinedOptimizer:
    """Loads the unsharded ``ref``'s weights into ``dmp``'s shards; returns ``dmp``'s optimizer: its
    fused one (the sharded tables') with SGD at ``lr`` for the dense parameters."""
    start = dmp.state_dict()
    copy_into_sharded(start, ref.state_dict())
    dmp.load_state_dict(start)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=lr))
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def local_shards(state: Dict[str, object]) -> Iterator[Tuple[str, torch.Tensor, Tuple[int, ...]]]:
    """(key, local tensor, offsets into the full tensor) for every tensor of a sharded state dict."""
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                yield key, shard.tensor, tuple(shard.metadata.shard_offsets)
        elif isinstance(value, DTensor):
            local = value.to_local()
            if hasattr(local, "local_shards"):  # LocalShardsWrapper (column-wise)
                for t, off in zip(local.local_shards(), local.local_offsets()):
                    yield key, t, tuple(off)
            else:
                yield key, local, (0,) * local.dim()
        elif isinstance(value, torch.Tensor):
            yield key, value, (0,) * value.dim()


def assert_trained_alike(piped, plain, piped_losses: List[float], plain_losses: List[float]) -> None:
    """A pipelined training equals the plain loop's: its losses (which must move) and every local shard."""
    assert len(set(plain_losses)) > 1
    torch.testing.assert_close(piped_losses, plain_losses, atol=1e-6, rtol=1e-6)
    a, b = list(local_shards(piped.state_dict())), list(local_shards(plain.state_dict()))
    assert [(k, o) for k, _, o in a] == [(k, o) for k, _, o in b]
    for (key, x, _), (_, y, _) in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def slice_at(full: torch.Tensor, local: torch.Tensor, offsets: Tuple[int, ...]) -> torch.Tensor:
    idx = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape))
    return full[idx]


def copy_into_sharded(sharded_state: Dict[str, object], full_state: Dict[str, torch.Tensor]) -> None:
    """Copies an unsharded state dict into the local shards of a sharded one."""
    with torch.no_grad():
        for key, local, offsets in local_shards(sharded_state):
            local.copy_(slice_at(full_state[key], local, offsets))


def assert_state_equal(sharded_state: Dict[str, object], full_state: Dict[str, torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5) -> int:
    """Every local shard equals its slice of the unsharded tensor; returns how many were compared."""
    n = 0
    for key, local, offsets in local_shards(sharded_state):
        if local.numel() == 0:
            continue
        torch.testing.assert_close(local.cpu(), slice_at(full_state[key], local, offsets), atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}")
        n += 1
    return n


def train_side_by_side(
    dmp, ref, opt, per_rank: List[List[Batch]], rank: int, lr: float, label: str = "", device: torch.device = torch.device("cpu"), tol: float = 1e-5
) -> float:
    """SGD steps of the sharded ``dmp`` on ``device`` (this rank's batches) and the unsharded ``ref``
    on CPU (every rank's batches, as the sharded model sees them all), asserting logits equal within
    ``tol`` at every step; returns the largest logit difference seen."""
    world_size = len(per_rank)
    ref_params = dict(ref.named_parameters())
    logits_diff = 0.0
    for step in range(len(per_rank[rank])):
        loss, (_, logits, _) = dmp(per_rank[rank][step].to(device))
        logits = logits.cpu()
        ref.zero_grad()
        for r in range(world_size):  # the reference sees every rank's batch
            ref_loss, (_, ref_logits, _) = ref(per_rank[r][step])
            ref_loss.backward()
            if r == rank:
                msg = lambda m, step=step: f"{label}, step {step}: {m}"  # noqa: E731
                torch.testing.assert_close(logits, ref_logits.detach(), atol=tol, rtol=tol, msg=msg)
                logits_diff = max(logits_diff, float((logits - ref_logits).abs().max()))
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            # DDP averages the gradients of dense layers over ranks, and TorchRec divides those
            # of sharded tables by the world size too (its default gradient division)
            for p in ref_params.values():
                p -= lr / world_size * p.grad
    return logits_diff
