"""On a GPU: the test DLRM's multi-hash tables sharded by DistributedModelParallel onto CUDA, with
FBGEMM's CUDA kernels and fused SGD (one rank, NCCL), equal the unsharded module on CPU, forward and
after training steps, for every sharding type and every layout (per-id mult, pooled one-hot mult,
stacked add). Skipped where there is no GPU (CI has none); run on a lent GPU with
``pytest tests/distributed/test_cuda.py``."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, PoolingType
from torchrec_multihash.modules.id_transform import IdTransform, InvalidInputError

from tests.helpers import sharded_model as sm
from tests.modules.test_flat_transform import mixed_configs, mixed_kjt

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

    opt = sm.start_from(dmp, ref, LR)
    per_rank = [list(sm.batches(0, 1, STEPS, batch_size=64, max_bag=1 if layout == "one_hot" else 3))]
    diff = sm.train_side_by_side(dmp, ref, opt, per_rank, 0, LR, label=f"{sharding_type}/{layout}", device=device, tol=TOL)
    print(f"{sharding_type}/{layout}: max |cuda - cpu| logits {diff:.2e}")
    assert sm.assert_state_equal(dmp.state_dict(), ref.state_dict(), atol=TOL, rtol=TOL) >= 1


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_cuda_flat_id_transform_equals_the_module_on_cpu(weighted, pooling, monkeypatch):
    """The flat id transform (every feature at once; on a GPU at any size) and the combine on CUDA,
    unsharded: the same outputs and gradients as the module on CPU, and the same error for a bad id."""
    flat_devices = []
    forward_flat = IdTransform._forward_flat

    def spy(self, features):
        flat_devices.append(features.device().type)
        return forward_flat(self, features)

    monkeypatch.setattr(IdTransform, "_forward_flat", spy)
    cfgs = mixed_configs(pooling)
    torch.manual_seed(0)
    cpu = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    gpu = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted, device=torch.device("cuda", 0))
    gpu.load_state_dict(cpu.state_dict())
    kjt = mixed_kjt(cfgs, weighted, batch=33, order=["h", "g", "f", "e", "d", "c", "b", "a"])
    # the GPU module its own KJT, as a loader gives: TorchRec's KJT.to() carries over the CPU
    # JaggedTensors that to_dict() cached on the first module's forward
    on_gpu = KeyedJaggedTensor(kjt.keys(), kjt.values(), kjt.weights_or_none(), kjt.lengths()).to(torch.device("cuda", 0))
    out_cpu, out_gpu = cpu(kjt), gpu(on_gpu)
    assert flat_devices == ["cpu", "cuda"]  # both ran the flat path
    torch.testing.assert_close(out_gpu.values().cpu(), out_cpu.values(), atol=TOL, rtol=TOL)
    out_cpu.values().sum().backward()
    out_gpu.values().sum().backward()
    grads = {n: p.grad for n, p in cpu.named_parameters()}
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[n], atol=TOL, rtol=TOL, msg=lambda m, n=n: f"{n}: {m}")
    bad = KeyedJaggedTensor(kjt.keys(), kjt.values().clone(), kjt.weights_or_none(), kjt.lengths())
    bad.values()[-1] = 10**6  # feature 'a': outside both of its tables
    with pytest.raises(InvalidInputError, match="feature 'a'"):
        gpu(bad.to(torch.device("cuda", 0)))
