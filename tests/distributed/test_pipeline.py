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


def _train(rank, world_size, pipelined, stacked=False):
    model = sm.build_model(seed=0, stacked=stacked)
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
    assert pipelined_modules == {"ShardedEmbeddingBagCollection"}, pipelined_modules
    assert len(pipeline._pipelined_modules) == 2  # the pooled and the per-id lookups
    postprocs = sorted(p._fqn for p in pipeline._pipelined_postprocs)
    assert postprocs == [f"{prefix}.per_id.per_id_d16.transform", f"{prefix}.pooled.pooled.transform"], postprocs

    sm.assert_trained_alike(piped, plain, piped_losses, plain_losses)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_overlaps_input_dist_and_trains_like_the_plain_loop():
    run_multiprocess(_worker, 2)


def _golden_flow(rank, world_size, operations, only_ebc_sharder, pipeline_postproc):
    """TorchRec's examples/golden_training/train_dlrm.py with the one-line swap: DLRM, DMP with the
    sharders given, TrainPipelineSparseDist(model, optimizer, device) as called there."""
    import warnings

    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardedModule
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_multihash import MultiHashEmbeddingBagCollection, sharders, to_multihash_configs
    from torchrec_multihash.datasets.synthetic import SyntheticCriteo
    from torchrec_multihash.modules.lookup_checks import PIPELINE_HINT

    configs = [EmbeddingBagConfig(name=f"t_f{i}", num_embeddings=1000, embedding_dim=16, feature_names=[f"f{i}"]) for i in range(2)]
    overrides = {c.name: {"operation": op} for c, op in zip(configs, operations)}
    tables = to_multihash_configs(configs, 8, strategy="qr", overrides=overrides)
    ebc = MultiHashEmbeddingBagCollection(tables, device=torch.device("meta"))
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16], over_arch_layer_sizes=[8, 1]))
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
    shard = [EmbeddingBagCollectionSharder(fused_params=fused)] if only_ebc_sharder else sharders(fused)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=shard)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adagrad(p, lr=0.1))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    kw = {"pipeline_postproc": True} if pipeline_postproc else {}
    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), **kw)
    task = SyntheticCriteo.toy([1000, 1000], seed=3)
    data = iter([task.batch(8, i * world_size + rank) for i in range(4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            pipeline.progress(data)
    hints = [w for w in caught if str(w.message) == PIPELINE_HINT]
    assert len(hints) == (0 if pipeline_postproc else 1), [str(w.message) for w in caught]
    groups = len({"per_id" if op == "mult" else "pooled" for op in operations})
    assert len(pipeline._pipelined_modules) == (groups if pipeline_postproc else 0)
    inner = dmp.module.model.sparse_arch.embedding_bag_collection
    assert all(isinstance(g.tables, ShardedModule) for g in [*inner.pooled.values(), *inner.per_id.values()])  # the EBC sharder shards all


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "operations,only_ebc_sharder,pipeline_postproc",
    [(("add", "mult"), True, True), (("add", "add"), False, False), (("add", "add"), False, True)],
    ids=["mult-tables-sharded-by-the-ebc-sharder-alone", "default-pipeline-is-told-what-to-pass", "pipeline_postproc-pipelines"],
)
def test_torchrec_golden_training_flow_with_the_one_line_swap(operations, only_ebc_sharder, pipeline_postproc):
    run_multiprocess(_golden_flow, 2, operations, only_ebc_sharder, pipeline_postproc)
