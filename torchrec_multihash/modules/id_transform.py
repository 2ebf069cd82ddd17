"""The parameter-free module that rewrites a KJT of logical features into sub-table lookups.

It sits in front of an ordinary TorchRec ``EmbeddingBagCollection``. For the per-id (mult) tables it
"explodes" every bag into one bag per id (see ``IdTransform``), so that a SUM-pooled
``EmbeddingBagCollection`` returns one row per id.
Being parameter-free, ``TrainPipelineSparseDist(pipeline_postproc=True)`` runs it in the
input-dist stage of the pipeline, overlapped with compute.
"""

import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_multihash.errors import InvalidInputError
from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.strategies import StackedRows, Strategy
from torchrec_multihash.modules.strategies.base import partition_rows, place_rows
from torchrec_multihash.modules.variable_batch import expand_variable_batch

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# On CPU, past this many ids the flat path's extra passes over them (the parts side by side, then
# permuted) cost more than the per-feature path's ops; on a GPU, where each op is a kernel launch
# and passes over the ids are cheap, the flat path runs at any size.
FLAT_CPU_MAX_IDS = 1 << 16

torch.fx.wrap("expand_variable_batch")  # a leaf for fx here too (wrap patches the caller's globals)


@dataclass
class FeatureLookup:
    """How one logical feature of one table is turned into sub-features."""

    feature: str
    table: str
    num_embeddings: int
    strategy: Strategy  # the table's id -> rows partition
    sub_features: List[str]
    mapping: Optional[LearnedMapping] = None  # learned id -> row, applied before the partitions
    max_ids_per_bag: Optional[int] = None  # checked with the ids; 1: one-hot
    pooled_mult: bool = False  # one-hot mult looked up pooled: only the first part carries the weight
    # stacked parts: where each part's rows lie in the one stacked table; the feature is then one
    # sub-feature whose bags hold each id's k rows (pooled by SUM: the add)
    stacked_rows: Optional[List[StackedRows]] = None
    # add, mult: the combine composes the parts column block by column block, so the sub-features
    # come part by part among the lookup's group (see ``sub_feature_order``)
    part_major: bool = False


def _few(names: List[str], most: int = 6) -> str:
    """``names`` for a message: the first ``most`` and how many more."""
    return str(names[:most])[:-1] + (f", ... {len(names) - most} more]" if len(names) > most else "]")


def check_feature_keys(keys: Sequence[str], required: Sequence[str], known: Optional[Sequence[str]]) -> None:
    """Raises InvalidInputError for features the module needs but the KJT lacks, or (if ``known``
    is given) KJT keys that no table of the module looks up."""
    missing = sorted(set(required) - set(keys))
    if missing:
        msg = f"the KJT has no feature(s) {missing}, which the module's tables look up; its keys are {list(keys)}"
        raise InvalidInputError(msg)
    known_set = set(known) if known is not None else None
    unknown = [k for k in keys if k not in known_set] if known_set is not None else []
    if unknown:
        raise InvalidInputError(
            f"the KJT has feature(s) {unknown} that no table of this MultiHashEmbeddingBagCollection "
            f"looks up (known: {list(known or [])}); pass strict_features=False to ignore extra features"
        )


def _bag_error(lk: FeatureLookup, lengths: torch.Tensor) -> InvalidInputError:
    bag = int((lengths > (lk.max_ids_per_bag or 0)).nonzero()[0].item())
    return InvalidInputError(
        f"feature '{lk.feature}' (table '{lk.table}', max_ids_per_bag={lk.max_ids_per_bag}): bag {bag} holds "
        f"{int(lengths[bag].item())} ids; a table declared {'one-hot' if lk.max_ids_per_bag == 1 else 'with smaller bags'} "
        "would not compose it exactly: raise or remove max_ids_per_bag"
    )


