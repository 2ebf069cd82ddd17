"""The training app end to end: synthetic data on 1 and 2 processes, real MovieLens CTR data;
checkpoints, resuming and restarts."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchrec_multihash.app.train_state import TrainState
from torchrec_multihash.distributed.checkpoint import read_index

from tests.helpers.cli import SMALL, train

KEYS = {"auc", "logloss", "ne", "embedding_bytes", "full_embedding_bytes", "train_samples_per_s", "steps", "world_size"}


@pytest.mark.slow
def test_synthetic_one_process_learns_and_writes_metrics(tmp_path):
    r, m = train(tmp_path, *SMALL, "--set", "train.eval_every=50")
    assert r.returncode == 0, r.stderr[-3000:]
    assert KEYS <= set(m)
    assert m["steps"] == 117 and m["world_size"] == 1
    assert m["full_embedding_bytes"] / m["embedding_bytes"] > 7
    assert m["auc"] > 0.58  # the hidden clusters are learnable (base rate gives 0.5)
    assert [h["step"] for h in m["eval_history"]] == [50, 100]
    assert "Test AUC" in r.stdout and "Run outputs in" in r.stdout


# torchrun --max-restarts=1 and --resume auto: the job restarts a rank that dies from its last
# checkpoint. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 works around pytorch#135712 (torch 2.13 keeps the
# rendezvous store across restarts: restarted ranks can read the dead ranks' addresses).
RESTARTS = ["--standalone", "--max-restarts=1"]
RESTARTS_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RESTARTABLE = [*SMALL, "--set", "train.eval_every=25", "--set", "train.checkpoint_every=20", "--resume", "auto"]


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory):
    """SMALL on 2 ranks, an evaluation every 25 steps and a checkpoint every 20, from start to end
    without a fault (as a restartable job: no checkpoint to resume yet): (process, metrics, its
    folder). The 2-process run checked below, and the uninterrupted run that the resumed and the
    restarted runs must equal."""
    tmp = tmp_path_factory.mktemp("straight_two_ranks")
    r, m = train(tmp, *RESTARTABLE, nproc=2, torchrun=RESTARTS, env=RESTARTS_ENV)
    return r, m, tmp


@pytest.mark.slow
@pytest.mark.distributed
def test_synthetic_two_processes(straight_two_ranks):
    # evaluation in the middle of training must not collide with batches in flight
    r, m, _ = straight_two_ranks  # SMALL, eval_every=25, on 2 processes
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["world_size"] == 2 and m["steps"] == 58
    assert [h["step"] for h in m["eval_history"]] == [25, 50]
    assert m["auc"] > 0.55


@pytest.mark.slow
def test_movielens_full_and_qr(tmp_path, shared_data):
    cfg = "configs/movielens_100k_ctr_full.yaml"
    data = [
        "--set",
        f"data.train={shared_data / 'movielens_100k_ctr/train.txt'}",
        "--set",
        f"data.test={shared_data / 'movielens_100k_ctr/test.txt'}",
    ]
    r, full = train(tmp_path / "full", *data, config=cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert full["auc"] > 0.775  # reference (shared/data/README.md): about 0.787
    r, qr = train(tmp_path / "qr", *data, "--set", "embeddings.strategy=qr", "--set", "embeddings.compression=4", config=cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 3.9 < qr["full_embedding_bytes"] / qr["embedding_bytes"] < 4.1  # a quarter of the memory
    assert qr["full_embedding_bytes"] == full["full_embedding_bytes"]
    assert qr["auc"] > 0.76


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.batchsize=3"], "unknown key(s) ['train.batchsize']"),
        (["--set", "data.format=parquet"], "data.format must be one of"),
        (
            ["--set", "data.format=criteo_tsv", "--set", "data.train=/nope.txt", "--set", "data.test=/nope.txt"],
            "data.train: no such file(s) ['/nope.txt'] (relative paths are from the working directory",
        ),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, args, message):
    r, _ = train(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_data_paths_and_sizes_that_cannot_be_read_are_named(tmp_path):
    """In-process (what the command above prints, without its start-up): a folder for a file, and
    hashing sizes that do not match the features."""
    from torchrec_multihash.app.config import ConfigError, load_config
    from torchrec_multihash.app.data import make_data

    cfg = load_config("configs/quickstart.yaml", ["data.format=criteo_tsv", f"data.train={tmp_path}", "data.test=/nope.txt"])
    with pytest.raises(ConfigError, match=r"data.train: \[.*\] is a folder: list the files in it"):
        make_data(cfg, 0, 1, tmp_path)
    cfg = load_config("configs/quickstart.yaml", ["data.format=criteo_tsv", "data.train=README.md", "data.test=README.md"])
    cfg.embeddings.num_embeddings_per_feature = [5, 6]
    with pytest.raises(ConfigError, match=r"needs one size per categorical feature for hashing: 2 size\(s\) for 26 features"):
        make_data(cfg, 0, 1, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_then_resume_continues_where_it_stopped(tmp_path, straight_two_ranks):
    """2 ranks: 20 steps and a checkpoint, then --resume to the end == one uninterrupted run."""
    common = [*SMALL, "--set", "train.eval_every=25", "--set", "train.checkpoint_every=20"]
    r, first = train(tmp_path / "a", *common, "--set", "train.max_steps=20", "--set", f"train.output_dir={tmp_path / 'run'}", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert first["steps"] == 20 and (tmp_path / "run" / "checkpoint" / ".metadata").is_file()
    # only tensors: DCP pickles nothing into it (torchrec's optimizers leave out param_groups)
    entries = read_index(tmp_path / "run" / "checkpoint").state_dict_metadata
    assert len(entries) > 50 and all(isinstance(e, TensorStorageMetadata) for e in entries.values())
    assert any(k.startswith("optimizer.state.") for k in entries)
    assert {f"train_state.{f.name}" for f in fields(TrainState)} <= set(entries)
    # the data position is per rank: 1 rank cannot continue what 2 started
    r, _ = train(tmp_path / "one", *common, "--set", f"train.output_dir={tmp_path / 'run'}", "--resume")
    assert r.returncode == 2 and "world_size: 2 then, 1 now" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r, resumed = train(tmp_path / "b", *common, "--set", f"train.output_dir={tmp_path / 'run'}", "--resume", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "step 20" in r.stdout
    r, straight, _ = straight_two_ranks  # *common on 2 ranks, uninterrupted
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed["steps"] == straight["steps"] == 58
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    r, _ = train(tmp_path, *SMALL, "--resume")
    assert r.returncode == 2 and "--resume: no checkpoint in" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nor an empty folder


@pytest.mark.slow
def test_resume_of_another_config_is_a_clear_error(tmp_path):
    common = [*SMALL, "--set", "train.checkpoint_every=5", "--set", "train.max_steps=5", "--set", f"train.output_dir={tmp_path / 'run'}"]
    r, _ = train(tmp_path / "a", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r, _ = train(tmp_path / "b", *common, "--set", "embeddings.compression=4", "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "written by a run with other settings (embeddings.compression: 8.0 then, 4.0 now)" in r.stderr
    r, _ = train(tmp_path / "b", *common, "--set", "train.dense_optimizer=adam", "--resume")  # the same tables, other state
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "exp_avg" in r.stderr and "the optimizer differs (its state has other names): was train.dense_optimizer" in r.stderr
    # without its manifest (the checksums and the run's settings) a checkpoint is refused: deleting it
    # must not turn the checks off
    (tmp_path / "run" / "checkpoint" / "manifest.json").unlink()
    r, _ = train(tmp_path / "b", *common, "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "records no run settings (no manifest.json): it is damaged or was not written by torchrec-multihash train" in r.stderr


CRASH_IN_SECOND_SAVE = """
import os, sys
from torch.distributed.checkpoint import FileSystemWriter
from torchrec_multihash.cli import main

