"""``torchrec-multihash quality``: test AUC and log loss against embedding bytes, for several
strategies, compressions and seeds, each a real ``train`` run of the config.

Writes ``results.json`` (every run), ``results.md`` (mean and spread over seeds) and
``frontier.png`` (AUC against embedding bytes). Runs whose metrics already exist are reused, so
an interrupted study continues where it stopped.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypedDict

from tqdm import tqdm

from torchrec_multihash.app.config import config_parser
from torchrec_multihash.argtypes import at_least, folder
from torchrec_multihash.bench import python_command

BASELINE = "hash"  # AUC differences are reported against the hashing trick, seed by seed
SECOND_BASELINE = "qr"  # ... and against Q-R, when the study ran it

# methods that are not a strategy name: the config overrides each stands for (baselines, issue 15)
METHODS: Dict[str, List[str]] = {
    # TorchRec's MCH remapper (ManagedCollisionEmbeddingBagCollection), rows and remapper state within the bytes
    "mch": ["embeddings.strategy=mch", "embeddings.mch_eviction=lfu", "embeddings.mch_sizing=bytes"],
    "mch_distance_lfu": ["embeddings.strategy=mch", "embeddings.mch_eviction=distance_lfu", "embeddings.mch_sizing=bytes"],
    # N / compression rows, as the hashing trick, the remapper's state on top (counted in its bytes)
    "mch_rows": ["embeddings.strategy=mch", "embeddings.mch_eviction=lfu", "embeddings.mch_sizing=rows"],
    # the original DLRM code's Q-R: each partition pooled, then multiplied
    "naive_qr": ["embeddings.strategy=qr", "embeddings.operation=mult", "embeddings.compose=pooled"],
    # every table full, its rows fp16: 2x smaller than fp32 (the baseline precision alone gives)
    "full_fp16": ["embeddings.strategy=full", "embeddings.precision=fp16"],
}
# methods that run once per seed, at the compression they stand for
FIXED = {"full": 1.0, "full_fp16": 2.0}


def method_overrides(method: str) -> List[str]:
    """The ``--set`` overrides of a ``--strategies`` entry: a strategy name or one of ``METHODS``."""
    return list(METHODS.get(method, [f"embeddings.strategy={method}"]))


class Run(TypedDict):
    """One training run of the study: what it ran and its test metrics (``results.json``'s runs)."""

    strategy: str
    compression: float
    seed: int
    auc: float
    logloss: float
    ne: float
    embedding_bytes: float
    full_embedding_bytes: float
    optimizer_state_bytes: float  # the fused row-wise Adagrad's, beside the rows (0: not recorded)


class Summary(TypedDict):
    """One strategy at one compression, over its seeds (``results.json``'s summary)."""

    strategy: str
    compression: float
    seeds: int
    auc: float
    auc_std: float
    logloss: float
    logloss_std: float
    auc_vs_hash: Optional[Tuple[float, float, float]]  # min, mean, max over seeds; None for the baseline
    auc_vs_qr: Optional[Tuple[float, float, float]]  # the same against qr (None for qr, or without qr runs)
    embedding_bytes: float
    reduction: float
    optimizer_state_bytes: float


def run_one(config: Optional[str], overrides: Sequence[str], run_dir: Path, nproc: int = 1) -> Dict[str, float]:
    """One training run (in a fresh process, as a user would run it); its metrics."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["-m", "torchrec_multihash.cli", "train", "--metrics-out", str(metrics), "--set", f"train.output_dir={run_dir}"]
    if config:
        args += ["--config", config]
    for o in overrides:
        args += ["--set", o]
    cmd = python_command(args, nproc)
    log = run_dir / "train.log"
    with open(log, "w") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"training failed (exit {r.returncode}); see {log}")
    return json.loads(metrics.read_text())


def summarize(rows: List[Run]) -> List[Summary]:
    """Mean and standard deviation over seeds, per strategy and compression."""
    groups: Dict[Tuple[str, float], List[Run]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["compression"]), []).append(r)
    out: List[Summary] = []
    for (strategy, compression), rs in groups.items():
        auc = [float(r["auc"]) for r in rs]
        logloss = [float(r["logloss"]) for r in rs]
        # paired by seed (a seed fixes the data order and init; on synthetic data, the data too)
        paired = _paired(rs, groups.get((BASELINE, compression), []))
        paired_qr = _paired(rs, groups.get((SECOND_BASELINE, compression), []))
        embedding_bytes = statistics.mean(float(r["embedding_bytes"]) for r in rs)
        out.append(
            Summary(
                strategy=strategy,
                compression=compression,
                seeds=len(rs),
                auc=statistics.mean(auc),
                auc_std=_std(auc),
                logloss=statistics.mean(logloss),
                logloss_std=_std(logloss),
                auc_vs_hash=(min(paired), statistics.mean(paired), max(paired)) if paired and strategy != BASELINE else None,
                auc_vs_qr=(min(paired_qr), statistics.mean(paired_qr), max(paired_qr)) if paired_qr and strategy != SECOND_BASELINE else None,
                embedding_bytes=embedding_bytes,
                reduction=float(rs[0]["full_embedding_bytes"]) / embedding_bytes,
                optimizer_state_bytes=statistics.mean(float(r.get("optimizer_state_bytes", 0)) for r in rs),
            )
        )
    return sorted(out, key=lambda s: (s["compression"], s["strategy"]))


def _paired(rs: List[Run], base_runs: List[Run]) -> List[float]:
    """AUC of each run minus the baseline's run of the same seed."""
    base = {r["seed"]: r for r in base_runs}
    return [float(r["auc"]) - float(base[r["seed"]]["auc"]) for r in rs if r["seed"] in base]


def _std(vals: List[float]) -> float:
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def _vs(d: Optional[Tuple[float, float, float]]) -> str:
    return f"{d[1]:+.4f} [{d[0]:+.4f}, {d[2]:+.4f}]" if d else "-"


def _count(n: float) -> str:
    """A byte count, or '-' for one the runs did not record."""
    return f"{n:,.0f}" if n else "-"


def markdown(summary: List[Summary], title: str) -> str:
    with_qr = any(s.get("auc_vs_qr") for s in summary)
    qr_head = f" AUC - {SECOND_BASELINE} (same seed) |" if with_qr else ""
    lines = [
        f"### {title}",
        "",
        "| strategy | target | actual reduction | embedding bytes | optimizer state bytes | test AUC | test log loss | "
        f"AUC - {BASELINE} (same seed: mean [min, max]) |{qr_head} seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if with_qr else "") + " --- |",
    ]
    for s in summary:
        qr_cell = f" {_vs(s.get('auc_vs_qr'))} |" if with_qr else ""
        spread = s["seeds"] > 1  # a std over one seed says nothing: left out
        auc = f"{s['auc']:.4f}" + (f" ± {s['auc_std']:.4f}" if spread else "")
        logloss = f"{s['logloss']:.4f}" + (f" ± {s['logloss_std']:.4f}" if spread else "")
        lines.append(
            f"| {s['strategy']} | {s['compression']:g}x | {s['reduction']:.2f}x | {s['embedding_bytes']:,.0f} | "
            f"{_count(s.get('optimizer_state_bytes', 0))} | {auc} | {logloss} | {_vs(s['auc_vs_hash'])} |{qr_cell} {s['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def _style(strategy: str) -> Dict[str, Any]:
    """Line style of a strategy on the frontier: ``auto`` stands out, baselines that are not ours
    (the hashing trick, TorchRec's MCH remapper, the original DLRM code's Q-R) are dashed."""
    if strategy == "auto":
        return {"marker": "*", "markersize": 12, "linewidth": 2.5, "color": "black", "zorder": 5}
    if strategy in (BASELINE, "full_fp16") or strategy.startswith("mch") or strategy.startswith("naive"):
        return {"marker": "s", "linestyle": "--", "alpha": 0.8}
    return {"marker": "o"}


def plot(summary: List[Summary], path: Path, title: str) -> None:
    """AUC against embedding bytes, one line per strategy (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy in sorted({str(s["strategy"]) for s in summary}):
        pts = sorted((s for s in summary if s["strategy"] == strategy), key=lambda s: float(s["embedding_bytes"]))
        ax.errorbar(
            [float(p["embedding_bytes"]) for p in pts],
            [float(p["auc"]) for p in pts],
            yerr=[float(p["auc_std"]) for p in pts],
            capsize=3,
            label=strategy,
            **_style(strategy),
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (mappings included)")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = config_parser("torchrec-multihash quality", __doc__)
    p.add_argument(
        "--strategies",
        default="full,hash,qr,learned",
        help="comma-separated strategies (full and full_fp16 run once per seed), or the baselines " + ", ".join(METHODS) + " (docs/benchmarks.md)",
    )
    p.add_argument("--compressions", default="4,16", help="comma-separated target reductions")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    p.add_argument("--nproc", type=at_least(1), default=1, help="processes per run (torchrun)")
    p.add_argument("--out", type=folder, required=True, help="directory for the runs and the report")
    p.add_argument("--title", default=None, help="title of the table and plot (default: the config's name)")
    args = p.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    try:
        compressions = [float(c) for c in args.compressions.split(",") if c]
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as e:
        p.error(f"--compressions are numbers and --seeds whole numbers: {e}")
    for option, values in (("--strategies", strategies), ("--compressions", compressions), ("--seeds", seeds)):
        if not values:
            p.error(f"{option} is empty: give at least one")
    if any(not c >= 1 for c in compressions):
        p.error(f"--compressions must be >= 1, got {compressions}")
    title = args.title or (Path(args.config).stem if args.config else "defaults")
    jobs = [(s, c, seed) for s in strategies for c in ([FIXED[s]] if s in FIXED else compressions) for seed in seeds]
    rows: List[Run] = []
    for strategy, compression, seed in tqdm(jobs, desc="quality", unit="run"):
        name = f"{strategy}_{compression:g}x_seed{seed}"
        overrides = [*args.set, *method_overrides(strategy), f"embeddings.compression={compression:g}", f"train.seed={seed}"]
        try:
            m = run_one(args.config, overrides, args.out / "runs" / name, args.nproc)
        except RuntimeError as e:
            print(f"torchrec-multihash quality: {name}: {e}", file=sys.stderr)
            return 1
        rows.append(
            Run(
                strategy=strategy,
                compression=compression,
                seed=seed,
                auc=m["auc"],
                logloss=m["logloss"],
                ne=m["ne"],
                embedding_bytes=m["embedding_bytes"],
                full_embedding_bytes=m["full_embedding_bytes"],
                optimizer_state_bytes=m.get("optimizer_state_bytes", 0),
            )
        )
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"config": args.config, "overrides": args.set, "runs": rows, "summary": summary}, indent=2))
    table = markdown(summary, title)
    (args.out / "results.md").write_text(table)
    plot(summary, args.out / "frontier.png", title)
    print(table)
    print(f"Report in {args.out.resolve()} (results.json, results.md, frontier.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
