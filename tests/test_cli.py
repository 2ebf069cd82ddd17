"""The console script: help, and the demo end to end."""

import re
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "torchrec_multihash.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout


def test_unknown_command_is_an_error():
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_demo_runs_and_reports_memory_and_auc():
    r = run("demo", "--steps", "60", "--batch-size", "128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"qr tables take [0-9.]+x less than the full tables", r.stdout)
    assert "test AUC" in r.stdout
