"""Operators (and, on a GPU, kernel launches) per training step of each benchmark method, against
TorchRec's EBC: what a host-bound step costs. On a GPU at the bench's sizes the step's time is
mostly host time (Python, the dispatcher, launches), so a method's extra operators are its extra
time; on CPU a tiny batch shows the same (``--batch-size 64``).

    python -m torchrec_multihash.bench.op_counts --methods torchrec_ebc,full,qr_mult --batch-size 64
    python -m torchrec_multihash.bench.op_counts --methods torchrec_ebc,qr_mult --top 8 --by-time   # where the time goes

Counts come from the torch profiler (reliable); its times only with ``--by-time``, as a profile
(the profiler inflates them: the step column is timed without it).
"""

import argparse
import statistics
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from torchrec_multihash.app.quiet import quiet_warnings
from torchrec_multihash.bench.step_time import DEVICES, _step, build, dense_optimizer, method_names, shard, upstream_gradient
from torchrec_multihash.bench.workload import WORKLOADS, BenchSpec


class OpCount(NamedTuple):
    """One method's unprofiled median step time and its operators (``aten::`` ops) per step."""

    method: str
    step_ms: float
    ops_per_step: float
    kernels_per_step: Optional[float]  # CUDA kernels launched, on a GPU
    top: List[Tuple[str, float]]  # the most frequent (or costly) operators: count (or self ms) per step


def count(method: str, spec: BenchSpec, device: torch.device, steps: int = 10, top: int = 0, by_time: bool = False) -> OpCount:
    """``method``'s step (time unprofiled, then ``steps`` steps profiled); ``top``: how many of
    its most frequent operators to list, or with ``by_time`` of the operators (FBGEMM's and
    TorchRec's too) that take the most self time on the host (the profiler's overhead included)."""
    model = shard(build(method, spec, device), device)
    opt = dense_optimizer(model)
    batches = [b.to(device) for b in spec.batches()]
    upstream = upstream_gradient(spec, device)
    times = [_step(model, opt, kjt, upstream) for kjt in batches][spec.warmup :]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = batches[spec.warmup :][:steps]
    with profile(activities=activities) as prof:
        for kjt in profiled:
            _step(model, opt, kjt, upstream)  # on a fresh KJT, as a loader gives
    n = len(profiled)
    ops: Dict[str, float] = {e.key: e.count / n for e in prof.key_averages() if e.key.startswith("aten::")}
    kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / n
    if by_time:
        host_ms = {e.key: e.self_cpu_time_total / 1000 / n for e in prof.key_averages() if "::" in e.key}
        frequent = sorted(host_ms.items(), key=lambda kv: -kv[1])[:top]
    else:
        frequent = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    return OpCount(method, 1000 * statistics.median(times), sum(ops.values()), kernels if device.type == "cuda" else None, frequent)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_multihash.bench.op_counts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", default="torchrec_ebc,full,hash,qr_add,qr_mult,qr_concat,generalized_qr", help=f"comma-separated, from {method_names()}"
    )
    p.add_argument("--workload", choices=list(WORKLOADS), default="one_hot")
    p.add_argument("--quick", action="store_true", help="the workload's small tables (as bench --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="instead of the workload's (64: a CPU run shows the host cost alone)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--top", type=int, default=0, help="also list each method's N most frequent operators")
    p.add_argument("--by-time", action="store_true", help="--top lists the operators of most self time (ms per step) instead")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names() or m == "naive_qr"]
    if unknown:
        p.error(f"unknown or unsupported method(s) {unknown}; choose from {[m for m in method_names() if m != 'naive_qr']}")
    spec = BenchSpec.workload(args.workload, args.quick)
    spec.batch_size = args.batch_size or spec.batch_size
    from torchrec_multihash.app.process_group import setup_distributed

    with quiet_warnings():
        device = setup_distributed(args.device)
        rows = [count(m, spec, device, top=args.top, by_time=args.by_time) for m in methods]
    base = next((r for r in rows if r.method == "torchrec_ebc"), None)
    kernels = device.type == "cuda"
    step = "forward, backward, fused optimizer, dense one for data-parallel tables"
    print(f"{args.workload}, batch {spec.batch_size}, {device.type}: per training step ({step})")
    print(f"| method | step (ms) | operators | vs torchrec_ebc |{' kernels |' if kernels else ''}")
    print(f"| --- | --- | --- | --- |{' --- |' if kernels else ''}")
    for r in rows:
        extra = f" {r.ops_per_step - base.ops_per_step:+.0f}" if base is not None else " -"
        k = f" {r.kernels_per_step:.0f} |" if r.kernels_per_step is not None else ""
        print(f"| {r.method} | {r.step_ms:.2f} | {r.ops_per_step:.0f} |{extra} |{k}")
        for name, n in r.top:
            print(f"|   {name} | | {f'{n:.2f} ms' if args.by_time else f'{n:.0f}'} | |{' |' if kernels else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
