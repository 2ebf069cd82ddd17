"""Distributed forms: sharding, constraints, planning and checkpoints for multi-hash tables."""

from torchrec_multihash.distributed.checkpoint import (  # noqa: F401
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_entries,
    save_checkpoint,
)
from torchrec_multihash.distributed.constraints import model_constraints, sub_table_constraints  # noqa: F401
from torchrec_multihash.distributed.planning import (  # noqa: F401
    PlanReport,
    describe_plan,
    plan_model,
)
from torchrec_multihash.distributed.sharding import shard_model, sharders  # noqa: F401
