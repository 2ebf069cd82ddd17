"""The bench and quality commands run end to end, and the naive Q-R baseline computes what the
original DLRM code does."""

import json
import subprocess
import sys

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig
from torchrec_multihash.bench.naive_qr import NaiveQREmbeddingBags
from torchrec_multihash.bench.quality import markdown, summarize

from tests.helpers.cli import run_cli


def test_naive_qr_equals_the_module_on_one_hot_bags_and_pools_first_on_multi_hot():
    plain = [EmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=4, feature_names=["f"])]
    naive = NaiveQREmbeddingBags(plain, collisions=8)
    ebc = MultiHashEmbeddingBagCollection(
        [MultiHashEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=4, feature_names=["f"], num_collisions=8)]
    )
    with torch.no_grad():
        w = ebc.sub_table_weights()
        naive.q[0].weight.copy_(w["t"])
        naive.r[0].weight.copy_(w["t__r"])
    one_hot = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 99, 42]), lengths=torch.tensor([1, 1, 1]))
    torch.testing.assert_close(naive(one_hot).values(), ebc(one_hot).values())
    bag = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 99]), lengths=torch.tensor([2]))
    q, r = w["t"], w["t__r"]
    pooled_first = (q[0] + q[12]) * (r[3] + r[3])  # 3 = 0*8+3, 99 = 12*8+3
    torch.testing.assert_close(naive(bag).values()[0], pooled_first.detach())


@pytest.mark.slow
def test_bench_quick_writes_ratios_tables_and_plots(tmp_path):
    r = run_cli(
        "bench", "--quick", "--steps", "3", "--methods", "naive_qr,qr_mult", "--scaling", "", "--loader-lines", "3000",
        "--train-samples", "4096", "--device", "cpu", "--out", str(tmp_path), "--malloc", "system",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["workloads"]) == ["one_hot", "multi_hot", "mixed"]
    for name, work in res["workloads"].items():
        assert [m["method"] for m in work["methods"]] == ["torchrec_ebc", "naive_qr", "qr_mult"]  # the baseline always runs
        by = {m["method"]: m for m in work["methods"]}
        assert by["naive_qr"]["weights_bytes_rank0"] * 7 < by["torchrec_ebc"]["weights_bytes_rank0"]  # 8x smaller tables
        assert all(m["step_ms"] > 0 and m["peak_mib"] > 0 and m["workload"] == name for m in work["methods"])
        assert by["qr_mult"]["vs_baseline"] > 0 and "vs_baseline" not in by["torchrec_ebc"]  # timed with the EBC in one process
        assert by["qr_mult"]["malloc"] == "system"  # glibc's defaults
    assert res["workloads"]["one_hot"]["spec"]["multi_hot"] == 0
    assert res["workloads"]["mixed"]["spec"]["multi_hot"] == 3 and not res["workloads"]["mixed"]["spec"]["declare_one_hot"]
    assert res["loader"] and res["loader"][0]["samples"] > 0
    assert [t["method"] for t in res["train"]] == ["full", "qr_mult"] and all(t["samples_per_s"] > 0 for t in res["train"])
    md = (tmp_path / "results.md").read_text()
    assert "Workload one_hot" in md and "Workload multi_hot" in md and "| naive_qr |" in md and "End-to-end `train`" in md
    assert "3 multi-hot features (1-20 ids), the rest one-hot, nothing declared" in md
    assert (tmp_path / "step_time.png").stat().st_size > 1000 and (tmp_path / "memory.png").stat().st_size > 1000


def test_bench_cuda_without_a_gpu_says_so(monkeypatch):
    from torchrec_multihash.app.process_group import setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        setup_distributed("cuda")


def test_one_hot_workload_declares_its_tables_one_hot():
    from torchrec_multihash.bench.step_time import build
    from torchrec_multihash.bench.workload import BenchSpec

    one_hot, multi_hot = BenchSpec.one_hot(quick=True), BenchSpec.quick()
    assert len(one_hot.one_hot_tables()) == 26 and len(multi_hot.one_hot_tables()) == 26 - multi_hot.multi_hot
    module = build("qr_mult", multi_hot, torch.device("cpu"))
    per_id = {c.name for c in module.multihash_configs() if c.strategy_impl().looks_up_per_id()}
    assert per_id == {f"t_C{i + 1}" for i in range(multi_hot.multi_hot)}  # the multi-hot features' tables only
    mixed = BenchSpec.mixed(quick=True)  # nothing declared: every mult table per id
    assert mixed.multi_hot == 3 and mixed.one_hot_tables() == [] and mixed.rows == one_hot.rows
    assert all(c.strategy_impl().looks_up_per_id() for c in build("qr_mult", mixed, torch.device("cpu")).multihash_configs())


