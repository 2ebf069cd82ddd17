"""One benchmark method's training step time and memory, in its own process (a rank under
torchrun for the scaling runs). Run by ``torchrec-multihash bench``; prints one JSON object."""

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.app.quiet import quiet_warnings
from torchrec_multihash.bench.naive_qr import NaiveQREmbeddingBags
from torchrec_multihash.bench.workload import BenchSpec
from torchrec_multihash.distributed.constraints import model_constraints
from torchrec_multihash.distributed.sharding import shard_model
from torchrec_multihash.modules.convert import to_multihash_configs
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection
from torchrec_multihash.modules.strategies import registered_strategies

LR = 0.05
BASELINE = "torchrec_ebc"
DEVICES = ("auto", "cpu", "cuda")


class MethodSpec(NamedTuple):
    """A MultiHashEmbeddingBagCollection's tables: strategy, operation and table options."""

    strategy: str
    operation: str
    stack_parts: Optional[bool] = None  # add: each table's parts one table, an id's rows one bag (None: the default, stacked)


# method -> its MultiHashEmbeddingBagCollection's tables; None: a baseline
METHODS: Dict[str, Optional[MethodSpec]] = {
    "torchrec_ebc": None,  # TorchRec's EmbeddingBagCollection, full tables
    "naive_qr": None,  # two torch.nn.EmbeddingBag per table, torch.optim.Adagrad (sparse)
    "full": MethodSpec("full", "mult"),
    "hash": MethodSpec("hash", "mult"),
    "qr_add": MethodSpec("qr", "add"),  # its parts stacked in one table: the default
    "qr_add_unstacked": MethodSpec("qr", "add", stack_parts=False),
    "qr_mult": MethodSpec("qr", "mult"),
    "qr_concat": MethodSpec("qr", "concat"),
    "generalized_qr": MethodSpec("generalized_qr", "mult"),
    "learned": MethodSpec("learned", "mult"),
}


def method_names() -> List[str]:
    """What ``bench --methods`` takes: ``METHODS`` (the default set), then any other registered
    strategy (its tables mult-composed)."""
    return [*METHODS, *(n for n in registered_strategies() if n not in METHODS)]