def _bounds(tensors: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The min and max of each tensor: one reduction of them stacked when they are equally long."""
    if len(tensors) > 1 and all(t.numel() == tensors[0].numel() for t in tensors):
        return torch.aminmax(torch.stack(tensors), dim=1)
    each = [torch.aminmax(t) for t in tensors]
    return torch.stack([m for m, _ in each]), torch.stack([m for _, m in each])


def check_id_ranges(lookups: Sequence[FeatureLookup], jts: Sequence[JaggedTensor]) -> None:
    """Raises InvalidInputError if an id lies outside [0, num_embeddings) of its table, or a bag
    holds more than its table's ``max_ids_per_bag`` ids.

    One host sync for all features: their id bounds and largest bags are gathered and read together
    (features of equally many ids, as one-hot ones, stacked and reduced by one op each).
    """
    checks: List[tuple] = []  # (lookup, jagged tensor, what): "ids" reads 2 stats, "bags" 1
    ids: List[torch.Tensor] = []
    bags: List[torch.Tensor] = []
    for lk, jt in zip(lookups, jts):
        v = jt.values()
        if v.device.type == "meta":  # meta has no ids to read
            continue
        if not lk.strategy.accepts_any_id and v.numel() > 0:
            ids.append(v)
            checks.append((lk, jt, "ids"))
        if lk.max_ids_per_bag is not None and jt.lengths().numel() > 0:
            bags.append(jt.lengths())
            checks.append((lk, jt, "bags"))
    if not checks:
        return
    stats: List[torch.Tensor] = []
    if ids:
        lo, hi = _bounds(ids)
        stats.append(torch.stack([lo, hi], dim=1).view(-1).long())
    if bags:
        stats.append(_bounds(bags)[1].long())
    read = torch.cat(stats).tolist() if len(stats) > 1 else stats[0].tolist()
    read_ids = iter(read[: 2 * len(ids)])
    read_bags = iter(read[2 * len(ids) :])
    for lk, jt, what in checks:
        if what == "bags":
            if next(read_bags) > lk.max_ids_per_bag:
                raise _bag_error(lk, jt.lengths())
            continue
        lo, hi = next(read_ids), next(read_ids)
        if lo < 0 or hi >= lk.num_embeddings:
            values = jt.values()
            bad = ((values < 0) | (values >= lk.num_embeddings)).nonzero()[0].item()
            raise InvalidInputError(
                f"feature '{lk.feature}' (table '{lk.table}', num_embeddings={lk.num_embeddings}): "
                f"id {values[bad].item()} at position {bad} of the feature's values is outside "
                f"[0, {lk.num_embeddings}); use strategy='hash' for unbounded ids"
            )


class SlotKind(IntEnum):
    """How the flat transform computes one part's rows of an id ``x``."""

    QUOTIENT = 0  # x // d
    REMAINDER = 1  # x - q * m, q the quotient another slot (``reuse``) computed for the same id
    DIVMOD = 2  # (x // d) % m


@dataclass
class _FlatGroup:
    """Lookups whose parts are computed by the same ops (a slot per part), over their ids at once:
    per slot, its ``SlotKind``, whether it divides and reduces, and its divisor and modulus: an int when all
    the group's lookups share it, else the row of the per-id parameter table that holds them."""

    lookups: List[int]  # in the order their ids come in the regrouped KJT
    kinds: List[SlotKind]
    reuse: List[int]
    divides: List[bool]
    reduces: List[bool]
    divisor: List[int]  # the value (if ``divisor_row < 0``)
    divisor_row: List[int]
    modulus: List[int]
    modulus_row: List[int]
    unit_weights: List[bool]
    # stacked parts: each lookup one segment, per id its slots' rows side by side, each moved to its
    # part's rows of the stacked table: per slot, ``StackedRows``' mul, add, div and shift, each as
    # (value, row of the per-id table that holds it or -1)
    stacked: bool = False
    placement: List[List[Tuple[int, int]]] = field(default_factory=list)


def _slot(lk: FeatureLookup, p: int, spec: List[Tuple[int, int]]) -> Tuple[SlotKind, int, bool, bool, bool, bool]:
    """Part ``p`` of a lookup as (kind, reuse, divides, reduces, unit weight, stacked): see
    ``_FlatGroup``."""
    d, m = spec[p]
    reuse = next((q for q in range(len(spec)) if spec[q] == (m, 0)), -1) if d == 1 and m > 0 else -1
    kind = SlotKind.QUOTIENT if m == 0 else (SlotKind.REMAINDER if reuse >= 0 else SlotKind.DIVMOD)
    return kind, reuse, d != 1, m != 0, lk.pooled_mult and p > 0, lk.stacked_rows is not None


def _lookup_groups(lookups: Sequence[FeatureLookup]) -> List[Tuple[tuple, List[int]]]:
    """The lookups (indices) grouped by equal slots (``_slot`` of each part), each group in order,
    groups in order of first appearance, with their slots: what the flat transform maps with the
    same ops."""
    groups: Dict[tuple, List[int]] = {}
    for i, lk in enumerate(lookups):
        spec = lk.strategy.partition_spec()
        groups.setdefault(tuple(_slot(lk, p, spec) for p in range(len(spec))), []).append(i)
    return list(groups.items())


def sub_feature_order(lookups: Sequence[FeatureLookup]) -> List[Tuple[int, int]]:
    """The order of the id transform's sub-features, ``(lookup, its sub-feature)``, which the inner
    EmbeddingBagCollection's features follow too (but for a concat table of several features: a
    TorchRec table's features are consecutive): the lookups in order, each with its sub-features
    side by side (concat, single tables: the output's own layout, which the combine then passes on
    without a copy), except ``part_major`` lookups (add, mult): at the first of those of a group of
    equal slots (``_lookup_groups``), every first part of them, then every second part, ..., so that
    each part is one column block of the lookup's output, composed by one op over contiguous rows."""
    group_of = {i: members for _, members in _lookup_groups(lookups) for i in members}
    order: List[Tuple[int, int]] = []
    for i, lk in enumerate(lookups):
        k = len(lk.sub_features)
        if not lk.part_major:
            order.extend((i, s) for s in range(k))
            continue
        block = [m for m in group_of[i] if lookups[m].part_major]
        if block[0] == i:
            order.extend((m, s) for s in range(k) for m in block)
    return order


class _FlatPlan:
    """How ``IdTransform`` maps all features at once (lookups without learned mappings): the KJT
    regrouped by lookups of equal slots (``order``, lookup indices), each
    group's parts computed over its ids at once into a ``[slots, ids]`` block, and one
    ``permute_1D_sparse_data`` (``perm``) putting the blocks' segments in the sub-features' order
    (``sub_features``: ``sub_feature_order``). Per-id divisors, moduli and id bounds come from
    ``params`` (rows of per-lookup values, in ``order``), repeated over each lookup's ids."""

    def __init__(self, lookups: List[FeatureLookup], validate_ids: bool, sub_features: List[Tuple[int, int]]) -> None:
        specs = [lk.strategy.partition_spec() for lk in lookups]
        slots = _lookup_groups(lookups)
        self.order = [i for _, members in slots for i in members]
        position = {i: n for n, i in enumerate(self.order)}
        self.params: List[List[int]] = []
        self.groups: List[_FlatGroup] = []
        segment = 0
        first: Dict[Tuple[int, int], int] = {}  # (lookup, part) -> its segment in the blocks
        for sig, members in slots:
            kinds, reuse, divides, reduces, unit_weights, stacked = (list(column) for column in zip(*sig))
            g = _FlatGroup(members, kinds, reuse, divides, reduces, [], [], [], [], unit_weights, stacked[0])
            for p in range(len(sig)):
                for values, rows, column in ((g.divisor, g.divisor_row, 0), (g.modulus, g.modulus_row, 1)):
                    value, row = self._value_or_row(members, position, [specs[i][p][column] for i in members])
                    values.append(value)
                    rows.append(row)
                if g.stacked:
                    placed = [(lookups[i].stacked_rows or [])[p] for i in members]
                    g.placement.append([self._value_or_row(members, position, [x[f] for x in placed]) for f in range(4)])
                    continue
                for i in members:
                    first[(i, p)] = segment
                    segment += 1
            if g.stacked:  # one segment per lookup: its ids' rows, side by side
                for i in members:
                    first[(i, 0)] = segment
                    segment += 1
            self.groups.append(g)
        self.perm = [first[(i, p)] for i, p in sub_features]
        # per sub-feature: its lookup's place in ``order`` and its ids per id (a stacked table's k)
        self.sub_lengths = [(position[i], len(specs[i]) if lookups[i].stacked_rows is not None else 1) for i, _ in sub_features]
        self.segments = segment
        self.permutes = self.perm != list(range(segment))  # segments not already in the sub-features' order
        # id bounds (hash tables: any int64) and largest bags, checked at once
        checked = [not lookups[i].strategy.accepts_any_id for i in self.order]
        self.check_ids = validate_ids and any(checked)
        low = [0 if c else _INT64_MIN for c in checked]
        last = [lookups[i].num_embeddings - 1 if c else _INT64_MAX for i, c in zip(self.order, checked)]
        # [low, last] of every id: an int where all lookups share it, else a row of params
        self.low, self.low_row = self._value_or_row(self.order, position, low)
        self.last, self.last_row = self._value_or_row(self.order, position, last)
        self.max_bags = [lookups[i].max_ids_per_bag or _INT64_MAX for i in self.order]
        self.max_bag = self.max_bags[0] if len(set(self.max_bags)) == 1 else -1  # -1: per lookup
        self.check_bags = validate_ids and any(lk.max_ids_per_bag is not None for lk in lookups)

    def _value_or_row(self, members: List[int], position: Dict[int, int], each: List[int]) -> Tuple[int, int]:
        """``members``' parameter ``each``: ``(value, -1)`` if they share it, else ``(0, row)``,
        its row of ``params``."""
        return (each[0], -1) if len(set(each)) == 1 else (0, self._row(members, position, each))

    def _row(self, members: List[int], position: Dict[int, int], each: List[int]) -> int:
        """The row of ``params`` with ``each`` for ``members`` (0 for other lookups), added unless
        there is one already (a Q-R table's divisor and modulus are one)."""
        row = [0] * len(position)
        for i, v in zip(members, each):
            row[position[i]] = v
        if row not in self.params:
            self.params.append(row)
        return self.params.index(row)


def exploded_batch(most_ids: int, batch: int) -> int:
    """The batch of an exploded KJT: ``max(1, most ids of a sub-feature)`` bags, one more where that
    equals the input's ``batch``, so that a per-id lookup's output has ``batch`` rows only in the
    one-hot layout (``IdTransform``), which is how the combine tells the two apart."""
    stride = max(1, most_ids)
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():  # torch.export / compile: always exploded, and the combine does not compare
            return stride
    return stride + 1 if stride == batch else stride


@torch.fx.wrap
def _exploded(keys: List[str], values: List[torch.Tensor], lengths_dtype: torch.dtype, batch: int) -> KeyedJaggedTensor:
    """The KJT of sub-features with one bag per id: a batch of ``exploded_batch`` bags per key, the
    ``n`` ids of a sub-feature in its first ``n`` bags (length 1), the rest empty (padding). A leaf
    call for fx."""
    counts: List[int] = [v.numel() for v in values]
    stride = exploded_batch(max(counts), batch)
    device = values[0].device
    n = torch.tensor(counts, device=device)
    lengths = (torch.arange(stride, device=device).unsqueeze(0) < n.unsqueeze(1)).to(lengths_dtype).view(-1)
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths, stride=stride)


