"""``torchrec-multihash train``: a sharded DLRM with multi-hash tables, driven by TorchRec's
TrainPipelineSparseDist. One process when run directly; one rank per process under torchrun or
TorchX (it reads RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

import copy
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_multihash.app.config import Config, ConfigError, config_parser, load_config
from torchrec_multihash.app.data import make_data
from torchrec_multihash.app.data_timing import DataWait
from torchrec_multihash.app.model import build_constraints, build_model, multihash_module
from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError
from torchrec_multihash.distributed.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_entries, save_checkpoint
from torchrec_multihash.distributed.sharding import sharders
from torchrec_multihash.learned.fit import MAPPING_FILE, apply_mappings, load_mappings
from torchrec_multihash.modules.config import MultiHashConfigError
from torchrec_multihash.modules.id_transform import InvalidInputError

REPORT_EVERY = 50  # steps between progress reports (bar postfix, or a log line off a terminal)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> torch.device:
    """Joins the job's process group (torchrun / TorchX env), or makes a group of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def _synchronized(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Stops every rank as soon as one runs out (sharded steps need all ranks), or meets bad data:
    that rank raises its error, the others one that names it (none waits in a collective)."""
    it = iter(batches)
    while True:
        error: Optional[CriteoFormatError] = None
        try:
            b = next(it, None)
        except CriteoFormatError as e:
            b, error = None, e
        # 1: a batch, 0: the end, -1 - r: rank r met bad data
        flag = torch.tensor([-1 - dist.get_rank() if error else 0 if b is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        code = int(flag.item())
        if error is not None:
            raise error
        if code < 0:
            raise CriteoFormatError(f"stopped: rank {-1 - code} met bad data (its error says where)")
        if code == 0:
            return
        yield b


def _mapping_dir(cfg: Config, rank: int, out_dir: Path) -> Path:
    """The learned tables' mapping: ``embeddings.mapping``, or one fitted now by rank 0 into the
    run's directory (reused when the run is resumed)."""
    if cfg.embeddings.mapping:
        return Path(cfg.embeddings.mapping)
    path = out_dir / "mapping"
    if rank == 0 and not (path / MAPPING_FILE).is_file():
        from torchrec_multihash.app.fit_hash import fit_for_config

        print(f"No embeddings.mapping given: fitting the learned tables' mapping into {path}", flush=True)
        fit_for_config(copy.deepcopy(cfg), path, show_progress=True)
    dist.barrier()
    return path


