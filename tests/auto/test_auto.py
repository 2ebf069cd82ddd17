"""``strategy: auto``: the per-table choice within a budget, and the app's use of it."""

import json
import warnings

import pytest
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from torchrec_multihash.auto import AutoChoiceError, TableStatistics, auto_configs, choose_tables
from torchrec_multihash.auto.choice import full_bytes
from torchrec_multihash.distributed.checkpoint import find_checkpoint
from torchrec_multihash.distributed.checkpoint_files import read_manifest

from tests.helpers.cli import run_cli, train

DIM = 16


def _table(name: str, n: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=DIM, feature_names=[name.removeprefix("t_")])


def _stats(name: str, counts: torch.Tensor) -> TableStatistics:
    return TableStatistics.from_counts(name, counts)


def _zipf(n: int, hot: int, seed: int = 0) -> torch.Tensor:
    """Counts of ``n`` ids: ``hot`` ids with almost all the traffic, the rest seen once or never."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n, dtype=torch.int64)
    ids = torch.randperm(n, generator=g)
    counts[ids[:hot]] = 1000
    counts[ids[hot : 2 * hot]] = 1
    return counts


def test_statistics_count_hottest_first():
    s = _stats("t", torch.tensor([0, 5, 1, 0, 3]))
    assert s.sorted_counts.tolist() == [5, 3, 1]
    assert (s.accesses, s.seen_ids, s.num_embeddings) == (9, 3, 5)
    assert s.top_accesses(2) == 8 and s.coverage(2) == pytest.approx(8 / 9)
    assert s.coverage(10) == 1.0


def test_budget_goes_where_it_buys_coverage():
    # same size, one table's traffic is on 100 ids, the other's spread over all: the spread one
    # gets the bytes, the skewed one is compressed down to about its hot ids
    n = 20_000
    tables = [_table("t_skewed", n), _table("t_spread", n)]
    stats = {"t_skewed": _stats("t_skewed", _zipf(n, 100)), "t_spread": _stats("t_spread", torch.full((n,), 50))}
    budget = sum(full_bytes(c) for c in tables) // 8
    choices = choose_tables(tables, stats, budget, threshold=200, candidates=["qr"])
    by = {c.table: c for c in choices}
    assert by["t_skewed"].compression > by["t_spread"].compression
    assert by["t_skewed"].coverage > 0.99  # its hot ids still fit in its rows
    assert sum(c.bytes for c in choices) <= budget
    # the choice's bytes are those of the tables it builds
    built = auto_configs(tables, choices)
    assert [c.strategy_impl().memory_bytes() for c in built] == [c.bytes for c in choices]


def test_no_step_left_that_fits_and_helps():
    # greedy stops only when no table can be compressed less within the budget for a gain
    n = [5_000, 12_000, 30_000]
    tables = [_table(f"t_{i}", k) for i, k in enumerate(n)]
    g = torch.Generator().manual_seed(1)
    stats = {t.name: _stats(t.name, (torch.rand(k, generator=g) ** 4 * 100).long()) for t, k in zip(tables, n)}
    budget = sum(full_bytes(c) for c in tables) // 10
    choices = choose_tables(tables, stats, budget, threshold=200, candidates=["qr"])
    spent = sum(c.bytes for c in choices)
    assert spent <= budget
    for t, ch in zip(tables, choices):
        if ch.compression == 1:
            continue
        less = auto_configs([t], [type(ch)(**{**ch.to_dict(), "compression": ch.compression / 2})])[0]
        more_bytes = less.strategy_impl().memory_bytes() - ch.bytes
        rows_now, rows_less = -(-t.num_embeddings // int(ch.compression)), -(-t.num_embeddings // int(ch.compression / 2))
        gain = stats[t.name].top_accesses(rows_less) - stats[t.name].top_accesses(rows_now)
        assert gain == 0 or spent + more_bytes > budget, t.name


def test_small_tables_stay_full_and_learned_only_where_its_mapping_is_cheap():
    tables = [_table("t_small", 150), _table("t_big", 40_000)]
    counts = torch.arange(40_000, 0, -1)
    stats = {"t_big": _stats("t_big", counts)}
    full = sum(full_bytes(c) for c in tables)
    # dim 16 at 8x: 8 bytes per id, an int16 row per id costs 2: learned
    at8 = choose_tables(tables, stats, full // 8, threshold=200)
    assert (at8[0].strategy, at8[0].compression) == ("full", 1.0)
    assert at8[1].strategy == "learned" and at8[1].compression >= 8
    # at 64x a row per id would cost more than the table's whole budget: Q-R
    at64 = choose_tables(tables, stats, full // 64, threshold=200)
    assert at64[1].strategy == "qr" and at64[1].compression >= 64
    assert "mapping" in at64[1].reason and "hottest ids" in at64[1].reason


def test_fp16_rows_buy_twice_the_rows_at_the_same_bytes():
    # every id of a spread table is used: at 8x of its fp32 bytes, fp16 rows give it 4x rows, not 8x
    tables = [_table("t_small", 150), _table("t_a", 40_000), _table("t_b", 20_000)]
    stats = {t.name: _stats(t.name, torch.full((t.num_embeddings,), 5)) for t in tables[1:]}
    budget = sum(full_bytes(c) for c in tables) // 8
    fp32 = {c.table: c for c in choose_tables(tables, stats, budget, threshold=200, candidates=["qr"])}
    both = choose_tables(tables, stats, budget, threshold=200, candidates=["qr"], precisions=["fp32", "fp16"])
    by = {c.table: c for c in both}
    assert all(c.precision == "fp32" for c in fp32.values())
    assert by["t_small"].precision == "fp32"  # small tables stay full, in fp32
    for name in ("t_a", "t_b"):
        assert by[name].precision == "fp16" and by[name].compression * 2 <= fp32[name].compression, by[name]
        assert "in fp16 (half the bytes a value)" in by[name].reason
    assert sum(c.bytes for c in both) <= budget
    # the bytes are those of the fp16 tables it builds (2 a value), and they are fp16 tables
    built = auto_configs(tables, both)
    assert [c.strategy_impl().memory_bytes() for c in built] == [c.bytes for c in both]
    assert [c.data_type for c in built] == [DataType.FP32, DataType.FP16, DataType.FP16]
    # bytes left after sizing for fp16 buy fp32 back, table by table: room for t_b's (half t_a's) only
    half = full_bytes(tables[1]) // 2 + full_bytes(tables[2]) // 2 + full_bytes(tables[0])
    some = {c.table: c for c in choose_tables(tables, stats, half + full_bytes(tables[2]) // 2, threshold=200, precisions=["fp32", "fp16"])}
    assert [(some[n].strategy, some[n].precision) for n in ("t_a", "t_b")] == [("full", "fp16"), ("full", "fp32")]
    assert "fp32 rows: bought back with bytes the budget had left" in some["t_b"].reason
    # a budget of the full fp32 tables keeps them all full fp32
    roomy = choose_tables(tables, stats, sum(full_bytes(c) for c in tables), threshold=200, precisions=["fp32", "fp16"])
    assert [(c.strategy, c.precision) for c in roomy] == [("full", "fp32")] * 3
    # fp16 only: every table, small ones included; a bad precision is named
    only = choose_tables(tables, stats, budget, threshold=200, candidates=["qr"], precisions=["fp16"])
    assert {c.precision for c in only} == {"fp16"}
    with pytest.raises(AutoChoiceError, match=r"unknown precision\(s\) \['bf16'\]"):
        choose_tables(tables, stats, budget, threshold=200, precisions=["bf16"])
    # a choice saved before precisions were chosen reads as fp32
    old = {k: v for k, v in both[1].to_dict().items() if k != "precision"}
    assert type(both[1]).from_dict(old).precision == "fp32"


def test_an_unseen_tail_is_not_paid_for():
    # a 1M-id table of which 2,000 ids are ever seen gets about 2,000 ids' worth of rows
    n = 1_000_000
    counts = torch.zeros(n, dtype=torch.int64)
    counts[:2000] = 7
    tables = [_table("t_sparse", n), _table("t_dense", 50_000)]
    stats = {"t_sparse": _stats("t_sparse", counts), "t_dense": _stats("t_dense", torch.full((50_000,), 3))}
    budget = sum(full_bytes(c) for c in tables) // 4
    by = {c.table: c for c in choose_tables(tables, stats, budget, threshold=200, candidates=["qr"])}
    assert by["t_sparse"].compression >= 256  # 1M / 256 = 3,906 rows' worth
    assert by["t_dense"].compression == 1.0  # the bytes went to the table that uses them


def test_bad_candidates_and_missing_statistics_are_named():
    tables = [_table("t_a", 10_000)]
    stats = {"t_a": _stats("t_a", torch.ones(10_000, dtype=torch.int64))}
    with pytest.raises(AutoChoiceError, match="unknown strategies \\['bogus'\\]"):
        choose_tables(tables, stats, 1000, 200, candidates=["bogus"])
    with pytest.raises(AutoChoiceError, match="no strategy that compresses"):
        choose_tables(tables, stats, 1000, 200, candidates=["full"])
    with pytest.raises(AutoChoiceError, match="no access statistics for table\\(s\\) \\['t_a'\\]"):
        choose_tables(tables, {}, 1000, 200)
    choices = choose_tables(tables, stats, 100_000, 200)
    with pytest.raises(AutoChoiceError, match="no entry for table\\(s\\) \\['t_b'\\]"):
        auto_configs([_table("t_b", 500)], choices)


def test_a_budget_below_the_least_gives_the_smallest_with_a_warning():
    tables = [_table("t_small", 150), _table("t_big", 40_000)]
    stats = {"t_big": _stats("t_big", torch.arange(40_000, 0, -1))}
    with pytest.warns(UserWarning):
        least = sum(c.bytes for c in choose_tables(tables, stats, 1, threshold=200, candidates=["qr"]))
    with pytest.warns(UserWarning, match=f"a budget of 1,000 bytes is below the least these tables take, {least:,} bytes"):
        choices = choose_tables(tables, stats, 1000, threshold=200, candidates=["qr"])
    assert sum(c.bytes for c in choices) == least > 1000


def test_a_coarse_step_does_not_end_the_options():
    # generalized_qr's first size (radices 2, 2, N / 4) is 4x: sized for 2x and for 4x alike, which
    # is no reason to stop before 16x
    tables = [_table("t_a", 40_000)]
    stats = {"t_a": _stats("t_a", torch.ones(40_000, dtype=torch.int64))}
    budget = full_bytes(tables[0]) // 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (choice,) = choose_tables(tables, stats, budget, threshold=200, candidates=["generalized_qr"])
    assert choice.strategy == "generalized_qr" and choice.compression >= 16 and choice.bytes <= budget


@pytest.mark.parametrize(
    "strategy,says",
    [
        ("qr", "qr mult (learned is not a candidate): every id keeps its own pair of rows"),
        ("crt", "crt mult (learned is not a candidate): every id keeps its own combination of rows"),
        ("generalized_qr", "generalized_qr mult (learned is not a candidate): every id keeps its own combination of rows"),
        ("hash", "hash (learned is not a candidate): the hashing trick, about 8 ids to a row, which they share"),
    ],
)
def test_the_reason_says_what_the_strategy_does(strategy, says):
    tables = [_table("t_a", 40_000)]
    stats = {"t_a": _stats("t_a", torch.ones(40_000, dtype=torch.int64))}
    (choice,) = choose_tables(tables, stats, full_bytes(tables[0]) // 8, threshold=200, candidates=[strategy])
    assert choice.strategy == strategy
    assert choice.reason.endswith(says), choice.reason


TINY = [
    "--set",
    "embeddings.num_embeddings_per_feature=[20000,5000,1000,300,100]",
    "--set",
    "embeddings.strategy=auto",
    "--set",
    "data.train_samples=20000",
    "--set",
    "data.test_samples=4096",
    "--set",
    "train.batch_size=512",
]


def test_config_errors_name_the_key(tmp_path):
    r = run_cli("plan", "--config", "configs/quickstart.yaml", "--set", "embeddings.budget_bytes=1000", "--world-size", "1")
    assert r.returncode == 2 and "embeddings.budget_bytes needs embeddings.strategy auto (got qr)" in r.stderr
    r = run_cli("plan", "--config", "configs/quickstart.yaml", "--set", "embeddings.strategy=bogus", "--world-size", "1")
    assert r.returncode == 2 and "embeddings.strategy must be one of" in r.stderr and "'auto'" in r.stderr


@pytest.mark.slow
def test_train_chooses_saves_and_reuses_the_choice(tmp_path):
    r, m = train(tmp_path, *TINY, "--set", "train.checkpoint_every=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "strategy auto:" in r.stdout and "t_C1" in r.stdout
    report = json.loads((tmp_path / "run" / "auto.json").read_text())
    assert m["embedding_bytes"] == report["bytes"] <= report["budget_bytes"]
    assert m["auc"] > 0.55  # it learns
    chosen = {t["table"]: [t["strategy"], t["compression"], t["precision"]] for t in report["tables"]}
    assert chosen["t_C5"] == ["full", 1.0, "fp32"]  # 100 rows: under the threshold
    manifest = read_manifest(find_checkpoint(tmp_path / "run" / "checkpoint"))
    assert manifest is not None and manifest["meta"]["run"]["embeddings.auto"] == chosen
    # plan shows the saved choice; a run with other data chooses again
    r = run_cli("plan", "--config", "configs/quickstart.yaml", *TINY, "--set", f"train.output_dir={tmp_path / 'run'}", "--world-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "strategy auto:" in r.stdout and "Plan for 2" in r.stdout
    r, _ = train(tmp_path, *TINY, "--set", "data.train_samples=30000", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "choosing again" in r.stdout and "data.train_samples: 20000 then, 30000 now" in r.stdout


@pytest.mark.slow
def test_budget_bytes_is_kept(tmp_path):
    budget = 200_000
    r, m = train(tmp_path, *TINY, "--set", f"embeddings.budget_bytes={budget}", "--set", "embeddings.auto_candidates=[qr]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert m["embedding_bytes"] <= budget
    assert m["embedding_bytes"] > budget * 0.8  # spent, not left unused


@pytest.mark.slow
def test_a_budget_it_cannot_meet_is_refused(tmp_path):
    common = ["--config", "configs/quickstart.yaml", *TINY, "--set", "embeddings.auto_candidates=[qr]", "--set", f"train.output_dir={tmp_path}"]
    r = run_cli("plan", *common, "--set", "embeddings.budget_bytes=1000", "--world-size", "1")
    assert r.returncode == 2, r.stdout[-2000:]
    (line,) = r.stderr.strip().splitlines()
    assert "strategy auto: embeddings.budget_bytes=1,000 cannot be met: the least the tables take is " in line and "give at least" in line
    least = int(line.rsplit(" ", 1)[-1].replace(",", ""))
    r = run_cli("plan", *common, "--set", f"embeddings.budget_bytes={least}", "--world-size", "1")
    assert r.returncode == 0 and f"{least:,} bytes of a budget of {least:,}" in r.stdout, r.stderr[-2000:]
    r = run_cli("train", *common, "--set", "embeddings.compression=1000")
    assert r.returncode == 2 and "embeddings.compression=1000 (a budget of " in r.stderr and "give a compression of at most" in r.stderr, r.stderr
    assert not (tmp_path / "auto.json").exists()
