"""``torchrec-multihash bench``: training step time and memory of every strategy against TorchRec's
own ``EmbeddingBagCollection`` (full tables) and the original DLRM code's naive Q-R, on the same
batches, for a one-hot (Criteo's shape) and a multi-hot workload; scaling over processes; the data
reader's throughput against the trainer's; end-to-end ``train`` samples/s, full vs Q-R mult.

Each method runs in its own process (``bench.step_time``), so peak memory is its own; that process
then builds TorchRec's EBC too and times both step for step on the same batches, which gives the
``vs torchrec_ebc`` ratio. Results go to ``results.json``, ``results.md``, ``step_time.png`` and
``memory.png`` in ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypedDict

from tqdm import tqdm

from torchrec_multihash.argtypes import at_least, folder
from torchrec_multihash.bench import python_command
from torchrec_multihash.bench.step_time import BASELINE, DEVICES, METHODS, method_names
from torchrec_multihash.bench.workload import WORKLOADS, BenchSpec

NAIVE = "naive_qr"
TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
TRAIN_RUNS = {"full": ["embeddings.strategy=full"], "qr_mult": ["embeddings.strategy=qr", "embeddings.operation=mult"]}

Record = Dict[str, Any]  # one JSON object: a method's measurement (``bench.step_time``) or a reader's


class Workload(TypedDict):
    """One workload's spec and one record per method."""

    spec: Dict[str, Any]
    methods: List[Record]


class Results(TypedDict):
    """``results.json``: per workload its spec and methods; the scaling runs (multi-hot), the reader
    runs, the end-to-end ``train`` runs; the method runs that failed (the others still count)."""

    workloads: Dict[str, Workload]
    scaling: List[Record]
    loader: List[Record]
    train: List[Record]
    failed: List[Record]  # a method's run that failed: workload, method, the end of its stderr


# glibc's malloc hands large blocks back to the OS when they are freed (mmap above 32 MB, trim), so
# on CPU a step page-faults such tensors in again: that is what a user's process gets ("system", the
# default, the ratios the bench reports first). CUDA's caching allocator keeps freed blocks; these
# tunables make glibc keep them too (no mmap, no trim), for every method and the baseline alike
# ("caching", shown beside them: what an allocator-tuned process gets).
CACHING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
MALLOCS = ("both", "system", "caching")


