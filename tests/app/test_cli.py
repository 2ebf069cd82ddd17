"""The console script: its commands, and the demo end to end."""

import re

import pytest

from torchrec_multihash.cli import COMMANDS, main

from tests.helpers.cli import run_cli


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_in_the_help_dispatches_to_its_own_parser(command, capsys):
    """The top-level help lists the command, and ``COMMAND --help`` reaches that command's own
    options (its module imports, has a main, and names itself in its usage line)."""
    assert main(["--help"]) == 0
    listed = re.findall(r"^  (\S+) ", capsys.readouterr().out, flags=re.M)
    assert command in listed
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: torchrec-multihash {command} ") and "--" in usage.split("options:")[1]


def test_no_command_and_an_unknown_command_are_errors(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_and_reports_memory_and_auc():
    r = run_cli("demo", "--steps", "60", "--batch-size", "128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"qr tables take [0-9.]+x less than the full tables", r.stdout)
    assert "test AUC" in r.stdout


def test_fit_hash_errors_name_the_command_once(tmp_path):
    r = run_cli("fit-hash", "--config", "configs/quickstart.yaml", "--out", str(tmp_path / "mapping"))
    assert r.returncode == 2 and "torchrec-multihash fit-hash: the config has no learned table" in r.stderr, r.stderr[-2000:]
    assert "fit-hash: fit-hash:" not in r.stderr and "Traceback" not in r.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    """``plan ... | head -n 0``: the reader is gone before the first line; exit 141 (SIGPIPE), no traceback."""
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "torchrec_multihash.cli", "plan", "--config", "configs/quickstart.yaml", "--world-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # the reader stops before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--steps", "-3"], "argument --steps: must be >= 1, got -3"),
        (["demo", "--compression", "0"], "argument --compression: must be >= 1, got 0"),
        (["demo", "--dim", "0"], "argument --dim: must be >= 1, got 0"),
        (["demo", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["demo", "--lr", "nan"], "argument --lr: must be > 0 and finite, got nan"),
        (["bench", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["preprocess", "x.gz", "--out-dir", "o", "--processes", "0"], "argument --processes: must be >= 1, got 0"),
        (["quality", "--out", "o", "--seeds", ","], "--seeds is empty: give at least one"),
        (["quality", "--out", "o", "--compressions", "0.5"], "--compressions must be >= 1, got [0.5]"),
    ],
)
def test_command_numbers_no_run_can_use_are_refused_by_the_parser(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in [
        (["bench", "--quick", "--out", str(a_file)], f"argument --out: {a_file} is a file: give a folder"),
        (["quality", "--out", str(a_file)], f"argument --out: {a_file} is a file: give a folder"),
        (["preprocess", "x.gz", "--out-dir", str(a_file)], f"argument --out-dir: {a_file} is a file: give a folder"),
        (["export", "--out", str(tmp_path)], f"argument --out: {tmp_path} is a folder: give the file to write"),
        # what only shows later is said in one line too (was a traceback): a run folder under a file
        (["train", "--config", "configs/quickstart.yaml", "--set", f"train.output_dir={a_file}/run"], "Not a directory"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_tables_the_planner_cannot_place_are_one_line(tmp_path):
    big = ["--set", "train.batch_size=100000000", "--set", "data.train_samples=100000000", "--set", "train.max_steps=1"]
    r = run_cli("train", "--config", "configs/quickstart.yaml", *big, "--set", f"train.output_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "TorchRec's planner cannot place the tables on 1 rank(s) with train.batch_size=100000000" in r.stderr
