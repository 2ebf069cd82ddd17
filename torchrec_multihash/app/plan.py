"""``torchrec-multihash plan``: where TorchRec's planner puts each sub-table, for any topology."""

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError

from torchrec_multihash.app.auto_choice import describe, is_auto, load_choices
from torchrec_multihash.app.choose_tables import plan_choice
from torchrec_multihash.app.config import Config, ConfigError, load_config
from torchrec_multihash.app.data import make_data
from torchrec_multihash.app.model import build_constraints, build_mch, build_model, check_mch_world, is_mch, multihash_module, plain_tables
from torchrec_multihash.app.quiet import quiet
from torchrec_multihash.auto import TableChoice
from torchrec_multihash.distributed.planning import PlanReport, describe_plan, plan_model
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.strategies import StrategyName


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ranks(ranks: List[int]) -> str:
    if ranks and ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrec-multihash plan", description=__doc__)
    p.add_argument("--config", required=True, help="YAML config (its model and embeddings parts are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs or processes)")
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per node (default: world size)")
    p.add_argument(
        "--compute-device", choices=["cuda", "cpu"], default="cuda", help="the ranks' device (default: cuda; a GPU plan needs no GPU here)"
    )
    p.add_argument(
        "--hbm-gib",
        type=float,
        default=None,
        help="memory per rank for the tables: HBM with cuda, DDR with cpu (default: TorchRec's)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: train.batch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def make_topology(args: argparse.Namespace) -> Topology:
    local = args.local_world_size or args.world_size
    if args.world_size < 1 or local < 1 or args.world_size % local:
        raise ConfigError(f"--world-size {args.world_size} must be a positive multiple of --local-world-size {local}")
    kw = {}
    if args.hbm_gib is not None:
        kw["hbm_cap" if args.compute_device == "cuda" else "ddr_cap"] = int(args.hbm_gib * 1024**3)
    return Topology(world_size=args.world_size, local_world_size=local, compute_device=args.compute_device, **kw)


def uncompressed_config(cfg: Config) -> Config:
    """The same model with full tables (sub-table overrides and constraints dropped)."""
    emb = dataclasses.replace(
        cfg.embeddings,
        strategy=StrategyName.FULL,
        overrides={},
        constraints={k: v for k, v in cfg.embeddings.constraints.items() if "__" not in k},
    )
    return dataclasses.replace(cfg, embeddings=emb)


def auto_report(cfg: Config) -> Optional[Dict[str, Any]]:
    """Strategy auto's choice (the saved one, else made now from the training data); None for
    other strategies. The data's table sizes go into ``cfg``."""
    if not is_auto(cfg):
        return None
    data = make_data(cfg, 0, 1, Path(cfg.train.output_dir))
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature
    return plan_choice(cfg, plain_tables(cfg))


def plan_config(cfg: Config, topology: Topology, batch_size: Optional[int], choices: Optional[List[TableChoice]] = None) -> PlanReport:
    model = build_model(cfg, device=torch.device("meta"), choices=choices)
    constraints = build_constraints(cfg, multihash_module(model).multihash_configs())
    plan = plan_model(model, topology, constraints, batch_size=batch_size or cfg.train.batch_size)
    return describe_plan(plan, model, topology)


def sizes_from_data(cfg: Config) -> None:
    """The tables' sizes from the data where the config gives none (``data.ids: vocabulary``), as
    ``train`` finds them (the vocabulary saved in the run folder, else counted now and saved there)."""
    if not cfg.embeddings.num_embeddings_per_feature and cfg.data.format != "synthetic":
        cfg.embeddings.num_embeddings_per_feature = make_data(cfg, 0, 1, Path(cfg.train.output_dir)).num_embeddings_per_feature


def mch_report(cfg: Config) -> Dict[str, Any]:
    """Strategy mch's tables (TorchRec's MCH remapper, one rank): rows, weight and remapper-state
    bytes of each."""
    ebc = build_mch(cfg, torch.device("meta"))
    return {
        "strategy": "mch",
        "eviction": cfg.embeddings.mch_eviction,
        "sizing": cfg.embeddings.mch_sizing,
        "tables": [dataclasses.asdict(t) for t in ebc.tables()],
        "embedding_bytes": ebc.memory_bytes(),
        "full_embedding_bytes": ebc.full_memory_bytes(),
    }


def print_mch(report: Dict[str, Any]) -> None:
    print(f"TorchRec MCH tables ({report['eviction']} eviction, sized by {report['sizing']}), one rank")
    print(f"\n{'table':10s} {'ids':>10s} {'rows':>8s} {'weights':>12s} {'remapper':>12s}")
    for t in report["tables"]:
        rows = f"{t['rows']:,}" if t["rows"] else "full"
        print(f"{t['name']:10s} {t['num_embeddings']:>10,} {rows:>8s} {_fmt_bytes(t['weight_bytes']):>12s} {_fmt_bytes(t['state_bytes']):>12s}")
    ratio = report["full_embedding_bytes"] / max(1, report["embedding_bytes"])
    print(
        f"\nAll tables: {_fmt_bytes(report['embedding_bytes'])} (remapper state included) vs "
        f"{_fmt_bytes(report['full_embedding_bytes'])} uncompressed ({ratio:.1f}x smaller)"
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with quiet(all_warnings=True):  # the planner warns and logs for live jobs (dry-run estimates)
        try:
            cfg = load_config(args.config, args.set)
            sizes_from_data(cfg)
            if is_mch(cfg):
                check_mch_world(cfg, args.world_size)
                mch = mch_report(cfg)
                if args.json:
                    print(json.dumps(mch, indent=2))
                else:
                    print_mch(mch)
                return 0
            topology = make_topology(args)
            with warnings.catch_warnings(record=True) as caught:  # ours are shown (the libraries' stay quiet)
                warnings.simplefilter("always")
                auto = auto_report(cfg)
                report = plan_config(cfg, topology, args.batch_size, load_choices(cfg, auto) if auto else None)
            for message in dict.fromkeys(str(w.message) for w in caught if f"{os.sep}torchrec_multihash{os.sep}" in w.filename):
                print(f"torchrec-multihash plan: warning: {message}", file=sys.stderr)
        except (MultiHashError, PlannerError) as e:
            print(f"torchrec-multihash plan: {e}", file=sys.stderr)
            return 2
        full_error = None
        try:
            full_report: Optional[PlanReport] = plan_config(uncompressed_config(cfg), topology, args.batch_size)
        except PlannerError as e:
            full_report, full_error = None, str(e).strip().splitlines()[0]

    if args.json:
        out = report.to_dict()
        out["uncompressed"] = {"bytes_per_rank": full_report.bytes_per_rank} if full_report else {"error": full_error}
        if auto:
            out["auto"] = {k: v for k, v in auto.items() if k != "source"}
        print(json.dumps(out, indent=2))
        return 0

    nodes = report.world_size // report.local_world_size
    if auto:
        print(describe(auto) + "\n")
    print(f"Plan for {report.world_size} {report.compute_device} ranks ({nodes} node(s) x {report.local_world_size}); config {args.config}")
    print(f"\n{'table':10s} {'sub-table':14s} {'sharding':18s} {'kernel':18s} {'ranks':>10s} {'bytes':>12s}")
    for s in report.shards:
        print(
            f"{s.logical_table:10s} {s.table:14s} {s.sharding_type:18s} {s.compute_kernel:18s} {_fmt_ranks(s.ranks):>10s} {_fmt_bytes(s.bytes):>12s}"
        )
    uvm = [s.table for s in report.shards if "uvm" in s.compute_kernel]
    if uvm:
        print(
            f"\n{len(uvm)} sub-table(s) on a UVM kernel ({', '.join(uvm[:4])}{' ...' if len(uvm) > 4 else ''}): their weights live in "
            "host memory (fused_uvm_caching: the GPU caches their hot rows); the bytes per rank below count them whole"
        )
    if report.mapping_bytes:
        print(f"\nLearned mappings: {_fmt_bytes(report.mapping_bytes)}, held whole by every rank")
    print("\nEmbedding weights per rank (replicated tables and learned mappings counted on every rank):")
    full_per_rank = full_report.bytes_per_rank if full_report else None
    print(f"{'rank':>6s} {'multi-hash':>12s} {'uncompressed':>14s}")
    for r, b in enumerate(report.bytes_per_rank):
        uncompressed = _fmt_bytes(full_per_rank[r]) if full_per_rank else "-"
        print(f"{r:>6d} {_fmt_bytes(b):>12s} {uncompressed:>14s}")
    ratio = report.full_embedding_bytes / max(1, report.embedding_bytes)
    print(
        f"\nAll tables: {_fmt_bytes(report.embedding_bytes)} multi-hash vs "
        f"{_fmt_bytes(report.full_embedding_bytes)} uncompressed ({ratio:.1f}x smaller)"
    )
    if full_report is None:
        print(f"The uncompressed tables do not fit this topology: {full_error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
