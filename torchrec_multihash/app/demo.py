"""End-to-end demo: a DLRM with full tables vs. the same DLRM with multi-hash tables."""

import argparse
import sys
import time
from typing import Dict, List

import torch
from torchmetrics.classification import BinaryAUROC
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from tqdm import tqdm

from torchrec_multihash.argtypes import above, at_least
from torchrec_multihash.datasets.synthetic import SyntheticCriteo
from torchrec_multihash.modules.convert import to_multihash_configs
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection
from torchrec_multihash.modules.strategies import registered_strategies


def build_dlrm(ebc: torch.nn.Module, num_dense: int, dim: int) -> DLRM:
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=[32, dim],
        over_arch_layer_sizes=[32, 1],
    )


def train_and_eval(model: DLRM, task: SyntheticCriteo, steps: int, batch_size: int, lr: float, desc: str) -> Dict[str, float]:
    """Trains with Adagrad on ``steps`` batches, evaluates AUC and log loss on 20 held-out ones."""
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses: List[float] = []
    start = time.perf_counter()
    bar = tqdm(task.batches(batch_size, steps), total=steps, desc=desc, disable=None, leave=False)
    for b in bar:
        loss = loss_fn(model(b.dense_features, b.sparse_features).squeeze(1), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    elapsed = time.perf_counter() - start
    auc = BinaryAUROC()
    eval_losses = []
    with torch.no_grad():
        for b in task.batches(batch_size, 20, start=10_000_000):
            logits = model(b.dense_features, b.sparse_features).squeeze(1)
            auc.update(torch.sigmoid(logits), b.labels.long())
            eval_losses.append(loss_fn(logits, b.labels).item())
    return {
        "first_loss": sum(losses[:20]) / min(20, len(losses)),
        "last_loss": sum(losses[-20:]) / min(20, len(losses)),
        "test_logloss": sum(eval_losses) / len(eval_losses),
        "test_auc": float(auc.compute()),
        "samples_per_s": steps * batch_size / elapsed,
    }


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="torchrec-multihash demo", description=__doc__)
    # every strategy that needs no fitting (learned needs a mapping: see the train command)
    p.add_argument("--strategy", default="qr", choices=[n for n in registered_strategies() if n not in ("full", "learned")])
    p.add_argument("--operation", default="mult", choices=["add", "mult", "concat"])
    p.add_argument("--compression", type=at_least(1.0, float), default=8.0)
    p.add_argument("--steps", type=at_least(1), default=400)
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--dim", type=at_least(1), default=16)
    p.add_argument("--lr", type=above(0.0), default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with torch.random.fork_rng():  # the seeded draws stay inside the demo
        torch.manual_seed(args.seed)
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    """Trains the full and the compressed DLRM on the same task and prints both."""
    vocab = [50_000, 20_000, 5_000, 100, 30_000]
    task = SyntheticCriteo.toy(vocab, seed=args.seed)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=args.dim, feature_names=[f]) for f, n in zip(task.feature_names, vocab)
    ]
    full = MultiHashEmbeddingBagCollection(to_multihash_configs(tables, 1.0, strategy="full"))
    compressed = MultiHashEmbeddingBagCollection(to_multihash_configs(tables, args.compression, strategy=args.strategy, operation=args.operation))
    print(f"Synthetic CTR task: {len(vocab)} sparse features {vocab}, dim {args.dim}, {args.steps} steps of {args.batch_size}")
    print(f"Compressed tables ({args.strategy}, {args.operation}):")
    for c in compressed.multihash_configs():
        print(f"  {c.name:8s} N={c.num_embeddings:>7,d} -> {c.strategy:14s} sub-table rows {c.strategy_impl().sizes()}")

    results = {}
    for name, ebc in [("full", full), (args.strategy, compressed)]:
        torch.manual_seed(args.seed)
        model = build_dlrm(ebc, task.num_dense, args.dim)
        results[name] = train_and_eval(model, task, args.steps, args.batch_size, args.lr, name)
        results[name]["embedding_bytes"] = ebc.memory_bytes()

    bayes, base = task.bayes_logloss(4096, 10_000_000)
    print()
    print(f"{'model':16s} {'emb. bytes':>12s} {'loss start->end':>18s} {'test logloss':>13s} {'test AUC':>9s} {'samples/s':>10s}")
    for name, r in results.items():
        print(
            f"{name:16s} {r['embedding_bytes']:>12,d} {r['first_loss']:>8.4f} -> {r['last_loss']:.4f} "
            f"{r['test_logloss']:>13.4f} {r['test_auc']:>9.4f} {r['samples_per_s']:>10,.0f}"
        )
    print(f"(log loss of the true model {bayes:.4f}; of predicting the base rate {base:.4f})")
    saved = results["full"]["embedding_bytes"] / results[args.strategy]["embedding_bytes"]
    print(f"\nMemory: {args.strategy} tables take {saved:.1f}x less than the full tables.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
