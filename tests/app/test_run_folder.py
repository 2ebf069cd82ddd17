"""Issue 14: a run folder never gives a silently wrong result or loses a checkpoint. The checks
themselves, in process: the lock, the folder's owner, what artifacts were made from, the
config values and data no run can use. (tests/app/test_run_folder_cli.py runs the command.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_multihash.app.config import ConfigError, load_config
from torchrec_multihash.app.provenance import run_record
from torchrec_multihash.app.run_folder import check_owner, make_folder
from torchrec_multihash.app.run_lock import RunLock
from torchrec_multihash.app.train import check_metrics_out
from torchrec_multihash.distributed import save_checkpoint

from tests.helpers.modules import one_table_ebc


def _cfg(tmp_path: Path, *sets: str):
    return load_config("configs/quickstart.yaml", [f"train.output_dir={tmp_path / 'run'}", *sets])


def test_a_second_run_is_refused_by_the_lock_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    """Item 6."""
    lock = RunLock.acquire(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(ConfigError, match=f"is in use by another run \\(pid {live.pid} on"):
            RunLock.acquire(tmp_path)
    finally:
        live.kill()
        live.wait()
    RunLock.acquire(tmp_path).release()  # the dead process's lock: taken over
    assert "is no longer running" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists()
    lock.release()  # no longer ours: left alone


def _checkpoint(cfg, world=1):
    save_checkpoint(Path(cfg.train.output_dir) / "checkpoint", one_table_ebc(), meta={"run": run_record(cfg, world)})


def test_another_runs_checkpoint_is_refused_unless_resumed_or_overwritten(tmp_path):
    """Item 3 (and --resume without one)."""
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="--resume: no checkpoint in"):
        check_owner(cfg, run_record(cfg, 1), True, False)
    check_owner(cfg, run_record(cfg, 1), "auto", False)
    _checkpoint(cfg)
    with pytest.raises(ConfigError, match="holds the checkpoint of another run: continue it with --resume, replace it with --overwrite"):
        check_owner(cfg, run_record(cfg, 1), False, False)
    check_owner(cfg, run_record(cfg, 1), False, True)
    check_owner(cfg, run_record(cfg, 1), True, False)


@pytest.mark.parametrize(
    "change,key",
    [
        ("train.batch_size=512", "train.batch_size: 1024 then, 512 now"),
        ("train.seed=3", "train.seed: 0 then, 3 now"),
        ("data.train_samples=1000", "data.train_samples"),
        ("embeddings.strategy=crt", 'embeddings.strategy: "qr" then, "crt" now'),
    ],
)
def test_resume_refuses_a_checkpoint_of_other_data_shaping_settings(tmp_path, change, key):
    """Item 4: the data position would mean other samples; crt and generalized_qr of one shape."""
    _checkpoint(_cfg(tmp_path))
    cfg = _cfg(tmp_path, change)
    with pytest.raises(ConfigError, match="--resume: the checkpoint in .* was written by a run with other settings") as e:
        check_owner(cfg, run_record(cfg, 1), True, False)
    assert key in str(e.value)
    with pytest.raises(ConfigError, match="world_size: 1 then, 2 now"):
        check_owner(_cfg(tmp_path), run_record(_cfg(tmp_path), 2), "auto", False)


def test_resume_refuses_other_data_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 10)
    b.write_text("x" * 20)
    files = ["data.format=criteo_tsv", f"data.test={a}"]
    _checkpoint(_cfg(tmp_path, *files, f"data.train={a}"))
    cfg = _cfg(tmp_path, *files, f"data.train={b}")
    with pytest.raises(ConfigError, match='data.train: \\[\\["a.txt", 10, "\\w+"\\]\\] then, \\[\\["b.txt", 20, "\\w+"\\]\\] now'):
        check_owner(cfg, run_record(cfg, 1), True, False)


@pytest.mark.parametrize(
    "setting,message",
    [
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.batch_size=-4", "train.batch_size must be >= 1"),
        ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0"),
        ("train.eval_every=-5", "train.eval_every must be >= 0"),
        ("train.epochs=-1", "train.epochs must be >= 1"),
        ("train.max_steps=-1", "train.max_steps must be >= 0"),
        ("train.embedding_lr=.nan", "train.embedding_lr must be >= 0.0 and finite, got nan"),
        ("train.dense_lr=.inf", "train.dense_lr must be >= 0.0 and finite"),
        ("embeddings.num_embeddings_per_feature=[10, 0]", "embeddings.num_embeddings_per_feature must hold sizes >= 1"),
        ("embeddings.num_embeddings_per_feature=[10, -3]", "must hold sizes >= 1"),
        ("model.embedding_dim=0", "model.embedding_dim must be >= 1"),
        ("model.over_arch_layer_sizes=[16, 2]", "model.over_arch_layer_sizes must end in 1"),
        ("embeddings.num_partitions=1", "embeddings.num_partitions must be >= 2"),
        ("embeddings.num_partitions=0", "embeddings.num_partitions must be >= 2"),
        ("data.train_samples=0", "data.train_samples must be >= 1"),
    ],
)
def test_config_values_no_run_can_use_are_refused_naming_the_key(tmp_path, setting, message):
    """Items 5, 9, 10 (NaN learning rates)."""
    with pytest.raises(ConfigError, match="configs/quickstart.yaml: ") as e:
        _cfg(tmp_path, setting)
    assert message in str(e.value)


def test_unwritable_places_are_refused_before_any_work(tmp_path):
    """Item 9: a non-UTF-8 config, an output_dir that is a file, --metrics-out a folder."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  seed: 1 \xff\n")
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8 text"):
        load_config(bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="train.output_dir .*file is a file"):
        make_folder(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot be created"):
        make_folder(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match="--metrics-out .* is a folder"):
        check_metrics_out(tmp_path)
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_metrics_out(tmp_path / "file" / "m.json")
    check_metrics_out(tmp_path / "new" / "m.json")


def _kaggle_cfg(tmp_path, shared_data, train, *sets):
    k = shared_data / "criteo_kaggle_900" / "train.txt"
    return _cfg(tmp_path, "data.format=criteo_tsv", f"data.train={train}", f"data.test={k}", "data.ids=vocabulary", *sets)


def test_a_vocabulary_of_other_data_or_min_count_is_rebuilt_a_corrupt_one_refused(tmp_path, shared_data, capsys):
    """Item 1 (and 9: a corrupt vocabulary.json)."""
    from torchrec_multihash.app.data import make_data

    k = shared_data / "criteo_kaggle_900" / "train.txt"
    half = tmp_path / "half.txt"
    half.write_text("".join(k.read_text().splitlines(keepends=True)[:450]))
    out = tmp_path / "run"
    sizes = make_data(_kaggle_cfg(tmp_path, shared_data, k), 0, 1, out).num_embeddings_per_feature
    assert make_data(_kaggle_cfg(tmp_path, shared_data, k), 0, 1, out).num_embeddings_per_feature == sizes
    assert "Rebuilding" not in capsys.readouterr().out
    other = make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out).num_embeddings_per_feature
    assert other != sizes and "made from other data: data.train: " in capsys.readouterr().out
    make_data(_kaggle_cfg(tmp_path, shared_data, half, "data.min_count=2"), 0, 1, out)
    assert "data.min_count: 1 then, 2 now" in capsys.readouterr().out
    # an edited vocabulary: one feature's values all one of them (its table would silently shrink)
    import json

    data = json.loads((out / "vocabulary.json").read_text())
    data["features"][3] = [data["features"][3][0]] * len(data["features"][3])
    (out / "vocabulary.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"vocabulary.json: feature 3 lists value \w+ more than once: .*\(edited\?\): delete it"):
        make_data(_kaggle_cfg(tmp_path, shared_data, half, "data.min_count=2"), 0, 1, out)
    (out / "vocabulary.json").write_text("{not json")
    with pytest.raises(ConfigError, match="vocabulary.json: not a vocabulary file .*delete it to build it again"):
        make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out)


