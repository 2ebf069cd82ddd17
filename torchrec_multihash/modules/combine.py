"""The parameter-free module that composes sub-table lookups into one pooled embedding per feature."""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@dataclass
class OutputSpec:
    """How the output embedding of one logical feature is built.

    ``group`` is the lookup group whose output holds the parts (an inner EmbeddingBagCollection,
    SUM pooling): for a pooled group the parts are already pooled per bag; for a per-id group
    (bags exploded into one bag per id) they are one row per id, composed per id and then pooled.
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


def _bag_index(
    lengths: List[torch.Tensor], weights: Optional[List[torch.Tensor]], counts: List[int], rows: int, mean: bool, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each per-id row of ``n`` features pools to, and with what factor: for the ``i``-th id
    of feature ``f`` (row ``i * n + f`` of an ``[rows, n]`` grid), ``index`` is its bag's row
    ``b * n + f`` of a ``[batch, n]`` output and ``scale`` its weight (1 unweighted), divided by its
    bag's length for MEAN; padding rows (``i`` past the feature's ``counts[f]`` ids) scale by 0."""
    n = len(lengths)
    batch = lengths[0].numel()
    device = lengths[0].device
    flat = torch.cat(lengths) if n > 1 else lengths[0]
    total = sum(counts)
    bag = torch.repeat_interleave(torch.arange(n * batch, device=device), flat, output_size=total)  # f * batch + b
    f = torch.div(bag, batch, rounding_mode="floor")
    b = bag - f * batch
    starts: List[int] = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    pos = torch.arange(total, device=device) - torch.tensor(starts, device=device).index_select(0, f)
    dest = pos * n + f
    index = torch.zeros(rows * n, dtype=torch.long, device=device).index_put_((dest,), b * n + f)
    factor = torch.ones(total, dtype=dtype, device=device)
    if weights is not None:
        factor = (torch.cat(weights) if n > 1 else weights[0]).to(dtype)
    if mean:
        factor = factor / flat.clamp(min=1).to(dtype).index_select(0, bag)
    scale = torch.zeros(rows * n, dtype=dtype, device=device).index_put_((dest,), factor)
    return index, scale


def _compose_plain(
    values: torch.Tensor, columns: List[int], dim: int, index: torch.Tensor, scale: torch.Tensor, batch: int, n: int, k: int
) -> torch.Tensor:
    """``_ComposePerId`` in plain ops (scripted and traced models; autograd's own backward)."""
    rows = values.size(0)
    prods: List[torch.Tensor] = []
    for f in range(n):
        prod = values[:, columns[f * k] : columns[f * k] + dim]
        for p in range(1, k):
            c = columns[f * k + p]
            prod = prod * values[:, c : c + dim]
        prods.append(prod)
    stacked = torch.stack(prods, dim=1) * scale.view(rows, n, 1)
    pooled = torch.zeros(batch * n, dim, dtype=values.dtype, device=values.device).index_add(0, index, stacked.reshape(rows * n, dim))
    return pooled.view(batch, n * dim)


