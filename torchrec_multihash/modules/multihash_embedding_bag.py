"""MultiHashEmbeddingBagCollection: a drop-in EmbeddingBagCollection built from small sub-tables."""

from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import (
    EmbeddingBagConfig,
    PoolingType,
)
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.combine import Combine, OutputSpec
from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig, logical_fields
from torchrec_multihash.modules.feature_lookup import FeatureLookup
from torchrec_multihash.modules.flat_plan import sub_feature_order
from torchrec_multihash.modules.id_transform import IdTransform
from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.lookup_checks import check_sharding, warn_if_not_pipelined
from torchrec_multihash.modules.lookup_group import Lookup
from torchrec_multihash.modules.strategies import SubTable, stacked_table_name, sub_feature_name
from torchrec_multihash.modules.strategies.base import stacked_part_rows

POOLED_GROUP = "pooled"


def _per_id_group(dim: int) -> str:
    return f"per_id_d{dim}"


@dataclass
class _LookupGroups:
    """The sub-tables, features and outputs of every lookup group, as the tables are added."""

    configs: Dict[str, List[EmbeddingBagConfig]] = field(default_factory=dict)
    in_table_order: List[EmbeddingBagConfig] = field(default_factory=list)
    lookups: Dict[str, List[FeatureLookup]] = field(default_factory=dict)
    outputs: List[OutputSpec] = field(default_factory=list)


def _check_tables(tables: List[MultiHashEmbeddingBagConfig]) -> None:
    if not tables:
        raise MultiHashConfigError("MultiHashEmbeddingBagCollection needs at least one table")
    for t in tables:
        if not isinstance(t, MultiHashEmbeddingBagConfig):
            raise MultiHashConfigError(
                f"table {getattr(t, 'name', t)!r} is a {type(t).__name__}, not a "
                "MultiHashEmbeddingBagConfig; convert TorchRec configs with "
                "torchrec_multihash.to_multihash_configs"
            )
        t.validate()
    dup = [n for n, c in Counter(t.name for t in tables).items() if c > 1]
    if dup:
        raise MultiHashConfigError(f"table names must be unique; repeated: {dup}")


def _inner_config(t: MultiHashEmbeddingBagConfig, sub: SubTable, features: List[str]) -> EmbeddingBagConfig:
    """The stock TorchRec config of one sub-table, SUM-pooled (per-id lookups pool bags of one id)."""
    return EmbeddingBagConfig(
        pooling=PoolingType.SUM,
        name=sub.name,
        num_embeddings=sub.num_embeddings,
        embedding_dim=sub.embedding_dim,
        feature_names=features,
        data_type=t.data_type,
        weight_init_min=sub.init_range[0],
        weight_init_max=sub.init_range[1],
        init_fn=t.init_fn,
    )


def _group_tables(tables: List[MultiHashEmbeddingBagConfig], device: torch.device) -> _LookupGroups:
    """Sorts every table's sub-tables into lookup groups: pooled (add, concat, one partition) or
    per id (mult), and records how each feature is looked up and combined. A ``stack_parts`` table
    is one pooled table of all its parts, and each of its features one sub-feature (``C1__parts``)
    whose bags hold each id's k rows: to the combine, a single-part output."""
    groups = _LookupGroups()
    feature_tables = Counter(f for t in tables for f in t.feature_names)
    for t, names in zip(tables, get_embedding_names_by_table(tables)):
        impl = t.strategy_impl()
        per_id = impl.looks_up_per_id()
        group = _per_id_group(t.embedding_dim) if per_id else POOLED_GROUP
        # stack_parts: one table of all the parts, one sub-feature per feature (each id's k rows)
        subs = impl.stored_tables()
        stacked_rows = impl.stacked_rows() if impl.is_stacked() else None
        mapping = LearnedMapping(t, device=device) if t.has_mapping() else None
        # a feature looked up by several tables gets the table in its sub-features' names
        sub_features = {f: [sub_feature_name(f, s.suffix, t.name if feature_tables[f] > 1 else None) for s in subs] for f in t.feature_names}
        for i, sub in enumerate(subs):
            features = [sub_features[f][i] for f in t.feature_names]
            inner = _inner_config(t, sub, features)
            groups.configs.setdefault(group, []).append(inner)
            groups.in_table_order.append(inner)
        for f, name in zip(t.feature_names, names):
            # one-hot mult (per-id semantics): weights on the first part only; compose="pooled": on every part
            pooled_mult = impl.is_composed() and t.operation == "mult" and not per_id and t.compose == "per_id"
            # add, mult: composed part by part, so each part's sub-features one column block
            part_major = impl.is_composed() and not impl.is_stacked() and t.operation in ("add", "mult")
            lookup = FeatureLookup(
                f, t.name, t.num_embeddings, impl, sub_features[f], mapping, t.max_ids_per_bag, pooled_mult, stacked_rows, part_major
            )
            groups.lookups.setdefault(group, []).append(lookup)
            groups.outputs.append(OutputSpec(name, f, group, per_id, sub_features[f], t.operation, t.pooling, t.embedding_dim))
    for group, lookups in groups.lookups.items():  # the inner tables' features in the transform's order
        position = {lookups[i].sub_features[j]: n for n, (i, j) in enumerate(sub_feature_order(lookups))}
        groups.configs[group].sort(key=lambda c: position[c.feature_names[0]])
    return groups


