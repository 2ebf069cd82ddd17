"""Issue 14 through the command: stale learned mappings, two runs in one folder, runs that train
nothing, a NaN loss, SIGTERM."""

import collections
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.cli import run_cli, train

# 16 steps of 256 samples on small tables
TINY = [
    "--set",
    "data.train_samples=4096",
    "--set",
    "data.test_samples=1024",
    "--set",
    "train.batch_size=256",
    "--set",
    "embeddings.num_embeddings_per_feature=[4000, 2000, 500]",
]


@pytest.mark.slow
def test_an_auto_fitted_mapping_is_fitted_again_for_other_data_or_tables(tmp_path):
    """Item 2: another seed (other synthetic data), other table sizes."""
    learned = [*TINY, "--set", "embeddings.strategy=learned", "--set", "train.max_steps=2", "--set", "embeddings.fit={learn_vectors: false}"]
    r, _ = train(tmp_path, *learned)
    assert r.returncode == 0 and "No embeddings.mapping given: fitting" in r.stdout, r.stderr[-3000:]
    r, _ = train(tmp_path, *learned)
    assert r.returncode == 0 and "fitting" not in r.stdout.lower(), r.stdout[-2000:]
    r, _ = train(tmp_path, *learned, "--set", "train.seed=1")
    assert r.returncode == 0 and "fitted for other data or tables: " in r.stdout and "train.seed: 0 then, 1 now" in r.stdout, r.stderr[-3000:]
    r, _ = train(tmp_path, *learned, "--set", "train.seed=1", "--set", "embeddings.num_embeddings_per_feature=[4000, 2000, 600]")
    assert r.returncode == 0 and "embeddings.num_embeddings_per_feature: [4000, 2000, 500] then" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_a_second_run_in_a_folder_in_use_is_refused(tmp_path):
    """Item 6: the lock of a live process (one that removed the other's files before)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        r, _ = train(tmp_path, *TINY)
        assert r.returncode == 2 and f"is in use by another run (pid {live.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    finally:
        live.kill()
        live.wait()
    r, m = train(tmp_path, *TINY, "--set", "train.max_steps=1")
    assert r.returncode == 0 and "is no longer running" in r.stdout and not (tmp_path / "run" / ".lock").exists(), r.stderr[-2000:]


@pytest.mark.slow
def test_fewer_lines_than_a_batch_is_an_error_not_an_untrained_model(tmp_path, shared_data):
    """Item 5 (hashing reads the file only in training)."""
    k = shared_data / "criteo_kaggle_900" / "train.txt"
    few = tmp_path / "few.txt"
    few.write_text("".join(k.read_text().splitlines(keepends=True)[:100]))
    sets = [
        "--set",
        f"data.train={few}",
        "--set",
        f"data.test={k}",
        "--set",
        "data.ids=hashing",
        "--set",
        f"embeddings.num_embeddings_per_feature={[1000] * 26}",
    ]
    r, m = train(tmp_path, *sets, config="configs/movielens_100k_ctr_full.yaml")
    assert r.returncode == 2 and m is None and "epoch 0 has no batch to train on" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


NAN_AT_STEP_12 = """
import sys
from torchrec_multihash.app.step_guard import StepGuard
from torchrec_multihash.cli import main

note = StepGuard.note
StepGuard.note = lambda self, loss, step: note(self, loss * float("nan") if step == 12 else loss, step)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_is_never_checkpointed(tmp_path):
    """Item 10: a checkpoint every 5 steps; the NaN of step 12 is found before step 15's save."""
    common = [*TINY, "--set", "train.checkpoint_every=5"]
    r, m = train(tmp_path, *common, python=("-c", NAN_AT_STEP_12))
    assert r.returncode == 2 and m is None and "the training loss is NaN or inf at step 12" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r, m = train(tmp_path, *common, "--set", "train.max_steps=10", "--resume")
    assert r.returncode == 0 and "Resumed from" in r.stdout and "step 10" in r.stdout, r.stderr[-2000:]


SIGTERM_AFTER_STEP_7 = """
import os, signal, sys
from torchrec_multihash.app.callbacks import ProgressReport
from torchrec_multihash.cli import main

call = ProgressReport.__call__
def call_then_term(self, run, loss):
    call(self, run, loss)
    if run.state.step == 7:
        os.kill(os.getpid(), signal.SIGTERM)
ProgressReport.__call__ = call_then_term
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_auto_ends_as_an_uninterrupted_run(tmp_path):
    """Item 11: no checkpoint_every set; SIGTERM after step 7 saves one at the next step boundary."""
    r, m = train(tmp_path / "a", *TINY, "--resume", "auto", python=("-c", SIGTERM_AFTER_STEP_7))
    assert r.returncode == 143 and m is None and "SIGTERM: stopped after step 7 with a checkpoint" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "a" / "run" / ".lock").exists()
    r, resumed = train(tmp_path / "a", *TINY, "--resume", "auto")
    assert r.returncode == 0 and "Resumed from" in r.stdout and "step 7" in r.stdout, r.stderr[-2000:]
    r, straight = train(tmp_path / "b", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert resumed["steps"] == straight["steps"] == 16
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)


SIGINT_AFTER_STEP_7 = """
import os, signal, sys
from torchrec_multihash.app.callbacks import ProgressReport
from torchrec_multihash.cli import main

