"""``torchrec-multihash train``: a sharded DLRM with multi-hash tables, driven by TorchRec's
TrainPipelineSparseDist. One process when run directly; one rank per process under torchrun or
TorchX (it reads RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_multihash.app.config import Config, ConfigError, TrainConfig, config_parser, load_config
from torchrec_multihash.app.data import RunData, make_data
from torchrec_multihash.app.data_timing import DataWait
from torchrec_multihash.app.model import build_constraints, build_model, multihash_module
from torchrec_multihash.app.quiet import quiet
from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError
from torchrec_multihash.distributed.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_entries, save_checkpoint
from torchrec_multihash.distributed.sharding import shard_model
from torchrec_multihash.learned.fit import MAPPING_FILE, apply_mappings, load_mappings
from torchrec_multihash.modules.config import MultiHashConfigError
from torchrec_multihash.modules.id_transform import InvalidInputError
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection

REPORT_EVERY = 50  # steps between progress reports (bar postfix, or a log line off a terminal)
DENSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


@dataclass
class TrainState:
    """Where a run is: what a checkpoint saves and a resumed run continues from."""

    epoch: int = 0
    step: int = 0
    batches_in_epoch: int = 0  # batches of each rank done in ``epoch`` (the data position is per rank)
    samples: int = 0  # over all ranks
    seed: int = 0  # train.seed of the run that started it
    world_size: int = 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """One int64 tensor per field: what DCP saves, and loads (weights-only) in place."""
        return {f.name: torch.tensor(getattr(self, f.name), dtype=torch.int64) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "TrainState":
        """The state a ``state_dict()`` (e.g. loaded from a checkpoint) holds."""
        return cls(**{name: int(value) for name, value in state.items()})


StepCallback = Callable[["TrainRun", torch.Tensor], None]  # (the run, the step's loss)


@dataclass
class TrainRun:
    """What one rank's training works with; ``state`` moves on with every step."""

    cfg: Config
    device: torch.device
    data: RunData
    dmp: DistributedModelParallel
    ebc: MultiHashEmbeddingBagCollection
    opt: CombinedOptimizer  # the tables' fused optimizer and the dense one
    schedule: LambdaLR  # every learning rate, stepped after each training step
    state: TrainState
    on_step: List[StepCallback] = field(default_factory=list)  # after each step, before the schedule's
    data_wait: DataWait = field(default_factory=DataWait)  # time waiting for this rank's next batch
    step_seconds: float = 0.0  # time in training steps, waits included
    history: List[Dict[str, float]] = field(default_factory=list)  # evaluations during training


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


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNGs (the CPU's, this rank's GPU's) seeded with ``seed`` in the scope, and
    as they were after it: TorchRec and torch draw initial weights from them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_sharded_model(cfg: Config, device: torch.device) -> Tuple[DistributedModelParallel, MultiHashEmbeddingBagCollection]:
    """The config's DLRM built on the meta device, then sharded with weights drawn from
    ``train.seed``; the learned tables get their mapping (fitted now when none is given)."""
    with seeded(cfg.train.seed, device):
        model = DLRMTrain(build_model(cfg, device=torch.device("meta")))
        ebc = multihash_module(model)
        constraints = build_constraints(cfg, ebc.multihash_configs())
        dmp = shard_model(model, device, cfg.train.embedding_lr, constraints, batch_size=cfg.train.batch_size)
        if ebc.learned_mappings():
            apply_mappings(ebc, load_mappings(_mapping_dir(cfg, dist.get_rank(), Path(cfg.train.output_dir))))
    return dmp, ebc


def make_optimizer(dmp: DistributedModelParallel, t: TrainConfig) -> CombinedOptimizer:
    """The tables' fused optimizer (``shard_model``'s) and ``train.dense_optimizer`` on the rest."""
    dense = DENSE_OPTIMIZERS.get(t.dense_optimizer)
    if dense is None:
        raise ConfigError(f"train.dense_optimizer must be adagrad or adam, got {t.dense_optimizer!r}")
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(params, functools.partial(dense, lr=t.dense_lr))])