class _ComposePerId(torch.autograd.Function):
    """Product over parts, per id, then pooled into bags, in one op with a hand-written backward.

    ``values``: the per-id lookup's output, ``[rows, width]``, row ``i`` the ``i``-th id of every
    feature; part ``p`` of feature ``f`` is its ``dim`` columns from ``columns[f * k + p]`` (read
    where TorchRec put them: no regrouping copy). Out: ``[batch, n * dim]``. The backward gathers
    the output's gradient per id (one ``index_select``), scales it, and writes each part's gradient
    (that times the other parts) straight into its columns of the lookup's gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, columns: List[int], dim: int, index: torch.Tensor, scale: torch.Tensor, batch: int, n: int, k: int
    ) -> torch.Tensor:
        rows = values.size(0)
        prod = torch.empty(rows, n, dim, dtype=values.dtype, device=values.device)
        for f in range(n):
            cols = [values[:, c : c + dim] for c in columns[f * k : (f + 1) * k]]
            if k == 1:
                prod[:, f].copy_(cols[0])
                continue
            torch.mul(cols[0], cols[1], out=prod[:, f])
            for c in cols[2:]:
                prod[:, f].mul_(c)
        prod.mul_(scale.view(rows, n, 1))
        pooled = torch.zeros(batch * n, dim, dtype=prod.dtype, device=prod.device).index_add_(0, index, prod.view(rows * n, dim))
        ctx.save_for_backward(values, index, scale)
        ctx.spec = (columns, dim, batch, n, k)
        return pooled.view(batch, n * dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        values, index, scale = ctx.saved_tensors
        columns, dim, batch, n, k = ctx.spec
        rows = values.size(0)
        g = grad.reshape(batch * n, dim).index_select(0, index).view(rows, n, dim).mul_(scale.view(rows, n, 1))
        # every column written below: no zero fill, unless other pieces read other columns
        covered = len(set(columns)) * dim == values.size(1)
        out = torch.empty_like(values) if covered else torch.zeros_like(values)
        for f in range(n):
            cs = columns[f * k : (f + 1) * k]
            for p in range(k):
                dst = out[:, cs[p] : cs[p] + dim]
                if k == 1:
                    dst.copy_(g[:, f])
                    continue
                others = [c for q, c in enumerate(cs) if q != p]
                torch.mul(g[:, f], values[:, others[0] : others[0] + dim], out=dst)
                for c in others[1:]:
                    dst.mul_(values[:, c : c + dim])
        return out, None, None, None, None, None, None, None


@torch.jit.unused
def _compose_fused(
    values: torch.Tensor, columns: List[int], dim: int, index: torch.Tensor, scale: torch.Tensor, batch: int, n: int, k: int
) -> torch.Tensor:
    return _ComposePerId.apply(values, columns, dim, index, scale, batch, n, k)


@torch.fx.wrap
def _per_id_bags(
    kt: KeyedTensor,
    keys: List[str],
    dim: int,
    lengths: List[torch.Tensor],
    ids: List[torch.Tensor],
    weights: Optional[List[torch.Tensor]],
    k: int,
    mean: bool,
) -> torch.Tensor:
    """The pooled products of ``n`` per-id features, ``[batch, n * dim]``, from the per-id lookup's
    output ``kt`` (``rows`` >= each feature's id count, the rest padding): ``keys`` are the
    features' parts (feature-major), ``lengths``/``ids``/``weights`` the features' bags (a leaf
    call for fx)."""
    offsets = kt.offset_per_key()
    where: Dict[str, int] = {}
    kt_keys = kt.keys()
    for i in range(len(kt_keys)):
        where[kt_keys[i]] = offsets[i]
    columns: List[int] = [where[key] for key in keys]
    values = kt.values()
    counts: List[int] = [v.numel() for v in ids]
    index, scale = _bag_index(lengths, weights, counts, values.size(0), mean, values.dtype)
    batch, n = lengths[0].numel(), len(lengths)
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return _compose_plain(values, columns, dim, index, scale, batch, n, k)
    return _compose_fused(values, columns, dim, index, scale, batch, n, k)


@torch.fx.wrap
def _in_layout(kt: KeyedTensor, layout: List[str]) -> torch.Tensor:
    """``kt``'s values with its columns in the order of the keys ``layout``: the values themselves
    when TorchRec's output already has that order (an unsharded or single-sharding-type EBC), else one
    ``index_select`` of its columns (a sharded EBC orders its keys by sharding type)."""
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
    # one index_select of blocks of columns (a gather of rows of a [batch, blocks, block] view;
    # a gather of single columns is several times slower, forward and backward, on CPU)
    block = 0
    for j in range(len(starts)):
        block = math.gcd(block, math.gcd(starts[j], ends[j]))
    block = math.gcd(block, values.size(1))
    blocks = torch.cat([torch.arange(starts[j] // block, ends[j] // block, device=values.device) for j in range(len(starts))])
    return values.view(values.size(0), -1, block).index_select(1, blocks).view(values.size(0), -1)


@torch.fx.wrap
def _renamed(kt: KeyedTensor, names: Dict[str, str]) -> KeyedTensor:
    """``kt`` itself, its keys renamed (sub-feature -> output name), in TorchRec's order."""
    keys = kt.keys()
    return KeyedTensor(keys=[names[keys[i]] for i in range(len(keys))], length_per_key=kt.length_per_key(), values=kt.values())


class Combine(nn.Module):
    """Composes the parts of each feature (add, mult or concat) and pools them into a KeyedTensor.

    The outputs are cut into pieces: runs of consecutive outputs of one group and kind, each
    composed by one op. The pooled group's output (a SUM-pooled EBC) is read in one layout, each
    output's parts side by side in output order (TorchRec's own order unless a sharded EBC
    regrouped its keys by sharding type: then one ``index_select`` of column blocks), each piece a
    view of its columns.

    Add and concat commute with pooling, so their parts arrive pooled (sum of q plus sum of r): a
    run of single-part or concat outputs is the layout's columns as they are, a run of add (one-hot
    mult) outputs one sum (product) over a ``[batch, outputs, parts, dim]`` view. Mult does not
    commute with pooling: its parts arrive per id (the per-id group's transform made one bag per
    id, so row ``i`` of the per-id EBC's output holds the ``i``-th id of every feature), and a run
    of them is multiplied over the parts, where TorchRec put them (no regrouping copy), and pooled
    back into bags -- sum_i w_i * q[x_i] * r[x_i] -- by one fused op with its own backward
    (``_ComposePerId``; plain ops when scripted or traced). A module of single-part SUM tables
    only (full, hash, learned) returns the lookup's KeyedTensor as it is, keys renamed (sharded:
    in TorchRec's order, by sharding type, as TorchRec's EBC returns them; read it by key). One-hot mult tables
    (``max_ids_per_bag=1``) are looked up pooled: a bag's pooled rows are its one id's rows (the id
    transform weights only the first part). MEAN divides the weighted sum by the number of ids in
    the bag (as FBGEMM does); an empty bag gives zeros. The forward reads plain lists
    (fx-traceable, scriptable).
    """

    _keys: List[str]
    _dims: List[int]
    _layout_groups: List[str]
    _layouts: List[List[str]]
    _splits: List[List[int]]
    _piece_group: List[str]
    _piece_start: List[int]
    _piece_end: List[int]
    _piece_op: List[int]
    _piece_n: List[int]
    _piece_k: List[int]
    _piece_per_id: List[bool]
    _piece_mean: List[List[str]]
    _piece_features: List[List[str]]
    _piece_is_mean: List[bool]
    _piece_keys: List[List[str]]
    _names: Dict[str, str]
    _piece_chunk: List[int]

    def __init__(self, outputs: List[OutputSpec], is_weighted: bool) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._keys = [o.name for o in outputs]
        self._dims = [o.dim for o in outputs]
        self._needs_features = any(o.per_id or o.pooling == PoolingType.MEAN for o in outputs)
        self._plan_pieces(outputs)
        # every output one sub-feature of one pooled group, as it is (full, hash, learned tables):
        # the lookup's KeyedTensor is the output, its keys renamed and in TorchRec's order (a
        # sharded EBC orders them by sharding type, as TorchRec's own EBC returns them)
        self._passthrough = (
            len(self._layout_groups) == 1
            and all(not o.per_id and len(o.sub_features) == 1 and o.pooling != PoolingType.MEAN for o in outputs)
            and len({o.sub_features[0] for o in outputs}) == len(outputs)
        )
        self._names = {o.sub_features[0]: o.name for o in outputs} if self._passthrough else {}

    def _plan_pieces(self, outputs: List[OutputSpec]) -> None:
        """The layout of each group and the outputs' pieces: runs of consecutive outputs of one
        group and kind, each a column range of its group's layout."""
        layouts: Dict[str, List[str]] = {}
        width: Dict[str, int] = {}
        self._piece_group, self._piece_start, self._piece_end, self._piece_op = [], [], [], []
        self._piece_n, self._piece_k, self._piece_per_id, self._piece_mean, self._piece_features = [], [], [], [], []
        self._piece_is_mean, self._piece_keys = [], []
        last: Optional[tuple] = None
        for o in outputs:
            mean = o.pooling == PoolingType.MEAN
            k = len(o.sub_features)
            op = 0 if k == 1 or o.operation == "concat" else _OPS[o.operation]
            if o.per_id:
                op = 2
            span = o.dim * (k if op else 1)
            start = width.get(o.group, 0)
            width[o.group] = start + span
            if not o.per_id:  # per-id pieces read their parts where the lookup put them
                layouts.setdefault(o.group, []).extend(o.sub_features)
            # per-id pieces pool (and divide for MEAN) themselves; pooled ones divide afterwards
            divide = [o.feature] if mean and not o.per_id else []
            kind = (o.group, o.per_id, op, k, o.dim if (op or mean) else 0, mean)
            if kind == last and start == self._piece_end[-1]:
                self._piece_end[-1] += span
                self._piece_n[-1] += 1
                self._piece_mean[-1] += divide
                self._piece_features[-1].append(o.feature)
                self._piece_keys[-1].extend(o.sub_features)
            else:
                self._piece_group.append(o.group)
                self._piece_start.append(start)
                self._piece_end.append(start + span)
                self._piece_op.append(op)
                self._piece_n.append(1)
                self._piece_k.append(k)
                self._piece_per_id.append(o.per_id)
                self._piece_mean.append(divide)
                self._piece_features.append([o.feature])
                self._piece_is_mean.append(mean)
                self._piece_keys.append(list(o.sub_features))
            last = kind
        self._layout_groups = list(layouts)
        self._layouts = list(layouts.values())
        # each group's layout is cut into its pieces by one split (one cat in the backward; a
        # slice per piece would zero-fill the whole layout's gradient once per piece)
        self._splits = [
            [e - b for g, b, e, i in zip(self._piece_group, self._piece_start, self._piece_end, self._piece_per_id) if g == group and not i]
            for group in self._layout_groups
        ]
        chunk: Dict[str, int] = {}
        self._piece_chunk = []
        for g, per_id in zip(self._piece_group, self._piece_per_id):
            self._piece_chunk.append(-1 if per_id else chunk.get(g, 0))
            chunk[g] = chunk.get(g, 0) + (0 if per_id else 1)

    def _pooled_piece(self, p: int, cols: torch.Tensor) -> torch.Tensor:
        """Piece ``p`` from its columns of a pooled layout, [batch, its outputs' dims]."""
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

    def _per_id_piece(self, p: int, kt: KeyedTensor, by_key: Dict[str, JaggedTensor]) -> torch.Tensor:
        """Per-id piece ``p`` from its group's per-id lookup ``kt``, pooled: [batch, n * dim]."""
        fs = self._piece_features[p]
        lengths = [by_key[f].lengths() for f in fs]
        ids = [by_key[f].values() for f in fs]
        weights: Optional[List[torch.Tensor]] = [by_key[f].weights() for f in fs] if self._is_weighted else None
        dim = (self._piece_end[p] - self._piece_start[p]) // (self._piece_n[p] * self._piece_k[p])
        return _per_id_bags(kt, self._piece_keys[p], dim, lengths, ids, weights, self._piece_k[p], self._piece_is_mean[p])

    def forward(self, features: KeyedJaggedTensor, looked_up: Dict[str, KeyedTensor]) -> KeyedTensor:
        if self._passthrough:
            return _renamed(looked_up[self._layout_groups[0]], self._names)
        by_key: Dict[str, JaggedTensor] = features.to_dict() if self._needs_features else {}
        chunks: Dict[str, List[torch.Tensor]] = {}
        for g in range(len(self._layout_groups)):
            values = _in_layout(looked_up[self._layout_groups[g]], self._layouts[g])
            chunks[self._layout_groups[g]] = _split_columns(values, self._splits[g])
        results: List[torch.Tensor] = []
        for p in range(len(self._piece_op)):
            if self._piece_per_id[p]:
                results.append(self._per_id_piece(p, looked_up[self._piece_group[p]], by_key))
                continue
            out = self._pooled_piece(p, chunks[self._piece_group[p]][self._piece_chunk[p]])
            mean = self._piece_mean[p]
            if len(mean) > 0:
                lengths = torch.stack([by_key[f].lengths() for f in mean], dim=1).clamp(min=1).to(out.dtype)
                out = (out.reshape(out.size(0), len(mean), -1) / lengths.unsqueeze(2)).reshape(out.size(0), -1)
            results.append(out)
        values = results[0] if len(results) == 1 else torch.cat(results, dim=1)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values)