def test_a_vocabulary_under_the_folders_checkpoint_is_never_rebuilt_from_other_data(tmp_path, shared_data):
    """What plan, fit-hash, export and --resume read: the vocabulary the checkpoint was trained
    with (its manifest's record, or for an older checkpoint the vocabulary.json beside it); while
    another run owns the folder (--overwrite), that run's own."""
    from torchrec_multihash.app.data import make_data

    k = shared_data / "criteo_kaggle_900" / "train.txt"
    half = tmp_path / "half.txt"
    half.write_text("".join(k.read_text().splitlines(keepends=True)[:450]))
    out, other = tmp_path / "run", "the checkpoint in .* was trained with a vocabulary of other data \\(data.train: "
    make_data(_kaggle_cfg(tmp_path, shared_data, k), 0, 1, out)
    saved = (out / "vocabulary.json").read_bytes()
    trained = json.loads(saved)["source"]
    save_checkpoint(out / "checkpoint", one_table_ebc(), meta={"run": {}})  # an older checkpoint: no vocabulary recorded
    with pytest.raises(ConfigError, match=other + ".*vocabulary.json is not rebuilt; start a new run on this data \\(--overwrite"):
        make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out)
    assert (out / "vocabulary.json").read_bytes() == saved
    make_data(_kaggle_cfg(tmp_path, shared_data, k, "train.batch_size=512"), 0, 1, out)  # not refused: the batch size decides no id

    save_checkpoint(out / "checkpoint", one_table_ebc(), meta={"run_id": "a", "vocabulary": trained})
    (out / "vocabulary.json").unlink()  # deleted, or rebuilt by a failed --overwrite: the record decides
    with pytest.raises(ConfigError, match=other):
        make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out)
    assert not (out / "vocabulary.json").exists()
    make_data(_kaggle_cfg(tmp_path, shared_data, k), 0, 1, out)  # its data: built again
    assert (out / "vocabulary.json").read_bytes() == saved
    (out / "run.json").write_text(json.dumps({"run_id": "a"}))
    with pytest.raises(ConfigError, match=other):
        make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out)
    (out / "run.json").write_text(json.dumps({"run_id": "b"}))  # run b replaces run a's checkpoint (--overwrite)
    assert make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out).vocabulary != trained  # its own
    with pytest.raises(ConfigError, match=other):  # an explicit checkpoint (export --checkpoint): its own
        make_data(_kaggle_cfg(tmp_path, shared_data, half), 0, 1, out, checkpoint=out / "checkpoint")