def test_quality_summary_pairs_seeds_against_hash():
    rows = [
        {"strategy": s, "compression": 4.0, "seed": seed, "auc": auc, "logloss": 0.5, "embedding_bytes": 100, "full_embedding_bytes": 400}
        for s, seed, auc in [("hash", 0, 0.70), ("hash", 1, 0.60), ("learned", 0, 0.72), ("learned", 1, 0.61)]
    ]
    for r in rows:
        r["optimizer_state_bytes"] = 50 if r["strategy"] == "learned" else 0
    summary = {s["strategy"]: s for s in summarize(rows)}
    lo, mean, hi = summary["learned"]["auc_vs_hash"]
    assert (round(lo, 4), round(mean, 4), round(hi, 4)) == (0.01, 0.015, 0.02)
    assert summary["hash"]["auc_vs_hash"] is None and summary["learned"]["reduction"] == 4.0
    assert "+0.0150 [+0.0100, +0.0200]" in markdown(summarize(rows), "t")
    assert "| learned | 4x | 4.00x | 100 | 50 | 0.6650" in markdown(summarize(rows), "t")  # the optimizer's state beside the rows
    assert "| 0.6500 ± 0.0707 |" in markdown(summarize(rows), "t")  # the std over the 2 seeds
    one_seed = markdown(summarize([r for r in rows if r["seed"] == 0]), "t")
    assert "| 0.7200 | 0.5000 |" in one_seed and "±" not in one_seed  # no std of one value


def test_quality_summary_pairs_against_qr_too_when_it_ran():
    rows = [
        {"strategy": s, "compression": 8.0, "seed": seed, "auc": auc, "logloss": 0.5, "embedding_bytes": 100, "full_embedding_bytes": 800}
        for s, seed, auc in [("hash", 0, 0.70), ("hash", 1, 0.60), ("qr", 0, 0.74), ("qr", 1, 0.66), ("mch", 0, 0.71), ("mch", 1, 0.58)]
    ]
    summary = {s["strategy"]: s for s in summarize(rows)}
    assert [round(v, 4) for v in summary["mch"]["auc_vs_qr"]] == [-0.08, -0.055, -0.03]
    assert [round(v, 4) for v in summary["mch"]["auc_vs_hash"]] == [-0.02, -0.005, 0.01]
    assert summary["qr"]["auc_vs_qr"] is None and summary["hash"]["auc_vs_qr"] is not None
    md = markdown(summarize(rows), "t")
    assert "AUC - qr (same seed)" in md and "| mch | 8x |" in md and "-0.0550 [-0.0800, -0.0300]" in md
    # without qr runs the table keeps its former columns
    assert "AUC - qr" not in markdown(summarize([r for r in rows if r["strategy"] != "qr"]), "t")


@pytest.mark.slow
def test_bench_keeps_the_other_methods_when_one_fails_and_takes_a_batch_size(tmp_path, monkeypatch, capsys):
    from torchrec_multihash.bench import bench

    real = bench.run_method

    def run_method(method, spec, *args, **kwargs):
        if method == "qr_mult":
            raise RuntimeError("qr_mult on 1 process(es) failed (exit 1):\nTraceback ...\nRuntimeError: CUDA out of memory")
        return real(method, spec, *args, **kwargs)

    monkeypatch.setattr(bench, "run_method", run_method)
    # crt: a registered strategy outside the default methods, its tables mult-composed
    argv = ["--quick", "--steps", "2", "--methods", "qr_mult,qr_add,crt", "--workloads", "one_hot", "--batch-size", "96", "--malloc", "system"]
    argv += ["--scaling", "", "--loader-lines", "0", "--train-samples", "0", "--device", "cpu", "--out", str(tmp_path)]
    assert bench.main(argv) == 1  # a failed run fails the command, after the results are written
    res = json.loads((tmp_path / "results.json").read_text())
    work = res["workloads"]["one_hot"]
    assert work["spec"]["batch_size"] == 96 and all(m["samples_per_s"] > 0 for m in work["methods"])
    assert [m["method"] for m in work["methods"]] == ["torchrec_ebc", "qr_add", "crt"]
    assert len(res["failed"]) == 1 and res["failed"][0]["method"] == "qr_mult" and "out of memory" in res["failed"][0]["error"]
    md = (tmp_path / "results.md").read_text()
    assert "| qr_add |" in md and "- one_hot, qr_mult: RuntimeError: CUDA out of memory" in md
    assert (tmp_path / "step_time.png").exists()
    err = capsys.readouterr().err
    assert "one_hot: qr_mult on 1 process(es) failed" in err and "1 method run(s) failed" in err


