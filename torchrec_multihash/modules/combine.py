"""The parameter-free module that composes sub-table lookups into one pooled embedding per feature."""

from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_multihash.modules.variable_batch import expand_variable_batch

torch.fx.wrap("expand_variable_batch")  # a leaf for fx here too (wrap patches the caller's globals)


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


class Op(Enum):
    """How a run composes its parts: a run's first int (``_column_runs``), its ``value``."""

    COPY = 0  # one part, as it is
    ADD = 1
    MULT = 2
    CONCAT = 3  # equal parts side by side


_OPS = {"add": Op.ADD.value, "mult": Op.MULT.value}


class _Run(NamedTuple):
    """Outputs composed by one op (``_column_runs``): ``n`` outputs at column ``out`` of the result,
    each of ``k`` parts; part ``p`` of the ``i``-th output is ``dim`` columns at ``srcs[p] + i *
    strides[p]`` of the lookup's output."""

    op: int  # an ``Op``'s value
    n: int
    k: int
    dim: int
    out: int
    srcs: List[int]
    strides: List[int]


@torch.fx.wrap
def _split_columns(values: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    """``values`` cut into column blocks of ``sizes`` (a leaf call for fx, which cannot iterate a proxy)."""
    if len(sizes) == 1:
        return [values]
    return list(values.split(sizes, dim=1))


def _bag_index(
    flat: torch.Tensor, weights: Optional[torch.Tensor], counts: List[int], rows: int, mean: bool, dtype: torch.dtype
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Where each per-id row of ``n`` features pools to, and with what factor: for the ``i``-th id
    of feature ``f`` (row ``i * n + f`` of an ``[rows, n]`` grid), ``index`` is its bag's row
    ``b * n + f`` of a ``[batch, n]`` output and ``scale`` its weight, divided by its bag's length
    for MEAN; padding rows (``i`` past the feature's ``counts[f]`` ids) scale by 0. Unweighted SUM:
    no ``scale`` (None), as every factor is 1 and a padding row's parts are zeros (an empty bag's).
    ``flat``: the features' bag lengths one after another; ``weights``: their ids' weights."""
    n = len(counts)
    batch = flat.numel() // n
    device = flat.device
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
    if weights is None and not mean:
        return index, None
    factor = torch.ones(total, dtype=dtype, device=device)
    if weights is not None:
        factor = weights.to(dtype)
    if mean:
        factor = factor / flat.clamp(min=1).to(dtype).index_select(0, bag)
    scale = torch.zeros(rows * n, dtype=dtype, device=device).index_put_((dest,), factor)
    return index, scale


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
    """``_pooled_per_id`` of ``n`` features' bags, ``lengths``/``ids``/``weights`` (a leaf call for fx)."""
    flat_weights = (torch.cat(weights) if len(weights) > 1 else weights[0]) if weights is not None else None
    counts: List[int] = [v.numel() for v in ids]
    n = len(counts)
    runs = _column_runs(kt, _per_id_outputs(keys, n, k), _per_id_ops(n, k))
    return _pooled_per_id(kt, runs, dim, torch.cat(lengths) if len(lengths) > 1 else lengths[0], counts, flat_weights, mean)


def _per_id_outputs(keys: List[str], n: int, k: int) -> List[List[str]]:
    """The parts of each of ``n`` per-id outputs of ``k`` parts, ``keys`` feature-major."""
    return [keys[f * k : (f + 1) * k] for f in range(n)]


def _per_id_ops(n: int, k: int) -> List[int]:
    """The op of each of ``n`` per-id outputs of ``k`` parts: their product, or the one part."""
    return [Op.MULT.value if k > 1 else Op.COPY.value] * n


def _pooled_per_id(
    kt: KeyedTensor,
    runs: List[_Run],
    dim: int,
    lengths: torch.Tensor,
    counts: List[int],
    weights: Optional[torch.Tensor],
    mean: bool,
    buffer: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """The pooled products of ``n`` per-id features, ``[batch, n * dim]``, from the per-id lookup's
    output ``kt`` (``rows`` >= each feature's id count, the rest padding): ``runs`` (``_column_runs``)
    where their parts are; ``lengths``, ``counts`` and ``weights`` the features' bag lengths, id
    counts and ids' weights, one feature after another."""
    n = len(counts)
    values = kt.values()
    batch = lengths.numel() // n
    # scripted, traced, exported or compiled: the transform always explodes; the plain ops (no
    # data-dependent sizes, no fused op with out=)
    plain = torch.jit.is_scripting() or torch.jit.is_tracing()
    if not torch.jit.is_scripting():
        plain = plain or torch.compiler.is_compiling()
    if not plain and values.size(0) == batch:  # the one-hot layout: row b is bag b (see ``IdTransform``)
        return _one_hot_products(values, runs, lengths, weights, n, dim, buffer)
    index, scale = _bag_index(lengths, weights, counts, values.size(0), mean, values.dtype)
    if plain:
        return _compose_per_id_plain(values, runs, index, scale, batch, n, dim)
    return _compose_per_id_fused(values, runs, index, scale, batch, n, dim, buffer)


def _one_hot_products(
    values: torch.Tensor,
    runs: List[_Run],
    lengths: torch.Tensor,
    weights: Optional[torch.Tensor],
    n: int,
    dim: int,
    buffer: Optional[List[torch.Tensor]],
) -> torch.Tensor:
    """``_pooled_per_id`` of a one-hot batch, whose per-id lookup kept the bags (each of at most one
    id): the parts multiplied row by row are the pooled products (MEAN divides by 1; an empty bag's
    parts are zeros), each bag's times its id's weight."""
    batch = lengths.numel() // n
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        out = _compose_runs_plain(values, runs)
    else:
        out = _compose_runs_fused(values, runs, n * dim, buffer)
    if weights is None:
        return out
    per_bag = torch.zeros(n * batch, dtype=out.dtype, device=out.device).masked_scatter(lengths > 0, weights.to(out.dtype))
    return (out.view(batch, n, dim) * per_bag.view(n, batch).t().unsqueeze(2)).view(batch, n * dim)


def _column_runs(kt: KeyedTensor, keys: List[List[str]], ops: List[int]) -> List[_Run]:
    """The outputs ``keys`` (each output's parts, read from ``kt``) cut into runs composed by one
    op each (``_Run``): the run's ``n`` outputs at ``out`` of the result, part ``p`` of its
    ``i``-th output (``dim`` columns) at column ``srcs[p] + i * strides[p]`` of ``kt``, wherever
    TorchRec put it. ``op`` is an ``Op``'s value: COPY one part, ADD or MULT the parts (an output
    of ``dim`` columns), CONCAT them side by side (equal parts, ``k * dim``; unequal ones are one
    COPY per part). Consecutive outputs join a run while each part's columns advance by one
    constant stride."""
    offsets = kt.offset_per_key()
    where: Dict[str, int] = {}
    width: Dict[str, int] = {}
    kt_keys = kt.keys()
    for i in range(len(kt_keys)):
        where[kt_keys[i]] = offsets[i]
        width[kt_keys[i]] = offsets[i + 1] - offsets[i]
    runs: List[_Run] = []
    out = 0
    for j in range(len(keys)):
        units: List[List[int]] = []
        part_widths = [width[key] for key in keys[j]]
        if ops[j] == Op.COPY.value and (len(keys[j]) == 1 or min(part_widths) != max(part_widths)):
            for key in keys[j]:
                units.append([Op.COPY.value, width[key], where[key]])
        elif ops[j] == Op.COPY.value:
            units.append([Op.CONCAT.value, part_widths[0]] + [where[key] for key in keys[j]])
        else:
            units.append([ops[j], width[keys[j][0]]] + [where[key] for key in keys[j]])
        for u in units:
            op, dim, srcs = u[0], u[1], u[2:]
            k = len(srcs)
            span = k * dim if op == Op.CONCAT.value else dim
            joined = False
            if len(runs) > 0:
                r = runs[-1]
                if r.op == op and r.k == k and r.dim == dim and r.out + r.n * span == out:
                    fits = True
                    for p in range(k):
                        step = srcs[p] - r.srcs[p]
                        if r.n == 1:
                            fits = fits and step > 0
                        else:
                            fits = fits and step == r.n * r.strides[p]
                    if fits:
                        strides = [srcs[p] - r.srcs[p] for p in range(k)] if r.n == 1 else r.strides
                        runs[-1] = _Run(r.op, r.n + 1, k, dim, r.out, r.srcs, strides)
                        joined = True
            if not joined:
                runs.append(_Run(op, 1, k, dim, out, srcs, [dim] * k))
            out += span
    return runs


def _run_parts(values: torch.Tensor, run: _Run) -> List[torch.Tensor]:
    """Run ``run``'s parts as ``[batch, n, dim]`` views of ``values`` (contiguous ``[batch, width]``)."""
    n, dim = run.n, run.dim
    parts: List[torch.Tensor] = []
    for p in range(run.k):
        stride = run.strides[p]
        # n windows of dim columns, stride apart: a view (unfold, not as_strided, which strict export refuses)
        parts.append(values.narrow(1, run.srcs[p], (n - 1) * stride + dim).unfold(1, dim, stride))
    return parts


def _compose_runs_plain(values: torch.Tensor, runs: List[_Run]) -> torch.Tensor:
    """``_ComposeRuns`` in plain ops (scripted and traced models; autograd's own backward)."""
    values = values.contiguous()
    pieces: List[torch.Tensor] = []
    for run in runs:
        parts = _run_parts(values, run)
        if run.op == Op.CONCAT.value:
            pieces.append(torch.stack(parts, dim=2).reshape(values.size(0), -1))
            continue
        out = parts[0]
        for p in range(1, len(parts)):
            out = out + parts[p] if run.op == Op.ADD.value else out * parts[p]
        pieces.append(out.reshape(values.size(0), -1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _forward_runs(values: torch.Tensor, runs: List[_Run], width: int) -> Tuple[torch.Tensor, List[List[torch.Tensor]]]:
    """The runs composed from ``values`` (contiguous ``[rows, columns]``), ``[rows, width]``: each
    run one copy, sum or product over strided views, written into its place. Also, per run, the
    prefix products ``p0 * p1``, ``p0 * p1 * p2``, ... of a product of more than two parts (what
    its backward reuses)."""
    rows = values.size(0)
    out = torch.empty(rows, width, dtype=values.dtype, device=values.device)
    prefixes: List[List[torch.Tensor]] = []
    for run in runs:
        n, dim, start = run.n, run.dim, run.out
        parts = _run_parts(values, run)
        saved: List[torch.Tensor] = []
        prefixes.append(saved)
        if run.op == Op.CONCAT.value:  # concat: [rows, n, k, dim]
            side = out[:, start : start + n * len(parts) * dim].view(rows, n, len(parts), dim)
            for p, part in enumerate(parts):
                side[:, :, p].copy_(part)
            continue
        dst = out[:, start : start + n * dim].view(rows, n, dim)
        if len(parts) == 1:
            dst.copy_(parts[0])
        elif run.op == Op.ADD.value:
            torch.add(parts[0], parts[1], out=dst)
            for part in parts[2:]:
                dst.add_(part)
        else:
            prod = parts[0]
            for part in parts[1:-1]:
                prod = prod * part
                saved.append(prod)
            torch.mul(prod, parts[-1], out=dst)
    return out, prefixes


def gradient_out(values: torch.Tensor, runs: List[_Run], buffer: Optional[List[torch.Tensor]]) -> torch.Tensor:
    """Where a fused op's backward writes the gradient of ``values``: zeros where the runs leave
    columns unread; else, on CPU with a ``buffer`` (one per call site, kept by the ``Combine``
    across steps), the first rows of the tensor it holds, grown when a batch needs more: glibc's
    malloc gives freed blocks above 32 MB back to the OS, so a fresh ``[rows, columns]`` tensor a
    step would be page-faulted in again every step (the consumer, FBGEMM's backward, reads it at
    once and keeps nothing)."""
    rows, columns = values.size(0), values.size(1)
    if sum(r.n * r.k * r.dim for r in runs) != columns:
        return torch.zeros_like(values)
    if buffer is None or values.device.type != "cpu":
        return torch.empty_like(values)
    if len(buffer) == 0 or buffer[0].size(1) != columns or buffer[0].size(0) < rows or buffer[0].dtype != values.dtype:
        buffer[:] = [torch.empty_like(values)]
    return buffer[0][:rows]


def _product_gradients(g: torch.Tensor, parts: List[torch.Tensor], before: List[torch.Tensor], dsts: List[torch.Tensor]) -> None:
    """Each part's gradient of a product of ``k`` parts, written into ``dsts``: the output's
    gradient ``g`` times the suffix product of the parts after ``p`` (built up from the last)
    times the prefix product before it (``before[p - 1]``); ``2k - 2`` passes."""
    k = len(parts)
    suffix = g
    for p in range(k - 1, 1, -1):
        torch.mul(suffix, before[p - 1], out=dsts[p])
        suffix = suffix * parts[p]
    torch.mul(suffix, parts[0], out=dsts[1])
    torch.mul(suffix, parts[1], out=dsts[0])


def _backward_runs(values: torch.Tensor, runs: List[_Run], grad: torch.Tensor, prefixes: List[List[torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """The gradient of ``_forward_runs`` for ``values``, written into ``out`` (``gradient_out``'s):
    each part's (the output's, times the other parts for mult) straight into its columns."""
    rows = values.size(0)
    for run, saved in zip(runs, prefixes):
        n, k, dim, start = run.n, run.k, run.dim, run.out
        dsts = _run_parts(out, run)
        if run.op == Op.CONCAT.value:  # concat: each part gets its columns of the output's gradient
            side = grad[:, start : start + n * k * dim].reshape(rows, n, k, dim)
            for p, dst in enumerate(dsts):
                dst.copy_(side[:, :, p])
            continue
        g = grad[:, start : start + n * dim].reshape(rows, n, dim)
        if run.op != Op.MULT.value:  # copy, add: each part gets the output's gradient
            for dst in dsts:
                dst.copy_(g)
            continue
        parts = _run_parts(values, run)
        _product_gradients(g, parts, [parts[0], *saved], dsts)  # saved[p]: the product of the parts up to p+1
    return out


class _ComposeRuns(torch.autograd.Function):
    """The pooled outputs composed from the pooled lookup's ``[batch, columns]`` output in one op:
    each run of outputs (``_column_runs``) is one copy, sum or product over strided views of the
    columns where TorchRec put them, written into its place of the result; the backward writes
    each part's gradient straight into its columns of the lookup's gradient (no regrouping, no
    zero fill when the runs read every column; ``gradient_out``)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, runs: List[_Run], width: int, buffer: Optional[List[torch.Tensor]]) -> torch.Tensor:
        values = values.contiguous()
        out, prefixes = _forward_runs(values, runs, width)
        ctx.save_for_backward(values)
        ctx.runs, ctx.prefixes, ctx.buffer = runs, prefixes, buffer
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (values,) = ctx.saved_tensors
        return _backward_runs(values, ctx.runs, grad, ctx.prefixes, gradient_out(values, ctx.runs, ctx.buffer)), None, None, None


@torch.jit.unused
def _compose_runs_fused(values: torch.Tensor, runs: List[_Run], width: int, buffer: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    return _ComposeRuns.apply(values, runs, width, buffer)


# the most bytes of a per-id op's temporaries a row chunk takes (products, gathered gradients):
# each a fresh tensor far below glibc's mmap threshold (32 MB), whatever the batch
_ROW_CHUNK_BYTES = 1 << 23


def _row_chunks(rows: int, row_bytes: int) -> List[Tuple[int, int]]:
    """``[start, end)`` of the row chunks of ``rows`` rows of ``row_bytes`` each."""
    step = max(1, _ROW_CHUNK_BYTES // max(1, row_bytes))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _prefix_products(values: torch.Tensor, runs: List[_Run]) -> List[List[torch.Tensor]]:
    """``_forward_runs``' prefix products alone (what a product of more than two parts' backward
    reuses), computed again for a row chunk instead of being kept from the forward."""
    prefixes: List[List[torch.Tensor]] = []
    for run in runs:
        saved: List[torch.Tensor] = []
        prefixes.append(saved)
        if run.op == Op.MULT.value and run.k > 2:
            parts = _run_parts(values, run)
            prod = parts[0]
            for part in parts[1:-1]:
                prod = prod * part
                saved.append(prod)
    return prefixes


class _ComposePerId(torch.autograd.Function):
    """Product over parts, per id, then pooled into bags, in one op with a hand-written backward.

    ``values``: the per-id lookup's output, ``[rows, columns]``, row ``i`` the ``i``-th id of
    every feature; ``runs`` (``_column_runs``) say where the ``n`` features' parts are (read where
    TorchRec put them: no regrouping copy); ``index``/``scale`` (``_bag_index``) where each id's
    product pools to and with what factor. Out: ``[batch, n * dim]``. The backward gathers the
    output's gradient per id (``index_select``), scales it, and writes each part's gradient
    (that times the other parts) straight into its columns of the lookup's gradient (a tensor
    kept from step to step, ``gradient_out``). Both go in row chunks (``_row_chunks``), so that
    no temporary is a fresh ``[ids, n * dim]`` tensor each step.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        runs: List[_Run],
        index: torch.Tensor,
        scale: Optional[torch.Tensor],
        shape: Tuple[int, int, int],
        buffer: Any,
    ) -> torch.Tensor:
        batch, n, dim = shape
        values = values.contiguous()
        pooled = torch.zeros(batch * n, dim, dtype=values.dtype, device=values.device)
        for r0, r1 in _row_chunks(values.size(0), n * dim * values.element_size()):
            prod = _forward_runs(values[r0:r1], runs, n * dim)[0].view(-1, dim)
            if scale is not None:
                prod.mul_(scale[r0 * n : r1 * n].unsqueeze(1))
            pooled.index_add_(0, index[r0 * n : r1 * n], prod)
        ctx.save_for_backward(values, index, scale)
        ctx.runs, ctx.buffer = runs, buffer
        ctx.n, ctx.dim = n, dim
        return pooled.view(batch, n * dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        values, index, scale = ctx.saved_tensors
        runs, n, dim = ctx.runs, ctx.n, ctx.dim
        out = gradient_out(values, runs, ctx.buffer)
        flat = grad.reshape(-1, dim)
        for r0, r1 in _row_chunks(values.size(0), n * dim * values.element_size()):
            g = flat.index_select(0, index[r0 * n : r1 * n])
            if scale is not None:
                g.mul_(scale[r0 * n : r1 * n].unsqueeze(1))
            chunk = values[r0:r1]
            _backward_runs(chunk, runs, g.view(r1 - r0, -1), _prefix_products(chunk, runs), out=out[r0:r1])
        return out, None, None, None, None, None


@torch.jit.unused
def _compose_per_id_fused(
    values: torch.Tensor,
    runs: List[_Run],
    index: torch.Tensor,
    scale: Optional[torch.Tensor],
    batch: int,
    n: int,
    dim: int,
    buffer: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    return _ComposePerId.apply(values, runs, index, scale, (batch, n, dim), buffer)


def _compose_per_id_plain(
    values: torch.Tensor, runs: List[_Run], index: torch.Tensor, scale: Optional[torch.Tensor], batch: int, n: int, dim: int
) -> torch.Tensor:
    """``_ComposePerId`` in plain ops (scripted and traced models; autograd's own backward)."""
    prod = _compose_runs_plain(values, runs).reshape(values.size(0) * n, dim)
    if scale is not None:
        prod = prod * scale.unsqueeze(1)
    pooled = torch.zeros(batch * n, dim, dtype=values.dtype, device=values.device).index_add(0, index, prod)
    return pooled.view(batch, n * dim)


def _as_they_are(runs: List[_Run], width: int, columns: int) -> bool:
    """Whether the runs only copy every column of the lookup's output to the same place (single
    parts and concats in TorchRec's order): then the output is the lookup's, no copy."""
    if width != columns:
        return False
    for run in runs:
        op, n, k, dim, start = run.op, run.n, run.k, run.dim, run.out
        if op == Op.COPY.value:
            if run.srcs[0] != start or (n > 1 and run.strides[0] != dim):
                return False
        elif op == Op.CONCAT.value:
            for p in range(k):
                if run.srcs[p] != start + p * dim or (n > 1 and run.strides[p] != k * dim):
                    return False
        else:
            return False
    return True


@torch.fx.wrap
def _compose_pooled(
    kt: KeyedTensor,
    keys: List[List[str]],
    ops: List[int],
    width: int,
    runs: Optional[List[_Run]] = None,
    buffer: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """The pooled outputs, ``[batch, width]`` in output order, from the pooled lookup's output
    ``kt``: output ``j`` composes the parts ``keys[j]`` by ``ops[j]`` (0: as they are, side by side;
    1: add; 2: mult), read where TorchRec put them (a leaf call for fx)."""
    if runs is None:
        runs = _column_runs(kt, keys, ops)
    if _as_they_are(runs, width, kt.values().size(1)):
        return kt.values()
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return _compose_runs_plain(kt.values(), runs)
    return _compose_runs_fused(kt.values(), runs, width, buffer)


@torch.fx.wrap
def _renamed(kt: KeyedTensor, names: Dict[str, str]) -> KeyedTensor:
    """``kt`` itself, its keys renamed (sub-feature -> output name), in TorchRec's order."""
    keys = kt.keys()
    return KeyedTensor(keys=[names[keys[i]] for i in range(len(keys))], length_per_key=kt.length_per_key(), values=kt.values())


class _Piece(NamedTuple):
    """One piece of the output, in output order: a chunk of consecutive pooled outputs, or a run of
    consecutive per-id outputs of one lookup group, parts, dim and pooling, composed and pooled by one op."""

    per_id: bool
    chunk: int  # a pooled piece: its chunk of the pooled outputs (-1 for a per-id run)
    group: str  # the lookup group it reads
    k: int  # parts of each output
    dim: int  # of each output
    features: List[str]  # the outputs' features, in order
    keys: List[str]  # their sub-features, output by output
    is_mean: bool


class Combine(nn.Module):
    """Composes the parts of each feature (add, mult or concat) and pools them into a KeyedTensor.

    Add and concat commute with pooling, so their parts arrive pooled from the pooled group's
    SUM-pooled EBC (sum of q plus sum of r), and all pooled outputs are composed by one op
    (``_ComposeRuns``): runs of outputs whose parts' columns advance by one stride, read where
    TorchRec put them (a sharded EBC orders its keys by sharding type), are each one copy, sum or
    product over strided views, and the backward writes each part's gradient into its columns.

    Mult does not commute with pooling: its parts arrive per id (the per-id group's transform made one bag per
    id, so row ``i`` of the per-id EBC's output holds the ``i``-th id of every feature), and a run
    of them is multiplied over the parts, where TorchRec put them (no regrouping copy), and pooled
    back into bags -- sum_i w_i * q[x_i] * r[x_i] -- by one fused op with its own backward
    (``_ComposePerId``; plain ops when scripted or traced); a one-hot batch, whose transform kept
    its bags (the lookup's output has the batch's rows), is multiplied row by row. A module of single-part SUM tables
    only (full, hash, learned, and add tables with ``stack_parts``, whose one stacked lookup is the
    sum of the parts) returns the lookup's KeyedTensor as it is, keys renamed (sharded:
    in TorchRec's order, by sharding type, as TorchRec's EBC returns them; read it by key). One-hot mult tables
    (``max_ids_per_bag=1``) are looked up pooled: a bag's pooled rows are its one id's rows (the id
    transform weights only the first part). MEAN divides the weighted sum by the number of ids in
    the bag (as FBGEMM does); an empty bag gives zeros. The forward reads plain lists
    (fx-traceable, scriptable).
    """

    _keys: List[str]
    _dims: List[int]
    _pooled_group: str
    _pooled_keys: List[List[str]]
    _pooled_ops: List[int]
    _pooled_width: int
    _pooled_splits: List[int]
    _mean_features: List[str]
    _mean_index: List[int]
    _pieces: List[_Piece]
    _names: Dict[str, str]
    __jit_ignored_attributes__ = ["_gradient_buffers"]

    def __init__(self, outputs: List[OutputSpec], is_weighted: bool) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._keys = [o.name for o in outputs]
        self._dims = [o.dim for o in outputs]
        self._needs_features = any(o.per_id or o.pooling == PoolingType.MEAN for o in outputs)
        self._plan(outputs)
        # every output one sub-feature of one pooled group, as it is (full, hash, learned tables):
        # the lookup's KeyedTensor is the output, its keys renamed and in TorchRec's order (a
        # sharded EBC orders them by sharding type, as TorchRec's own EBC returns them)
        self._passthrough = (
            all(not o.per_id and len(o.sub_features) == 1 and o.pooling != PoolingType.MEAN for o in outputs)
            and len({o.sub_features[0] for o in outputs}) == len(outputs)
            and len(outputs) > 0
        )
        self._names = {o.sub_features[0]: o.name for o in outputs} if self._passthrough else {}
        self._runs: Dict[str, List[_Run]] = {}  # see _cached_runs
        self._gradient_buffers: Dict[int, List[torch.Tensor]] = {}  # see _gradient_buffer

    def _plan(self, outputs: List[OutputSpec]) -> None:
        """The pooled outputs (composed by one op from the pooled group's output) and the pieces of
        the result: chunks of consecutive pooled outputs, and runs of consecutive per-id outputs of
        one group and kind, each composed and pooled by one op."""
        pooled_groups = {o.group for o in outputs if not o.per_id}
        if len(pooled_groups) > 1:
            raise ValueError(f"Combine reads one pooled lookup group, got {sorted(pooled_groups)}")
        self._pooled_group = next(iter(pooled_groups)) if pooled_groups else ""
        self._pooled_keys, self._pooled_ops, self._pooled_splits = [], [], []
        self._mean_features, self._mean_index = [], []
        self._pieces = []
        last: Optional[tuple] = None
        for o in outputs:
            mean = o.pooling == PoolingType.MEAN
            k = len(o.sub_features)
            if not o.per_id:
                self._pooled_keys.append(list(o.sub_features))
                self._pooled_ops.append(Op.COPY.value if k == 1 or o.operation == "concat" else _OPS[o.operation])
                if mean:  # pooled parts are summed: MEAN divides the composed output afterwards
                    self._mean_features.append(o.feature)
                self._mean_index.extend([len(self._mean_features) - 1 if mean else -1] * o.dim)
                if last == ("pooled",):
                    self._pooled_splits[-1] += o.dim
                    continue
                last = ("pooled",)
                self._pooled_splits.append(o.dim)
                self._pieces.append(_Piece(False, len(self._pooled_splits) - 1, o.group, k, o.dim, [o.feature], list(o.sub_features), mean))
                continue
            kind = (o.group, k, o.dim, mean)
            if kind == last:
                self._pieces[-1].features.append(o.feature)
                self._pieces[-1].keys.extend(o.sub_features)
                continue
            last = kind
            self._pieces.append(_Piece(True, -1, o.group, k, o.dim, [o.feature], list(o.sub_features), mean))
        self._pooled_width = sum(self._pooled_splits)
        ones = len(self._mean_features)  # the index of a column of ones next to the bags' lengths
        self._mean_index = [ones if i < 0 else i for i in self._mean_index]

    def _per_id_piece(self, p: int, kt: KeyedTensor, features: KeyedJaggedTensor, by_key: Dict[str, JaggedTensor], in_order: bool) -> torch.Tensor:
        """Per-id piece ``p`` from its group's per-id lookup ``kt``, pooled: [batch, n * dim]."""
        piece = self._pieces[p]
        fs = piece.features
        if not torch.jit.is_scripting() and in_order:
            return self._per_id_run(p, kt, features)
        lengths = [by_key[f].lengths() for f in fs]
        ids = [by_key[f].values() for f in fs]
        weights: Optional[List[torch.Tensor]] = [by_key[f].weights() for f in fs] if self._is_weighted else None
        return _per_id_bags(kt, piece.keys, piece.dim, lengths, ids, weights, piece.k, piece.is_mean)

    @torch.jit.unused
    def _per_id_run(self, p: int, kt: KeyedTensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """``_per_id_piece`` of features that are consecutive keys of the KJT, in order: their bags
        read as one slice of its lengths and weights (eager mode; no ``to_dict``)."""
        piece = self._pieces[p]
        fs = piece.features
        first, n, batch = features.keys().index(fs[0]), len(fs), features.stride()
        length_per_key = features.length_per_key()
        start = sum(length_per_key[:first])
        counts = length_per_key[first : first + n]
        lengths = features.lengths()[first * batch : (first + n) * batch]
        weights = features.weights()[start : start + sum(counts)] if self._is_weighted else None
        runs = self._cached_runs(p, kt, _per_id_outputs(piece.keys, n, piece.k), _per_id_ops(n, piece.k))
        return _pooled_per_id(kt, runs, piece.dim, lengths, counts, weights, piece.is_mean, self._gradient_buffer(p))

    @torch.jit.unused
    def _cached_runs(self, piece: int, kt: KeyedTensor, keys: List[List[str]], ops: List[int]) -> List[_Run]:
        """``_column_runs`` of piece ``piece`` (-1: the pooled outputs), made once per order of
        ``kt``'s keys (eager mode: they are what the module's lookups return, in their order)."""
        at = f"{piece}:" + ",".join(kt.keys())
        if at not in self._runs:
            self._runs[at] = _column_runs(kt, keys, ops)
        return self._runs[at]

    @torch.jit.unused
    def __getstate__(self) -> Dict[str, Any]:
        """Pickled and copied (``torch.save(module)``, ``copy.deepcopy``) without the gradient
        tensors kept between steps: scratch space, not state."""
        state = super().__getstate__()
        state["_gradient_buffers"] = {}
        return state

    @torch.jit.unused
    def _gradient_buffer(self, piece: int) -> List[torch.Tensor]:
        """The tensor piece ``piece``'s fused op (-1: the pooled outputs') writes its gradient into,
        step after step on CPU (``gradient_out``); not part of the module's state."""
        return self._gradient_buffers.setdefault(piece, [])

    @torch.jit.unused
    def _runs_in_order(self, features: KeyedJaggedTensor) -> bool:
        """Whether each per-id piece's features are consecutive keys of ``features``, in order, and
        its bags one stride each (then the eager forward reads them without ``to_dict``)."""
        if len(self._mean_features) > 0 and self._pooled_group != "":  # (``forward`` expanded a variable-batch KJT)
            return False
        keys = features.keys()
        for piece in self._pieces:
            fs = piece.features
            if piece.per_id and (fs[0] not in keys or keys[keys.index(fs[0]) : keys.index(fs[0]) + len(fs)] != fs):
                return False
        return True

    def _pooled(self, kt: KeyedTensor, by_key: Dict[str, JaggedTensor]) -> List[torch.Tensor]:
        """The pooled outputs from the pooled group's lookup, cut into their chunks."""
        runs: Optional[List[_Run]] = None
        buffer: Optional[List[torch.Tensor]] = None
        if not torch.jit.is_scripting():
            if not (is_fx_symbolic_tracing() or torch.compiler.is_compiling()):
                runs = self._cached_runs(-1, kt, self._pooled_keys, self._pooled_ops)
                buffer = self._gradient_buffer(-1)
        out = _compose_pooled(kt, self._pooled_keys, self._pooled_ops, self._pooled_width, runs, buffer)
        if len(self._mean_features) > 0:  # divide MEAN outputs by their bags' lengths (others by 1)
            lengths = [by_key[f].lengths() for f in self._mean_features]
            lengths.append(torch.ones_like(lengths[0]))
            divisor = torch.stack(lengths, dim=1).clamp(min=1).to(out.dtype)
            out = out / divisor.index_select(1, torch.tensor(self._mean_index, device=out.device))
        return _split_columns(out, self._pooled_splits)

    def forward(self, features: KeyedJaggedTensor, looked_up: Dict[str, KeyedTensor]) -> KeyedTensor:
        if self._passthrough:
            return _renamed(looked_up[self._pooled_group], self._names)
        if self._needs_features:  # bag lengths as the transforms saw them: one batch size
            features = expand_variable_batch(features)
        in_order = False  # eager, each per-id piece's features consecutive in the KJT: no to_dict
        if not torch.jit.is_scripting():
            if self._needs_features and not (is_fx_symbolic_tracing() or torch.compiler.is_compiling()):
                in_order = self._runs_in_order(features)
        by_key: Dict[str, JaggedTensor] = features.to_dict() if self._needs_features and not in_order else {}
        chunks: List[torch.Tensor] = []
        if self._pooled_group != "":
            chunks = self._pooled(looked_up[self._pooled_group], by_key)
        results: List[torch.Tensor] = []
        for p in range(len(self._pieces)):
            piece = self._pieces[p]
            if piece.per_id:
                results.append(self._per_id_piece(p, looked_up[piece.group], features, by_key, in_order))
            else:
                results.append(chunks[piece.chunk])
        values = results[0] if len(results) == 1 else torch.cat(results, dim=1)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values)
