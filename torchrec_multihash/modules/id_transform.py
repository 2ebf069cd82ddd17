"""The parameter-free module that rewrites a KJT of logical features into sub-table lookups.

It sits in front of an ordinary TorchRec ``EmbeddingBagCollection``. For the per-id (mult) tables it
"explodes" every bag into one bag per id (see ``IdTransform``), so that a SUM-pooled
``EmbeddingBagCollection`` returns one row per id.
Being parameter-free, ``TrainPipelineSparseDist(pipeline_postproc=True)`` runs it in the
input-dist stage of the pipeline, overlapped with compute.
"""

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_multihash.errors import InvalidInputError
from torchrec_multihash.modules.feature_lookup import FeatureLookup
from torchrec_multihash.modules.flat_plan import FLAT_CPU_MAX_IDS, FlatPlan, flat_segments, sub_feature_order
from torchrec_multihash.modules.id_checks import check_feature_keys, check_id_ranges, few_names
from torchrec_multihash.modules.strategies import StackedRows
from torchrec_multihash.modules.strategies.base import partition_rows, place_rows
from torchrec_multihash.modules.variable_batch import expand_variable_batch

torch.fx.wrap("expand_variable_batch")  # a leaf for fx here too (wrap patches the caller's globals)


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
    In eager mode, lookups without learned mappings map all features at once (``FlatPlan``): one
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
        self._flat: Optional[FlatPlan] = None
        if not self.mappings:
            self._flat = FlatPlan(lookups, validate_ids, order)
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
            f"mult tables looked up per id: feature(s) {few_names(names)} held at most one id a bag, but share their per-id lookup with "
            f"multi-hot {few_names(multi)}, so each is padded to {rows:,} bags ({rows / max(1, max(counts[i] for i in one_hot)):.1f}x its ids), "
            f"which can make the step many times slower; if they are always one-hot, declare their tables so "
            f"(max_ids_per_bag=1: {few_names(one_hot_tables)}) to look them up pooled",
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
        sub-features put in order by one ``permute_1D_sparse_data`` (see ``FlatPlan``); stacked
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
        out_values, out_lengths, block_counts, out_weights = flat_segments(plan, ids, per_id, bags_2d, counts, weights, length_per_key)
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
