"""Distributed checkpoints: save from 2 ranks, load on 1 rank (unsharded) and on 2 ranks with
another plan; every table equals what was saved."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig
from torchrec_multihash.distributed import load_checkpoint, save_checkpoint

from tests.helpers import ROOT
from tests.helpers import sharded_model as sm
from tests.helpers.distributed import run_multiprocess
from tests.helpers.modules import one_table_ebc

FUSED = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}


def _save(rank, world_size, path):
    saved = sm.build_model(seed=0)
    dmp, _, _ = sm.shard_with(sm.build_model(seed=1), "table_wise", world_size, FUSED)
    state = dmp.state_dict()
    sm.copy_into_sharded(state, saved.state_dict())
    dmp.load_state_dict(state)
    save_checkpoint(path, dmp)


def _load_other_plan(rank, world_size, path):
    dmp, plan, _ = sm.shard_with(sm.build_model(seed=2), "column_wise", world_size, FUSED)
    assert {ps.sharding_type for mod in plan.plan.values() for ps in mod.values()} == {"column_wise"}
    load_checkpoint(path, dmp)
    n = sm.assert_state_equal(dmp.state_dict(), sm.build_model(seed=0).state_dict(), atol=0)
    assert n > 10


def _save_then_load_other_plan(rank, world_size, path):
    """``_save``, then ``_load_other_plan`` into a new model, in one group of processes (a spawn
    each would cost more than either)."""
    _save(rank, world_size, path)
    _load_other_plan(rank, world_size, path)


@pytest.mark.slow
@pytest.mark.distributed
def test_save_on_two_ranks_load_on_one_and_on_two_with_another_plan(tmp_path):
    path = tmp_path / "ckpt"
    run_multiprocess(_save_then_load_other_plan, 2, path)  # the 2-rank load: assertions in _load_other_plan
    assert (path / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary left

    one = sm.build_model(seed=3)  # 1 rank, no process group, unsharded
    load_checkpoint(path, one)
    expected = sm.build_model(seed=0).state_dict()
    before = sm.build_model(seed=3).state_dict()
    for key, value in one.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)
    table = "model.sparse_arch.embedding_bag_collection.per_id.per_id_d16.tables.embedding_bags.t_f0.weight"
    assert not torch.equal(before[table], expected[table])


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


def test_a_symlinked_checkpoint_folder_stays_a_link_save_after_save(tmp_path):
    # a run folder whose checkpoint/ links to a bigger disk: the second save failed (NotADirectoryError),
    # after the training it was to keep; saves now go where the link points
    disk, run = tmp_path / "disk", tmp_path / "run"
    (disk / "ckpt").mkdir(parents=True)
    run.mkdir()
    (run / "checkpoint").symlink_to(disk / "ckpt")
    for seed in (0, 5, 7):
        save_checkpoint(run / "checkpoint", sm.build_model(seed=seed))
    assert (run / "checkpoint").is_symlink() and sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in disk.iterdir()) == ["ckpt"]  # no leftovers beside it
    m = sm.build_model(seed=0)
    load_checkpoint(run / "checkpoint", m)
    expected = sm.build_model(seed=7).state_dict()
    for key, value in m.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nope", sm.build_model())


class _Payload:
    """Unpickling this touches ``marker``: proof that a loader executed code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_code_payload_in_the_index_is_refused_unexecuted(tmp_path):
    import pickle

    from torchrec_multihash.distributed import CheckpointError

    path, marker = tmp_path / "ckpt", tmp_path / "ran"
    save_checkpoint(path, one_table_ebc())
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a safe DCP checkpoint index: refusing to load io.open"):
        load_checkpoint(path, one_table_ebc())
    assert not marker.exists()
    # stock DCP would have run it
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load({"model": one_table_ebc().state_dict()}, checkpoint_id=str(path))
    except BaseException:
        pass
    assert marker.exists()