def _lr_multiplier(t: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then from ``decay_start`` a squared polynomial decay
    to 0 over ``decay_steps``, as the DLRM reference's LRPolicyScheduler."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.decay_steps and step >= t.decay_start:
        return (1 - min(step - t.decay_start, t.decay_steps) / t.decay_steps) ** 2
    return 1.0


def lr_schedule(opt: CombinedOptimizer, t: TrainConfig, step: int = 0) -> LambdaLR:
    """Every learning rate of ``opt`` on the config's schedule, from step ``step`` on. TorchRec's
    fused optimizers hand their param group's rate to the tables' kernels on ``zero_grad()`` and
    ``step()``, so the tables follow it as the dense layers do."""
    for group in opt.param_groups:  # the base rates, which a resumed run needs too
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(opt, functools.partial(_lr_multiplier, t), last_epoch=step - 1)


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


def evaluate_during_training(run: TrainRun) -> None:
    """Evaluates at the current step, into ``run.history``, and says so on rank 0."""
    m = evaluate(run.dmp, run.data.test(), run.device)
    run.history.append({"step": run.state.step, **m})
    if dist.get_rank() == 0:
        print(f"eval at step {run.state.step}: auc {m['auc']:.4f} logloss {m['logloss']:.4f} ne {m['ne']:.4f}", flush=True)


def checkpoint_dir(cfg: Config) -> Path:
    """Where a run keeps its checkpoint (the latest only)."""
    return Path(cfg.train.output_dir) / "checkpoint"


def save_train_checkpoint(run: TrainRun) -> None:
    """The model, the optimizer state and ``run.state`` into ``output_dir/checkpoint``; every rank
    calls it."""
    extra = {"optimizer": run.opt.state_dict(), "train_state": run.state.state_dict()}
    save_checkpoint(checkpoint_dir(run.cfg), run.dmp, extra)


def load_train_checkpoint(path: Path, dmp: DistributedModelParallel, opt: CombinedOptimizer) -> TrainState:
    """Loads the model and optimizer state saved in ``path`` (in place) and returns its
    ``TrainState``; ``ConfigError`` if this job cannot continue it (another config, world size)."""
    world = dist.get_world_size()
    entries = {"train_state": TrainState().state_dict()}
    opt.init_state()
    extra = {"optimizer": opt.state_dict()}
    try:
        load_entries(path, entries)
        state = TrainState.from_state_dict(entries["train_state"])
        if state.world_size != world:  # the data position and the plan (so the optimizer state) depend on it
            raise ConfigError(f"--resume: the checkpoint in {path} was written by {state.world_size} ranks, this job "
                              f"has {world}; resume on {state.world_size} (the data position is per rank)")
        load_checkpoint(path, dmp, extra)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    opt.load_state_dict(extra["optimizer"])
    return state


def start_state(cfg: Config, dmp: DistributedModelParallel, opt: CombinedOptimizer, resume: Union[bool, str]) -> TrainState:
    """Where the run starts: the checkpoint's state when resuming (``resume`` True: there must be
    one; ``"auto"``: if there is one), else the beginning."""
    path = checkpoint_dir(cfg)
    found = find_checkpoint(path) if resume else None
    if resume is True and found is None:
        raise ConfigError(f"--resume: no checkpoint in {path} (set train.checkpoint_every to write one)")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if found is not None:
        state = load_train_checkpoint(path, dmp, opt)
        note = f"Resumed from {path}: epoch {state.epoch}, step {state.step}{f' (restart {restart})' if restart else ''}"
    else:
        state = TrainState(seed=cfg.train.seed, world_size=dist.get_world_size())
        note = (f"--resume auto: no checkpoint in {path} yet, starting from scratch" if resume
                else f"Restart {restart}: starting from scratch (--resume auto would continue from the last checkpoint)"
                if restart else "")
    if note and dist.get_rank() == 0:
        print(note, flush=True)
    return state


def build_run(cfg: Config, device: torch.device, resume: Union[bool, str]) -> TrainRun:
    """This rank's data, sharded model, optimizers and schedule, at the start or where the
    checkpoint left off (see ``train``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(cfg.train.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = make_data(cfg, rank, world, out_dir)
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature
    dmp, ebc = build_sharded_model(cfg, device)
    opt = make_optimizer(dmp, cfg.train)
    state = start_state(cfg, dmp, opt, resume)
    return TrainRun(cfg, device, data, dmp, ebc, opt, lr_schedule(opt, cfg.train, state.step), state)


class ProgressReport:
    """A step callback: rank 0's progress bar (on a terminal) and, every ``REPORT_EVERY`` steps,
    the loss and speed (in the bar, or as a log line off a terminal)."""

    def __init__(self) -> None:
        self.shown = dist.get_rank() == 0
        self.bar = tqdm(desc="train", unit="step", disable=not self.shown or not sys.stderr.isatty(), dynamic_ncols=True)

    def __call__(self, run: TrainRun, loss: torch.Tensor) -> None:
        if not self.shown:
            return
        self.bar.update(1)
        state = run.state
        if state.step % REPORT_EVERY:
            return
        # reading the loss syncs with the device: only when it is shown
        rate = state.samples / max(run.step_seconds, 1e-9)
        self.bar.set_postfix(epoch=state.epoch, loss=f"{loss.item():.4f}", samples_per_s=f"{rate:,.0f}")
        if not sys.stderr.isatty():
            print(f"step {state.step} epoch {state.epoch} loss {loss.item():.4f} samples/s {rate:,.0f}", flush=True)

    def close(self) -> None:
        self.bar.close()


@dataclass
class FaultAtStep:
    """A step callback for restart tests: rank ``rank`` dies right after step ``step``, on the
    job's first attempt only (TORCHELASTIC_RESTART_COUNT 0)."""

    step: int
    rank: int = 0

    @classmethod
    def from_env(cls) -> Optional["FaultAtStep"]:
        """``MULTIHASH_FAULT_AT_STEP=M`` (and ``MULTIHASH_FAULT_RANK``, default 0); None without."""
        at = os.environ.get("MULTIHASH_FAULT_AT_STEP")
        return cls(int(at), int(os.environ.get("MULTIHASH_FAULT_RANK", "0"))) if at else None

    def __call__(self, run: TrainRun, loss: torch.Tensor) -> None:
        rank = dist.get_rank()
        if run.state.step == self.step and rank == self.rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print(f"MULTIHASH_FAULT_AT_STEP: rank {rank} exits after step {self.step}", file=sys.stderr, flush=True)
            os._exit(1)


def train_segment(run: TrainRun, batches: Iterator[Batch]) -> int:
    """Trains on ``batches`` to their end with a fresh pipeline, leaving nothing in flight (so
    evaluation and checkpoints can use the collectives); returns the steps taken."""
    # the pipeline overlaps the sub-tables' input dist (id transforms included) with compute
    pipeline = TrainPipelineSparseDist(run.dmp, run.opt, device=run.device, pipeline_postproc=True)
    taken = 0
    while True:
        start = time.perf_counter()
        try:
            loss, _, _ = pipeline.progress(batches)
        except StopIteration:
            break
        run.step_seconds += time.perf_counter() - start
        run.state.step += 1
        run.state.samples += run.cfg.train.batch_size * run.state.world_size
        taken += 1
        for callback in run.on_step:  # they see the learning rates this step used
            callback(run, loss)
        run.schedule.step()
    pipeline.detach()
    return taken


def _reached_max_steps(t: TrainConfig, state: TrainState) -> bool:
    return bool(t.max_steps) and state.step >= t.max_steps


def _steps_to_next_stop(t: TrainConfig, step: int) -> int:
    """Steps from ``step`` to the next evaluation, checkpoint or ``max_steps``."""
    stops = [2**62]
    for every in (t.eval_every, t.checkpoint_every):
        if every:
            stops.append((step // every + 1) * every)
    if t.max_steps:
        stops.append(t.max_steps)
    return min(stops) - step


def after_segment(run: TrainRun, taken: int, finished_epoch: bool) -> None:
    """The evaluation and the checkpoint due at the end of a segment, if any."""
    t, step = run.cfg.train, run.state.step
    if t.eval_every and taken and step % t.eval_every == 0:
        evaluate_during_training(run)
    if t.checkpoint_every and taken and (step % t.checkpoint_every == 0 or finished_epoch or _reached_max_steps(t, run.state)):
        save_train_checkpoint(run)


def train_epoch(run: TrainRun) -> None:
    """Trains the rest of epoch ``run.state.epoch`` (or to ``max_steps``), a segment from one
    evaluation or checkpoint to the next at a time."""
    t, state = run.cfg.train, run.state
    source = _synchronized(run.data_wait.timed(run.data.train(state.epoch, state.batches_in_epoch)), run.device)
    while not _reached_max_steps(t, state):
        size = _steps_to_next_stop(t, state.step)
        taken = train_segment(run, itertools.islice(source, size))
        state.batches_in_epoch += taken
        finished_epoch = taken < size
        if finished_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        after_segment(run, taken, finished_epoch)
        if finished_epoch:
            return


def train_epochs(run: TrainRun) -> None:
    """Trains from ``run.state`` to the end of the last epoch, or to ``max_steps``."""
    while run.state.epoch < run.cfg.train.epochs and not _reached_max_steps(run.cfg.train, run.state):
        train_epoch(run)


def final_metrics(run: TrainRun) -> Dict[str, Any]:
    """The last evaluation, with the run's data, memory and speed figures (over all ranks)."""
    metrics: Dict[str, Any] = dict(evaluate(run.dmp, run.data.test(), run.device))
    skipped = torch.tensor(run.data.skipped_lines(), dtype=torch.int64, device=run.device)
    dist.all_reduce(skipped)
    wait = torch.tensor([run.data_wait.seconds / max(run.step_seconds, 1e-9)], dtype=torch.float64, device=run.device)
    dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the rank that waited most
    metrics.update(
        data_wait_fraction=wait.item(),
        skipped_lines=int(skipped[0]),
        skipped_test_lines=int(skipped[1]),
        embedding_bytes=run.ebc.memory_bytes(),
        full_embedding_bytes=run.ebc.full_memory_bytes(),
        train_samples_per_s=run.state.samples / max(run.step_seconds, 1e-9),
        steps=run.state.step,
        world_size=run.state.world_size,
        eval_history=run.history,
    )
    return metrics


def print_summary(metrics: Dict[str, Any], out_dir: Path, metrics_out: Optional[Path]) -> None:
    """Rank 0's last words: the test metrics, data and memory; the metrics as JSON in ``metrics_out``."""
    print(
        f"\nTest AUC {metrics['auc']:.4f}, log loss {metrics['logloss']:.4f}, NE {metrics['ne']:.4f} "
        f"after {metrics['steps']} steps on {metrics['world_size']} rank(s), {metrics['train_samples_per_s']:,.0f} samples/s"
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


def train(
    cfg: Config, metrics_out: Optional[Path] = None, resume: Union[bool, str] = False, on_step: Sequence[StepCallback] = ()
) -> Dict[str, Any]:
    """Trains and evaluates; ``resume``: True continues from ``output_dir/checkpoint`` (which must
    exist), ``"auto"`` continues from it if there is one (what a restarted job runs); ``on_step``:
    callbacks after every training step."""
    device = setup_distributed()
    run = build_run(cfg, device, resume)
    progress = ProgressReport()
    run.on_step = [*on_step, progress]
    train_epochs(run)
    progress.close()
    metrics = final_metrics(run)
    if dist.get_rank() == 0:
        print_summary(metrics, Path(cfg.train.output_dir), metrics_out)
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
    fault = FaultAtStep.from_env()  # the restart tests' faults
    with quiet():
        try:
            train(load_config(args.config, args.set), args.metrics_out, resume=args.resume, on_step=[fault] if fault else [])
        except (ConfigError, CriteoFormatError, InvalidInputError, MultiHashConfigError) as e:
            print(f"torchrec-multihash train: {e}", file=sys.stderr)
            return 2
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
