"""The flat id transform (eager mode): every part of every feature computed by one op per group of
lookups of equal slots and part, the sub-features put in order by one permute (``FlatPlan``)."""

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from torchrec_multihash.modules.feature_lookup import FeatureLookup
from torchrec_multihash.modules.id_checks import INT64_MAX, INT64_MIN

# On CPU, past this many ids the flat path's extra passes over them (the parts side by side, then
# permuted) cost more than the per-feature path's ops; on a GPU, where each op is a kernel launch
# and passes over the ids are cheap, the flat path runs at any size.
FLAT_CPU_MAX_IDS = 1 << 16


class SlotKind(IntEnum):
    """How the flat transform computes one part's rows of an id ``x``."""

    QUOTIENT = 0  # x // d
    REMAINDER = 1  # x - q * m, q the quotient another slot (``reuse``) computed for the same id
    DIVMOD = 2  # (x // d) % m


@dataclass
class FlatGroup:
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


def slot_of(lk: FeatureLookup, p: int, spec: List[Tuple[int, int]]) -> Tuple[SlotKind, int, bool, bool, bool, bool]:
    """Part ``p`` of a lookup as (kind, reuse, divides, reduces, unit weight, stacked): see
    ``FlatGroup``."""
    d, m = spec[p]
    reuse = next((q for q in range(len(spec)) if spec[q] == (m, 0)), -1) if d == 1 and m > 0 else -1
    kind = SlotKind.QUOTIENT if m == 0 else (SlotKind.REMAINDER if reuse >= 0 else SlotKind.DIVMOD)
    return kind, reuse, d != 1, m != 0, lk.pooled_mult and p > 0, lk.stacked_rows is not None


def lookup_groups(lookups: Sequence[FeatureLookup]) -> List[Tuple[tuple, List[int]]]:
    """The lookups (indices) grouped by equal slots (``slot_of`` of each part), each group in order,
    groups in order of first appearance, with their slots: what the flat transform maps with the
    same ops."""
    groups: Dict[tuple, List[int]] = {}
    for i, lk in enumerate(lookups):
        spec = lk.strategy.partition_spec()
        groups.setdefault(tuple(slot_of(lk, p, spec) for p in range(len(spec))), []).append(i)
    return list(groups.items())


def sub_feature_order(lookups: Sequence[FeatureLookup]) -> List[Tuple[int, int]]:
    """The order of the id transform's sub-features, ``(lookup, its sub-feature)``, which the inner
    EmbeddingBagCollection's features follow too (but for a concat table of several features: a
    TorchRec table's features are consecutive): the lookups in order, each with its sub-features
    side by side (concat, single tables: the output's own layout, which the combine then passes on
    without a copy), except ``part_major`` lookups (add, mult): at the first of those of a group of
    equal slots (``lookup_groups``), every first part of them, then every second part, ..., so that
    each part is one column block of the lookup's output, composed by one op over contiguous rows."""
    group_of = {i: members for _, members in lookup_groups(lookups) for i in members}
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


class FlatPlan:
    """How ``IdTransform`` maps all features at once (lookups without learned mappings): the KJT
    regrouped by lookups of equal slots (``order``, lookup indices), each
    group's parts computed over its ids at once into a ``[slots, ids]`` block, and one
    ``permute_1D_sparse_data`` (``perm``) putting the blocks' segments in the sub-features' order
    (``sub_features``: ``sub_feature_order``). Per-id divisors, moduli and id bounds come from
    ``params`` (rows of per-lookup values, in ``order``), repeated over each lookup's ids."""

    def __init__(self, lookups: List[FeatureLookup], validate_ids: bool, sub_features: List[Tuple[int, int]]) -> None:
        specs = [lk.strategy.partition_spec() for lk in lookups]
        slots = lookup_groups(lookups)
        self.order = [i for _, members in slots for i in members]
        position = {i: n for n, i in enumerate(self.order)}
        self.params: List[List[int]] = []
        self.groups: List[FlatGroup] = []
        segment = 0
        first: Dict[Tuple[int, int], int] = {}  # (lookup, part) -> its segment in the blocks
        for sig, members in slots:
            kinds, reuse, divides, reduces, unit_weights, stacked = (list(column) for column in zip(*sig))
            g = FlatGroup(members, kinds, reuse, divides, reduces, [], [], [], [], unit_weights, stacked[0])
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
        low = [0 if c else INT64_MIN for c in checked]
        last = [lookups[i].num_embeddings - 1 if c else INT64_MAX for i, c in zip(self.order, checked)]
        # [low, last] of every id: an int where all lookups share it, else a row of params
        self.low, self.low_row = self._value_or_row(self.order, position, low)
        self.last, self.last_row = self._value_or_row(self.order, position, last)
        self.max_bags = [lookups[i].max_ids_per_bag or INT64_MAX for i in self.order]
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


def placed_rows(
    r: torch.Tensor, mul: Union[int, torch.Tensor], add: Union[int, torch.Tensor], div: Union[int, torch.Tensor], shift: Union[int, torch.Tensor]
) -> torch.Tensor:
    """``place_rows`` of a group of lookups (the flat transform): each parameter an int that all
    share, or a per-id tensor."""
    return torch.div(r * mul + add, div, rounding_mode="floor") + r + shift


def group_rows(g: FlatGroup, ids: torch.Tensor, per_id: List[torch.Tensor]) -> List[torch.Tensor]:
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


def flat_segments(
    plan: "FlatPlan",
    ids: torch.Tensor,
    per_id: List[torch.Tensor],
    bags_2d: torch.Tensor,
    counts: torch.Tensor,
    weights: Optional[torch.Tensor],
    length_per_key: Optional[List[int]],
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
    """The flat plan's segments, group by group (``FlatPlan.groups``): their ids' rows, their bags'
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
        rows = group_rows(g, x, per)
        if g.stacked:  # per id its k rows side by side, each moved to its part's rows
            k = len(rows)
            moved = [placed_rows(r, *[per[row] if row >= 0 else value for value, row in g.placement[p]]) for p, r in enumerate(rows)]
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