def _resolve_device(device: Optional[torch.device]) -> torch.device:
    """The given device, else the context's (``with torch.device("meta"):``, or
    ``torch.set_default_device``), as TorchRec's EmbeddingBagCollection takes its tables'."""
    return torch.device(device) if device is not None else torch.get_default_device()


def _refuse_other_stacking(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: refuses a state dict whose tables are stacked where this module's are not
    (``stack_parts``), or the other way round: it would otherwise load partly (``strict=False``)."""
    bags = prefix + POOLED_GROUP + "." + POOLED_GROUP + ".tables.embedding_bags."
    for t in cast(MultiHashEmbeddingBagCollection, module).multihash_configs():
        impl = t.strategy_impl()
        if not impl.is_composed():
            continue
        stacked = bags + stacked_table_name(t.name) + ".weight"
        parts = [bags + s.name + ".weight" for s in impl.sub_tables()]
        if impl.is_stacked() and stacked not in state_dict and any(k in state_dict for k in parts):
            found = next(k for k in parts if k in state_dict)
            raise MultiHashConfigError(
                f"table '{t.name}': the state dict holds its parts as separate tables ('{found}'), this module stacks them "
                f"in one ('{stacked}'; an add's parts are stacked unless stack_parts=False): set stack_parts=False on the table to load it"
            )
        if not impl.is_stacked() and stacked in state_dict:
            raise MultiHashConfigError(
                f"table '{t.name}': the state dict holds its parts stacked in one table ('{stacked}'), this module keeps them "
                "separate (stack_parts=False here): leave stack_parts unset (or True) to load it"
            )


class MultiHashEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` whose tables are compositional (multi-hash) embeddings.

    KJT in, KeyedTensor out (keyed by the original feature names), so it drops into
    ``torchrec.models.dlrm.DLRM``. The data path::

        KJT -> IdTransform (ids -> sub-table rows) -> inner EmbeddingBagCollection (ordinary
        TorchRec tables) -> Combine (add | mult | concat, pool) -> KeyedTensor

    Tables with add or concat (and single-table strategies) are looked up pooled in one inner
    ``EmbeddingBagCollection`` (``pooled["pooled"].tables``): pooling commutes with them. Tables
    with mult are looked up per id in another SUM ``EmbeddingBagCollection`` per dim
    (``per_id["per_id_d{dim}"].tables``), whose transform explodes every bag into bags of one id,
    and multiplied per id before pooling; unless declared one-hot (``max_ids_per_bag=1``): those are
    looked up pooled and their pooled parts multiplied. All are stock TorchRec modules, so TorchRec's
    planner, sharders and pipelines handle the sub-tables like any other table. The forward is
    fx-traceable (TorchRec's tracer) and scriptable; state dict keys: ``pooled.pooled.tables.
    embedding_bags.<sub-table>.weight``, ``per_id.per_id_d<dim>.tables.embedding_bags.<sub-table>.
    weight`` and, for learned tables, ``<group>.<name>.transform.mappings.<table>.{ids,rows,shape}``.
    An add table with ``stack_parts`` is one pooled table, ``<table>__parts``, of all its parts'
    rows, and an id one bag of its k rows (offset into their parts): its SUM pooling is the add.
    A state dict of another ``stack_parts`` is refused on load.

    Args:
        tables: one ``MultiHashEmbeddingBagConfig`` per logical table.
        is_weighted: the KJT carries per-sample weights.
        device: where the sub-tables and learned mappings live ("meta" for deferred init under
            DMP); default: the current default device (``with torch.device(...)``), else the CPU.
        validate_ids: raise on ids outside [0, num_embeddings) and on bags of more ids than a
            table's ``max_ids_per_bag`` (eager mode; one host sync per batch for all features).
        strict_features: raise on KJT keys that no table looks up (TorchRec's EBC ignores them).

    Example::

        tables = [
            MultiHashEmbeddingBagConfig(
                name="t1", embedding_dim=3, num_embeddings=10_000, feature_names=["f1"],
                strategy="qr", operation="mult", num_collisions=100,  # 100 + 100 rows
            ),
            MultiHashEmbeddingBagConfig(
                name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"], strategy="full",
            ),
        ]
        ebc = MultiHashEmbeddingBagCollection(tables)

        #         0        1      2  <-- batch
        # "f1"  [0, 1]   None   [2]
        # "f2"  [3]      [4]    [5, 6, 7]
        #  ^
        # feature
        features = KeyedJaggedTensor(
            keys=["f1", "f2"],
            values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
            offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]),
        )
        pooled = ebc(features)
        print(pooled.values().shape)
        print(pooled.offset_per_key())
        print(ebc.memory_bytes(), "bytes instead of", ebc.full_memory_bytes())

        >>> torch.Size([3, 7])
        >>> [0, 3, 7]
        >>> 2560 bytes instead of 120160
    """

    __jit_unused_properties__ = ["embedding_bags"]  # a view for eager tools, not for TorchScript

    def __init__(
        self,
        tables: List[MultiHashEmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        validate_ids: bool = True,
        strict_features: bool = True,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once("torchrec_multihash.MultiHashEmbeddingBagCollection")
        _check_tables(tables)
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self._device = _resolve_device(device)
        groups = _group_tables(self._configs, self._device)
        self._sub_table_configs = groups.in_table_order
        self._groups = list(groups.configs)
        all_features = sorted({f for t in tables for f in t.feature_names})
        # at most one pooled group; one per-id group per dim (read as one [ids, features, parts, dim] view)
        self.pooled = nn.ModuleDict()
        self.per_id = nn.ModuleDict()
        for i, group in enumerate(self._groups):
            pooled = group == POOLED_GROUP
            transform = IdTransform(
                groups.lookups[group],
                is_weighted=is_weighted,
                validate_ids=validate_ids,
                # one transform checks for unknown keys; the rest need not repeat it
                known_features=all_features if (strict_features and i == 0) else None,
                explode=not pooled,
            )
            # per-id lookups are unweighted: the combine weights each id's product
            ebc = EmbeddingBagCollection(tables=groups.configs[group], is_weighted=is_weighted and pooled, device=self._device)
            (self.pooled if pooled else self.per_id)[group] = Lookup(transform, ebc)
        self.combine = Combine(groups.outputs, is_weighted=is_weighted)
        self._sharding_checked = False
        self._traced_by_pipeline = False
        self._register_load_state_dict_pre_hook(_refuse_other_stacking, with_module=True)

    @torch.jit.unused
    def _lookup_tables(self) -> Dict[str, nn.Module]:
        """The inner tables of every lookup group (EBCs, or what DMP sharded them into)."""
        return {name: cast(nn.Module, g.tables) for name, g in [*self.pooled.items(), *self.per_id.items()]}

    @torch.jit.unused
    def _check_use(self, features: KeyedJaggedTensor) -> None:
        """Eager mode only: on the first forward, that the inner tables were sharded consistently;
        after a TrainPipelineSparseDist traced the model, that it pipelined their lookups."""
        if isinstance(features, torch.fx.Proxy):  # being traced: remember whether by a training pipeline
            self._traced_by_pipeline = type(features.tracer).__module__.startswith("torchrec.distributed.train_pipeline")
            return
        if not self._sharding_checked:
            check_sharding(self._lookup_tables())
            self._sharding_checked = True
        if self._traced_by_pipeline:
            self._traced_by_pipeline = False
            warn_if_not_pipelined(self._lookup_tables())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Looks up and pools every feature; returns ``[B, sum of embedding dims]`` keyed by feature."""
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling():  # a check of the eager module, not part of a graph
                self._check_use(features)
        looked_up: Dict[str, KeyedTensor] = {}
        for group, pooled_lookup in self.pooled.items():
            looked_up[group] = pooled_lookup(features)
        for group, per_id_lookup in self.per_id.items():
            looked_up[group] = per_id_lookup(features)
        return self.combine(features, looked_up)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The logical tables as plain TorchRec configs (what DLRM reads its dims and features from)."""
        return [EmbeddingBagConfig(**logical_fields(t)) for t in self._configs]

    def multihash_configs(self) -> List[MultiHashEmbeddingBagConfig]:
        """The configs this module was built from."""
        return list(self._configs)

    def sub_table_configs(self) -> List[EmbeddingBagConfig]:
        """The physical sub-tables (``t_C1``, ``t_C1__r``, ...; ``t_C1__parts`` for a table with
        ``stack_parts``) the planner sees."""
        return list(self._sub_table_configs)

    def sub_table_weights(self) -> Dict[str, torch.Tensor]:
        """Weight of every physical sub-table by name (unsharded module): a table with
        ``stack_parts`` has one, ``<table>__parts`` (see ``part_weights``)."""
        weights: Dict[str, torch.Tensor] = {}
        for group in [*self.pooled.values(), *self.per_id.values()]:
            inner = cast(EmbeddingBagCollection, group.tables)
            for name, table in inner.embedding_bags.items():
                weights[name] = cast(torch.Tensor, table.weight)
        return weights

    def part_weights(self) -> Dict[str, torch.Tensor]:
        """Weight of every logical sub-table by its strategy's name (``t_C1``, ``t_C1__r``, ...;
        unsharded module): those of a table with ``stack_parts`` are copies of its rows of the
        stacked weight (writing one leaves the table as it is), the others ``sub_table_weights``'."""
        stored = self.sub_table_weights()
        weights: Dict[str, torch.Tensor] = {}
        for t in self._configs:
            impl = t.strategy_impl()
            if not impl.is_stacked():
                weights.update((s.name, stored[s.name]) for s in impl.sub_tables())
                continue
            stacked = stored[stacked_table_name(t.name)]
            for s, placed in zip(impl.sub_tables(), impl.stacked_rows()):
                weights[s.name] = stacked.index_select(0, stacked_part_rows(placed, s.num_embeddings, stacked.device))
        return weights

    def reset_parameters(self) -> None:
        """Draws every sub-table's weights again from its initial range, as TorchRec's EBC does
        (unsharded sub-tables: TorchRec's sharded modules initialize their own); learned mappings
        are kept (they are fitted, not drawn)."""
        for group in [*self.pooled.values(), *self.per_id.values()]:
            if isinstance(group.tables, EmbeddingBagCollection):
                group.tables.reset_parameters()

    @property
    def embedding_bags(self) -> Mapping[str, nn.Module]:
        """A read-only view for tools written for TorchRec's EBC (its ``embedding_bags``): each stored
        sub-table's module by its name (``t_C1``, ``t_C1__r``, ``t_C1__parts``, ...), and each table's
        name that no sub-table holds (a stacked add's) for its first sub-table. A table's embeddings are
        composed of its sub-tables' rows: read them with ``composed_embeddings(module, table, ids)``;
        weights by part with ``part_weights()``."""
        bags: Dict[str, nn.Module] = {}
        for group in [*self.pooled.values(), *self.per_id.values()]:
            bags.update(cast(EmbeddingBagCollection, group.tables).embedding_bags.items())
        for t in self._configs:
            first = t.strategy_impl().stored_tables()[0].name
            if t.name not in bags and first in bags:
                bags[t.name] = bags[first]
        return MappingProxyType(bags)

    def learned_mappings(self) -> Dict[str, LearnedMapping]:
        """The learned id -> row mapping of each learned table, by table name."""
        return {name: cast(LearnedMapping, m) for module in self.modules() if isinstance(module, IdTransform) for name, m in module.mappings.items()}

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def memory_bytes(self) -> int:
        """Bytes of all sub-tables and learned mappings (exact; independent of device or sharding)."""
        return sum(t.strategy_impl().memory_bytes() for t in self._configs)

    def full_memory_bytes(self) -> int:
        """Bytes the same logical tables would take uncompressed, N x D fp32 values each (TorchRec's
        default rows): the reference of every compression figure, so fp16 rows count as 2x."""
        return sum(t.num_embeddings * t.embedding_dim * 4 for t in self._configs)