def test_a_code_payload_in_an_entry_is_refused_unexecuted_plain_data_loads(tmp_path):
    from torchrec_multihash.distributed import CheckpointError

    path, marker = tmp_path / "ckpt", tmp_path / "ran"
    # where a tensor is expected (the data position): refused before DCP reads anything
    save_checkpoint(path, one_table_ebc(), {"progress": _Payload(marker)})
    with pytest.raises(CheckpointError, match="progress is not a tensor in the checkpoint"):
        load_checkpoint(path, one_table_ebc(), {"progress": torch.zeros(4, dtype=torch.int64)})
    # where plain data is expected (a torch optimizer's param_groups, pickled by DCP)
    save_checkpoint(path, one_table_ebc(), {"opt": {"param_groups": [{"lr": _Payload(marker)}]}})
    with pytest.raises(CheckpointError, match="opt.param_groups.0.lr is not plain data"):
        load_checkpoint(path, one_table_ebc(), {"opt": {"param_groups": [{"lr": 0.0}]}})
    assert not marker.exists()

    m = torch.nn.Linear(2, 2)
    adam = torch.optim.Adam(m.parameters(), lr=0.123, betas=(0.8, 0.9))
    m(torch.ones(1, 2)).sum().backward()
    adam.step()
    save_checkpoint(path, one_table_ebc(), {"opt": adam.state_dict()})
    fresh = torch.optim.Adam(m.parameters(), lr=1.0)
    m(torch.ones(1, 2)).sum().backward()
    fresh.step()
    sd = fresh.state_dict()
    load_checkpoint(path, one_table_ebc(), {"opt": sd})
    assert sd["param_groups"][0]["lr"] == 0.123 and sd["param_groups"][0]["betas"] == (0.8, 0.9)
    torch.testing.assert_close(sd["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_of_another_config_is_refused_naming_the_table(tmp_path):
    from torchrec_multihash.distributed import CheckpointError

    path = tmp_path / "ckpt"
    save_checkpoint(path, one_table_ebc())
    with pytest.raises(CheckpointError, match=r"table t_C1 has shape \[125, 16\] in the checkpoint, \[250, 16\] in this model"):
        load_checkpoint(path, one_table_ebc(strategy="qr", operation="mult", num_collisions=4))
    with pytest.raises(CheckpointError, match=r"table t_C1 is looked up per id \(mult\) in the checkpoint, looked up pooled in this model"):
        load_checkpoint(path, one_table_ebc(strategy="full"))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: table t_C2, table t_C2__r \(its tables: t_C1, t_C1__r\)"):
        cfg = MultiHashEmbeddingBagConfig(name="t_C2", num_embeddings=1000, embedding_dim=16, feature_names=["C1"], num_collisions=8)
        load_checkpoint(path, MultiHashEmbeddingBagCollection([cfg]))
    load_checkpoint(path, one_table_ebc())  # the same config loads


CRASH_IN_SAVE = """
import os, sys, torch
from torch.distributed.checkpoint import FileSystemWriter
from torchrec_multihash.distributed import save_checkpoint
from tests.helpers.modules import one_table_ebc

torch.manual_seed(1)
save_checkpoint(sys.argv[1], one_table_ebc())
def die(self, *a, **k):  # the data files are written; the index is next
    os._exit(3)
FileSystemWriter.finish = die
torch.manual_seed(2)
save_checkpoint(sys.argv[1], one_table_ebc())
"""


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    import subprocess
    import sys

    from torchrec_multihash.distributed import find_checkpoint

    path = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert list(left.glob("*.distcp")) and not (left / ".metadata").exists()  # killed mid-save

    torch.manual_seed(1)
    first = one_table_ebc().state_dict()
    m = one_table_ebc()
    load_checkpoint(path, m)
    assert not torch.equal(next(iter(m.state_dict().values())), next(iter(one_table_ebc().state_dict().values())))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, first[k], atol=0, rtol=0)

    # a crash between save's two renames: only the previous copy, under its old name
    path.rename(tmp_path / ".ckpt.old")
    assert find_checkpoint(path) == tmp_path / ".ckpt.old"
    m = one_table_ebc()
    load_checkpoint(path, m)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, first[k], atol=0, rtol=0)

    save_checkpoint(path, one_table_ebc())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _saved(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, one_table_ebc())
    return path, next(path.glob("*.distcp"))


def test_a_damaged_shard_file_is_refused_naming_it(tmp_path):
    """Issue 14, item 8: missing, truncated and bit-flipped data files (DCP has no checksums)."""
    from torchrec_multihash.distributed import CheckpointError

    path, shard = _saved(tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit, same size
    with pytest.raises(CheckpointError, match=f"file {shard.name} does not match its checksum"):
        load_checkpoint(path, one_table_ebc())
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"file {shard.name} is truncated"):
        load_checkpoint(path, one_table_ebc())
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"file {shard.name} is missing"):
        load_checkpoint(path, one_table_ebc())
    shard.write_bytes(data)
    load_checkpoint(path, one_table_ebc())  # as saved: loads
    # a flipped bit and the manifest deleted: refused all the same (no manifest turned every check off)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no manifest.json \(the checksums of its files\): it is damaged"):
        load_checkpoint(path, one_table_ebc())


def test_an_index_pointing_outside_the_folder_is_refused(tmp_path):
    import pickle

    from torchrec_multihash.distributed import CheckpointError
    from torchrec_multihash.distributed.checkpoint import read_index

    path, shard = _saved(tmp_path)
    md = read_index(path)
    for info in md.storage_data.values():
        info.relative_path = "../../x.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="points at '../../x.distcp', outside the checkpoint folder"):
        load_checkpoint(path, one_table_ebc())


def test_a_checkpoint_folder_without_its_index_is_not_taken_for_none(tmp_path):
    from torchrec_multihash.distributed import CheckpointError, find_checkpoint

    path, _ = _saved(tmp_path)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="holds checkpoint files but no .metadata index"):
        find_checkpoint(path)
    assert find_checkpoint(tmp_path / "nothing") is None


def test_save_and_load_checkpoint_are_exported_at_the_top_level(tmp_path):
    import torchrec_multihash

    torchrec_multihash.save_checkpoint(tmp_path / "c", one_table_ebc(), meta={"note": 1})
    torchrec_multihash.load_checkpoint(tmp_path / "c", one_table_ebc())
    from torchrec_multihash.distributed.checkpoint_files import read_manifest

    assert read_manifest(tmp_path / "c")["meta"] == {"note": 1}