TIMES = int(os.environ["SIGINTS"])
call = ProgressReport.__call__
def call_then_interrupt(self, run, loss):
    call(self, run, loss)
    if run.state.step == 7:
        for _ in range(TIMES):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, once or twice
ProgressReport.__call__ = call_then_interrupt
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_like_sigterm_and_a_second_one_stops_at_once(tmp_path):
    """Ctrl-C after step 7: a checkpoint at step 7 (SIGTERM's, whose resume the test above runs),
    one line, exit 130 (128 + SIGINT); pressed twice: no checkpoint is waited for, one line, exit 130."""
    r, m = train(tmp_path / "a", *TINY, python=("-c", SIGINT_AFTER_STEP_7), env={"SIGINTS": "1"})
    assert r.returncode == 130 and m is None and "SIGINT: stopped after step 7 with a checkpoint" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "a" / "run" / ".lock").exists()
    assert (tmp_path / "a" / "run" / "checkpoint" / ".metadata").is_file()
    r, m = train(tmp_path / "b", *TINY, python=("-c", SIGINT_AFTER_STEP_7), env={"SIGINTS": "2"})
    assert r.returncode == 130 and m is None and "interrupted (Ctrl-C); nothing saved since the last checkpoint" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "b" / "run" / "checkpoint").exists()
    assert not (tmp_path / "b" / "run" / ".lock").exists()


def _export(tmp_path, *args: str):
    common = ["--config", "configs/quickstart.yaml", "--set", f"train.output_dir={tmp_path / 'run'}", *args]
    return run_cli("export", *common, "--out", str(tmp_path / "model.pt"), "--evaluate")


@pytest.mark.slow
def test_an_overwriting_run_never_passes_the_old_checkpoint_off_as_its_own(tmp_path):
    """Once a run started over (--overwrite), export and --resume never take the old model for
    its: the old checkpoint is moved aside when the run ends without one of its own, and refused
    while the run goes on or after it was killed; a run that fails before it starts gives the
    folder back (a failed overwrite loses nothing)."""
    checkpoints = ["--set", "train.checkpoint_every=8"]
    r, old = train(tmp_path, *TINY, *checkpoints)
    assert r.returncode == 0, r.stderr[-2000:]
    # an overwrite that stops with an error before saving gives the folder back: the old checkpoint is still its
    r, _ = train(tmp_path, *TINY, "--set", "data.train_samples=100", "--overwrite")  # fails before a step
    assert r.returncode == 2 and "data.train_samples=100 is less than one batch" in r.stderr, r.stderr[-2000:]
    assert f"The checkpoint of the previous run stays in {tmp_path / 'run' / 'checkpoint'}" in r.stdout
    r = _export(tmp_path, *TINY)
    assert r.returncode == 0 and f"trained   test AUC {old['auc']:.4f}" in r.stdout, r.stderr[-2000:]
    (tmp_path / "model.pt").unlink()
    overwrite, new = train(tmp_path, *TINY, "--set", "train.max_steps=2", "--overwrite")  # ends without a checkpoint
    assert overwrite.returncode == 0 and new["steps"] == 2, overwrite.stderr[-2000:]
    r = _export(tmp_path, *TINY)
    assert r.returncode == 2 and "no checkpoint in" in r.stderr and "Traceback" not in r.stderr, r.stdout[-2000:]
    r, _ = train(tmp_path, *TINY, "--resume")
    assert r.returncode == 2 and "--resume: no checkpoint in" in r.stderr, r.stdout[-2000:]
    replaced = tmp_path / "run" / "checkpoint.replaced"
    assert f"Moved the checkpoint of the run this one replaced (--overwrite) to {replaced}" in overwrite.stdout
    assert (replaced / ".metadata").is_file()  # moved aside, not lost

    r, _ = train(tmp_path, *TINY, *checkpoints, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    r, _ = train(tmp_path, *TINY, "--overwrite", env={"MULTIHASH_FAULT_AT_STEP": "2"})  # killed mid-run: no cleanup
    assert r.returncode == 1 and "exits after step 2" in r.stderr, r.stderr[-2000:]
    r = _export(tmp_path, *TINY)
    assert (
        r.returncode == 2 and "checkpoint holds the checkpoint of an earlier run, not of the run" in r.stderr and "with --overwrite)" in r.stderr
    ), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "model.pt").exists()
    r, _ = train(tmp_path, *TINY, "--resume")
    assert r.returncode == 2 and "--resume: " in r.stderr and "holds the checkpoint of an earlier run" in r.stderr, r.stderr[-2000:]