def test_the_checkpoint_of_a_replaced_run_is_not_the_folders(tmp_path):
    """run.json names the run the folder belongs to, each checkpoint the run that wrote it."""
    from torchrec_multihash.app.run_folder import run_checkpoint

    cfg, out = _cfg(tmp_path), tmp_path / "run"
    save_checkpoint(out / "checkpoint", one_table_ebc(), meta={"run": run_record(cfg, 1), "run_id": "a"})
    assert run_checkpoint(out) == out / "checkpoint"  # no run.json: a folder of an older version
    (out / "run.json").write_text(json.dumps({"run_id": "a", "started": 0}))
    assert check_owner(cfg, run_record(cfg, 1), True, False) == out / "checkpoint"
    (out / "run.json").write_text(json.dumps({"run_id": "b", "started": 0}))
    assert run_checkpoint(out) is None
    with pytest.raises(
        ConfigError, match="--resume: .*checkpoint holds the checkpoint of an earlier run, not of the run .* belongs to now \\(started at"
    ):
        check_owner(cfg, run_record(cfg, 1), "auto", False)
    save_checkpoint(out / "checkpoint", one_table_ebc(), meta={"run": run_record(cfg, 1)})  # recording no writer (older version)
    assert run_checkpoint(out) == out / "checkpoint"  # the run replaced none: as before run ids
    (out / "run.json").write_text(json.dumps({"run_id": "b", "started": 0, "replaced": True}))
    assert run_checkpoint(out) is None  # the one the run replaced
    (out / "run.json").write_text("{trunc")
    with pytest.raises(ConfigError, match="run.json: not a run record \\(damaged\\?\\)"):
        check_owner(cfg, run_record(cfg, 1), True, False)


def test_a_corrupt_mapping_report_is_a_clear_error(tmp_path):
    from torchrec_multihash import MultiHashConfigError
    from torchrec_multihash.learned.fit import load_mappings

    torch.save({}, tmp_path / "mapping.pt")
    (tmp_path / "mapping.json").write_text("{trunc")
    with pytest.raises(MultiHashConfigError, match="mapping.json: not a report written by fit-hash"):
        load_mappings(tmp_path)


@pytest.mark.parametrize("content", ["", "label\tI1\tI2\n"])
def test_runs_that_would_train_nothing_are_refused(tmp_path, shared_data, content):
    """Item 5: an empty file is refused up front; a header-only one (hashing: never read whole)
    is a bad line even in the dropped last partial batch; too few synthetic samples."""
    from torchrec_multihash.app.data import make_data
    from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError

    f = tmp_path / "train.txt"
    f.write_text(content)
    cfg = _kaggle_cfg(
        tmp_path, shared_data, f, "data.ids=hashing", "embeddings.num_embeddings_per_feature=[100]*26".replace("[100]*26", str([100] * 26))
    )
    if not content:
        with pytest.raises(ConfigError, match="data.train: empty file"):
            make_data(cfg, 0, 1, tmp_path)
        return
    with pytest.raises(CriteoFormatError, match="train.txt:1: expected 40 tab-separated columns"):
        list(make_data(cfg, 0, 1, tmp_path).train(0, 0))
    with pytest.raises(ConfigError, match="data.train_samples=100 is less than one batch per rank"):
        make_data(_cfg(tmp_path, "data.train_samples=100"), 0, 1, tmp_path)