@torch.fx.wrap
def _sub_features(
    keys: List[str], values: List[torch.Tensor], lengths: List[torch.Tensor], weights: Optional[List[torch.Tensor]], stride: int
) -> KeyedJaggedTensor:
    """The KJT of sub-features (a leaf call for fx: a KJT cannot be built from proxies)."""
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights is not None else None,
        stride=stride,
    )


def _placed(
    r: torch.Tensor, mul: Union[int, torch.Tensor], add: Union[int, torch.Tensor], div: Union[int, torch.Tensor], shift: Union[int, torch.Tensor]
) -> torch.Tensor:
    """``place_rows`` of a group of lookups (the flat transform): each parameter an int that all
    share, or a per-id tensor."""
    return torch.div(r * mul + add, div, rounding_mode="floor") + r + shift


def _group_rows(g: _FlatGroup, ids: torch.Tensor, per_id: List[torch.Tensor]) -> List[torch.Tensor]:
    """Each slot's rows of a group's ``ids`` (int64, the group's lookups' ids one after another):
    ``(x // d) % m``, a remainder whose quotient another slot takes as ``x - q * m`` (see
    ``IdTransform._rows``); divisors and moduli per id from ``per_id`` where they differ."""
    rows: List[Optional[torch.Tensor]] = [None] * len(g.kinds)
    for p in sorted(range(len(g.kinds)), key=lambda q: g.kinds[q] == SlotKind.REMAINDER):  # quotients first
        d = per_id[g.divisor_row[p]] if g.divisor_row[p] >= 0 else g.divisor[p]
        m = per_id[g.modulus_row[p]] if g.modulus_row[p] >= 0 else g.modulus[p]
        if g.kinds[p] == SlotKind.REMAINDER:
            q = rows[g.reuse[p]]
            assert q is not None
            rows[p] = ids - q * m
            continue
        r = torch.div(ids, d, rounding_mode="floor") if g.divides[p] else ids
        rows[p] = torch.remainder(r, m) if g.reduces[p] else r
    return [r for r in rows if r is not None]


