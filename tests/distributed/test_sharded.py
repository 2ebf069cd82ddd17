"""Sharded equals unsharded: the same weights and batches give the same outputs, and the same
weights after SGD steps, for every sharding type TorchRec offers on CPU, and for row_wise and
table_row_wise, which it offers on CUDA only, through test-only sharders (2 processes, gloo).

Per-id (mult) tables live in an EmbeddingBagCollection of one-id bags, sharded with every type;
under row_wise and table_row_wise over gloo, every rank gets the same number of ids per feature
(gloo's row-wise backward needs equal per-rank sizes; the module warns of it)."""

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from tests.helpers import sharded_model as sm
from tests.helpers.distributed import run_multiprocess

LR = 0.1
STEPS = 3


def _max_diff(sharded_state, full_state):
    return max(
        (float((local - sm.slice_at(full_state[k], local, off)).abs().max()) for k, local, off in sm.local_shards(sharded_state) if local.numel()),
        default=0.0,
    )


def _check(rank, world_size, sharding_type):
    ref = sm.build_model(seed=0)
    model = sm.build_model(seed=1)  # another init: the copy below must set every weight
    ebc = model.model.sparse_arch.embedding_bag_collection
    unsharded_bytes = ebc.memory_bytes()
    dmp, plan, constraints = sm.shard_with(model, sharding_type, world_size, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    assert ebc.memory_bytes() == unsharded_bytes  # sharded modules' own buffers are not counted

    # every sub-table was placed, with the requested type
    types = {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()}
    assert sorted(types) == sorted(c.name for c in ebc.sub_table_configs())
    for table, st in types.items():
        assert st == constraints[table].sharding_types[0], (table, st)
    if sharding_type != "data_parallel":
        assert types["t_f3"] == sharding_type
    if sharding_type in ("row_wise", "table_row_wise"):  # rows really split over both ranks
        ranks = {t: ps.ranks for mod in plan.plan.values() for t, ps in mod.items()}
        assert all(sorted(r) == list(range(world_size)) for r in ranks.values()), ranks

    opt = sm.start_from(dmp, ref, LR)

    per_rank = [list(sm.batches(r, world_size, STEPS)) for r in range(world_size)]
    if sharding_type in ("row_wise", "table_row_wise"):
        # gloo's row-wise backward needs the same per-id lookup batch on every rank (see lookup_checks)
        per_rank = sm.equal_id_counts(per_rank)
        with pytest.warns(UserWarning, match=r"lookup group 'per_id_d16' \(mult tables, looked up per id\) is sharded .*row_wise over gloo"):
            dmp(per_rank[rank][0])
    logits_diff = sm.train_side_by_side(dmp, ref, opt, per_rank, rank, LR, label=sharding_type)
    state, ref_state = dmp.state_dict(), ref.state_dict()
    diffs = torch.tensor([logits_diff, _max_diff(state, ref_state)])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    if rank == 0:  # shown with -s
        print(f"{sharding_type}: max |sharded - unsharded| logits {diffs[0]:.2e}, weights after {STEPS} steps {diffs[1]:.2e}")
    compared = sm.assert_state_equal(state, ref_state)
    assert compared >= len(types) / world_size


def _worker(rank, world_size, sharding_types):
    for sharding_type in sharding_types:  # several in one process group: one start-up
        _check(rank, world_size, sharding_type)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "sharding_types",
    [("data_parallel",), ("table_wise",), ("column_wise",), ("table_column_wise",), ("row_wise", "table_row_wise")],
    ids=lambda types: "+".join(types),
)
def test_sharded_equals_unsharded(sharding_types):
    run_multiprocess(_worker, 2, sharding_types)
