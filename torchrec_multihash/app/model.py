"""Builds the multi-hash tables and the DLRM model a config describes."""

import dataclasses
import warnings
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.app.auto_choice import is_auto, load_choices
from torchrec_multihash.app.config import MCH, Config, ConfigError, EmbeddingsConfig
from torchrec_multihash.auto import AutoChoiceError, TableChoice, auto_configs
from torchrec_multihash.bench.mch import MCHEmbeddingBagCollection
from torchrec_multihash.distributed.constraints import sub_table_constraints
from torchrec_multihash.modules.config import ROW_PRECISIONS, MultiHashConfigError, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.convert import adds_parts, stack_add_tables, to_multihash_configs
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection

EmbeddingModule = Union[MultiHashEmbeddingBagCollection, MCHEmbeddingBagCollection]

ARCHS = ("dlrm", "dcn", "projection")


def feature_names(emb: EmbeddingsConfig) -> List[str]:
    n = len(emb.num_embeddings_per_feature)
    names = emb.feature_names or [f"C{i + 1}" for i in range(n)]
    if len(names) != n:
        raise ConfigError(f"embeddings.feature_names has {len(names)} names but embeddings.num_embeddings_per_feature has {n} sizes")
    return names


def plain_tables(cfg: Config) -> List[EmbeddingBagConfig]:
    """One uncompressed table ``t_<feature>`` per sparse feature."""
    emb = cfg.embeddings
    if not emb.num_embeddings_per_feature:
        raise ConfigError(
            "embeddings.num_embeddings_per_feature is empty: give one vocabulary size per sparse feature "
            "(or start from a config that does: --config configs/quickstart.yaml)"
        )
    return [
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=cfg.model.embedding_dim, feature_names=[f])
        for f, n in zip(feature_names(emb), emb.num_embeddings_per_feature)
    ]


def is_mch(cfg: Config) -> bool:
    """True when the tables are TorchRec's MCH remapper (``embeddings.strategy: mch``), a baseline."""
    return cfg.embeddings.strategy == MCH


def check_mch_world(cfg: Config, world_size: int) -> None:
    """Strategy mch (TorchRec's MCH remapper, a baseline) trains on one rank: its sharder shards
    row-wise only, and the CPU eviction reset (``bench/mch_sharding.py``) is one rank's."""
    if is_mch(cfg) and world_size > 1:
        raise ConfigError(
            f"embeddings.strategy mch runs on one rank only, got {world_size}: TorchRec's MCH remapper is sharded row-wise "
            "only, and this project resets its evicted rows on one rank (bench/mch_sharding.py); run it with one process"
        )


def build_mch(cfg: Config, device: Optional[torch.device] = None) -> MCHEmbeddingBagCollection:
    """The config's tables as TorchRec MCH tables at ``embeddings.compression`` (``bench/mch.py``)."""
    emb = cfg.embeddings
    try:
        return MCHEmbeddingBagCollection(
            plain_tables(cfg),
            emb.compression,
            eviction=emb.mch_eviction,
            eviction_interval=emb.mch_eviction_interval,
            sizing=emb.mch_sizing,
            threshold=emb.threshold,
            device=device,
        )
    except MultiHashConfigError as e:
        raise ConfigError(f"embeddings: {e}") from None


def build_tables(cfg: Config, choices: Optional[List[TableChoice]] = None) -> List[MultiHashEmbeddingBagConfig]:
    """One table ``t_<feature>`` per sparse feature, compressed as ``cfg.embeddings`` says; with
    strategy auto, as ``choices`` say (default: the saved choice, ``app/auto_choice.py``)."""
    emb = cfg.embeddings
    if is_mch(cfg):
        raise ConfigError("embeddings.strategy mch has no multi-hash tables: it builds TorchRec's MCH tables (build_mch)")
    plain = plain_tables(cfg)
    overrides = {name: dict(fields) for name, fields in emb.overrides.items()}
    # table fields set for every table by ``embeddings``, unless an override says otherwise
    defaults = {"max_ids_per_bag": emb.max_ids_per_bag, "compose": emb.compose if emb.compose != "per_id" else None}
    multi_hot = set(cfg.data.multi_hot_features)
    for c in plain:
        for key, value in defaults.items():
            if value is not None:
                overrides.setdefault(c.name, {}).setdefault(key, value)
        # synthetic data with multi-hot features: the others are one-hot (mult tables then looked up pooled, not
        # per id next to the multi-hot ones, whose id counts they would be padded to)
        if multi_hot and emb.max_ids_per_bag is None and not multi_hot & set(c.feature_names):
            overrides.setdefault(c.name, {}).setdefault("max_ids_per_bag", 1)
    try:
        if is_auto(cfg):
            tables = auto_configs(plain, choices if choices is not None else load_choices(cfg), overrides)
        else:
            tables = to_multihash_configs(
                plain,
                emb.compression,
                strategy=emb.strategy,
                operation=emb.operation,
                threshold=emb.threshold,
                num_partitions=emb.num_partitions,
                overrides=overrides,
                data_type=ROW_PRECISIONS[emb.precision] if emb.precision else None,
            )
        if emb.stack_parts is None:
            return tables
        own = [n for n, o in emb.overrides.items() if "stack_parts" in o]  # an override setting it keeps its own
        if not emb.stack_parts:
            for t in tables:
                if t.name not in own:
                    t.stack_parts = False
            return tables
        if not any(t.name not in own and adds_parts(t) for t in tables):  # stack_add_tables would stack none
            if any(t.stack_parts for t in tables):  # an override stacked its own table
                return tables
            warnings.warn(
                "embeddings.stack_parts is set but no table adds several partitions (operation add on qr, generalized_qr "
                "or crt), so no table is stacked: it changes nothing here",
                stacklevel=3,
            )
            return tables
        return stack_add_tables(tables, own)
    except (MultiHashConfigError, AutoChoiceError, TypeError) as e:
        raise ConfigError(f"embeddings: {e}") from None


