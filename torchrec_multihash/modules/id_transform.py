"""The parameter-free module that rewrites a KJT of logical features into sub-table lookups.

It sits in front of an ordinary TorchRec ``EmbeddingBagCollection``. For the per-id (mult) tables it
"explodes" every bag into one bag per id (see ``IdTransform``), so that a SUM-pooled
``EmbeddingBagCollection`` returns one row per id.
Being parameter-free, ``TrainPipelineSparseDist(pipeline_postproc=True)`` runs it in the
input-dist stage of the pipeline, overlapped with compute.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.learned_mapping import LearnedMapping
from torchrec_multihash.modules.strategies import Strategy
from torchrec_multihash.modules.strategies.base import partition_rows


class InvalidInputError(MultiHashError, ValueError):
    """An input KJT that the module cannot look up; the message names feature, table and id."""


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


_NO_LIMIT = 2**63 - 1


def check_id_ranges(lookups: Sequence[FeatureLookup], features: KeyedJaggedTensor, by_key: Dict[str, JaggedTensor]) -> None:
    """Raises InvalidInputError if an id lies outside [0, num_embeddings) of its table, or a bag
    holds more than its table's ``max_ids_per_bag`` ids.

    A few ops over the KJT's flat ids and lengths (each compared with its feature's bounds) and
    one host sync for all features; the feature at fault is looked for only when one is.
    """
    values, lengths = features.values(), features.lengths()
    if values.device.type == "meta":  # meta has no ids to read
        return
    keys = features.keys()
    lo: Dict[str, int] = {}
    hi: Dict[str, int] = {}
    bags: Dict[str, int] = {}
    for lk in lookups:
        if not lk.strategy.accepts_any_id:
            lo[lk.feature] = 0
            hi[lk.feature] = min(hi.get(lk.feature, _NO_LIMIT), lk.num_embeddings)
        if lk.max_ids_per_bag is not None:
            bags[lk.feature] = min(bags.get(lk.feature, _NO_LIMIT), lk.max_ids_per_bag)
    if features.variable_stride_per_key() or not (lo or bags):
        return _check_each(lookups, [by_key[lk.feature] for lk in lookups])
    device = values.device
    flags: List[torch.Tensor] = []
    if lo and values.numel() > 0:
        counts = torch.tensor(features.length_per_key(), device=device)
        bounds = torch.tensor([[lo.get(k, -_NO_LIMIT - 1), hi.get(k, _NO_LIMIT)] for k in keys], device=device)
        per_id = bounds.repeat_interleave(counts, dim=0, output_size=values.numel())
        flags.append(((values < per_id[:, 0]) | (values >= per_id[:, 1])).any())
    if bags and lengths.numel() > 0:
        most = torch.tensor([bags.get(k, _NO_LIMIT) for k in keys], device=device)
        flags.append((lengths.view(len(keys), -1) > most.unsqueeze(1)).any())
    if flags and any(torch.stack(flags).tolist()):
        _check_each(lookups, [by_key[lk.feature] for lk in lookups])


def _check_each(lookups: Sequence[FeatureLookup], jts: Sequence[JaggedTensor]) -> None:
    """``check_id_ranges`` feature by feature, naming the first at fault."""
    stats: List[torch.Tensor] = []
    checks: List[tuple] = []  # (lookup, jagged tensor, what): "ids" reads 2 stats, "bags" 1
    for lk, jt in zip(lookups, jts):
        v = jt.values()
        if v.device.type == "meta":  # meta has no ids to read
            continue
        if not lk.strategy.accepts_any_id and v.numel() > 0:
            stats += list(torch.aminmax(v))
            checks.append((lk, jt, "ids"))
        if lk.max_ids_per_bag is not None and jt.lengths().numel() > 0:
            stats.append(jt.lengths().max().to(v.dtype))
            checks.append((lk, jt, "bags"))
    if not checks:
        return
    read = iter(torch.stack(stats).tolist())
    for lk, jt, what in checks:
        if what == "bags":
            if next(read) > lk.max_ids_per_bag:
                raise _bag_error(lk, jt.lengths())
            continue
        lo, hi = next(read), next(read)
        if lo < 0 or hi >= lk.num_embeddings:
            values = jt.values()
            bad = ((values < 0) | (values >= lk.num_embeddings)).nonzero()[0].item()
            raise InvalidInputError(
                f"feature '{lk.feature}' (table '{lk.table}', num_embeddings={lk.num_embeddings}): "
                f"id {values[bad].item()} at position {bad} of the feature's values is outside "
                f"[0, {lk.num_embeddings}); use strategy='hash' for unbounded ids"
            )


@torch.fx.wrap
def _partition(ids: List[torch.Tensor], source: List[int], divisors: List[int], moduli: List[int]) -> torch.Tensor:
    """Every sub-feature's rows, ``(x // divisor) % modulus`` of its feature's ids, concatenated in
    sub-feature order: one division and one remainder over all of them (a leaf call for fx)."""
    parts = [ids[i] for i in source]
    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    if divisors.count(divisors[0]) == len(divisors) and moduli.count(moduli[0]) == len(moduli):
        return partition_rows(flat, divisors[0], moduli[0])
    device = flat.device
    counts = torch.tensor([p.numel() for p in parts], device=device)
    no_limit = 9223372036854775807  # remainder by it leaves an id as it is
    spec = torch.tensor([[d, m if m > 0 else no_limit] for d, m in zip(divisors, moduli)], device=device)
    per_id = spec.repeat_interleave(counts, dim=0, output_size=flat.numel())
    rows = flat if max(divisors) == 1 else torch.div(flat, per_id[:, 0], rounding_mode="floor")
    return rows if max(moduli) == 0 else torch.remainder(rows, per_id[:, 1])


@torch.fx.wrap
def _exploded(keys: List[str], values: torch.Tensor, counts: List[int], lengths_dtype: torch.dtype) -> KeyedJaggedTensor:
    """The KJT of sub-features with one bag per id: a batch of ``max(1, most ids of a sub-feature)``
    bags per key, the ``n = counts[j]`` ids of sub-feature ``j`` in its first ``n`` bags (length 1),
    the rest empty (padding). A leaf call for fx."""
    stride = max(1, max(counts))
    device = values.device
    n = torch.tensor(counts, device=device)
    lengths = (torch.arange(stride, device=device).unsqueeze(0) < n.unsqueeze(1)).to(lengths_dtype).view(-1)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=stride)


@torch.fx.wrap
def _sub_features(
    keys: List[str], values: torch.Tensor, lengths: List[torch.Tensor], weights: Optional[List[torch.Tensor]], stride: int
) -> KeyedJaggedTensor:
    """The KJT of sub-features (a leaf call for fx: a KJT cannot be built from proxies)."""
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights is not None else None,
        stride=stride,
    )


class IdTransform(nn.Module):
    """Maps a KJT of logical features to a KJT of sub-features, one per partition.

    Feature ``C1`` of a Q-R table becomes ``C1`` (ids ``x // m``) and ``C1__r`` (ids ``x % m``),
    with the same lengths and per-sample weights. Tables with a learned mapping first map ids to
    rows; the mappings (buffers, no parameters) are children of the transform, in ``mappings``.

    With ``explode`` (the per-id lookups of mult tables), every bag becomes one bag per id: the
    output KJT has a batch of ``max(1, most ids of a feature in the batch)`` bags per sub-feature,
    the ``n`` ids of a sub-feature in its first ``n`` bags, one id each, in the order of the
    feature's values, and the rest empty; no weights (the combine applies them after the product).
    A SUM-pooled ``EmbeddingBagCollection`` then returns one row per id, which ``Combine`` reads
    as an ``[ids, features, parts, dim]`` view.
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
    _source: List[int]
    _divisors: List[int]
    _moduli: List[int]
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
        # what the forward reads, as plain lists: per lookup its feature and table; per sub-feature
        # its key, its lookup and its partition (row = (id // divisor) % modulus)
        self._features = [lk.feature for lk in lookups]
        self._tables = [lk.table for lk in lookups]
        self._sub_keys = [s for lk in lookups for s in lk.sub_features]
        self._source = [i for i, lk in enumerate(lookups) for _ in lk.sub_features]
        spec = [p for lk in lookups for p in lk.strategy.partition_spec()]
        self._divisors = [d for d, _ in spec]
        self._moduli = [m for _, m in spec]
        # a one-hot mult bag pooled is w * q[x] times w * r[x]: weighting its first part alone
        # leaves w * q[x] * r[x], as per id
        self._unit_weights = [lk.pooled_mult and p > 0 for lk in lookups for p in range(len(lk.sub_features))]
        # every sub-feature its feature's ids as they are (full tables, one each): a KJT of exactly
        # those keys, in that order, is passed on as it is instead of being cut up and rebuilt
        self._identity = (
            not explode
            and not self.mappings
            and self._sub_keys == self._features
            and all(d == 1 and m == 0 for d, m in spec)
            and not any(self._unit_weights)
        )

    @torch.jit.unused
    def check(self, features: KeyedJaggedTensor, by_key: Dict[str, JaggedTensor]) -> None:
        """Raises InvalidInputError for a KJT the module cannot look up (eager mode only);
        ``by_key``: its ``to_dict()``, which the forward reads too."""
        check_feature_keys(features.keys(), self._required, self._known_features)
        if features.values().is_floating_point():  # .long() would truncate them to other rows
            raise InvalidInputError(f"the KJT's ids are {features.values().dtype}: pass integer ids (int64 or int32)")
        if self._is_weighted and features.weights_or_none() is None:
            raise InvalidInputError("the module is weighted (is_weighted=True) but the KJT has no weights")
        if self._validate_ids:
            check_id_ranges(self._lookups, features, by_key)

    @torch.jit.unused
    def _passes_as_is(self, features: KeyedJaggedTensor) -> bool:
        """Eager mode: the KJT holds exactly the sub-features' keys, in order, with int64 ids."""
        return features.keys() == self._sub_keys and features.values().dtype == torch.long

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not torch.jit.is_scripting():
            if self._identity and not (is_fx_symbolic_tracing() or torch.compiler.is_compiling()) and self._passes_as_is(features):
                self.check(features, features.to_dict() if self._validate_ids else {})
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
        values = _partition(ids, self._source, self._divisors, self._moduli)
        if self._explode:
            counts: List[int] = [ids[i].numel() for i in self._source]
            return _exploded(self._sub_keys, values, counts, features.lengths().dtype)
        lengths: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for j in range(len(self._sub_keys)):
            i = self._source[j]
            jt = by_key[self._features[i]]
            lengths.append(jt.lengths())
            if self._is_weighted:
                weights.append(torch.ones_like(jt.weights()) if self._unit_weights[j] else jt.weights())
        return _sub_features(self._sub_keys, values, lengths, weights if self._is_weighted else None, features.stride())