@pytest.mark.slow
def test_op_counts_counts_each_methods_operators_per_step():
    # a process of its own: the command joins a process group (one rank), as bench's runs do
    args = ["--quick", "--methods", "torchrec_ebc,qr_add", "--batch-size", "16", "--device", "cpu", "--top", "3"]
    r = subprocess.run([sys.executable, "-m", "torchrec_multihash.bench.op_counts", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| torchrec_ebc") or line.startswith("| qr_add")
    }
    ebc, qr = float(rows["torchrec_ebc"][3]), float(rows["qr_add"][3])
    assert 0 < ebc < qr  # the id transform and the combine add operators to TorchRec's step
    assert "aten::" in out  # --top lists them
    # --by-time: the operators of most host time, FBGEMM's lookups among them
    args = ["--quick", "--methods", "qr_add", "--batch-size", "16", "--device", "cpu", "--top", "3", "--by-time"]
    r = subprocess.run([sys.executable, "-m", "torchrec_multihash.bench.op_counts", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    listed = [line.split("|") for line in r.stdout.splitlines() if line.startswith("|   ")]
    assert len(listed) == 3 and all(c[3].strip().endswith(" ms") for c in listed)
    assert any(c[1].strip().startswith("fbgemm::split_embedding") for c in listed)


_DP_STEP = """
import json, torch
from torchrec_multihash.app.process_group import setup_distributed
from torchrec_multihash.bench.step_time import _step, build, dense_optimizer, shard, upstream_gradient
from torchrec_multihash.bench.workload import BenchSpec
device = setup_distributed("cpu")
spec = BenchSpec.one_hot(quick=True)
spec.batch_size = 16
model = shard(build("qr_add_unstacked", spec, device), device, data_parallel=True)
dp = sorted(t for m in model.plan.plan.values() for t, ps in m.items() if ps.sharding_type == "data_parallel")
opt = dense_optimizer(model)
params = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in dp}
before = {n: p.detach().clone() for n, p in params.items()}
_step(model, opt, spec.batches()[0], upstream_gradient(spec, device))
print(json.dumps({"dp": dp, "trained": sorted(n.split(".")[-2] for n, p in params.items() if not torch.equal(p, before[n])),
                  "in_optimizer": sum(len(g["params"]) for g in opt.param_groups) if opt else 0}))
"""


@pytest.mark.slow
def test_bench_steps_train_the_data_parallel_tables_too():
    # allowed to, the planner makes the quick one-hot plan's 8-row remainder tables data-parallel
    # (TorchRec's dense kernel, outside the fused optimizer): the timed step must update them, as
    # train does
    r = subprocess.run([sys.executable, "-c", _DP_STEP], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["dp"]) == 26 and all(t.endswith("__r") for t in got["dp"])
    assert got["in_optimizer"] == 26 and got["trained"] == got["dp"]


def test_speed_table_shows_the_paired_steps_its_ratio_comes_from():
    """The ratio is of steps timed in one process; the table shows them next to the standalone step."""
    from torchrec_multihash.bench.bench import markdown as speed_markdown

    def row(method, ms, **extra):
        return dict(method=method, step_ms=ms, samples_per_s=1000.0, weights_bytes_rank0=2**20, peak_mib=10, device="cpu", **extra)

    spec = {"multi_hot": 0, "max_bag": 1, "rows": [10, 20], "dim": 8, "batch_size": 4, "compression": 8, "steps": 3, "warmup": 1}
    rows = [row("torchrec_ebc", 2.9), row("full", 2.2, vs_baseline=1.10, paired_step_ms=3.3, paired_baseline_step_ms=3.0)]
    md = speed_markdown({"workloads": {"one_hot": {"spec": spec, "methods": rows}}})
    assert "| full | 2.2 | 1.10x time | 3.3 / 3.0 | - |" in md and "| torchrec_ebc | 2.9 | 1.00x time | - | - |" in md


def test_bench_measures_glibc_defaults_first_and_the_caching_malloc_beside_them(tmp_path, monkeypatch):
    """``--malloc both`` (the default): each method run with glibc's defaults, then with the
    caching malloc, whose ratio is the table's second ratio column."""
    from torchrec_multihash.bench import bench

    calls = []

    def run_method(method, spec, nproc, device, malloc):
        calls.append((method, malloc))
        ratio = {"system": 2.0, "caching": 1.5}[malloc]
        rec = dict(
            method=method, workload=spec.name, world_size=1, device="cpu", step_ms=4.0, samples_per_s=100.0, weights_bytes_rank0=1, peak_mib=1.0
        )
        return rec if method == "torchrec_ebc" else {**rec, "vs_baseline": ratio, "paired_step_ms": 4.0, "paired_baseline_step_ms": 4.0 / ratio}

    monkeypatch.setattr(bench, "run_method", run_method)
    argv = ["--quick", "--methods", "qr_mult", "--workloads", "mixed", "--scaling", "", "--loader-lines", "0", "--train-samples", "0"]
    assert bench.main([*argv, "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert calls == [("torchrec_ebc", "system"), ("torchrec_ebc", "caching"), ("qr_mult", "system"), ("qr_mult", "caching")]
    row = json.loads((tmp_path / "results.json").read_text())["workloads"]["mixed"]["methods"][1]
    assert (row["malloc"], row["vs_baseline"], row["caching_vs_baseline"]) == ("system", 2.0, 1.5)
    assert "| qr_mult | 4.0 | 2.00x time | 4.0 / 2.0 | 1.50x time |" in (tmp_path / "results.md").read_text()