def build_constraints(cfg: Config, tables: List[MultiHashEmbeddingBagConfig]) -> Dict[str, ParameterConstraints]:
    """Planner constraints on the sub-tables, from ``embeddings.constraints`` on logical tables."""
    logical: Dict[str, ParameterConstraints] = {}
    allowed = [f.name for f in dataclasses.fields(ParameterConstraints)]
    for name, fields in cfg.embeddings.constraints.items():
        unknown = sorted(set(fields) - set(allowed)) if isinstance(fields, dict) else []
        if unknown:
            raise ConfigError(f"embeddings.constraints.{name}: unknown key(s) {unknown}; TorchRec's ParameterConstraints takes {allowed}")
        try:
            logical[name] = ParameterConstraints(**fields)
        except TypeError as e:
            raise ConfigError(f"embeddings.constraints.{name}: {e}") from None
    try:
        return sub_table_constraints(tables, logical, small_table_rows=cfg.embeddings.small_table_rows, data_parallel=cfg.embeddings.data_parallel)
    except ValueError as e:
        raise ConfigError(f"embeddings.constraints: {e}") from None


def embedding_module(model: nn.Module) -> EmbeddingModule:
    """The tables of a model built by ``build_model``: its MultiHashEmbeddingBagCollection, or with
    strategy mch its MCHEmbeddingBagCollection."""
    ebc = next((m for m in model.modules() if isinstance(m, (MultiHashEmbeddingBagCollection, MCHEmbeddingBagCollection))), None)
    if ebc is None:
        raise ConfigError(f"the model ({type(model).__name__}) holds no MultiHashEmbeddingBagCollection")
    return ebc


def multihash_module(model: nn.Module) -> MultiHashEmbeddingBagCollection:
    """The MultiHashEmbeddingBagCollection of a model built by ``build_model`` (or its DLRMTrain)."""
    ebc = embedding_module(model)
    if not isinstance(ebc, MultiHashEmbeddingBagCollection):
        raise ConfigError(f"the model ({type(model).__name__}) holds TorchRec's MCH tables, no MultiHashEmbeddingBagCollection")
    return ebc


def build_model(cfg: Config, device: Optional[torch.device] = None, choices: Optional[List[TableChoice]] = None) -> nn.Module:
    """The DLRM (DLRM_DCN, DLRM_Projection) of the config, its tables a MultiHashEmbeddingBagCollection
    (``choices``: strategy auto's, default the saved one)."""
    m = cfg.model
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {ARCHS}, got {m.arch!r}")
    if m.dense_arch_layer_sizes[-1] != m.embedding_dim:
        raise ConfigError(f"model.dense_arch_layer_sizes must end with model.embedding_dim={m.embedding_dim}, got {m.dense_arch_layer_sizes}")
    ebc: EmbeddingModule
    if is_mch(cfg):
        ebc = build_mch(cfg, device)
    else:
        ebc = MultiHashEmbeddingBagCollection(build_tables(cfg, choices), device=device, validate_ids=cfg.embeddings.validate_ids)
    kw = dict(
        embedding_bag_collection=ebc,
        dense_in_features=m.dense_in_features,
        dense_arch_layer_sizes=m.dense_arch_layer_sizes,
        over_arch_layer_sizes=m.over_arch_layer_sizes,
        dense_device=device,
    )
    if m.arch == "dcn":
        return DLRM_DCN(dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim, **kw)
    if m.arch == "projection":
        for name in ("interaction_branch1_layer_sizes", "interaction_branch2_layer_sizes"):
            sizes = getattr(m, name)
            if not sizes or sizes[-1] % m.embedding_dim:
                raise ConfigError(f"model.{name} must end with a multiple of model.embedding_dim={m.embedding_dim}, got {sizes}")
        return DLRM_Projection(
            interaction_branch1_layer_sizes=m.interaction_branch1_layer_sizes,
            interaction_branch2_layer_sizes=m.interaction_branch2_layer_sizes,
            **kw,
        )
    return DLRM(**kw)
