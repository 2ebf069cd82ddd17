"""A naive reference for multi-hash lookups: loops over ids in pure Python."""

import math
from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashEmbeddingBagConfig


def learned_row(cfg: MultiHashEmbeddingBagConfig, mapping: Dict[int, int], x: int) -> int:
    """A learned table's row: the mapping's, or the fallback hash into the last rows."""
    if x in mapping:
        return mapping[x]
    fallback = cfg.fallback_rows
    return cfg.mapping_rows - fallback + x % fallback


def partition_rows(cfg: MultiHashEmbeddingBagConfig, x: int, mapping: Optional[Dict[int, int]] = None) -> List[int]:
    """Row of each sub-table for id x, computed with Python integers."""
    if cfg.has_mapping():
        x = learned_row(cfg, mapping or {}, x)
    if cfg.strategy in ("full", "learned"):
        return [x]
    if cfg.strategy == "hash":
        return [x % math.ceil(cfg.num_embeddings / cfg.num_collisions)]
    if cfg.strategy == "qr":
        m = cfg.num_collisions
        return [x // m, x % m]
    if cfg.strategy == "generalized_qr":
        digits = []
        for m in cfg.moduli:
            x, d = divmod(x, m)
            digits.append(d)
        return digits
    if cfg.strategy == "crt":
        return [x % m for m in cfg.moduli]
    raise AssertionError(cfg.strategy)


def reference_forward(
    cfgs: List[MultiHashEmbeddingBagConfig],
    weights: Dict[str, torch.Tensor],
    kjt: KeyedJaggedTensor,
    mappings: Optional[Dict[str, Dict[int, int]]] = None,
) -> Dict[str, torch.Tensor]:
    """Pooled embedding [B, D] of every feature, built id by id from the sub-table rows
    (``mappings``: the learned id -> row dict of learned tables, by table name)."""
    out: Dict[str, torch.Tensor] = {}
    features = kjt.to_dict()
    batch = kjt.stride()
    for cfg in cfgs:
        suffixes = [s.suffix for s in cfg.strategy_impl().sub_tables()]
        for f in cfg.feature_names:
            jt = features[f]
            vals = jt.values().tolist()
            lens = jt.lengths().tolist()
            w = jt.weights().tolist() if jt.weights_or_none() is not None else [1.0] * len(vals)
            bags = []
            pos = 0
            for b in range(batch):
                acc = torch.zeros(cfg.embedding_dim)
                for i in range(pos, pos + lens[b]):
                    rows = partition_rows(cfg, vals[i], (mappings or {}).get(cfg.name))
                    parts = [weights[cfg.name + s][r] for s, r in zip(suffixes, rows)]
                    if len(parts) == 1:
                        e = parts[0]
                    elif cfg.operation == "add":
                        e = sum(parts[1:], parts[0])
                    elif cfg.operation == "mult":
                        e = parts[0]
                        for p in parts[1:]:
                            e = e * p
                    else:
                        e = torch.cat(parts)
                    acc = acc + w[i] * e
                if cfg.pooling == PoolingType.MEAN and lens[b] > 0:
                    acc = acc / lens[b]
                bags.append(acc)
                pos += lens[b]
            out[f] = torch.stack(bags)
    return out


def part_grads(ebc):
    """The gradient of every part (sub-table name) of an unsharded module: a stacked table's
    gradient cut into its parts' rows, the others' own."""
    from torchrec_multihash.modules.strategies.base import stacked_part_rows, stacked_table_name

    stored = ebc.sub_table_weights()
    grads = {}
    for c in ebc.multihash_configs():
        impl = c.strategy_impl()
        if not impl.is_stacked():
            grads.update((s.name, stored[s.name].grad) for s in impl.sub_tables())
            continue
        grad = stored[stacked_table_name(c.name)].grad
        for s, placed in zip(impl.sub_tables(), impl.stacked_rows()):
            grads[s.name] = grad.index_select(0, stacked_part_rows(placed, s.num_embeddings))
    return grads
