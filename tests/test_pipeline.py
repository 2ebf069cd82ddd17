"""TrainPipelineSparseDist pipelines the sub-tables' input dist, id transforms included, and
trains exactly as the plain loop does (2 processes, gloo)."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tests.helpers import sharded_model as sm
from tests.helpers.distributed import run_multiprocess

STEPS = 6


def _train(rank, world_size, pipelined):
    model = sm.build_model(seed=0)
    dmp, _, _ = sm.shard_with(model, "table_wise", world_size, {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adagrad(p, lr=0.1))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    data = list(sm.batches(rank, world_size, STEPS))
    losses = []
    if not pipelined:
        for b in data:
            loss, _ = dmp(b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return dmp, losses, None
    pipeline = TrainPipelineSparseDist(dmp, opt, device=torch.device("cpu"), pipeline_postproc=True)
    it = iter(data)
    for _ in range(STEPS):
        loss, _, _ = pipeline.progress(it)  # the pipeline returns the model's output tuple
        losses.append(loss.item())
    return dmp, losses, pipeline


def _worker(rank, world_size):
    plain, plain_losses, _ = _train(rank, world_size, pipelined=False)
    piped, piped_losses, pipeline = _train(rank, world_size, pipelined=True)

    prefix = "model.sparse_arch.embedding_bag_collection"
    pipelined_modules = {type(m).__name__ for m in pipeline._pipelined_modules}
    assert pipelined_modules == {"ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"}, pipelined_modules
    postprocs = sorted(p._fqn for p in pipeline._pipelined_postprocs)
    assert postprocs == [f"{prefix}.per_id.per_id_d16.transform", f"{prefix}.pooled.pooled.transform"], postprocs

    assert len(set(plain_losses)) > 1
    torch.testing.assert_close(piped_losses, plain_losses, atol=1e-6, rtol=1e-6)
    a = list(sm.local_shards(piped.state_dict()))
    b = list(sm.local_shards(plain.state_dict()))
    assert [(k, o) for k, _, o in a] == [(k, o) for k, _, o in b]
    for (key, x, _), (_, y, _) in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_overlaps_input_dist_and_trains_like_the_plain_loop():
    run_multiprocess(_worker, 2)
