"""The YAML configuration of a run: dataclasses, loading, ``--set a.b=value`` overrides.

Unknown keys and values of the wrong type are errors that name the file and the key.
"""

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from torchrec_multihash.distributed.constraints import DEFAULT_SMALL_TABLE_ROWS
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.config import COMPOSITIONS, LOGICAL_FIELDS, ROW_PRECISIONS, TABLE_FIELDS
from torchrec_multihash.modules.convert import DEFAULT_THRESHOLD
from torchrec_multihash.modules.strategies import StrategyName, registered_strategies

AUTO = "auto"  # embeddings.strategy: each table's strategy and size chosen from the data (torchrec_multihash.auto)
MCH = "mch"  # embeddings.strategy: TorchRec's ManagedCollisionEmbeddingBagCollection (MCH remapper), a baseline
MCH_EVICTIONS = ("lfu", "distance_lfu")
MCH_SIZINGS = ("bytes", "rows")
PRECISIONS = tuple(ROW_PRECISIONS)  # embeddings.precision: the tables' stored rows
DEVICES = ("auto", "cpu", "cuda")  # train.device


class ConfigError(MultiHashError, ValueError):
    """A configuration file or override that cannot be used; the message says where and why."""


@dataclass
class ModelConfig:
    """The dense part of the model (TorchRec's DLRM family)."""

    arch: str = "dlrm"  # dlrm | dcn | projection
    embedding_dim: int = 64
    dense_in_features: int = 13
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [512, 256, 64])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [512, 512, 256, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512
    # projection: the two interaction-branch MLPs (each ending in a multiple of embedding_dim)
    interaction_branch1_layer_sizes: List[int] = field(default_factory=lambda: [2048, 2048])
    interaction_branch2_layer_sizes: List[int] = field(default_factory=lambda: [2048, 2048])


@dataclass
class EmbeddingsConfig:
    """The embedding tables: one per sparse feature, compressed as configured."""

    num_embeddings_per_feature: List[int] = field(default_factory=list)
    feature_names: Optional[List[str]] = None  # default C1..Cn
    # full | hash | qr | generalized_qr | crt | learned (or one you registered) | auto: chosen per table
    # | mch: TorchRec's MCH remapper (ManagedCollisionEmbeddingBagCollection), one rank only
    strategy: str = StrategyName.QR.value
    operation: str = "mult"  # add | mult | concat
    # the rows' precision: fp32 | fp16 (half the bytes a value: at one compression, twice the rows); unset: fp32,
    # and strategy auto chooses it per table
    precision: Optional[str] = None
    compose: str = "per_id"  # mult: per_id (product per id, then pooled) | pooled (the original DLRM Q-R: pooled, then product)
    mch_eviction: str = "lfu"  # mch: lfu | distance_lfu (TorchRec's LFU_EvictionPolicy, DistanceLFU_EvictionPolicy)
    mch_eviction_interval: int = 1  # mch: training steps between the remapper's admissions/evictions
    mch_sizing: str = "bytes"  # mch: bytes (rows + remapper state within the compression) | rows (N / compression rows, state on top)
    compression: float = 4.0  # memory reduction of each table over `threshold` rows (auto: of them all)
    budget_bytes: Optional[int] = None  # auto: bytes for all tables, mappings included (instead of compression)
    auto_candidates: List[str] = field(default_factory=lambda: ["learned", "qr"])  # auto: the strategies it picks from
    auto_choice: Optional[str] = None  # auto: an auto.json to use (default: chosen before training, in the run folder)
    threshold: int = DEFAULT_THRESHOLD  # tables this small stay full
    num_partitions: Optional[int] = None  # generalized_qr / crt (default 3 / 2)
    # table (t_<feature>) -> its multi-hash fields (strategy, operation, num_collisions, moduli, ...): a strategy
    # without sizes is sized for the compression; sizes given are the table's (see to_multihash_configs)
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    constraints: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # table -> ParameterConstraints fields
    small_table_rows: int = DEFAULT_SMALL_TABLE_ROWS  # sub-tables this small are kept whole (table-wise)
    # let the planner replicate small fp32 tables (data_parallel): replicas are trained by train.dense_optimizer
    # at train.dense_lr, not like the rest of their table by its fused row-wise Adagrad (docs/benchmarks.md)
    data_parallel: bool = False
    validate_ids: bool = True
    max_ids_per_bag: Optional[int] = None  # 1: every feature one-hot (Criteo's): mult tables looked up pooled, checked per batch
    # add tables of several partitions: their parts stored as one table, each id's rows one bag (see the table
    # option stack_parts). Unset: the tables' default (stacked where they can be); true: every such table
    # (a warning when there is none); false: none (their parts separate tables, placed apart by the planner)
    stack_parts: Optional[bool] = None
    mapping: Optional[str] = None  # learned: a directory written by fit-hash (default: fit before training)
    fit: Dict[str, Any] = field(default_factory=dict)  # learned: FitOptions fields (dim, lr, seed, ...)


@dataclass
class DataConfig:
    """Where the samples come from."""

    format: str = "synthetic"  # criteo_tsv | criteo_npy | synthetic
    train: Optional[List[str]] = None  # files (.txt or .gz); a single string is accepted too
    test: Optional[List[str]] = None
    ids: str = "hashing"  # criteo_tsv: hashing (value % N) | vocabulary (frequency-ordered, saved)
    min_count: int = 1  # vocabulary: rarer values share the out-of-vocabulary id
    train_samples: int = 200_000  # synthetic: samples per epoch
    test_samples: int = 20_000  # synthetic
    num_clusters: int = 64  # synthetic: hidden clusters per feature
    # synthetic: these features (names, e.g. [C1, C2]) get bags of 1..max_bag ids, the others one id each; the
    # others' tables are then declared one-hot (embeddings.max_ids_per_bag 1, unless it or an override says otherwise)
    multi_hot_features: List[str] = field(default_factory=list)
    max_bag: int = 20  # synthetic: the most ids a multi-hot bag holds
    num_workers: int = 0  # criteo_tsv, criteo_npy: DataLoader workers building this rank's batches (0: in the training process)
    # criteo_npy: each epoch's whole batches in an order drawn from train.seed and the epoch (the same on every
    # rank; a resume reads what an uninterrupted run would); false: the files' order
    shuffle: bool = False
    skip_bad_lines: int = 0  # criteo_tsv: bad lines each rank may skip (counted, reported); 0: the first one stops the run
    max_vocab_size: int = 1_000_000  # vocabulary: ids per feature at most (counting memory is bounded by it, not by the data)


@dataclass
class TrainConfig:
    """Optimisation."""

    batch_size: int = 2048  # per rank
    epochs: int = 1
    embedding_lr: float = 0.05  # fused row-wise Adagrad on the tables
    dense_optimizer: str = "adagrad"  # adagrad | adam
    dense_lr: float = 0.01
    warmup_steps: int = 0  # linear warm-up of every learning rate
    decay_start: int = 0  # polynomial (squared) decay to 0 over decay_steps, as the DLRM reference
    decay_steps: int = 0
    eval_every: int = 0  # steps between evaluations during training (0: only at the end)
    max_steps: int = 0  # stop after this many steps (0: run every epoch)
    checkpoint_every: int = 0  # steps between checkpoints in output_dir/checkpoint (0: none)
    # minutes between checkpoints too (0: none): what a job a scheduler restarts loses at most (cluster configs: 30)
    checkpoint_every_minutes: float = 0.0
    seed: int = 0
    output_dir: str = "runs/latest"
    device: str = "auto"  # auto (CUDA where a GPU is visible, else CPU) | cpu | cuda (an error without a GPU)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin in (list, List):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {[str(m.value) for m in tp]}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # 1e-3: YAML 1.1 (PyYAML) reads a float only with a dot (1.0e-3); people write 1e-3
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    return value


def _from_dict(cls: Any, data: Dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s) {[prefix + str(k) for k in unknown]}; {cls.__name__} has: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies ``a.b=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.batch_size=512")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return raw


# (section, key, least value): numbers a run cannot use below that
_LEAST = [
    *(("train", k, 1) for k in ("batch_size", "epochs")),
    *(("train", k, 0) for k in ("max_steps", "eval_every", "checkpoint_every", "warmup_steps", "decay_start", "decay_steps")),
    *(("train", k, 0.0) for k in ("embedding_lr", "dense_lr", "checkpoint_every_minutes")),
    *(("data", k, 1) for k in ("min_count", "train_samples", "test_samples", "num_clusters", "max_vocab_size", "max_bag")),
    *(("data", k, 0) for k in ("num_workers", "skip_bad_lines")),
    ("model", "embedding_dim", 1),
    ("model", "dense_in_features", 1),
    ("embeddings", "compression", 1.0),
    ("embeddings", "mch_eviction_interval", 1),
]


def _check_sizes(cfg: Config) -> None:
    """Lists of sizes (layers, tables) hold positive ints; the over arch ends in one logit."""
    for where, sizes in (
        ("model.dense_arch_layer_sizes", cfg.model.dense_arch_layer_sizes),
        ("model.over_arch_layer_sizes", cfg.model.over_arch_layer_sizes),
        ("embeddings.num_embeddings_per_feature", cfg.embeddings.num_embeddings_per_feature),
    ):
        bad = [v for v in sizes if v < 1]
        if bad:
            raise ConfigError(f"{where} must hold sizes >= 1, got {sizes}")
    # a table's bytes (N x dim x 4) are int64 everywhere (TorchRec's planner, torch): past that they wrap
    most = (2**63 - 1) // (4 * max(1, cfg.model.embedding_dim))
    huge = [v for v in cfg.embeddings.num_embeddings_per_feature if v > most]
    if huge:
        raise ConfigError(
            f"embeddings.num_embeddings_per_feature: {huge[:3]} rows of dim {cfg.model.embedding_dim} would take more bytes than "
            f"an int64 counts; a table holds at most {most:,} rows at this dim"
        )
    if cfg.embeddings.budget_bytes is not None and cfg.embeddings.budget_bytes < 1:
        raise ConfigError(f"embeddings.budget_bytes must be >= 1, got {cfg.embeddings.budget_bytes}")
    if not cfg.model.over_arch_layer_sizes or cfg.model.over_arch_layer_sizes[-1] != 1:
        raise ConfigError(f"model.over_arch_layer_sizes must end in 1 (the click logit), got {cfg.model.over_arch_layer_sizes}")
    k = cfg.embeddings.num_partitions
    if k is not None and k < 2:
        raise ConfigError(f"embeddings.num_partitions must be >= 2 (or left out for the default), got {k}")


def _check_strategy(emb: EmbeddingsConfig) -> None:
    names = [*registered_strategies(), AUTO, MCH]
    if emb.strategy not in names:
        raise ConfigError(f"embeddings.strategy must be one of {names}, got {emb.strategy!r}")
    if emb.budget_bytes is not None and emb.strategy != AUTO:
        raise ConfigError(f"embeddings.budget_bytes needs embeddings.strategy auto (got {emb.strategy}); other strategies take a compression")
    for key, allowed in (("compose", COMPOSITIONS), ("mch_eviction", MCH_EVICTIONS), ("mch_sizing", MCH_SIZINGS)):
        if getattr(emb, key) not in allowed:
            raise ConfigError(f"embeddings.{key} must be one of {list(allowed)}, got {getattr(emb, key)!r}")
    if emb.precision is not None and emb.precision not in PRECISIONS:
        raise ConfigError(f"embeddings.precision must be one of {list(PRECISIONS)} (or unset), got {emb.precision!r}")
    if emb.precision == "fp16" and emb.strategy == MCH:
        raise ConfigError("embeddings.precision fp16 is for multi-hash tables; strategy mch (TorchRec's MCH remapper, a baseline) keeps fp32 rows")


# the table fields the app sets itself, which an override cannot: where each comes from
_DERIVED = {
    "name": "a table is named t_<feature> after the feature it looks up (embeddings.feature_names)",
    "feature_names": "each table looks up its own feature, named by embeddings.feature_names (default C1, C2, ...)",
    "num_embeddings": "it comes from embeddings.num_embeddings_per_feature (with data.ids: vocabulary, from the data)",
    "embedding_dim": "it comes from model.embedding_dim, which every table shares (the DLRM interaction needs one width)",
}


def _check_overrides(emb: EmbeddingsConfig) -> None:
    """``embeddings.overrides`` set only the multi-hash fields of a table (strategy, sizes, ...)."""
    for table, fields in emb.overrides.items():
        for key in fields:
            where = f"embeddings.overrides.{table}.{key}"
            if key in _DERIVED:
                raise ConfigError(f"{where} cannot be set per table: {_DERIVED[key]}")
            if key in LOGICAL_FIELDS:
                raise ConfigError(f"{where} cannot be set per table: the app builds every table with TorchRec's default {key}")
            if key not in TABLE_FIELDS:
                raise ConfigError(f"{where}: not a table option; an override may set {list(TABLE_FIELDS)}")


def validate(cfg: Config) -> Config:
    """Refuses values no run can use (a batch of 0, NaN learning rates, ...), naming the key."""
    _check_strategy(cfg.embeddings)
    _check_overrides(cfg.embeddings)
    for section, key, least in _LEAST:
        value = getattr(getattr(cfg, section), key)
        if not least <= value < float("inf"):  # NaN too
            raise ConfigError(f"{section}.{key} must be >= {least}{' and finite' if isinstance(least, float) else ''}, got {value!r}")
    _check_sizes(cfg)
    _check_multi_hot(cfg)
    if cfg.train.device not in DEVICES:
        raise ConfigError(f"train.device must be one of {list(DEVICES)}, got {cfg.train.device!r}")
    if cfg.data.shuffle and cfg.data.format != "criteo_npy":
        raise ConfigError(f"data.shuffle orders criteo_npy's batches; data.format {cfg.data.format} is read in its own order: remove it")
    return cfg


def _check_multi_hot(cfg: Config) -> None:
    d = cfg.data
    if not d.multi_hot_features:
        return
    if d.format != "synthetic":
        raise ConfigError(
            f"data.multi_hot_features makes synthetic bags of several ids; data.format is {d.format!r}, whose bags are as the files hold them"
        )
    n = len(cfg.embeddings.num_embeddings_per_feature)
    names = cfg.embeddings.feature_names or [f"C{i + 1}" for i in range(n)]
    unknown = [f for f in d.multi_hot_features if f not in names]
    if unknown:
        raise ConfigError(
            f"data.multi_hot_features names {unknown}, not features of this config (its features: {names[:8]}{' ...' if len(names) > 8 else ''})"
        )


def config_from_dict(raw: Dict[str, Any], source: str = "<config>") -> Config:
    try:
        return validate(_from_dict(Config, raw or {}, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_parser(prog: str, description: Optional[str]) -> argparse.ArgumentParser:
    """A command's parser with the ``--config FILE`` and ``--set KEY=VALUE`` options."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config",
        default=None,
        help="YAML config, e.g. configs/quickstart.yaml (without one: the built-in defaults, which name no tables: "
        "--set embeddings.num_embeddings_per_feature=[...] then; output_dir runs/latest)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.batch_size=512")
    return p


def load_config(path: Union[str, Path, None], overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (or the defaults if ``path`` is None) and applies ``--set`` overrides."""
    raw: Dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping (model:, embeddings:, ...)")
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)
