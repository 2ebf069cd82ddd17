"""``torchrec-multihash train``: a sharded DLRM with multi-hash tables, driven by TorchRec's
TrainPipelineSparseDist. One process when run directly; one rank per process under torchrun or
TorchX (it reads RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

import contextlib
import copy
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_multihash.app.allocator import keep_freed_memory
from torchrec_multihash.app.auto_choice import choice_record, is_auto, load_choices
from torchrec_multihash.app.callbacks import FaultAtStep, ProgressReport, StepCallback
from torchrec_multihash.app.choose_tables import ensure_choice
from torchrec_multihash.app.config import Config, ConfigError, TrainConfig, config_parser, load_config
from torchrec_multihash.app.data import RunData, make_data
from torchrec_multihash.app.data_timing import DataWait
from torchrec_multihash.app.evaluation import evaluate, synchronized
from torchrec_multihash.app.model import EmbeddingModule, build_constraints, build_model, check_mch_world, embedding_module, plain_tables
from torchrec_multihash.app.optim import lr_schedule, make_optimizer
from torchrec_multihash.app.process_group import setup_distributed
from torchrec_multihash.app.provenance import Record, data_record, differences, run_record, tables_record
from torchrec_multihash.app.quiet import quiet
from torchrec_multihash.app.run_folder import claim_folder, on_rank0
from torchrec_multihash.app.step_guard import Preempted, StepGuard
from torchrec_multihash.app.train_state import TrainState, save_train_checkpoint, start_state
from torchrec_multihash.bench.mch import MCHEmbeddingBagCollection
from torchrec_multihash.bench.mch_sharding import mch_sharders
from torchrec_multihash.distributed.sharding import shard_model, sharders
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.learned.fit import MAPPING_FILE, apply_mappings, load_mappings, read_report


@dataclass
class TrainRun:
    """What one rank's training works with; ``state`` moves on with every step."""

    cfg: Config
    device: torch.device
    data: RunData
    dmp: DistributedModelParallel
    ebc: EmbeddingModule  # the tables (with strategy mch, TorchRec's MCH tables)
    opt: CombinedOptimizer  # the tables' fused optimizer and the dense one
    schedule: LambdaLR  # every learning rate, stepped after each training step
    state: TrainState
    meta: Dict[str, Any]  # what each checkpoint's manifest records about the run (save_train_checkpoint)
    guard: StepGuard = field(default_factory=StepGuard)  # NaN losses, SIGTERM
    on_step: List[StepCallback] = field(default_factory=list)  # after each step, before the schedule's
    data_wait: DataWait = field(default_factory=DataWait)  # time waiting for this rank's next batch
    step_seconds: float = 0.0  # time in training steps, waits included (this process's steps only)
    step_samples: int = 0  # samples (over all ranks) of this process's steps: a resumed run's rate counts only these
    history: List[Dict[str, float]] = field(default_factory=list)  # evaluations during training

    def samples_per_s(self) -> float:
        """Training throughput over all ranks, of the steps this process ran (0 if none)."""
        return self.step_samples / self.step_seconds if self.step_samples else 0.0


def _fit_unless_current(cfg: Config, path: Path) -> None:
    """Fits the mapping into ``path`` unless the one there was fitted on the same data and tables."""
    from torchrec_multihash.app.fit_hash import fit_for_config

    source = {**data_record(cfg), **tables_record(cfg)}
    if (path / MAPPING_FILE).is_file():
        changed = differences(read_report(path).get("source"), source)
        if not changed:
            return
        print(f"Fitting {path} again, fitted for other data or tables: {'; '.join(changed[:3])}", flush=True)
    else:
        print(f"No embeddings.mapping given: fitting the learned tables' mapping into {path}", flush=True)
    fit_for_config(copy.deepcopy(cfg), path, show_progress=True, source=source)


