"""Distributed checkpoints: save from 2 ranks, load on 1 rank (unsharded) and on 2 ranks with
another plan; every table equals what was saved."""

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_multihash.distributed import load_checkpoint, save_checkpoint
from tests import sharded_model as sm
from tests.dist_util import run_multiprocess
from tests.test_sharded import shard_with

FUSED = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}


def _save(rank, world_size, path):
    saved = sm.build_model(seed=0)
    dmp, _, _ = shard_with(sm.build_model(seed=1), "table_wise", world_size, FUSED)
    state = dmp.state_dict()
    sm.copy_into_sharded(state, saved.state_dict())
    dmp.load_state_dict(state)
    save_checkpoint(path, dmp)


def _load_other_plan(rank, world_size, path):
    dmp, plan, _ = shard_with(sm.build_model(seed=2), "column_wise", world_size, FUSED)
    assert {ps.sharding_type for mod in plan.plan.values() for ps in mod.values()} == {"column_wise"}
    load_checkpoint(path, dmp)
    n = sm.assert_state_equal(dmp.state_dict(), sm.build_model(seed=0).state_dict(), atol=0)
    assert n > 10


def test_save_on_two_ranks_load_on_one_and_on_two_with_another_plan(tmp_path):
    path = tmp_path / "ckpt"
    run_multiprocess(_save, 2, path)
    assert (path / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary left

    one = sm.build_model(seed=3)  # 1 rank, no process group, unsharded
    load_checkpoint(path, one)
    expected = sm.build_model(seed=0).state_dict()
    before = sm.build_model(seed=3).state_dict()
    for key, value in one.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)
    table = "model.sparse_arch.embedding_bag_collection.lookups.per_id_d16.embeddings.t_f0__q.weight"
    assert not torch.equal(before[table], expected[table])

    run_multiprocess(_load_other_plan, 2, path)


def test_overwriting_a_checkpoint_keeps_one_valid_copy(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, sm.build_model(seed=0))
    save_checkpoint(path, sm.build_model(seed=5))
    m = sm.build_model(seed=0)
    load_checkpoint(path, m)
    expected = sm.build_model(seed=5).state_dict()
    for key, value in m.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nope", sm.build_model())
