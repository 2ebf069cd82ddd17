"""What two lookups per id cost TorchRec itself on CPU, with none of this package's code in the step.

TorchRec's ``EmbeddingBagCollection`` (sharded table-wise on one process, fused row-wise Adagrad),
the same zipf ids, four layouts of 26 one-hot features:

- ``base``: 26 full tables of N rows, one id per bag (what ``bench`` calls ``torchrec_ebc``);
- ``52tables``: Q-R's layout, 26 quotient tables of ceil(N/m) rows and 26 remainder tables of m rows,
  the ids split beforehand (the floor of our pooled Q-R lookups: no id transform, no composition);
- ``stacked_bag2``: one table of ceil(N/m) + m rows per feature, each bag the id's quotient row and
  its remainder row (offset by ceil(N/m)): SUM pooling then *is* Q-R add;
- ``shared_2feat``: the same stacked table read by two features (quotient, remainder).

Run: ``python docs/experiments/two_lookups_per_id.py [full]`` (full: 400k rows, dim 64, batch 2048;
default: 50k rows, dim 16, batch 1024). Prints each layout's median step and its ratio to ``base``.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.app.process_group import setup_distributed
from torchrec_multihash.app.quiet import quiet_warnings
from torchrec_multihash.distributed.sharding import shard_model


def main() -> None:
    torch.set_num_threads(1)
    full = len(sys.argv) > 1 and sys.argv[1] == "full"
    n, dim, batch, features = (400_000, 64, 2048, 26) if full else (50_000, 16, 1024, 26)
    m = 8  # Q-R at 8x: about ceil(N/m) + m rows
    q = -(-n // m)
    g = torch.Generator().manual_seed(0)

    def zipf(size: int) -> torch.Tensor:
        return ((n ** torch.rand(size, generator=g)) - 1).long().clamp(max=n - 1)

    def ebc(tables: list) -> torch.nn.Module:
        module = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
        return shard_model(module, torch.device("cpu"), embedding_lr=0.05, constraints=constraints)

    def table(name: str, rows: int, names: list) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=names)

    with quiet_warnings():
        setup_distributed("cpu")
        fs = [f"C{i}" for i in range(features)]
        layouts = {
            "base": ebc([table(f"t{i}", n, [f]) for i, f in enumerate(fs)]),
            "52tables": ebc([table(f"t{i}", q, [f]) for i, f in enumerate(fs)] + [table(f"t{i}r", m, [f + "r"]) for i, f in enumerate(fs)]),
            "stacked_bag2": ebc([table(f"t{i}", q + m, [f]) for i, f in enumerate(fs)]),
            "shared_2feat": ebc([table(f"t{i}", q + m, [f, f + "r"]) for i, f in enumerate(fs)]),
        }
        batches = []
        for _ in range(25):
            ids = [zipf(batch) for _ in fs]
            ones = torch.ones(features * batch, dtype=torch.long)
            batches.append(
                {
                    "base": KeyedJaggedTensor(keys=fs, values=torch.cat(ids), lengths=ones),
                    "52tables": KeyedJaggedTensor(
                        keys=fs + [f + "r" for f in fs],
                        values=torch.cat([x // m for x in ids] + [x % m for x in ids]),
                        lengths=torch.cat([ones, ones]),
                    ),
                    "stacked_bag2": KeyedJaggedTensor(
                        keys=fs, values=torch.cat([torch.stack([x // m, q + x % m], 1).view(-1) for x in ids]), lengths=2 * ones
                    ),
                    "shared_2feat": KeyedJaggedTensor(
                        keys=[k for f in fs for k in (f, f + "r")],
                        values=torch.cat([y for x in ids for y in (x // m, q + x % m)]),
                        lengths=torch.cat([ones, ones]),
                    ),
                }
            )
        times: dict = {k: [] for k in layouts}
        for _ in range(2):
            for i, b in enumerate(batches):
                for k, module in layouts.items():  # step for step, on the same ids
                    t0 = time.perf_counter()
                    out = module(b[k])
                    out.values().backward(torch.ones_like(out.values()))
                    if i >= 5:
                        times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["base"])
        for k, v in times.items():
            print(f"{'full' if full else 'quick'} {k:14s} {1000 * statistics.median(v):7.2f} ms {statistics.median(v) / base:.2f}x")


if __name__ == "__main__":
    main()