def _fault_for_tests(steps: int, rank: int) -> None:
    """Test hook: with ``MULTIHASH_FAULT_AT_STEP=M`` the rank ``MULTIHASH_FAULT_RANK`` (default 0)
    dies right after step M, on the job's first attempt only (TORCHELASTIC_RESTART_COUNT 0)."""
    at = os.environ.get("MULTIHASH_FAULT_AT_STEP")
    if (at and steps == int(at) and rank == int(os.environ.get("MULTIHASH_FAULT_RANK", "0"))
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        print(f"MULTIHASH_FAULT_AT_STEP: rank {rank} exits after step {steps}", file=sys.stderr, flush=True)
        os._exit(1)


def lr_factor(step: int, cfg: Config) -> float:
    """Warm-up then polynomial decay, as the DLRM reference's LRPolicyScheduler."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.decay_steps and step >= t.decay_start:
        done = min(step - t.decay_start, t.decay_steps)
        return max(0.0, (1 - done / t.decay_steps) ** 2)
    return 1.0


def evaluate(dmp: torch.nn.Module, batches: Iterator[Batch], device: torch.device) -> Dict[str, float]:
    """AUC, log loss and normalized entropy over all ranks' test batches."""
    dmp.eval()
    auroc = BinaryAUROC().to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # bce sum, label sum, count
    with torch.no_grad():
        for b in _synchronized(batches, device):
            b = b.to(device)
            _, (_, logits, labels) = dmp(b)
            auroc.update(torch.sigmoid(logits), labels.long())
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            sums += torch.stack([bce.double(), labels.sum().double(), torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    dist.all_reduce(sums)
    dmp.train()
    n = sums[2].item()
    if n == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "ne": float("nan"), "test_samples": 0}
    logloss = sums[0].item() / n
    p = min(max(sums[1].item() / n, 1e-12), 1 - 1e-12)
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return {"auc": float(auroc.compute()), "logloss": logloss, "ne": logloss / base, "test_samples": int(n)}


def train(cfg: Config, metrics_out: Optional[Path] = None, resume: Union[bool, str] = False) -> Dict[str, float]:
    """Trains and evaluates; ``resume``: True continues from ``output_dir/checkpoint`` (which must
    exist), ``"auto"`` continues from it if there is one (what a restarted job runs)."""
    device = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(cfg, rank, world, out_dir)
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature

    model = DLRMTrain(build_model(cfg, device=torch.device("meta")))
    ebc = multihash_module(model)
    shard = sharders(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": cfg.train.embedding_lr, "eps": 1e-8})
    topology = Topology(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=cfg.train.batch_size, constraints=build_constraints(cfg, ebc.multihash_configs()))
    plan = planner.collective_plan(model, shard, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=None, device=device, plan=plan, sharders=shard)
    if ebc.learned_mappings():
        apply_mappings(ebc, load_mappings(_mapping_dir(cfg, rank, out_dir)))

    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if cfg.train.dense_optimizer == "adagrad":
        make = lambda p: torch.optim.Adagrad(p, lr=cfg.train.dense_lr)  # noqa: E731
    elif cfg.train.dense_optimizer == "adam":
        make = lambda p: torch.optim.Adam(p, lr=cfg.train.dense_lr)  # noqa: E731
    else:
        raise ConfigError(f"train.dense_optimizer must be adagrad or adam, got {cfg.train.dense_optimizer!r}")
    opt = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(dense_params, make)])
    base_lrs = [g["lr"] for g in opt.param_groups]

    steps, samples, seen_time = 0, 0, 0.0
    data_wait = DataWait()  # time the loop waits for this rank's next batch
    history: List[Dict[str, float]] = []
    bar = tqdm(desc="train", unit="step", disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)

    def run_segment(batches: Iterator[Batch], epoch: int) -> int:
        """Trains on ``batches`` to the end with a fresh pipeline, leaving nothing in flight (so
        evaluation can use the collectives); returns the steps taken."""
        nonlocal steps, samples, seen_time
        # the pipeline overlaps the sub-tables' input dist (id transforms included) with compute
        pipeline = TrainPipelineSparseDist(dmp, opt, device=device, pipeline_postproc=True)
        ran = 0
        while True:
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(steps, cfg)
            t0 = time.perf_counter()
            try:
                loss, _, _ = pipeline.progress(batches)
            except StopIteration:
                break
            seen_time += time.perf_counter() - t0
            steps += 1
            ran += 1
            samples += cfg.train.batch_size * world
            _fault_for_tests(steps, rank)
            if rank == 0:
                bar.update(1)
                # reading the loss syncs with the device: only when it is shown
                if steps % REPORT_EVERY == 0:
                    rate = samples / max(seen_time, 1e-9)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", samples_per_s=f"{rate:,.0f}")
                    if not sys.stderr.isatty():
                        print(f"step {steps} epoch {epoch} loss {loss.item():.4f} samples/s {rate:,.0f}", flush=True)
        pipeline.detach()
        return ran

    t = cfg.train
    ckpt_dir = out_dir / "checkpoint"
    # epoch, batches of each rank done in that epoch, steps, samples, world size: where a resumed run continues
    progress = torch.tensor([0, 0, 0, 0, world], dtype=torch.int64)

    def checkpoint_state() -> Dict[str, object]:
        return {"optimizer": opt.state_dict(), "progress": progress}

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    found = find_checkpoint(ckpt_dir) if resume else None
    if resume is True and found is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (set train.checkpoint_every to write one)")
    if found is not None:
        opt.init_state()
        extra = checkpoint_state()
        try:
            load_entries(ckpt_dir, {"progress": progress})
            if int(progress[4]) != world:  # the data position and the plan (so the optimizer state) depend on it
                raise ConfigError(f"--resume: the checkpoint in {ckpt_dir} was written by {int(progress[4])} ranks, this job "
                                  f"has {world}; resume on {int(progress[4])} (the data position is per rank)")
            load_checkpoint(ckpt_dir, dmp, extra)
        except CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None
        opt.load_state_dict(extra["optimizer"])
        progress = extra["progress"]
        steps, samples = int(progress[2]), int(progress[3])
        if rank == 0:
            print(f"Resumed from {ckpt_dir}: epoch {int(progress[0])}, step {steps}"
                  f"{f' (restart {restart})' if restart else ''}", flush=True)
    elif rank == 0 and resume:
        print(f"--resume auto: no checkpoint in {ckpt_dir} yet, starting from scratch", flush=True)
    elif rank == 0 and restart:
        print(f"Restart {restart}: starting from scratch (--resume auto would continue from the last checkpoint)", flush=True)

    def until_next_stop() -> int:
        stops = [2**62]
        for every in (t.eval_every, t.checkpoint_every):
            if every:
                stops.append((steps // every + 1) * every)
        if t.max_steps:
            stops.append(t.max_steps)
        return min(stops) - steps

    epoch, done_in_epoch = int(progress[0]), int(progress[1])
    while epoch < t.epochs and not (t.max_steps and steps >= t.max_steps):
        source = _synchronized(data_wait.timed(data.train(epoch, done_in_epoch)), device)
        while not (t.max_steps and steps >= t.max_steps):
            size = until_next_stop()
            ran = run_segment(itertools.islice(source, size), epoch)
            done_in_epoch += ran
            finished_epoch = ran < size
            if finished_epoch:
                epoch, done_in_epoch = epoch + 1, 0
            progress = torch.tensor([epoch, done_in_epoch, steps, samples, world], dtype=torch.int64)
            if t.eval_every and ran and steps % t.eval_every == 0:
                m = evaluate(dmp, data.test(), device)
                history.append({"step": steps, **m})
                if rank == 0:
                    print(f"eval at step {steps}: auc {m['auc']:.4f} logloss {m['logloss']:.4f} ne {m['ne']:.4f}", flush=True)
            last = bool(t.max_steps) and steps >= t.max_steps
            if t.checkpoint_every and ran and (steps % t.checkpoint_every == 0 or finished_epoch or last):
                save_checkpoint(ckpt_dir, dmp, checkpoint_state())
            if finished_epoch:
                break
    bar.close()

    metrics = evaluate(dmp, data.test(), device)
    skipped = torch.tensor(data.skipped_lines(), dtype=torch.int64, device=device)
    dist.all_reduce(skipped)
    wait = torch.tensor([data_wait.seconds / max(seen_time, 1e-9)], dtype=torch.float64, device=device)
    dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the rank that waited most
    metrics.update(
        data_wait_fraction=wait.item(),
        skipped_lines=int(skipped[0]),
        skipped_test_lines=int(skipped[1]),
        embedding_bytes=ebc.memory_bytes(),
        full_embedding_bytes=ebc.full_memory_bytes(),
        train_samples_per_s=samples / max(seen_time, 1e-9),
        steps=steps,
        world_size=world,
        eval_history=history,
    )
    if rank == 0:
        print(
            f"\nTest AUC {metrics['auc']:.4f}, log loss {metrics['logloss']:.4f}, NE {metrics['ne']:.4f} "
            f"after {steps} steps on {world} rank(s), {metrics['train_samples_per_s']:,.0f} samples/s"
        )
        print(
            f"Data: training waited for batches {metrics['data_wait_fraction']:.1%} of its time; "
            f"bad lines skipped: {metrics['skipped_lines']} in training, {metrics['skipped_test_lines']} in the last test pass"
        )
        print(
            f"Embedding memory: {metrics['embedding_bytes']:,} bytes vs {metrics['full_embedding_bytes']:,} "
            f"uncompressed ({metrics['full_embedding_bytes'] / metrics['embedding_bytes']:.1f}x smaller)"
        )
        if metrics_out:
            metrics_out.parent.mkdir(parents=True, exist_ok=True)
            metrics_out.write_text(json.dumps(metrics, indent=2))
            print(f"Metrics written to {metrics_out}")
        print(f"Run outputs in {out_dir.resolve()}")
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    p = config_parser("torchrec-multihash train", __doc__)
    p.add_argument("--metrics-out", type=Path, default=None, help="write the final metrics as one JSON object")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue from train.output_dir/checkpoint (model, optimizer, data position); "
                        "'--resume auto': continue if there is one, else start (for restarted jobs)")
    args = p.parse_args(argv)
    if args.resume not in (True, False, "auto"):
        p.error(f"--resume takes no value or 'auto', got {args.resume!r}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # fbgemm's CPU dense kernel (data-parallel tables) warns on every backward; its gradients are
    # checked against the unsharded module in tests/test_sharded.py
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    logging.getLogger().setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config, args.set)
        train(cfg, args.metrics_out, resume=args.resume)
    except (ConfigError, CriteoFormatError, InvalidInputError, MultiHashConfigError) as e:
        print(f"torchrec-multihash train: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
