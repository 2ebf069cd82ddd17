"""MultiHashEmbeddingBagCollection: a drop-in EmbeddingBagCollection built from small sub-tables."""

from collections import Counter
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import (
    DATA_TYPE_NUM_BITS,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    EmbeddingCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.combine import Combine, OutputSpec
from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.id_transform import FeatureLookup, IdTransform
from torchrec_multihash.modules.initialization import partition_init_ranges
from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.partition import Partitioner

POOLED_GROUP = "pooled"


def _per_id_group(dim: int) -> str:
    return f"per_id_d{dim}"


class MultiHashEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` whose tables are compositional (multi-hash) embeddings.

    KJT in, KeyedTensor out (keyed by the original feature names), so it drops into
    ``torchrec.models.dlrm.DLRM``. The data path::

        KJT -> IdTransform (ids -> sub-table rows) -> inner EmbeddingBagCollection /
        EmbeddingCollection (ordinary TorchRec tables) -> Combine (add | mult | concat, pool)
        -> KeyedTensor

    Tables with add or concat (and single-table strategies) are looked up pooled in one inner
    ``EmbeddingBagCollection`` (``lookups["pooled"]``): pooling commutes with them. Tables with
    mult are looked up per id in an inner ``EmbeddingCollection`` (``lookups["per_id_d{dim}"]``)
    and multiplied per id before pooling. Both are stock TorchRec modules, so TorchRec's planner
    and sharders place the sub-tables like any other table.

    Args:
        tables: one ``MultiHashEmbeddingBagConfig`` per logical table.
        is_weighted: the KJT carries per-sample weights.
        device: where the sub-tables live ("meta" for deferred init under DMP).
        validate_ids: raise on ids outside [0, num_embeddings) (one host sync per batch).
        strict_features: raise on KJT keys that no table looks up (TorchRec's EBC ignores them).
    """

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
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self._device = torch.device(device) if device is not None else torch.device("cpu")

        feature_tables = Counter(f for t in tables for f in t.feature_names)
        output_names = get_embedding_names_by_table(self.embedding_bag_configs())
        self._embedding_names: List[str] = [n for names in output_names for n in names]
        all_features = sorted(feature_tables)

        group_lookups: Dict[str, List[FeatureLookup]] = {}
        group_configs: Dict[str, list] = {}
        outputs: List[OutputSpec] = []
        self._sub_table_configs: List[EmbeddingBagConfig] = []
        for t, names in zip(tables, output_names):
            per_id = t.looks_up_per_id()
            group = _per_id_group(t.embedding_dim) if per_id else POOLED_GROUP
            suffixes = t.partition_suffixes()
            dims = t.partition_dims()
            ranges = partition_init_ranges(t)
            sizes = t.partition_sizes()
            partitioner = Partitioner(t)
            mapping = LearnedMapping(t, device=self._device) if t.is_learned() else None

            def sub_feature(f: str, suffix: str) -> str:
                # A feature looked up by several tables gets the table in its sub-feature names.
                base = f if feature_tables[f] == 1 else f"{f}@{t.name}"
                return base + suffix

            for suffix, rows, dim, (lo, hi) in zip(suffixes, sizes, dims, ranges):
                kwargs = dict(
                    name=t.name + suffix,
                    num_embeddings=rows,
                    embedding_dim=dim,
                    feature_names=[sub_feature(f, suffix) for f in t.feature_names],
                    data_type=t.data_type,
                    weight_init_min=lo,
                    weight_init_max=hi,
                    init_fn=t.init_fn,
                )
                cfg = EmbeddingConfig(**kwargs) if per_id else EmbeddingBagConfig(
                    pooling=PoolingType.SUM, **kwargs
                )
                group_configs.setdefault(group, []).append(cfg)
                self._sub_table_configs.append(cfg)
            for f, name in zip(t.feature_names, names):
                subs = [sub_feature(f, s) for s in suffixes]
                group_lookups.setdefault(group, []).append(
                    FeatureLookup(f, t.name, t.num_embeddings, partitioner, subs, mapping)
                )
                outputs.append(
                    OutputSpec(name, f, group, per_id, subs, t.operation, t.pooling, t.embedding_dim)
                )

        self._groups: List[str] = list(group_configs)
        # Each id transform is a direct child (``transform_pooled``, ``transform_per_id_d16``):
        # TrainPipelineSparseDist's tracer treats a child without sharded modules as a leaf, so a
        # transform must not sit inside a ModuleDict to be found and pipelined.
        self.lookups = nn.ModuleDict()
        for i, group in enumerate(self._groups):
            transform = IdTransform(
                group_lookups[group],
                is_weighted=is_weighted,
                validate_ids=validate_ids,
                # one transform checks for unknown keys; the rest need not repeat it
                known_features=all_features if (strict_features and i == 0) else None,
            )
            self.add_module(f"transform_{group}", transform)
            if group == POOLED_GROUP:
                self.lookups[group] = EmbeddingBagCollection(
                    tables=group_configs[group], is_weighted=is_weighted, device=self._device
                )
            else:
                self.lookups[group] = EmbeddingCollection(
                    tables=group_configs[group], device=self._device
                )
        self._pooled_groups = [g for g in self._groups if g == POOLED_GROUP]
        self._per_id_groups = [g for g in self._groups if g != POOLED_GROUP]
        self.combine = Combine(outputs, is_weighted=is_weighted)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Looks up and pools every feature; returns ``[B, sum of embedding dims]`` keyed by feature."""
        pooled: Dict[str, KeyedTensor] = {}
        per_id: Dict[str, Dict[str, JaggedTensor]] = {}
        for group in self._pooled_groups:
            pooled[group] = self.lookups[group](getattr(self, f"transform_{group}")(features))
        for group in self._per_id_groups:
            per_id[group] = self.lookups[group](getattr(self, f"transform_{group}")(features))
        return self.combine(features, pooled, per_id)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The logical tables as plain TorchRec configs (what DLRM reads its dims and features from)."""
        return [
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                feature_names=list(t.feature_names),
                pooling=t.pooling,
                data_type=t.data_type,
                weight_init_min=t.weight_init_min,
                weight_init_max=t.weight_init_max,
            )
            for t in self._configs
        ]

    def multihash_configs(self) -> List[MultiHashEmbeddingBagConfig]:
        """The configs this module was built from."""
        return list(self._configs)

    def sub_table_configs(self) -> List[EmbeddingBagConfig]:
        """The physical sub-tables (``t_C1__q``, ``t_C1__r``, ...) the planner sees."""
        return list(self._sub_table_configs)

    def sub_table_weights(self) -> Dict[str, torch.Tensor]:
        """Weight of every sub-table by name (unsharded module)."""
        weights: Dict[str, torch.Tensor] = {}
        for lookup in self.lookups.values():
            tables = getattr(lookup, "embedding_bags", None) or getattr(lookup, "embeddings")
            for name, table in tables.items():
                weights[name] = table.weight
        return weights

    def learned_mappings(self) -> Dict[str, LearnedMapping]:
        """The learned id -> row mapping of each learned table, by table name."""
        return {
            name: m for module in self.modules() if isinstance(module, IdTransform) for name, m in module.mappings.items()
        }

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def memory_bytes(self) -> int:
        """Bytes of all sub-tables and of the learned mappings (exact; independent of device or
        sharding)."""
        table_bytes = sum(
            c.num_embeddings * c.embedding_dim * DATA_TYPE_NUM_BITS[c.data_type] // 8
            for c in self._sub_table_configs
        )
        # our own buffers (the learned mappings), not those a sharded inner module may add
        buffer_bytes = sum(
            b.numel() * b.element_size() for m in self.learned_mappings().values() for b in m.buffers()
        )
        return table_bytes + buffer_bytes

    def full_memory_bytes(self) -> int:
        """Bytes the same logical tables would take uncompressed (N x D each)."""
        return sum(
            t.num_embeddings * t.embedding_dim * DATA_TYPE_NUM_BITS[t.data_type] // 8
            for t in self._configs
        )