finish, saves = FileSystemWriter.finish, []
def finish_or_die(self, *a, **k):  # the second save dies once its data files are written
    saves.append(1)
    if len(saves) == 2:
        os._exit(3)
    return finish(self, *a, **k)
FileSystemWriter.finish = finish_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_crash_mid_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    run = tmp_path / "run"
    common = [*SMALL, "--set", "train.checkpoint_every=10", "--set", "train.max_steps=30", "--set", f"train.output_dir={run}"]
    r, _ = train(tmp_path / "a", *common, python=("-c", CRASH_IN_SECOND_SAVE))
    assert r.returncode == 3, r.stderr[-3000:]
    assert [p.name for p in run.glob(".checkpoint.tmp-*")]  # what the crash left
    r, resumed = train(tmp_path / "b", *common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "step 10" in r.stdout and resumed["steps"] == 30
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    # the throughput is of this process's steps: none when resumed at the end (was all 30 steps' samples / ~0 s)
    r, again = train(tmp_path / "c", *common, "--resume")
    assert r.returncode == 0 and again["steps"] == 30 and again["train_samples_per_s"] == 0, r.stderr[-3000:]
    assert "no training step in this process" in r.stdout


@pytest.mark.slow
def test_a_time_based_checkpoint_is_what_a_crashed_run_resumes_from(tmp_path):
    # train.checkpoint_every_minutes alone (no step interval): one falls due at once, and is saved
    # where the segment ends (step 100 of the epoch's 117); the run dies after step 105 and resumes
    # from it, ending as an uninterrupted run does
    run = tmp_path / "run"
    common = [*SMALL, "--set", "train.checkpoint_every_minutes=0.0001", "--set", f"train.output_dir={run}"]
    r, crashed = train(tmp_path / "a", *common, env={"MULTIHASH_FAULT_AT_STEP": "105"})
    assert r.returncode != 0 and crashed is None and "rank 0 exits after step 105" in r.stderr, r.stderr[-3000:]
    r, resumed = train(tmp_path / "b", *common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "step 100" in r.stdout and resumed["steps"] == 117
    r, straight = train(tmp_path / "c", *SMALL, "--set", f"train.output_dir={tmp_path / 'straight'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (resumed["auc"], resumed["logloss"]) == (straight["auc"], straight["logloss"])


def _checkpoint_tensors(path: Path, tmp: Path) -> dict:
    dcp_to_torch_save(path, tmp)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(torch.load(tmp, weights_only=True))
    return flat


def _train_state(flat: dict) -> TrainState:
    return TrainState.from_state_dict({f.name: flat[f"train_state.{f.name}"] for f in fields(TrainState)})


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_mid_epoch_restarts_from_the_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, straight_two_ranks):
    """2 ranks under ``torchrun --max-restarts=1``, a checkpoint every 20 steps, ``--resume auto``;
    rank 1 dies after step 25 of the 58 of epoch 0 (first attempt only). torchrun restarts both
    ranks, they resume from step 20 and redo steps 21-25 on the same batches. The job ends with
    exactly (bit for bit) the weights, optimizer state and data position (epoch, steps, samples) of
    the same command run without the fault: nothing random is drawn during training, the CPU
    kernels are deterministic and a 2-rank gloo sum does not depend on order."""
    r, straight, straight_dir = straight_two_ranks  # the same command without the fault
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume auto: no checkpoint" in r.stdout
    fault = {**RESTARTS_ENV, "MULTIHASH_FAULT_AT_STEP": "25", "MULTIHASH_FAULT_RANK": "1"}
    r, restarted = train(tmp_path / "b", *RESTARTABLE, nproc=2, torchrun=RESTARTS, env=fault)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1 exits after step 25" in r.stderr
    assert "Resumed from" in r.stdout and "step 20 (restart 1)" in r.stdout
    assert restarted["steps"] == straight["steps"] == 58
    assert restarted["logloss"] == straight["logloss"] and restarted["auc"] == straight["auc"]
    a = _checkpoint_tensors(straight_dir / "run" / "checkpoint", tmp_path / "a.pt")
    b = _checkpoint_tensors(tmp_path / "b" / "run" / "checkpoint", tmp_path / "b.pt")
    assert a.keys() == b.keys() and len(a) > 50
    assert _train_state(a) == _train_state(b) == TrainState(epoch=1, batches_in_epoch=0, step=58, samples=58 * 1024, seed=0, world_size=2)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
@pytest.mark.distributed
def test_criteo_tsv_two_ranks_resume_continues_where_it_stopped(tmp_path, shared_data):
    """2 ranks on plain TSV, each reading its own byte range: 3 steps and a checkpoint, then
    --resume to the end == one uninterrupted run (the data position is per rank, in its range)."""
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    days = [tmp_path / "day_0.txt", tmp_path / "day_1.txt"]
    days[0].write_bytes(b"".join(lines[:350]))
    days[1].write_bytes(b"".join(lines[350:]))
    common = ["--set", f"data.train={[str(d) for d in days]}", "--set", f"data.test={[str(days[1])]}", "--set", "train.batch_size=64"]
    common += ["--set", "train.checkpoint_every=3", "--set", "data.ids=vocabulary", "--set", "train.epochs=3"]
    run = ["--set", f"train.output_dir={tmp_path / 'run'}"]
    kaggle = "configs/criteo_kaggle_qr.yaml"
    r, first = train(tmp_path / "a", *common, *run, "--set", "train.max_steps=3", nproc=2, config=kaggle)
    assert r.returncode == 0, r.stderr[-3000:]
    assert first["steps"] == 3
    r, resumed = train(tmp_path / "b", *common, *run, "--resume", nproc=2, config=kaggle)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "step 3" in r.stdout
    r, straight = train(tmp_path / "c", *common, nproc=2, config=kaggle)
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed["steps"] == straight["steps"] >= 18
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6) and straight["auc"] > 0.6


def test_train_keeps_the_memory_it_frees_unless_told_not_to():
    """The app raises glibc's mmap threshold and trim point for its own process, so a step's large
    tensors are not page-faulted in again each step; MULTIHASH_SYSTEM_MALLOC=1 leaves glibc as it is."""
    code = (
        "import resource, sys, torch\n"
        "from torchrec_multihash.app.allocator import keep_freed_memory\n"
        "kept = keep_freed_memory()\n"
        "faults = []\n"
        "for _ in range(3):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    x = torch.ones(100 << 18)  # 100 MB, above glibc's mmap threshold\n"
        "    del x\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(kept, faults[-1])\n"
    )
    for env, kept in (({}, True), ({"MULTIHASH_SYSTEM_MALLOC": "1"}, False)):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr[-2000:]
        said, faults = r.stdout.split()
        assert said == str(kept)
        assert (int(faults) < 1000) == kept, faults  # 100 MB is 25,600 pages: faulted in again only by glibc's defaults
