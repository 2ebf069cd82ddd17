"""The id transform's input checks: the KJT's keys, ids within each table, bags within ``max_ids_per_bag``;
errors that name the feature, table, id and bag."""

from typing import List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_multihash.errors import InvalidInputError
from torchrec_multihash.modules.feature_lookup import FeatureLookup

INT64_MIN = -(2**63)


INT64_MAX = 2**63 - 1


def few_names(names: List[str], most: int = 6) -> str:
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
