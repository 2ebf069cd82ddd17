"""The training optimizers (the tables' fused one and a dense one) and their learning-rate schedule."""

import functools

import torch
from torch.optim.lr_scheduler import LambdaLR
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_multihash.app.config import ConfigError, TrainConfig

DENSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


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