def _mapping_dir(cfg: Config, out_dir: Path) -> Path:
    """The learned tables' mapping: ``embeddings.mapping``, or one fitted by rank 0 into the run's
    folder (reused while the data and tables it was fitted for stay the same)."""
    if cfg.embeddings.mapping:
        return Path(cfg.embeddings.mapping)
    on_rank0(lambda: _fit_unless_current(cfg, out_dir / "mapping"))
    return out_dir / "mapping"


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNGs (the CPU's, this rank's GPU's) seeded with ``seed`` in the scope, and
    as they were after it: TorchRec and torch draw initial weights from them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_sharded_model(cfg: Config, device: torch.device) -> Tuple[DistributedModelParallel, EmbeddingModule]:
    """The config's DLRM built on the meta device, then sharded with weights drawn from
    ``train.seed``; the learned tables get their mapping (fitted now when none is given)."""
    check_mch_world(cfg, dist.get_world_size())
    with seeded(cfg.train.seed, device):
        model = DLRMTrain(build_model(cfg, device=torch.device("meta")))
        ebc = embedding_module(model)
        mch = isinstance(ebc, MCHEmbeddingBagCollection)
        constraints = build_constraints(cfg, ebc.multihash_configs()) if not mch else {}
        try:
            make_sharders = mch_sharders if mch else sharders
            dmp = shard_model(model, device, cfg.train.embedding_lr, constraints, batch_size=cfg.train.batch_size, make_sharders=make_sharders)
        except PlannerError as e:  # the tables and their inputs do not fit the ranks' memory
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"TorchRec's planner cannot place the tables on {dist.get_world_size()} rank(s) with train.batch_size="
                f"{cfg.train.batch_size}: {first[:300]}; lower train.batch_size, compress the tables more or add ranks "
                "(`torchrec-multihash plan` shows the placement)"
            ) from None
        if not isinstance(ebc, MCHEmbeddingBagCollection) and ebc.learned_mappings():
            apply_mappings(ebc, load_mappings(_mapping_dir(cfg, Path(cfg.train.output_dir))))
    return dmp, ebc


def evaluate_during_training(run: TrainRun) -> None:
    """Evaluates at the current step, into ``run.history``, and says so on rank 0."""
    m = evaluate(run.dmp, run.data.test(), run.device, run.data.keys, run.data.num_dense)
    run.history.append({"step": run.state.step, **m})
    if dist.get_rank() == 0:
        print(f"eval at step {run.state.step}: auc {m['auc']:.4f} logloss {m['logloss']:.4f} ne {m['ne']:.4f}", flush=True)