def method_spec(method: str) -> Optional[MethodSpec]:
    """``method``'s tables: its ``METHODS`` entry, or a registered strategy's (mult); None for a baseline."""
    if method in METHODS:
        return METHODS[method]
    if method in registered_strategies():
        return MethodSpec(method, "mult")
    raise ValueError(f"unknown method {method!r}; choose from {method_names()}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(method: str, spec: BenchSpec, device: torch.device) -> nn.Module:
    tables = spec.tables()
    if method == "torchrec_ebc":
        return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    if method == "naive_qr":
        return NaiveQREmbeddingBags(tables, collisions=int(spec.compression)).to(device)
    tables_spec = method_spec(method)
    assert tables_spec is not None, f"{method} is a baseline, not a multi-hash method"
    strategy, operation = tables_spec.strategy, tables_spec.operation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tables too small to shrink stay as they are
        configs = to_multihash_configs(
            tables,
            1.0 if strategy == "full" else spec.compression,
            strategy=strategy,
            operation=operation,
            num_partitions=3 if strategy == "generalized_qr" else None,
            overrides={t: {"max_ids_per_bag": 1} for t in spec.one_hot_tables()},
        )
    if tables_spec.stack_parts is not None:
        for c in configs:
            c.stack_parts = tables_spec.stack_parts if c.strategy_impl().is_composed() and c.operation == "add" else None
    return MultiHashEmbeddingBagCollection(configs, device=torch.device("meta"))


def shard(module: nn.Module, device: torch.device, data_parallel: bool = False) -> nn.Module:
    """``module`` sharded as ``train`` shards its model, with the app's sub-table constraints
    (small sub-tables whole; none replicated unless ``data_parallel``)."""
    return shard_model(module, device, embedding_lr=LR, constraints=model_constraints(module, data_parallel=data_parallel))


def dense_optimizer(model: nn.Module) -> Optional[torch.optim.Optimizer]:
    """Adagrad at ``LR`` on what the fused optimizer leaves out: tables the planner made
    data-parallel (TorchRec's dense kernel), which ``train`` gives its dense optimizer; None if
    there are none. Without it their update would go untimed."""
    params = [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
    return torch.optim.Adagrad(params, lr=LR) if params else None


def fit_learned(module: nn.Module, batches: List[KeyedJaggedTensor]) -> None:
    """A frequency-only mapping from the benchmark's batches (step time does not depend on it)."""
    from torchrec.datasets.utils import Batch

    from torchrec_multihash.learned.fit import FitOptions, fit_learned_mappings

    as_batches = [Batch(dense_features=torch.zeros(k.stride(), 1), sparse_features=k, labels=torch.zeros(k.stride())) for k in batches]
    fit_learned_mappings(module, as_batches, 1, FitOptions(learn_vectors=False))


def upstream_gradient(spec: BenchSpec, device: torch.device) -> torch.Tensor:
    """The fixed gradient every method's output gets in its backward, the same for all."""
    return torch.randn(spec.batch_size, spec.dim * len(spec.rows), generator=torch.Generator().manual_seed(1)).to(device)


def fresh(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``kjt``'s tensors in a new KJT, as a loader gives each batch: a KJT caches what it computes of
    itself (offsets, ids per key), which a step on a reused one would not pay for."""
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), weights=kjt.weights_or_none(), lengths=kjt.lengths())


def _step(model: nn.Module, opt: Optional[torch.optim.Optimizer], kjt: KeyedJaggedTensor, upstream: torch.Tensor) -> float:
    """One training step of the embeddings (forward, backward, the fused optimizer's update, ``opt``'s) on a
    fresh copy of ``kjt``; seconds."""
    kjt = fresh(kjt)
    if upstream.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(kjt)
    if opt is not None:
        opt.zero_grad()
    # the same fixed gradient for every method, passed in: no loss of our own to time
    out.values().backward(upstream)  # the fused optimizer updates the sharded tables here
    if opt is not None:
        opt.step()
    if upstream.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _paired(
    model: nn.Module,
    opt: Optional[torch.optim.Optimizer],
    spec: BenchSpec,
    batches: List[KeyedJaggedTensor],
    upstream: torch.Tensor,
    device: torch.device,
) -> Dict[str, float]:
    """The method and TorchRec's EBC (built here, in this process) timed step for step on the same
    batches, alternating: their ratio is free of what other processes did to the machine meanwhile."""
    base = shard(build(BASELINE, spec, device), device)
    base_opt = dense_optimizer(base)
    ours: List[float] = []
    theirs: List[float] = []
    for i, kjt in enumerate(batches):
        a = _step(base, base_opt, kjt, upstream)
        b = _step(model, opt, kjt, upstream)
        if i >= spec.warmup:
            theirs.append(a)
            ours.append(b)
    return {
        "paired_step_ms": 1000 * statistics.median(ours),
        "paired_baseline_step_ms": 1000 * statistics.median(theirs),
        "vs_baseline": statistics.median(ours) / statistics.median(theirs),
    }


def run(method: str, spec: BenchSpec, device_kind: str = "auto", paired: bool = True) -> Dict[str, object]:
    from torchrec_multihash.app.process_group import setup_distributed

    device = setup_distributed(device_kind)
    batches = [b.to(device) for b in spec.batches()]
    rss_before = _rss_mib()
    module = build(method, spec, device)
    opt: Optional[torch.optim.Optimizer]
    if method == "naive_qr":
        model, opt = module, torch.optim.Adagrad(module.parameters(), lr=LR)
        if dist.get_world_size() > 1:
            raise SystemExit("naive_qr runs on one process only")
    else:
        model = shard(module, device)
        opt = dense_optimizer(model)
        if method == "learned":
            fit_learned(model, batches)
    upstream = upstream_gradient(spec, device)
    times = [_step(model, opt, kjt, upstream) for kjt in batches][spec.warmup :]
    world = dist.get_world_size()
    gathered: List[float] = [0.0] * world
    dist.all_gather_object(gathered, statistics.median(times))
    step = max(gathered)  # a step ends when the slowest rank's does
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    result: Dict[str, object] = {
        "method": method,
        "workload": spec.name,
        "world_size": world,
        "device": str(device.type),
        "step_ms": 1000 * step,
        "step_ms_p90": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
        "samples_per_s": world * spec.batch_size / step,
        "peak_mib": _peak_mib(device),  # read before the paired baseline is built
        "rss_before_mib": rss_before,
        "weights_bytes_rank0": weights,
    }
    if paired and method != BASELINE and world == 1:
        result.update(_paired(model, opt, spec, batches, upstream, device))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", choices=method_names(), required=True)
    p.add_argument("--spec", required=True, help="BenchSpec as JSON")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA where there is a GPU, else CPU")
    p.add_argument("--no-paired", action="store_true", help="skip timing TorchRec's EBC in this process too")
    args = p.parse_args(argv)
    with quiet_warnings():
        result = run(args.method, BenchSpec(**json.loads(args.spec)), args.device, paired=not args.no_paired)
        if dist.get_rank() == 0:
            print("BENCH " + json.dumps(result), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