def _flat_segments(
    plan: "_FlatPlan",
    ids: torch.Tensor,
    per_id: List[torch.Tensor],
    bags_2d: torch.Tensor,
    counts: torch.Tensor,
    weights: Optional[torch.Tensor],
    length_per_key: Optional[List[int]],
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
    """The flat plan's segments, group by group (``_FlatPlan.groups``): their ids' rows, their bags'
    lengths, the ids of each segment and their weights (values, lengths and weights concatenated)."""
    blocks: List[torch.Tensor] = []
    block_lengths: List[torch.Tensor] = []
    block_counts: List[torch.Tensor] = []  # ids per segment
    block_weights: List[torch.Tensor] = []
    start, first = 0, 0
    for g in plan.groups:
        k = len(g.lookups)
        x, per, bags, c, w = ids, per_id, bags_2d.view(-1), counts, weights
        if len(plan.groups) > 1:
            assert length_per_key is not None
            count = sum(length_per_key[first : first + k])
            x, per = ids[start : start + count], [row[start : start + count] for row in per_id]
            bags, c = bags_2d[first : first + k].view(-1), counts[first : first + k]
            w = weights[start : start + count] if weights is not None else None
            start, first = start + count, first + k
        rows = _group_rows(g, x, per)
        if g.stacked:  # per id its k rows side by side, each moved to its part's rows
            k = len(rows)
            moved = [_placed(r, *[per[row] if row >= 0 else value for value, row in g.placement[p]]) for p, r in enumerate(rows)]
            blocks.append(torch.stack(moved, dim=1).view(-1))
            block_lengths.append(bags * k)
            block_counts.append(c * k)
            if w is not None:  # each of an id's k rows carries its weight
                block_weights.append(w.unsqueeze(1).expand(-1, k).reshape(-1))
            continue
        blocks.append(rows[0] if len(rows) == 1 else torch.cat(rows))
        block_lengths.append(bags if len(rows) == 1 else torch.cat([bags] * len(rows)))
        block_counts.append(c if len(rows) == 1 else torch.cat([c] * len(rows)))
        if w is not None:
            each = [torch.ones_like(w) if u else w for u in g.unit_weights]
            block_weights.append(each[0] if len(each) == 1 else torch.cat(each))
    out_values = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    out_lengths = block_lengths[0] if len(blocks) == 1 else torch.cat(block_lengths)
    out_weights = (block_weights[0] if len(blocks) == 1 else torch.cat(block_weights)) if weights is not None else None
    return out_values, out_lengths, block_counts, out_weights


class IdTransform(nn.Module):
    """Maps a KJT of logical features to a KJT of sub-features, one per partition.

    Feature ``C1`` of a Q-R table becomes ``C1`` (ids ``x // m``) and ``C1__r`` (ids ``x % m``),
    with the same lengths and per-sample weights. Tables with a learned mapping first map ids to
    rows; the mappings (buffers, no parameters) are children of the transform, in ``mappings``.
    A table whose parts are stacked in one table (add) gives one sub-feature, ``C1__parts``: per
    id its k rows, each moved to its part's rows of the stacked table (``StackedRows``), side by
    side (each bag stays contiguous), lengths times k and each id's weight on each of its rows, so
    that the table's SUM pooling is ``sum_i w_i (q_i + r_i)``.

    With ``explode`` (the per-id lookups of mult tables), every bag becomes one bag per id: the
    output KJT has a batch of ``max(1, most ids of a feature in the batch)`` bags per sub-feature,
    the ``n`` ids of a sub-feature in its first ``n`` bags, one id each, in the order of the
    feature's values, and the rest empty; no weights (the combine applies them after the product).
    A SUM-pooled ``EmbeddingBagCollection`` then returns one row per id, which ``Combine`` reads
    as an ``[ids, features, parts, dim]`` view. In eager mode a batch whose bags (of this
    transform's features) hold at most one id each keeps them as they are (each already a bag of
    one id: the one-hot layout, the input's batch of bags); an exploded batch never has the
    input's batch size (``exploded_batch``), so the combine tells the layouts apart by rows.
    In eager mode, lookups without learned mappings map all features at once (``_FlatPlan``): one
    op per part for each group of lookups of the same strategy (and layout), and one
    ``permute_1D_sparse_data`` into the sub-features' order; traced and scripted modules map
    feature by feature, to the same KJT.
    The forward reads only plain lists of ints and strings, so it can be fx-traced (TorchRec's
    tracer) and scripted; the input checks run in eager mode only (not in a traced or scripted
    model, as TorchRec's own modules check nothing).

    Args:
        lookups: the logical features this transform handles.
        is_weighted: copy the KJT's per-sample weights to every sub-feature.
        validate_ids: check ids lie in [0, num_embeddings) and bags hold at most their table's
            ``max_ids_per_bag`` ids (one host sync per batch for all features).
        known_features: if given, KJT keys outside it are an error.
        explode: one bag per id (per-id lookups), as above.
    """

    _features: List[str]
    _tables: List[str]
    _sub_keys: List[str]
    _sub_source: List[int]
    _sub_parts: List[List[int]]
    _source: List[int]
    _divisors: List[int]
    _moduli: List[int]
    _placement: List[List[int]]
    _reuse: List[int]
    _unit_weights: List[bool]

    def __init__(
        self,
        lookups: List[FeatureLookup],
        is_weighted: bool = False,
        validate_ids: bool = True,
        known_features: Optional[List[str]] = None,
        explode: bool = False,
    ) -> None:
        super().__init__()
        self._lookups = lookups
        self._is_weighted = is_weighted
        self._explode = explode
        self._validate_ids = validate_ids
        self._known_features = known_features
        self._required = sorted({lk.feature for lk in lookups})
        self.mappings = nn.ModuleDict({lk.table: lk.mapping for lk in lookups if lk.mapping is not None})
        # what the forward reads, as plain lists: per lookup its feature and table; per part its
        # lookup, its partition (row = (id // divisor) % modulus) and its row offset (stacked
        # tables); per sub-feature its key, its lookup and its parts (one, or a stacked table's k)
        self._features = [lk.feature for lk in lookups]
        self._tables = [lk.table for lk in lookups]
        order = sub_feature_order(lookups)
        self._sub_keys = [lookups[i].sub_features[j] for i, j in order]
        self._sub_source = [i for i, _ in order]
        spec = [p for lk in lookups for p in lk.strategy.partition_spec()]
        self._source = [i for i, lk in enumerate(lookups) for _ in lk.strategy.partition_spec()]
        self._divisors = [d for d, _ in spec]
        self._moduli = [m for _, m in spec]
        # per part where its rows lie in its stacked table (``StackedRows``: mul, add, div, shift)
        self._placement = [list(o) for lk in lookups for o in (lk.stacked_rows or [StackedRows(0, 0, 1, 0)] * len(lk.strategy.partition_spec()))]
        first_part: List[int] = []  # each lookup's first part in ``spec``
        part = 0
        for lk in lookups:
            k = len(lk.strategy.partition_spec())
            if lk.stacked_rows is not None:
                assert len(lk.sub_features) == 1 and len(lk.stacked_rows) == k, lk
            else:
                assert len(lk.sub_features) == k, lk
            first_part.append(part)
            part += k
        # per sub-feature its parts: its one part, or a stacked table's k
        self._sub_parts = []
        for i, j in order:
            k = len(lookups[i].strategy.partition_spec())
            self._sub_parts.append(list(range(first_part[i], first_part[i] + k)) if lookups[i].stacked_rows is not None else [first_part[i] + j])
        # per part x % m: the part of the same feature that takes x // m, if any
        self._reuse = [
            next((q for q in range(len(spec)) if self._source[q] == self._source[j] and spec[q] == (self._moduli[j], 0)), -1)
            if self._divisors[j] == 1 and self._moduli[j] > 0
            else -1
            for j in range(len(spec))
        ]
        # a one-hot mult bag pooled is w * q[x] times w * r[x]: weighting its first part alone
        # leaves w * q[x] * r[x], as per id
        self._unit_weights = [lookups[i].pooled_mult and j > 0 for i, j in order]
        # every sub-feature its feature's ids as they are (full tables, one each): a KJT of exactly
        # those keys, in that order, is passed on as it is instead of being cut up and rebuilt
        self._identity = (
            not explode
            and not self.mappings
            and self._sub_keys == self._features
            and all(d == 1 and m == 0 for d, m in spec)
            and all(len(parts) == 1 for parts in self._sub_parts)
            and not any(self._unit_weights)
        )
        # lookups without learned mappings: all features mapped at once (eager mode)
        self._flat: Optional[_FlatPlan] = None
        if not self.mappings:
            self._flat = _FlatPlan(lookups, validate_ids, order)
        self._flat_features = [self._features[i] for i in self._flat.order] if self._flat is not None else []
        self._flat_constants: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._flat_order = self._flat.order if self._flat is not None else []
        self._flat_regroupings: Dict[str, Tuple[List[int], torch.Tensor]] = {}  # see _regrouping
        self._warned_padding = False  # see _note_padding

    def _rows(self, ids: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each part's rows, ``(x // divisor) % modulus`` of its feature's ids; a remainder
        ``x % m`` whose quotient ``x // m`` another sub-feature takes anyway (Q-R) is ``x - (x // m)
        * m``: int64 division dominates the transform's time."""
        quotients: Dict[int, torch.Tensor] = {}
        for j in range(len(self._source)):  # quotients first: remainders may reuse them
            if self._moduli[j] == 0:
                quotients[j] = partition_rows(ids[self._source[j]], self._divisors[j], 0)
        out: List[torch.Tensor] = []
        for j in range(len(self._source)):
            if j in quotients:
                out.append(quotients[j])
            elif self._reuse[j] >= 0:
                out.append(ids[self._source[j]] - quotients[self._reuse[j]] * self._moduli[j])
            else:
                out.append(partition_rows(ids[self._source[j]], self._divisors[j], self._moduli[j]))
        return out

    @torch.jit.unused
    def _check_kjt(self, features: KeyedJaggedTensor) -> None:
        """Raises InvalidInputError for a KJT without the module's features, with ids that are not
        integers or without the weights the module needs (eager mode only)."""
        check_feature_keys(features.keys(), self._required, self._known_features)
        if features.values().is_floating_point():  # .long() would truncate them to other rows
            raise InvalidInputError(f"the KJT's ids are {features.values().dtype}: pass integer ids (int64 or int32)")
        if self._is_weighted and features.weights_or_none() is None:
            raise InvalidInputError("the module is weighted (is_weighted=True) but the KJT has no weights")

    @torch.jit.unused
    def check(self, features: KeyedJaggedTensor, by_key: Dict[str, JaggedTensor]) -> None:
        """Raises InvalidInputError for a KJT the module cannot look up (eager mode only);
        ``by_key``: its ``to_dict()``, which the forward reads too."""
        self._check_kjt(features)
        if self._validate_ids:
            check_id_ranges(self._lookups, [by_key[lk.feature] for lk in self._lookups])

    @torch.jit.unused
    def _all_in_one_range(self, features: KeyedJaggedTensor) -> bool:
        """Whether every id of a KJT of exactly this transform's features lies in the one range all
        its tables share, ``[0, num_embeddings)``, read by one reduction (no bag-size limits to
        check); False when they differ or an id is out (``check_id_ranges`` then says which)."""
        sizes = {lk.num_embeddings for lk in self._lookups}
        if len(sizes) != 1 or any(lk.strategy.accepts_any_id or lk.max_ids_per_bag is not None for lk in self._lookups):
            return False
        values = features.values()
        if values.numel() == 0 or values.device.type == "meta":
            return values.numel() == 0
        low, high = torch.aminmax(values)
        return bool((low >= 0) & (high < next(iter(sizes))))

    @torch.jit.unused
    def _passes_as_is(self, features: KeyedJaggedTensor) -> bool:
        """Eager mode: the KJT holds exactly the sub-features' keys, in order, with int64 ids."""
        return features.keys() == self._sub_keys and features.values().dtype == torch.long

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = expand_variable_batch(features)
        if not torch.jit.is_scripting():
            if not (is_fx_symbolic_tracing() or torch.compiler.is_compiling()):
                if self._flat is not None and self._flat_applies(features):
                    return self._forward_flat(features)
                if self._identity and self._passes_as_is(features):
                    self._check_kjt(features)
                    if self._validate_ids and not self._all_in_one_range(features):
                        check_id_ranges(self._lookups, [features.to_dict()[lk.feature] for lk in self._lookups])
                    return features
        by_key: Dict[str, JaggedTensor] = features.to_dict()
        if not torch.jit.is_scripting():
            if not (is_fx_symbolic_tracing() or torch.compiler.is_compiling()):
                self.check(features, by_key)
        ids: List[torch.Tensor] = [by_key[f].values().long() for f in self._features]
        for table, mapping in self.mappings.items():
            for i in range(len(self._tables)):
                if self._tables[i] == table:
                    ids[i] = mapping(ids[i])
        values = self._values(self._rows(ids))
        if self._explode:  # eager, a one-hot batch keeps its bags (each already of one id)
            keeps_bags = False
            if not torch.jit.is_scripting():
                keeps_bags = self._keeps_bags(features, by_key)
            if not keeps_bags:
                return _exploded(self._sub_keys, values, features.lengths().dtype, features.stride())
        weighted = self._is_weighted and not self._explode  # per-id lookups are unweighted
        lengths: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for j in range(len(self._sub_keys)):
            i = self._sub_source[j]
            k = len(self._sub_parts[j])
            jt = by_key[self._features[i]]
            lengths.append(jt.lengths() if k == 1 else jt.lengths() * k)
            if weighted:
                w = jt.weights()
                if self._unit_weights[j]:
                    weights.append(torch.ones_like(w))
                elif k == 1:
                    weights.append(w)
                else:  # each of an id's k rows carries its weight: w * q + w * r = w * (q + r)
                    weights.append(w.unsqueeze(1).expand(-1, k).reshape(-1))
        return _sub_features(self._sub_keys, values, lengths, weights if weighted else None, features.stride())

    @torch.jit.unused
    def _keeps_bags(self, features: KeyedJaggedTensor, by_key: Dict[str, JaggedTensor]) -> bool:
        """Eager per-id lookups: whether ``features`` is one-hot (no bag of more than one id), so
        that its bags, as they are, are already bags of one id (see ``IdTransform``)."""
        if is_fx_symbolic_tracing() or torch.compiler.is_compiling() or features.device().type == "meta":
            return False
        lengths = torch.stack([by_key[f].lengths() for f in self._features])  # one batch size: expanded
        return not self._explode_reading(lengths.sum(1), lengths, features.stride(), list(range(len(self._features))))[1]

    @torch.jit.unused
    def _explode_reading(self, counts: torch.Tensor, lengths: torch.Tensor, batch: int, lookups: List[int]) -> Tuple[List[int], bool]:
        """The ids of each of ``lookups`` (their ``counts`` and ``lengths``, one after another) and
        whether the batch is exploded (it holds a bag of several ids), from one host sync."""
        if batch == 0 or lengths.numel() == 0:
            return counts.tolist(), True
        keys = counts.numel()
        read = torch.cat([counts, lengths.view(keys, batch).amax(1).to(counts.dtype)]).tolist()
        ids, largest = read[:keys], read[keys:]
        if max(largest) <= 1:
            return ids, False
        if not self._warned_padding:
            self._note_padding(lookups, ids, largest, batch)
        return ids, True

    @torch.jit.unused
    def _note_padding(self, lookups: List[int], counts: List[int], largest: List[int], batch: int) -> None:
        """Warns once when an exploded batch pads one-hot features (at most one id a bag) to the
        multi-hot features' id count with more padding bags than the lookup has ids: they share one
        per-id lookup, whose batch of bags is the most ids of a feature; declared one-hot, they
        would be looked up pooled. ``lookups``: the lookups (indices) ``counts`` and ``largest`` are of."""
        features, tables = [self._features[i] for i in lookups], [self._tables[i] for i in lookups]
        one_hot = [i for i, m in enumerate(largest) if m <= 1]
        rows = exploded_batch(max(counts), batch)
        if not one_hot or sum(rows - counts[i] for i in one_hot) < sum(counts):
            return
        self._warned_padding = True
        names = sorted({features[i] for i in one_hot})
        multi = sorted({features[i] for i, m in enumerate(largest) if m > 1})
        one_hot_tables = sorted({tables[i] for i in one_hot})
        warnings.warn(
            f"mult tables looked up per id: feature(s) {_few(names)} held at most one id a bag, but share their per-id lookup with "
            f"multi-hot {_few(multi)}, so each is padded to {rows:,} bags ({rows / max(1, max(counts[i] for i in one_hot)):.1f}x its ids), "
            f"which can make the step many times slower; if they are always one-hot, declare their tables so "
            f"(max_ids_per_bag=1: {_few(one_hot_tables)}) to look them up pooled",
            stacklevel=2,
        )

    @torch.jit.unused
    def _constants(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat plan's per-lookup parameters, permutation and largest bags on ``device`` (made once)."""
        if device not in self._flat_constants:
            plan = self._flat
            assert plan is not None
            params = torch.tensor(plan.params, dtype=torch.long, device=device).view(len(plan.params), len(plan.order))
            perm = torch.tensor(plan.perm, dtype=torch.int, device=device)
            self._flat_constants[device] = (params, perm, torch.tensor(plan.max_bags, dtype=torch.long, device=device))
        return self._flat_constants[device]

    @torch.jit.unused
    def _flat_applies(self, features: KeyedJaggedTensor) -> bool:
        """Whether the flat path maps ``features`` (one batch size: ``forward`` expanded a variable-batch
        KJT): not on meta (no ids), int64 or int32 ids (FBGEMM's permutes take no others), on CPU at
        most ``FLAT_CPU_MAX_IDS`` ids."""
        device = features.device().type
        if device == "meta" or features.values().dtype not in (torch.long, torch.int):
            return False
        return device != "cpu" or features.values().numel() <= FLAT_CPU_MAX_IDS

    @torch.jit.unused
    def _regrouping(self, keys: List[str], device: torch.device) -> Tuple[List[int], torch.Tensor]:
        """The indices of the KJT's keys that put its features in the flat plan's order, as a list
        and a tensor on ``device`` (made once per order of keys)."""
        at = f"{device}:" + ",".join(keys)
        if at not in self._flat_regroupings:
            index = {k: n for n, k in enumerate(keys)}
            indices = [index[self._features[i]] for i in self._flat_order]
            self._flat_regroupings[at] = (indices, torch.tensor(indices, dtype=torch.int, device=device))
        return self._flat_regroupings[at]

    @torch.jit.unused
    def _forward_flat(self, source: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The forward for lookups without learned mappings (eager mode): every part of every
        feature computed by one op per group of lookups of equal slots and part, and the
        sub-features put in order by one ``permute_1D_sparse_data`` (see ``_FlatPlan``); stacked
        parts side by side per id, one segment per lookup; exploded, each part's ids are one
        segment, whose bags of one id are made afterwards."""
        plan = self._flat
        assert plan is not None
        self._check_kjt(source)
        if self._identity and not (plan.check_ids or plan.check_bags) and self._passes_as_is(source):
            return source  # nothing to map or check
        keys, values, lengths, batch = source.keys(), source.values(), source.lengths(), source.stride()
        weights = source.weights() if self._is_weighted and not self._explode else None
        counts = lengths.view(len(keys), batch).sum(1)  # ids per key
        length_per_key: Optional[List[int]] = None
        if len(plan.groups) > 1 and not self._explode:
            length_per_key = source.length_per_key()
        in_order = keys == self._flat_features
        if not in_order:  # regrouped: one copy per key's ids (permute_2D_sparse_data copies bag by bag)
            indices, regroup = self._regrouping(keys, values.device)
            lengths = lengths.view(len(keys), batch).index_select(0, regroup).view(-1)
            _, values, weights = torch.ops.fbgemm.permute_1D_sparse_data(regroup, counts, values, weights, None)
            counts = counts.index_select(0, regroup)
            length_per_key = [length_per_key[i] for i in indices] if length_per_key is not None else None
        explode = self._explode
        if explode and torch.compiler.is_compiling():  # torch.export / compile: always exploded (no data-dependent branch)
            length_per_key = counts.tolist()
        elif explode:  # its features' ids and largest bag, read at once: a one-hot batch keeps its bags
            length_per_key, explode = self._explode_reading(counts, lengths, batch, plan.order)
        params, perm, max_bags = self._constants(values.device)
        n, lookups = values.numel(), len(plan.order)
        # each row of params repeated over its lookups' ids (row by row: contiguous, far faster than along dim 1)
        per_id = [params[r].repeat_interleave(counts, output_size=n) for r in range(len(plan.params))]
        ids = values if values.dtype == torch.long else values.long()
        self._check_flat(source, ids, lengths.view(lookups, batch), per_id, max_bags)
        if self._identity and in_order and values.dtype == torch.long:  # passed on as it is
            return source
        # per lookup its bags' lengths; exploded: its id count, the one bag of each of its parts
        bags_2d = counts.view(lookups, 1) if explode else lengths.view(lookups, batch)
        out_values, out_lengths, block_counts, out_weights = _flat_segments(plan, ids, per_id, bags_2d, counts, weights, length_per_key)
        if plan.permutes:  # segments to sub-features: one copy per segment's ids
            segment_counts = block_counts[0] if len(block_counts) == 1 else torch.cat(block_counts)
            _, out_values, out_weights = torch.ops.fbgemm.permute_1D_sparse_data(perm, segment_counts, out_values, out_weights, out_values.numel())
            out_lengths = out_lengths.view(plan.segments, bags_2d.size(1)).index_select(0, perm)
        sub_length_per_key = None
        if length_per_key is not None:
            sub_length_per_key = [length_per_key[i] * k for i, k in plan.sub_lengths]
        if explode:  # as _exploded: per sub-feature, its n ids in its first n of the most ids' bags
            assert length_per_key is not None
            batch = exploded_batch(max(length_per_key), batch)
            rank = torch.arange(batch, device=values.device)
            out_lengths = (rank.unsqueeze(0) < out_lengths.view(-1, 1)).to(lengths.dtype)
        return KeyedJaggedTensor(
            keys=self._sub_keys,
            values=out_values,
            lengths=out_lengths.view(-1),
            weights=out_weights,
            stride=batch,
            length_per_key=sub_length_per_key,
        )

    @torch.jit.unused
    def _check_flat(
        self, source: KeyedJaggedTensor, values: torch.Tensor, lengths: torch.Tensor, per_id: List[torch.Tensor], max_bags: torch.Tensor
    ) -> None:
        """``check_id_ranges`` for the flat forward: whether any id is out of its table's range or
        any bag too large, read at once (one host sync); if so, ``check_id_ranges`` says which."""
        plan = self._flat
        assert plan is not None
        bad: List[torch.Tensor] = []
        if plan.check_ids and values.numel() > 0:  # every id in [low, last] of its table
            low = per_id[plan.low_row] if plan.low_row >= 0 else plan.low
            last = per_id[plan.last_row] if plan.last_row >= 0 else plan.last
            if isinstance(low, int) and isinstance(last, int):
                bad.append(values.clamp(low, last).ne(values).any())
            else:
                bad.append(((values < low) | (values > last)).any())
        if plan.check_bags and lengths.numel() > 0:
            bad.append((lengths > (max_bags.unsqueeze(1) if plan.max_bag < 0 else plan.max_bag)).any())
        if len(bad) > 0 and bool((bad[0] | bad[1]) if len(bad) == 2 else bad[0]):
            by_key = source.to_dict()
            check_id_ranges(self._lookups, [by_key[lk.feature] for lk in self._lookups])

    def _values(self, rows: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each sub-feature's values from its parts' rows: a part's rows as they are, or a stacked
        table's: per id its k parts' rows, each moved to its part's rows of the table
        (``StackedRows``), side by side (``[q0', r0', q1', r1', ...]``), so every bag stays contiguous."""
        values: List[torch.Tensor] = []
        for j in range(len(self._sub_keys)):
            parts = self._sub_parts[j]
            if len(parts) == 1:
                values.append(rows[parts[0]])
                continue
            moved: List[torch.Tensor] = []
            for p in parts:
                mul, add, div, shift = self._placement[p]
                moved.append(place_rows(rows[p], mul, add, div, shift))
            values.append(torch.stack(moved, dim=1).view(-1))
        return values
