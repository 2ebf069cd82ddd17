"""Variable-batch KJTs (TorchRec's VBE: a batch size per key, plus inverse indices that say which
of a key's bags each sample reads) as the plain KJT they stand for.

TorchRec's ``EmbeddingBagCollection`` pools each key's bags, then repeats the pooled rows by the
inverse indices. Pooling commutes with that repetition, so the module repeats the bags first and
everything after (id transform, lookups, combine) sees one batch size: the same outputs as the
stock module, at the cost of looking up a repeated bag once per sample that reads it.
"""

from typing import List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.errors import InvalidInputError


@torch.jit.unused
def _check_inverse_indices(features: KeyedJaggedTensor) -> None:
    """Raises InvalidInputError unless every key of the variable-batch ``features`` has inverse
    indices within its batch size (eager mode)."""
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        raise InvalidInputError(
            "the KJT has a batch size per key (stride_per_key_per_rank) but no inverse_indices: which of a key's bags each sample reads is unknown"
        )
    names, index = inverse
    missing = [k for k in features.keys() if k not in names]
    if missing:
        raise InvalidInputError(
            f"the variable-batch KJT has no inverse indices for feature(s) {missing} "
            f"(its inverse_indices name {names}): each key needs the index of its bag for every sample"
        )
    if index.numel() == 0:
        return
    for key, stride in zip(features.keys(), features.stride_per_key()):
        bags = index[names.index(key)]
        low, high = int(bags.min()), int(bags.max())
        if low < 0 or high >= stride:
            raise InvalidInputError(f"feature '{key}': its inverse indices must lie in [0, {stride}) (its batch size), got [{low}, {high}]")


@torch.fx.wrap
def expand_variable_batch(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``features`` itself, unless it is a variable-batch KJT: then a KJT of the same keys with one
    bag per sample for every key, key ``k``'s bag ``b`` its bag ``inverse_indices[k][b]``."""
    if not features.variable_stride_per_key():
        return features
    if not torch.jit.is_scripting():
        _check_inverse_indices(features)
    inverse = features.inverse_indices_or_none()
    assert inverse is not None
    names, index = inverse[0], inverse[1]
    keys = features.keys()
    strides = features.stride_per_key()
    device = features.values().device
    index = index.to(device=device, dtype=torch.long)
    rows: List[torch.Tensor] = []
    start = 0
    for j in range(len(keys)):
        rows.append(index[names.index(keys[j])] + start)
        start += strides[j]
    bag = torch.cat(rows) if len(rows) > 0 else torch.zeros(0, dtype=torch.long, device=device)
    lengths = features.lengths().index_select(0, bag)
    starts = features.offsets().index_select(0, bag).long()
    long_lengths = lengths.long()
    total = int(long_lengths.sum().item())
    ends = torch.cumsum(long_lengths, 0)
    # id i of the result: its bag's first id in the source, plus its place in the bag
    shift = torch.repeat_interleave(starts - (ends - long_lengths), long_lengths, output_size=total)
    pos = shift + torch.arange(total, device=device)
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=features.values().index_select(0, pos),
        weights=weights.index_select(0, pos) if weights is not None else None,
        lengths=lengths,
        stride=index.size(1),
    )