def _npy(tmp_path, rows=8, labels=None, sparse_rows=None):
    np.save(tmp_path / "day_0_dense.npy", np.ones((rows, 13), dtype=np.float32))
    np.save(tmp_path / "day_0_sparse.npy", np.ones((sparse_rows or rows, 26), dtype=np.int32))
    np.save(tmp_path / "day_0_labels.npy", np.array(labels if labels is not None else [0, 1] * (rows // 2), dtype=np.int32).reshape(-1, 1))
    return str(tmp_path / "day_0_dense.npy")


def test_criteo_npy_refuses_other_labels_and_unequal_row_counts(tmp_path):
    """Item 7."""
    from torchrec_multihash.app.data import make_data
    from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError

    sets = ["data.format=criteo_npy", f"embeddings.num_embeddings_per_feature={[100] * 26}", "train.batch_size=4"]
    dense = _npy(tmp_path, labels=[0, 1, 2, 0, 1, 0, -1, 1])
    data = make_data(_cfg(tmp_path, *sets, f"data.train={dense}", f"data.test={dense}"), 0, 1, tmp_path)
    with pytest.raises(CriteoFormatError, match="day_0_dense.npy row 2: label must be 0 or 1, got 2"):
        list(data.train(0, 0))
    dense = _npy(tmp_path, sparse_rows=6)
    with pytest.raises(CriteoFormatError, match="day_0_sparse.npy has 6 rows"):
        make_data(_cfg(tmp_path, *sets, f"data.train={dense}", f"data.test={dense}"), 0, 1, tmp_path)


ROW = ["0"] + ["1"] * 13 + ["0000abcd"] * 26


@pytest.mark.parametrize(
    "column,value,message",
    [
        (1, "+7", "I1 is not an integer: '+7'"),
        (1, "1_000", "I1 is not an integer: '1_000'"),
        (1, " 7", "I1 is not an integer"),
        (14, "0x1f", "C1 is not a hex string: '0x1f'"),
        (14, "0x1fabcd", "C1 is not a hex string"),
        (14, "+1f", "C1 is not a hex string"),
        (14, "1" * 19, "C1 is not a hex string"),
    ],
)
def test_odd_criteo_fields_are_refused_by_both_parsers(column, value, message):
    """Item 10: fields Python's int() would take; Criteo's empty fields and -1 are accepted."""
    from torchrec_multihash.datasets.batching import lines_to_batch
    from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES
    from torchrec_multihash.datasets.id_mapping import HashingIds

    fields = list(ROW)
    fields[column] = value
    good = "\t".join(ROW[:1] + ["-1", ""] + ROW[3:])
    lines = [("f", 1, ("\t".join(fields) + "\n").encode()), ("f", 2, (good + "\n").encode())]
    batch, bad = lines_to_batch(lines, DEFAULT_SPARSE_NAMES, HashingIds([100] * 26))
    assert len(bad) == 1 and message in bad[0] and batch is not None and batch.labels.numel() == 1


def test_cr_only_line_endings_are_named():
    from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError, parse_raw

    with pytest.raises(CriteoFormatError, match="CR-only"):
        parse_raw(("\t".join(ROW) + "\r" + "\t".join(ROW) + "\r").encode(), "f", 1)


def test_silent_acceptances_of_the_modules_are_refused():
    """Item 10: float ids, True as a size, num_partitions=0, unknown sharding types."""
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_multihash import FitOptions, InvalidInputError, MultiHashConfigError, sub_table_constraints, to_multihash_configs

    ebc = one_table_ebc()
    with pytest.raises(InvalidInputError, match="ids are torch.float32: pass integer ids"):
        ebc(KeyedJaggedTensor(keys=["C1"], values=torch.tensor([1.7, 2.2]), lengths=torch.tensor([1, 1])))
    tables = [EmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=4, feature_names=["f"])]
    with pytest.raises(MultiHashConfigError, match="compression must be >= 1, got True"):
        to_multihash_configs(tables, True)
    with pytest.raises(MultiHashConfigError, match="threshold must be an int"):
        to_multihash_configs(tables, 4, threshold=True)
    with pytest.raises(MultiHashConfigError, match="needs at least 2 partitions, got num_partitions=0"):
        to_multihash_configs(tables, 4, "generalized_qr", num_partitions=0)
    with pytest.raises(MultiHashConfigError, match="FitOptions.dim must be an int >= 1, got True"):
        FitOptions(dim=True)
    with pytest.raises(ValueError, match="unknown sharding type\\(s\\) \\['bogus_wise'\\]"):
        sub_table_constraints(ebc.multihash_configs(), {"t_C1": ParameterConstraints(sharding_types=["bogus_wise"])})
