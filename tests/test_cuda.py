"""On a GPU: the test DLRM's multi-hash tables sharded by DistributedModelParallel onto CUDA, with
FBGEMM's CUDA kernels and fused SGD (one rank, NCCL), equal the unsharded module on CPU, forward and
after training steps, for every sharding type and every layout (per-id mult, pooled one-hot mult,
stacked add). Skipped where there is no GPU (CI has none); run on a lent GPU with
``pytest tests/test_cuda.py``."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tests.helpers import sharded_model as sm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LR = 0.1
STEPS = 3
TOL = 1e-4  # CUDA sums in another order than CPU


@pytest.fixture(scope="module")
def nccl_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["per_id", "one_hot", "stacked"])
@pytest.mark.parametrize("sharding_type", ["data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"])
def test_cuda_sharded_equals_cpu_unsharded(nccl_group, sharding_type, layout):
    device = torch.device("cuda", 0)
    kind = {"stacked": layout == "stacked", "one_hot": layout == "one_hot"}
    ref = sm.build_model(seed=0, **kind)
    model = sm.build_model(seed=1, **kind).to(device)  # another init: the copy below must set every weight
    dmp, plan, constraints = sm.shard_with(model, sharding_type, 1, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}, device=device)
    types = {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()}
    for table, st in types.items():
        assert st == constraints[table].sharding_types[0], (table, st)
    kernels = {ps.compute_kernel for mod in plan.plan.values() for ps in mod.values()}
    assert kernels <= {"fused", "dense"}, kernels  # FBGEMM's TBE kernels, on the GPU

    start = dmp.state_dict()
    sm.copy_into_sharded(start, ref.state_dict())
    dmp.load_state_dict(start)
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=LR))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    per_rank = [list(sm.batches(0, 1, STEPS, batch_size=64, max_bag=1 if layout == "one_hot" else 3))]
    diff = sm.train_side_by_side(dmp, ref, opt, per_rank, 0, LR, label=f"{sharding_type}/{layout}", device=device, tol=TOL)
    print(f"{sharding_type}/{layout}: max |cuda - cpu| logits {diff:.2e}")
    assert sm.assert_state_equal(dmp.state_dict(), ref.state_dict(), atol=TOL, rtol=TOL) >= 1
