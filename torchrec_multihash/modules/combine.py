"""The parameter-free module that composes sub-table lookups into one pooled embedding per feature."""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass
class OutputSpec:
    """How the output embedding of one logical feature is built.

    ``group`` is the lookup group whose output holds the parts: for a pooled group (an inner
    EmbeddingBagCollection, SUM pooling) the parts are already pooled per bag; for a per-id group
    (an inner EmbeddingCollection) they are one row per id, composed per id and then pooled.
    """

    name: str  # output key (the feature name, or feature@table for a feature in several tables)
    feature: str  # the KJT key it reads lengths and weights from
    group: str
    per_id: bool
    sub_features: List[str]
    operation: str
    pooling: PoolingType
    dim: int


_OPS = {"add": 1, "mult": 2}


@torch.fx.wrap
def _split_columns(values: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    """``values`` cut into column blocks of ``sizes`` (a leaf call for fx, which cannot iterate a proxy)."""
    if len(sizes) == 1:
        return [values]
    return list(values.split(sizes, dim=1))


@torch.fx.wrap
def _sum_bags(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums consecutive ``rows`` into bags of ``lengths`` rows ([bags, dim]; an empty bag is 0)."""
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths, output_size=rows.size(0))
    pooled = torch.zeros(lengths.numel(), rows.size(1), dtype=rows.dtype, device=rows.device)
    return pooled.index_add(0, bag, rows)


@torch.fx.wrap
def _in_layout(kt: KeyedTensor, layout: List[str]) -> torch.Tensor:
    """``kt``'s values with its columns in the order of the keys ``layout``: the values themselves
    when TorchRec's output already has that order (an unsharded or single-sharding-type EBC), else one
    copy of the runs of columns (a sharded EBC orders its keys by sharding type)."""
    keys = kt.keys()
    values = kt.values()
    if keys == layout:
        return values
    offsets = kt.offset_per_key()
    index: Dict[str, int] = {}
    for i in range(len(keys)):
        index[keys[i]] = i
    starts: List[int] = []
    ends: List[int] = []
    for key in layout:
        i = index[key]
        if len(ends) > 0 and ends[-1] == offsets[i]:
            ends[-1] = offsets[i + 1]
        else:
            starts.append(offsets[i])
            ends.append(offsets[i + 1])
    if len(starts) == 1:
        return values[:, starts[0] : ends[0]]
    return torch.cat([values[:, starts[j] : ends[j]] for j in range(len(starts))], dim=1)


class Combine(nn.Module):
    """Composes the parts of each feature (add, mult or concat) and pools them into a KeyedTensor.

    Add and concat commute with pooling, so their parts arrive pooled (sum of q plus sum of r);
    mult does not, so its parts arrive per id and the product is taken per id before pooling:
    sum_i w_i * q[x_i] * r[x_i] -- except on one-hot tables (``max_ids_per_bag=1``), where a bag's
    pooled rows are its one id's rows (the id transform weights only the first part), so their
    parts arrive pooled too and are multiplied as they are. MEAN divides the weighted sum by the
    number of ids in the bag (as FBGEMM does); an empty bag gives zeros.

    The pooled group's output is read in one layout, each output's parts side by side in output
    order (TorchRec's own order unless a sharded EBC regrouped its keys), so consecutive outputs of
    one kind are composed by one op on a view: a run of single-part or concat outputs is the
    layout's columns as they are, a run of add (mult) outputs one sum (product) over a
    ``[batch, outputs, parts, dim]`` view. The forward reads plain lists (fx-traceable, scriptable).
    """

    _keys: List[str]
    _dims: List[int]
    _features: List[str]
    _subs: List[List[str]]
    _batch_groups: List[str]
    _batch_outputs: List[List[int]]
    _layout_groups: List[str]
    _layouts: List[List[str]]
    _splits: List[List[int]]
    _piece_group: List[str]
    _piece_start: List[int]
    _piece_end: List[int]
    _piece_op: List[int]
    _piece_n: List[int]
    _piece_k: List[int]
    _piece_per_id: List[int]
    _piece_mean: List[List[str]]
    _piece_chunk: List[int]

    def __init__(self, outputs: List[OutputSpec], is_weighted: bool) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._keys = [o.name for o in outputs]
        self._dims = [o.dim for o in outputs]
        self._features = [o.feature for o in outputs]
        self._subs = [list(o.sub_features) for o in outputs]
        self._needs_features = any(o.per_id or o.pooling == PoolingType.MEAN for o in outputs)
        # per-id outputs composed together: same group (one dim) and number of parts
        batches: Dict[tuple, List[int]] = {}
        for i, o in enumerate(outputs):
            if o.per_id:
                batches.setdefault((o.group, len(o.sub_features)), []).append(i)
        self._batch_groups = [g for g, _ in batches]
        self._batch_outputs = list(batches.values())
        self._plan_pieces(outputs)

    def _plan_pieces(self, outputs: List[OutputSpec]) -> None:
        """The layout of each pooled group and the output's pieces: runs of consecutive pooled
        outputs of one group and kind (a column range of the layout), or one per-id output."""
        layouts: Dict[str, List[str]] = {}
        width: Dict[str, int] = {}
        self._piece_group, self._piece_start, self._piece_end, self._piece_op = [], [], [], []
        self._piece_n, self._piece_k, self._piece_per_id, self._piece_mean = [], [], [], []
        last: Optional[tuple] = None
        for i, o in enumerate(outputs):
            mean = o.pooling == PoolingType.MEAN
            if o.per_id:
                self._add_piece("", 0, 0, 0, 1, i, [o.feature] if mean else [])
                last = None
                continue
            k = len(o.sub_features)
            op = 0 if k == 1 or o.operation == "concat" else _OPS[o.operation]
            span = o.dim * (k if op else 1)
            start = width.get(o.group, 0)
            layouts.setdefault(o.group, []).extend(o.sub_features)
            width[o.group] = start + span
            kind = (o.group, op, k, o.dim if (op or mean) else 0, mean)
            if kind == last:
                self._piece_end[-1] += span
                self._piece_n[-1] += 1
                self._piece_mean[-1] += [o.feature] if mean else []
            else:
                self._add_piece(o.group, start, start + span, op, k, -1, [o.feature] if mean else [])
            last = kind
        self._layout_groups = list(layouts)
        self._layouts = list(layouts.values())
        # each group's layout is cut into its pieces by one split (one cat in the backward; a
        # slice per piece would zero-fill the whole layout's gradient once per piece)
        self._splits = [
            [e - b for g, b, e in zip(self._piece_group, self._piece_start, self._piece_end) if g == group] for group in self._layout_groups
        ]
        chunk: Dict[str, int] = {}
        self._piece_chunk = []
        for g in self._piece_group:
            self._piece_chunk.append(chunk.get(g, 0))
            chunk[g] = chunk.get(g, 0) + 1

    def _add_piece(self, group: str, start: int, end: int, op: int, k: int, per_id: int, mean: List[str]) -> None:
        self._piece_group.append(group)
        self._piece_start.append(start)
        self._piece_end.append(end)
        self._piece_op.append(op)
        self._piece_n.append(1)
        self._piece_k.append(k)
        self._piece_per_id.append(per_id)
        self._piece_mean.append(mean)

    def _per_id_pooled(
        self, outputs: List[int], by_key: Dict[str, JaggedTensor], rows_by_sub: Dict[str, JaggedTensor], batch_size: int
    ) -> torch.Tensor:
        """Sum-pooled per-id products of ``outputs`` (one per-id group, one dim), [outputs, batch,
        dim]: the parts of all features are multiplied in one go and pooled with one ``index_add``."""
        rows = torch.cat([rows_by_sub[self._subs[o][0]].values() for o in outputs]).float()
        for k in range(1, len(self._subs[outputs[0]])):
            rows = rows * torch.cat([rows_by_sub[self._subs[o][k]].values() for o in outputs]).float()
        if self._is_weighted:
            rows = rows * torch.cat([by_key[self._features[o]].weights() for o in outputs]).unsqueeze(1)
        lengths = torch.cat([by_key[self._features[o]].lengths() for o in outputs])
        return _sum_bags(rows, lengths).view(len(outputs), batch_size, -1)

    def _pooled_piece(self, p: int, cols: torch.Tensor) -> torch.Tensor:
        """Piece ``p`` from its columns of the pooled layout, [batch, its outputs' dims]."""
        op = self._piece_op[p]
        if op == 0:  # single parts, concat: the columns as they are
            return cols
        n, k = self._piece_n[p], self._piece_k[p]
        parts = cols.reshape(cols.size(0), n, k, -1)
        if op == 1:  # add
            out = parts.sum(2)
        else:  # mult of one-hot bags
            each = parts.unbind(2)
            out = each[0]
            for j in range(1, k):
                out = out * each[j]
        return out.reshape(cols.size(0), -1)

    def forward(
        self,
        features: KeyedJaggedTensor,
        pooled: Dict[str, KeyedTensor],
        per_id: Dict[str, Dict[str, JaggedTensor]],
    ) -> KeyedTensor:
        batch_size = features.stride()
        by_key: Dict[str, JaggedTensor] = features.to_dict() if self._needs_features else {}
        chunks: Dict[str, List[torch.Tensor]] = {}
        for g in range(len(self._layout_groups)):
            values = _in_layout(pooled[self._layout_groups[g]], self._layouts[g])
            chunks[self._layout_groups[g]] = _split_columns(values, self._splits[g])
        per_id_out: Dict[int, torch.Tensor] = {}
        for b in range(len(self._batch_groups)):
            outs = self._batch_outputs[b]
            composed = self._per_id_pooled(outs, by_key, per_id[self._batch_groups[b]], batch_size).unbind(0)
            for k in range(len(outs)):
                per_id_out[outs[k]] = composed[k]
        results: List[torch.Tensor] = []
        for p in range(len(self._piece_op)):
            o = self._piece_per_id[p]
            out = per_id_out[o] if o >= 0 else self._pooled_piece(p, chunks[self._piece_group[p]][self._piece_chunk[p]])
            mean = self._piece_mean[p]
            if len(mean) > 0:
                lengths = torch.stack([by_key[f].lengths() for f in mean], dim=1).clamp(min=1).to(out.dtype)
                out = (out.reshape(out.size(0), len(mean), -1) / lengths.unsqueeze(2)).reshape(out.size(0), -1)
            results.append(out)
        values = results[0] if len(results) == 1 else torch.cat(results, dim=1)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values)