def build_run(cfg: Config, device: torch.device, resume: Union[bool, str], record: Record, run_id: Optional[str]) -> TrainRun:
    """This rank's data, sharded model, optimizers and schedule, at the start or where the
    checkpoint left off (see ``train``); the run folder is claimed (``run_folder``) by run ``run_id``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data = make_data(cfg, rank, world, Path(cfg.train.output_dir))  # (a vocabulary: that of the checkpoint resumed, if any)
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature
    if is_auto(cfg):  # each table's strategy and size, from the training data (rank 0 chooses)
        on_rank0(lambda: ensure_choice(cfg, plain_tables(cfg)))
        record.update(choice_record(load_choices(cfg)))  # the checkpoints record it
    dmp, ebc = build_sharded_model(cfg, device)
    opt = make_optimizer(dmp, cfg.train)
    state = start_state(cfg, dmp, opt, resume)
    meta = {"run": record, "run_id": run_id, **({"vocabulary": data.vocabulary} if data.vocabulary is not None else {})}
    guard = StepGuard(checkpoint_every_s=cfg.train.checkpoint_every_minutes * 60)
    return TrainRun(cfg, device, data, dmp, ebc, opt, lr_schedule(opt, cfg.train, state.step), state, meta, guard=guard)


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
        run.step_samples += run.cfg.train.batch_size * run.state.world_size
        taken += 1
        run.guard.note(loss, run.state.step)
        for callback in run.on_step:  # they see the learning rates this step used
            callback(run, loss)
        run.schedule.step()
        if run.guard.due(run.state.step) and run.guard.check(run.device):
            break
    pipeline.detach()
    run.guard.check(run.device)  # before any evaluation or checkpoint of this segment
    return taken


# with train.checkpoint_every_minutes: steps between the points where a checkpoint that fell due is saved
TIME_CHECKPOINT_STEPS = 100


def _reached_max_steps(t: TrainConfig, state: TrainState) -> bool:
    return bool(t.max_steps) and state.step >= t.max_steps


def _steps_to_next_stop(t: TrainConfig, step: int) -> int:
    """Steps from ``step`` to the next evaluation, checkpoint or ``max_steps``."""
    stops = [2**62]
    # a time-based checkpoint is taken where a segment ends (the pipeline holds batches in flight
    # inside one): with one, segments end at least every TIME_CHECKPOINT_STEPS steps
    for every in (t.eval_every, t.checkpoint_every, TIME_CHECKPOINT_STEPS if t.checkpoint_every_minutes else 0):
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
    by_steps = t.checkpoint_every and taken and (step % t.checkpoint_every == 0 or finished_epoch or _reached_max_steps(t, run.state))
    by_time = t.checkpoint_every_minutes and taken and (run.guard.checkpoint_due or finished_epoch or _reached_max_steps(t, run.state))
    if by_steps or by_time:
        save_train_checkpoint(run.cfg, run.dmp, run.opt, run.state, run.meta)
        run.guard.checkpointed()


def stop_for_signal(run: TrainRun) -> None:
    """After SIGTERM or Ctrl-C: a checkpoint of where the run is, then ``Preempted``."""
    save_train_checkpoint(run.cfg, run.dmp, run.opt, run.state, run.meta)
    name = run.guard.signal.name if run.guard.terminated else "SIGTERM"  # a peer rank's signal: SIGTERM from the launcher
    raise Preempted(
        f"{name}: stopped after step {run.state.step} with a checkpoint in {Path(run.cfg.train.output_dir) / 'checkpoint'}; "
        "run the same command with --resume auto to continue",
        exit_code=128 + int(run.guard.signal if run.guard.terminated else signal.SIGTERM),
    )


def _no_batch(run: TrainRun) -> ConfigError:
    t = run.cfg.train
    return ConfigError(
        f"epoch {run.state.epoch} has no batch to train on: data.train holds fewer than train.batch_size={t.batch_size} "
        f"samples per rank ({run.state.world_size} rank(s)), and a last partial batch is left out"
    )


def train_epoch(run: TrainRun) -> None:
    """Trains the rest of epoch ``run.state.epoch`` (or to ``max_steps``), a segment from one
    evaluation or checkpoint to the next at a time."""
    t, state = run.cfg.train, run.state
    source = synchronized(run.data_wait.timed(run.data.train(state.epoch, state.batches_in_epoch)), run.device)
    while not _reached_max_steps(t, state):
        size = _steps_to_next_stop(t, state.step)
        taken = train_segment(run, itertools.islice(source, size))
        state.batches_in_epoch += taken
        finished_epoch = taken < size and not run.guard.stop
        if finished_epoch and state.batches_in_epoch == 0:
            raise _no_batch(run)
        if run.guard.stop:
            stop_for_signal(run)
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
    metrics: Dict[str, Any] = dict(evaluate(run.dmp, run.data.test(), run.device, run.data.keys, run.data.num_dense))
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
        optimizer_state_bytes=optimizer_state_bytes(run.ebc),
        train_samples_per_s=run.samples_per_s(),
        steps=run.state.step,
        world_size=run.state.world_size,
        eval_history=run.history,
    )
    return metrics


def optimizer_state_bytes(ebc: EmbeddingModule) -> int:
    """Bytes of the tables' optimizer state: the fused row-wise Adagrad's one fp32 value a stored row,
    whatever the rows' precision."""
    if isinstance(ebc, MCHEmbeddingBagCollection):
        return 4 * sum(t.rows or t.num_embeddings for t in ebc.tables())
    return 4 * sum(c.num_embeddings for c in ebc.sub_table_configs())