def run_method(method: str, spec: BenchSpec, nproc: int = 1, device: str = "auto", malloc: str = "caching") -> Record:
    args = ["-m", "torchrec_multihash.bench.step_time", "--method", method, "--spec", json.dumps(spec.to_dict()), "--device", device]
    cmd = python_command(args, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(CACHING_MALLOC_ENV if malloc == "caching" else {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH ") :])
    raise RuntimeError(f"{method} on {nproc} process(es) failed (exit {r.returncode}):\n{r.stderr[-2000:]}")


def loader_throughput(spec: BenchSpec, lines: int) -> List[Record]:
    """The Criteo TSV reader (hashing ids) on a generated file, in-process and with one worker."""
    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.data_timing import measure_loader
    from torchrec_multihash.datasets.synthetic import write_criteo_tsv

    out: List[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        write_criteo_tsv(path, lines, seed=spec.seed)
        for workers in (0, 1):
            cfg = load_config(
                None,
                [
                    "data.format=criteo_tsv",
                    f"data.train=[{path}]",
                    f"data.test=[{path}]",
                    "data.ids=hashing",
                    f"data.num_workers={workers}",
                    f"train.batch_size={spec.batch_size}",
                    f"train.output_dir={tmp}/run",
                    f"embeddings.num_embeddings_per_feature=[{','.join(map(str, spec.rows))}]",
                ],
            )
            m = measure_loader(cfg, batches=lines // spec.batch_size)
            out.append({"num_workers": workers, **m})
    return out


def train_throughput(config: Path, samples: int, device: str, malloc: str = "caching") -> List[Record]:
    """End-to-end ``train`` (DLRM, data, fused optimizer) on ``config``, full tables vs Q-R mult: its
    samples/s, each in a fresh process as a user runs it."""
    out: List[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in TRAIN_RUNS.items():
            metrics = Path(tmp) / f"{name}.json"
            overrides = [*sets, f"train.output_dir={tmp}/{name}", f"data.train_samples={samples}", "data.test_samples=10000"]
            args = ["-m", "torchrec_multihash.cli", "train", "--config", str(config), "--metrics-out", str(metrics)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
            env.update(CACHING_MALLOC_ENV if malloc == "caching" else {})
            r = subprocess.run([sys.executable, *args, *[a for o in overrides for a in ("--set", o)]], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"train ({name}) failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            m = json.loads(metrics.read_text())
            out.append({"method": name, "config": str(config), "samples_per_s": m["train_samples_per_s"], "steps": m["steps"], "auc": m["auc"]})
    return out


def _method_table(name: str, work: Workload) -> List[str]:
    spec, rows = work["spec"], work["methods"]
    base = next((r for r in rows if r["method"] == BASELINE), rows[0])
    naive = next((r for r in rows if r["method"] == NAIVE), None)
    bags = f"{spec['multi_hot']} multi-hot features (1-{spec['max_bag']} ids), the rest one-hot" if spec["multi_hot"] else "every feature one-hot"
    bags += ", declared so (max_ids_per_bag=1)" if spec.get("declare_one_hot", True) else ", nothing declared"
    lines = [
        f"Workload {name}: {len(spec['rows'])} tables ({sum(spec['rows']):,} rows, dim {spec['dim']}), batch {spec['batch_size']}, "
        f"{bags}, compression {spec['compression']:g}x; median of {spec['steps']} steps after {spec['warmup']} warm-up; device {base['device']}"
        f"{'; malloc: ' + base['malloc'] if base['device'] == 'cpu' and 'malloc' in base else ''}. "
        f"`step (ms)`: the method alone in its process; `vs {BASELINE}`: the ratio of the method and TorchRec's EBC "
        f"timed step for step in one process on the same batches (those steps: `paired (ms)`), which is what to compare: "
        "separate processes on a shared machine see different loads; `caching malloc`: the same, glibc tuned to keep freed memory.",
        "",
        f"| method | step (ms) | vs {BASELINE} | paired (ms): method / {BASELINE} | vs {BASELINE}, caching malloc | vs {NAIVE} "
        "| samples/s | weights (MiB) | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs_naive = f"{naive['step_ms'] / r['step_ms']:.2f}x faster" if naive else "-"
        ratio = r.get("vs_baseline", r["step_ms"] / base["step_ms"] if base["method"] == BASELINE else None)
        paired = f"{r['paired_step_ms']:.1f} / {r['paired_baseline_step_ms']:.1f}" if "paired_step_ms" in r else "-"
        tuned = f"{r['caching_vs_baseline']:.2f}x time" if "caching_vs_baseline" in r else "-"
        lines.append(
            f"| {r['method']} | {r['step_ms']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x time'} | {paired} | {tuned} | {vs_naive} | "
            f"{r['samples_per_s']:,.0f} | {r['weights_bytes_rank0'] / 2**20:,.1f} | {r['peak_mib']:,.0f} |"
        )
    return lines


def markdown(results: Results) -> str:
    lines: List[str] = []
    for name, work in results["workloads"].items():
        lines += [*(["", ""] if lines else []), *_method_table(name, work)]
    rows = next(iter(results["workloads"].values()))["methods"] if results["workloads"] else []
    if "multi_hot" in results["workloads"]:
        rows = results["workloads"]["multi_hot"]["methods"]
    base = next((r for r in rows if r["method"] == BASELINE), None)
    if results.get("scaling"):
        lines += [
            "",
            "Scaling over CPU processes (DistributedModelParallel, gloo; per-rank batch fixed):",
            "",
            "| method | processes | step (ms) | samples/s (all ranks) | vs 1 process |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method in sorted({s["method"] for s in results["scaling"]}):
            pts = [s for s in results["scaling"] if s["method"] == method]
            one = next(s for s in pts if s["world_size"] == 1)
            for s in pts:
                speedup = s["samples_per_s"] / one["samples_per_s"]
                lines.append(f"| {method} | {s['world_size']} | {s['step_ms']:.1f} | {s['samples_per_s']:,.0f} | {speedup:.2f}x |")
    if results.get("loader") and base is not None:
        consumer = next((r for r in rows if r["method"] == "qr_mult"), base)
        trainer = consumer["samples_per_s"]
        lines += [
            "",
            f"Criteo TSV reader vs the {consumer['method']} training step ({trainer:,.0f} samples/s, embeddings only):",
            "",
            "| reader workers | samples/s | vs trainer |",
            "| --- | --- | --- |",
        ]
        for ld in results["loader"]:
            lines.append(f"| {ld['num_workers']} | {ld['samples_per_s']:,.0f} | {ld['samples_per_s'] / trainer:.2f}x |")
    if results.get("train"):
        full = next((t for t in results["train"] if t["method"] == "full"), results["train"][0])
        lines += [
            "",
            f"End-to-end `train` on {Path(full['config']).name} (DLRM, data, optimizers; one process):",
            "",
            "| tables | samples/s | vs full | steps | test AUC |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in results["train"]:
            lines.append(
                f"| {t['method']} | {t['samples_per_s']:,.0f} | {t['samples_per_s'] / full['samples_per_s']:.2f}x | {t['steps']} | {t['auc']:.4f} |"
            )
    if results.get("failed"):
        lines += ["", "Failed (the other runs above still count):", ""]
        for f in results["failed"]:
            last = f["error"].strip().splitlines()[-1:] or ["no output"]
            lines.append(f"- {f['workload']}, {f['method']}: {last[0]}")
    return "\n".join(lines) + "\n"


def plots(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = results["workloads"]
    for key, label, fname in (("step_ms", "training step (ms)", "step_time.png"), ("peak_mib", "peak memory (MiB)", "memory.png")):
        fig, axes = plt.subplots(1, len(works), figsize=(8 * len(works), 4), squeeze=False)
        for ax, (name, work) in zip(axes[0], works.items()):
            rows = work["methods"]
            base = next((r for r in rows if r["method"] == BASELINE), rows[0])["step_ms"]
            names = [r["method"] for r in rows]
            vals = [float(r[key]) for r in rows]
            bars = ax.bar(names, vals, color=["#888" if n in (BASELINE, NAIVE) else "#3a7" for n in names])
            if key == "step_ms":
                for b, v, r in zip(bars, vals, rows):
                    ax.annotate(f"{r.get('vs_baseline', v / base):.2f}x", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(label)
            title = f"{name}: {label}, {rows[0]['device']}"
            ax.set_title(title + (f" (grey: baselines; labels: time vs {BASELINE})" if key == "step_ms" else ""), fontsize=9)
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrec-multihash bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small tables and batches (a few minutes on CPU)")
    p.add_argument("--out", type=folder, default=Path("runs/bench"), help="directory for the results")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {method_names()}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA (FBGEMM's GPU kernels) where there is a GPU, else CPU")
    p.add_argument("--scaling", default="1,2,4", help="process counts for the scaling runs, multi-hot workload ('' to skip)")
    p.add_argument("--loader-lines", type=int, default=None, help="lines of the generated Criteo TSV (0 to skip)")
    p.add_argument("--train-samples", type=int, default=None, help="samples of the end-to-end train runs (0 to skip; default 200k, --quick 20k)")
    p.add_argument("--train-config", type=Path, default=TRAIN_CONFIG, help="config of the end-to-end train runs")
    p.add_argument("--steps", type=at_least(1), default=None, help="timed steps per method (default: 30, --quick 20)")
    p.add_argument(
        "--batch-size", type=at_least(1), default=None, help="batch size of every workload (per rank) instead of its own (GPUs: try 16384)"
    )
    p.add_argument(
        "--malloc",
        choices=MALLOCS,
        default="both",
        help="system: glibc's defaults, what a user's process gets; caching: glibc keeps freed memory (as CUDA's allocator does): "
        "no page faults for tensors of earlier steps; both (default): system, with caching's ratios beside it (CPU)",
    )
    return p


class _Bench:
    """One ``bench`` command: its stages, each recording into ``results`` what it measured or
    why it failed (the bench goes on after a failure)."""

    def __init__(self, args: argparse.Namespace, workloads: List[str], methods: List[str]) -> None:
        self.args, self.workloads, self.methods = args, workloads, methods
        self.results = Results(workloads={}, scaling=[], loader=[], train=[], failed=[])
        self.single = "caching" if args.malloc == "caching" else "system"  # the malloc of the runs measured once

    def spec(self, name: str) -> BenchSpec:
        spec = BenchSpec.workload(name, self.args.quick)
        spec.steps = self.args.steps or spec.steps
        spec.batch_size = self.args.batch_size or spec.batch_size
        return spec

    def attempt(self, stage: str, what: str, run: Callable[..., Any], *run_args: Any) -> Any:
        """``run(*run_args)``, or None when it fails: the failure is reported and recorded."""
        try:
            return run(*run_args)
        except RuntimeError as e:
            print(f"torchrec-multihash bench: {stage}: {e}", file=sys.stderr)
            self.results["failed"].append({"workload": stage, "method": what, "error": str(e)})
            return None

    def workload(self, name: str) -> None:
        """Every method on workload ``name``; on CPU with ``--malloc both``, again with glibc tuned."""
        spec, device = self.spec(name), self.args.device
        work = Workload(spec=spec.to_dict(), methods=[])
        for m in tqdm(self.methods, desc=f"bench: {name}", unit="method"):
            rec = self.attempt(name, m, run_method, m, spec, 1, device, self.single)
            if rec is not None and self.args.malloc == "both" and rec["device"] == "cpu":
                tuned = self.attempt(name, f"{m} (caching malloc)", run_method, m, spec, 1, device, "caching")
                rec.update({f"caching_{k}": tuned[k] for k in ("step_ms", "vs_baseline") if tuned is not None and k in tuned})
            if rec is not None:
                work["methods"].append({**rec, "malloc": self.single})
        if work["methods"]:
            self.results["workloads"][name] = work

    def scaling(self) -> None:
        """The multi-hot workload on each ``--scaling`` process count (one process: the run above)."""
        spec = self.spec("multi_hot")
        counts = [int(n) for n in self.args.scaling.split(",") if n]
        base_rows = self.results["workloads"]["multi_hot"]["methods"] if "multi_hot" in self.results["workloads"] else []
        for m in ("torchrec_ebc", "qr_mult") if counts else ():
            runs: List[Record] = []
            for n in tqdm(counts, desc=f"bench: scaling {m}", unit="run"):
                one = next((r for r in base_rows if r["method"] == m), None)
                rec = (
                    one
                    if n == 1 and one is not None
                    else self.attempt("scaling", f"{m} on {n} process(es)", run_method, m, spec, n, self.args.device, self.single)
                )
                if rec is None:
                    break
                runs.append(rec)
            if any(r["world_size"] == 1 for r in runs):  # the table's reference point
                self.results["scaling"] += runs

    def readers_and_training(self) -> None:
        """The Criteo TSV reader and end-to-end ``train`` runs, unless skipped (0)."""
        a = self.args
        lines = a.loader_lines if a.loader_lines is not None else (20_000 if a.quick else 200_000)
        if lines:
            self.results["loader"] = self.attempt("loader", "Criteo TSV reader", loader_throughput, self.spec("multi_hot"), lines) or []
        samples = a.train_samples if a.train_samples is not None else (20_000 if a.quick else 200_000)
        if samples:
            self.results["train"] = self.attempt("train", "end-to-end train", train_throughput, a.train_config, samples, a.device, self.single) or []

    def write(self, out: Path) -> int:
        """``results.json``, ``results.md`` and the plots in ``out``; 1 if a run failed."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=2))
        table = markdown(self.results)
        (out / "results.md").write_text(table)
        written = ["results.json", "results.md"]
        if self.results["workloads"]:
            plots(self.results, out)
            written += ["step_time.png", "memory.png"]
        print(table)
        print(f"Results in {out.resolve()} ({', '.join(written)})")
        if self.results["failed"]:
            print(f"torchrec-multihash bench: {len(self.results['failed'])} method run(s) failed: see above and results.md", file=sys.stderr)
            return 1
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if [w for w in workloads if w not in WORKLOADS]:
        p.error(f"unknown workload(s) in {workloads}; choose from {list(WORKLOADS)}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {method_names()}")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    bench = _Bench(args, workloads, methods)
    for name in workloads:
        bench.workload(name)
    bench.scaling()
    bench.readers_and_training()
    return bench.write(args.out)


if __name__ == "__main__":
    sys.exit(main())