def _swap_top_values(path, column: int = 14) -> None:
    """Rewrites ``path`` with the two most frequent values of ``column`` (C1) swapped: other data
    of the same name and size, whose rebuilt vocabulary would swap the two ids."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    (a, _), (b, _) = collections.Counter(r[column] for r in rows).most_common(2)
    for r in rows:
        r[column] = {a: b, b: a}.get(r[column], r[column])
    size = path.stat().st_size
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    assert path.stat().st_size == size


@pytest.mark.slow
def test_resume_export_and_plan_refuse_to_rebuild_the_vocabulary_of_a_checkpoint(tmp_path, shared_data):
    """Training data changed under its name and size: its vocabulary would give the checkpoint's
    rows to other values; every command refuses naming the file and keeps vocabulary.json."""
    k = shared_data / "criteo_kaggle_900" / "train.txt"
    data = tmp_path / "train.txt"
    data.write_bytes(k.read_bytes())
    config = "configs/movielens_100k_ctr_full.yaml"
    sets = ["--set", f"data.train={data}", "--set", f"data.test={k}", "--set", "train.batch_size=64", "--set", "train.checkpoint_every=5"]
    r, _ = train(tmp_path, *sets, config=config)
    assert r.returncode == 0, r.stderr[-2000:]
    vocabulary = (tmp_path / "run" / "vocabulary.json").read_bytes()
    _swap_top_values(data)

    folder = ["--config", config, "--set", f"train.output_dir={tmp_path / 'run'}", *sets]
    # --resume: the checkpoint's record of the files (their sampled content) refuses it first
    r = train(tmp_path, *sets, "--resume", config=config)[0]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Resumed" not in r.stdout, r.stderr[-2000:]
    assert "data.train: train.txt was modified since (same size)" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "run" / "vocabulary.json").read_bytes() == vocabulary and "Rebuilding" not in r.stdout
    for r in (
        run_cli("export", *folder, "--out", str(tmp_path / "m.pt")),
        run_cli("plan", *folder, "--set", "embeddings.strategy=mch", "--world-size", "1"),  # mch: the tables' sizes from the vocabulary
    ):
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Resumed" not in r.stdout, r.stderr[-2000:]
        assert f"data.train: {data} was modified since (same size)" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
        assert f"{tmp_path / 'run' / 'vocabulary.json'} is not rebuilt" in r.stderr and "Rebuilding" not in r.stdout
        assert (tmp_path / "run" / "vocabulary.json").read_bytes() == vocabulary
    r, _ = train(tmp_path, *sets, "--overwrite", config=config)  # a new run on this data builds its own
    assert r.returncode == 0 and "Rebuilding" in r.stdout, r.stderr[-2000:]
    assert (tmp_path / "run" / "vocabulary.json").read_bytes() != vocabulary


@pytest.mark.slow
def test_hashed_ids_resume_refuses_other_content_of_the_same_name_and_size(tmp_path, shared_data):
    # hashing keeps no vocabulary: the checkpoint's record of the files (name, size and now a sampled
    # content digest) is what tells a shuffled copy, or labels flipped in place, from the data it read
    k = shared_data / "criteo_kaggle_900" / "train.txt"
    data = tmp_path / "train.txt"
    lines = k.read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    sets = ["--set", "data.format=criteo_tsv", "--set", "data.ids=hashing", "--set", f"data.train={data}", "--set", f"data.test={k}"]
    sets += ["--set", "train.batch_size=64", "--set", "train.checkpoint_every=5", "--set", "train.max_steps=5"]
    r, _ = train(tmp_path, *sets, config="configs/criteo_kaggle_qr.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    for changed in ("".join(lines[::-1]), "".join(("0" if x[0] == "1" else "1") + x[1:] if i % 3 == 0 else x for i, x in enumerate(lines))):
        data.write_text(changed)  # the same name and size
        assert data.stat().st_size == k.stat().st_size
        r, _ = train(tmp_path, *sets, "--set", "train.max_steps=10", "--resume", config="configs/criteo_kaggle_qr.yaml")
        assert r.returncode == 2 and "Resumed" not in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "data.train: train.txt was modified since (same size)" in r.stderr, r.stderr[-2000:]
    data.write_text("".join(lines))  # the data it read: resumes
    r, _ = train(tmp_path, *sets, "--set", "train.max_steps=10", "--resume", config="configs/criteo_kaggle_qr.yaml")
    assert r.returncode == 0 and "Resumed" in r.stdout, r.stderr[-2000:]