def print_summary(metrics: Dict[str, Any], out_dir: Path, metrics_out: Optional[Path]) -> None:
    """Rank 0's last words: the test metrics, data and memory; the metrics as JSON in ``metrics_out``."""
    rate = metrics["train_samples_per_s"]
    speed = f"{rate:,.0f} samples/s" if rate else "no training step in this process (resumed at the end)"
    print(
        f"\nTest AUC {metrics['auc']:.4f}, log loss {metrics['logloss']:.4f}, NE {metrics['ne']:.4f} "
        f"after {metrics['steps']} steps on {metrics['world_size']} rank(s), {speed}"
    )
    print(
        f"Data: training waited for batches {metrics['data_wait_fraction']:.1%} of its time; "
        f"bad lines skipped: {metrics['skipped_lines']} in training, {metrics['skipped_test_lines']} in the last test pass"
    )
    print(
        f"Embedding memory: {metrics['embedding_bytes']:,} bytes vs {metrics['full_embedding_bytes']:,} "
        f"uncompressed ({metrics['full_embedding_bytes'] / metrics['embedding_bytes']:.1f}x smaller); "
        f"the optimizer's state beside them: {metrics['optimizer_state_bytes']:,} bytes"
    )
    if metrics_out:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(metrics, indent=2))
        print(f"Metrics written to {metrics_out}")
    print(f"Run outputs in {out_dir.resolve()}")


def train(
    cfg: Config,
    metrics_out: Optional[Path] = None,
    resume: Union[bool, str] = False,
    on_step: Sequence[StepCallback] = (),
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Trains and evaluates; ``resume``: True continues from ``output_dir/checkpoint`` (which must
    exist), ``"auto"`` continues from it if there is one (what a restarted job runs); ``overwrite``:
    starts over in a folder holding another run's checkpoint; ``on_step``: callbacks after every
    training step. ``Preempted`` after SIGTERM or Ctrl-C (a checkpoint saved)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is cuda but no CUDA device is visible to this process (a job without --gpu?); set train.device=auto or cpu to train on CPU"
        )
    device = setup_distributed(cfg.train.device)
    record = run_record(cfg, dist.get_world_size())  # before the data sets the table sizes
    claim = claim_folder(cfg, record, resume, overwrite)
    finished = False
    try:
        run = build_run(cfg, device, resume, record, claim.run_id)
        progress = ProgressReport()
        run.on_step = [*on_step, progress]
        previous = run.guard.install()
        try:
            train_epochs(run)
        finally:
            run.guard.uninstall(previous)
            progress.close()
        metrics = final_metrics(run)
        finished = True
    finally:
        claim.end(finished)  # (a replaced run's checkpoint left behind: moved aside, or the folder given back)
    if dist.get_rank() == 0:
        print_summary(metrics, Path(cfg.train.output_dir), metrics_out)
    return metrics


def check_metrics_out(path: Optional[Path]) -> None:
    """Refuses a ``--metrics-out`` that could not be written, before any work."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"--metrics-out {path} is a folder: give a file name")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--metrics-out {path}: {parent} is not a writable folder")


def main(argv: Optional[List[str]] = None) -> int:
    p = config_parser("torchrec-multihash train", __doc__)
    p.add_argument("--metrics-out", type=Path, default=None, help="write the final metrics as one JSON object")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="auto",
        help="continue from train.output_dir/checkpoint (model, optimizer, data position); "
        "'--resume auto': continue if there is one, else start (for restarted jobs)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over in a train.output_dir that holds another run's checkpoint")
    args = p.parse_args(argv)
    if args.resume not in (True, False, "auto"):
        p.error(f"--resume takes no value or 'auto', got {args.resume!r}")
    fault = FaultAtStep.from_env()  # the restart tests' faults
    keep_freed_memory()  # this process's steps reuse freed memory instead of page-faulting it in again
    with quiet():
        try:
            check_metrics_out(args.metrics_out)
            cfg = load_config(args.config, args.set)
            train(cfg, args.metrics_out, resume=args.resume, on_step=[fault] if fault else [], overwrite=args.overwrite)
        except MultiHashError as e:
            print(f"torchrec-multihash train: {e}", file=sys.stderr)
            return 2
        except Preempted as e:
            print(f"torchrec-multihash train: {e}", file=sys.stderr)
            return e.exit_code  # 143 after SIGTERM, 130 after Ctrl-C: what a scheduler or shell expects
        except KeyboardInterrupt:  # Ctrl-C before training began, or a second one during it
            print("torchrec-multihash train: interrupted (Ctrl-C); nothing saved since the last checkpoint", file=sys.stderr)
            return 130
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
