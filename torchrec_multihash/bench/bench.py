"""``torchrec-multihash bench``: training step time and memory of every strategy against TorchRec's
own ``EmbeddingBagCollection`` (full tables) and the original DLRM code's naive Q-R, on the same
batches; scaling over CPU processes; the data reader's throughput against the trainer's.

Each method runs in its own process (``bench.step_time``), so peak memory is its own. Results go to
``results.json``, ``results.md``, ``step_time.png`` and ``memory.png`` in ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, TypedDict

from tqdm import tqdm

from torchrec_multihash.bench import python_command
from torchrec_multihash.bench.step_time import METHODS
from torchrec_multihash.bench.workload import BenchSpec

BASELINE = "torchrec_ebc"
NAIVE = "naive_qr"

Record = Dict[str, Any]  # one JSON object: a method's measurement (``bench.step_time``) or a reader's


class Results(TypedDict):
    """``results.json``: the workload, one record per method, the scaling runs, the reader runs."""

    spec: Dict[str, Any]
    methods: List[Record]
    scaling: List[Record]
    loader: List[Record]


def run_method(method: str, spec: BenchSpec, nproc: int = 1) -> Record:
    args = ["-m", "torchrec_multihash.bench.step_time", "--method", method, "--spec", json.dumps(spec.to_dict())]
    cmd = python_command(args, nproc)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


def markdown(results: Results) -> str:
    spec = results["spec"]
    rows = results["methods"]
    base = next(r for r in rows if r["method"] == BASELINE)
    naive = next((r for r in rows if r["method"] == NAIVE), None)
    lines = [
        f"Workload: {len(spec['rows'])} tables ({sum(spec['rows']):,} rows, dim {spec['dim']}), batch {spec['batch_size']}, "
        f"{spec['multi_hot']} multi-hot features (1-{spec['max_bag']} ids), compression {spec['compression']:g}x; "
        f"median of {spec['steps']} steps after {spec['warmup']} warm-up; device {base['device']}.",
        "",
        f"| method | step (ms) | vs {BASELINE} | vs {NAIVE} | samples/s | weights (MiB) | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs_naive = f"{naive['step_ms'] / r['step_ms']:.2f}x faster" if naive else "-"
        lines.append(
            f"| {r['method']} | {r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f}x time | {vs_naive} | "
            f"{r['samples_per_s']:,.0f} | {r['weights_bytes_rank0'] / 2**20:,.1f} | {r['peak_mib']:,.0f} |"
        )
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
    if results.get("loader"):
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
    return "\n".join(lines) + "\n"


def plots(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    base = next(r for r in rows if r["method"] == BASELINE)["step_ms"]
    names = [r["method"] for r in rows]
    for key, label, fname in (("step_ms", "training step (ms)", "step_time.png"), ("peak_mib", "peak memory (MiB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        vals = [float(r[key]) for r in rows]
        bars = ax.bar(names, vals, color=["#888" if n in (BASELINE, NAIVE) else "#3a7" for n in names])
        if key == "step_ms":
            for b, v in zip(bars, vals):
                ax.annotate(f"{v / base:.2f}x", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label}, {rows[0]['device']} (grey: baselines; labels: time vs {BASELINE})" if key == "step_ms" else label)
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="torchrec-multihash bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small tables and batches (about a minute on CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for the results")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--scaling", default="1,2,4", help="process counts for the scaling runs ('' to skip)")
    p.add_argument("--loader-lines", type=int, default=None, help="lines of the generated Criteo TSV (0 to skip)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default: 30, --quick 20)")
    args = p.parse_args(argv)
    spec = BenchSpec.quick() if args.quick else BenchSpec()
    if args.steps:
        spec.steps = args.steps
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for needed in (BASELINE,):
        if needed not in methods:
            methods.insert(0, needed)
    results = Results(spec=spec.to_dict(), methods=[], scaling=[], loader=[])
    try:
        for m in tqdm(methods, desc="bench: methods", unit="method"):
            results["methods"].append(run_method(m, spec))
        counts = [int(n) for n in args.scaling.split(",") if n]
        for m in ("torchrec_ebc", "qr_mult") if counts else ():
            for n in tqdm(counts, desc=f"bench: scaling {m}", unit="run"):
                results["scaling"].append(run_method(m, spec, nproc=n) if n > 1 else next(r for r in results["methods"] if r["method"] == m))
        lines = args.loader_lines if args.loader_lines is not None else (20_000 if args.quick else 200_000)
        if lines:
            results["loader"] = loader_throughput(spec, lines)
    except RuntimeError as e:
        print(f"torchrec-multihash bench: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    plots(results, args.out)
    print(table)
    print(f"Results in {args.out.resolve()} (results.json, results.md, step_time.png, memory.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
