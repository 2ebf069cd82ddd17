"""Sharded equals unsharded: the same weights and batches give the same outputs, and the same
weights after SGD steps, for every sharding type TorchRec offers on CPU (2 processes, gloo)."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tests.helpers import sharded_model as sm
from tests.helpers.distributed import run_multiprocess

LR = 0.1
STEPS = 3


def _worker(rank, world_size, sharding_type):
    ref = sm.build_model(seed=0)
    model = sm.build_model(seed=1)  # another init: the copy below must set every weight
    ebc = model.model.sparse_arch.embedding_bag_collection
    unsharded_bytes = ebc.memory_bytes()
    dmp, plan, constraints = sm.shard_with(model, sharding_type, world_size, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    assert ebc.memory_bytes() == unsharded_bytes  # sharded modules' own buffers are not counted

    # every sub-table was placed, with the requested type (mult sub-tables: the closest an
    # EmbeddingCollection has, see constraints.py)
    types = {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()}
    assert sorted(types) == sorted(c.name for c in ebc.sub_table_configs())
    for table, st in types.items():
        assert st == constraints[table].sharding_types[0], (table, st)
    if sharding_type != "data_parallel":
        assert types["t_f3"] == sharding_type

    start = dmp.state_dict()
    sm.copy_into_sharded(start, ref.state_dict())
    dmp.load_state_dict(start)
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=LR))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt])

    per_rank = [list(sm.batches(r, world_size, STEPS)) for r in range(world_size)]
    sm.train_side_by_side(dmp, ref, opt, per_rank, rank, LR)
    compared = sm.assert_state_equal(dmp.state_dict(), ref.state_dict())
    assert compared >= len(types) / world_size


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sharding_type", ["data_parallel", "table_wise", "column_wise", "table_column_wise"])
def test_sharded_equals_unsharded(sharding_type):
    run_multiprocess(_worker, 2, sharding_type)
