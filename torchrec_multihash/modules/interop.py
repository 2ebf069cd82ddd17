"""Moving between TorchRec's EmbeddingBagCollection and ours: build ours from a stock one, read the
composed embedding of any id, and materialise plain full-size tables from ours."""

from typing import Any, Optional

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.modules.config import MultiHashConfigError
from torchrec_multihash.modules.convert import to_multihash_configs
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection


def from_embedding_bag_collection(ebc: EmbeddingBagCollection, compression: float, **kwargs: Any) -> MultiHashEmbeddingBagCollection:
    """Our module for a stock ``EmbeddingBagCollection``'s tables (same names, features, dims,
    pooling, weighting and device), each shrunk ``compression``-fold (``kwargs``: those of
    ``to_multihash_configs``, e.g. ``strategy``, ``operation``). Tables that stay full (small ones,
    or ``compression=1``) take over the stock module's weights; compressed ones start anew."""
    configs = to_multihash_configs(ebc.embedding_bag_configs(), compression, **kwargs)
    weights = {name: m.weight for name, m in ebc.embedding_bags.items()}
    device = next(iter(weights.values())).device if weights else None
    ours = MultiHashEmbeddingBagCollection(configs, is_weighted=ebc.is_weighted(), device=device)
    with torch.no_grad():
        for name, w in ours.sub_table_weights().items():
            if name in weights and weights[name].shape == w.shape and w.device.type != "meta":
                w.copy_(weights[name])
    return ours


def composed_embeddings(module: MultiHashEmbeddingBagCollection, table: str, ids: torch.Tensor) -> torch.Tensor:
    """The embedding ``[len(ids), embedding_dim]`` the (unsharded) module gives each id of ``table``
    on its own: composed from its sub-table rows, as a bag of one id looks it up."""
    config = next((t for t in module.multihash_configs() if t.name == table), None)
    if config is None:
        raise MultiHashConfigError(f"no table '{table}'; the module's tables: {[t.name for t in module.multihash_configs()]}")
    keys = sorted({f for t in module.multihash_configs() for f in t.feature_names})
    feature = config.feature_names[0]
    n = ids.numel()
    lengths = torch.cat([torch.ones(n, dtype=torch.int64) if k == feature else torch.zeros(n, dtype=torch.int64) for k in keys])
    weights = torch.ones(n) if module.is_weighted() else None
    kjt = KeyedJaggedTensor(keys=keys, values=ids.long().flatten(), lengths=lengths, weights=weights).to(module.device)
    out = module(kjt).to_dict()
    # the output of a feature several tables look up is named feature@table
    return out[feature] if feature in out else out[f"{feature}@{table}"]


def to_embedding_bag_collection(
    module: MultiHashEmbeddingBagCollection, device: Optional[torch.device] = None, batch_size: int = 65_536
) -> EmbeddingBagCollection:
    """A stock ``EmbeddingBagCollection`` of full-size tables holding every id's composed embedding
    (to migrate a model back to plain tables): ``num_embeddings x embedding_dim`` floats per table."""
    configs = module.embedding_bag_configs()
    ebc = EmbeddingBagCollection(configs, is_weighted=module.is_weighted(), device=device)
    with torch.no_grad():
        for c in configs:
            weight = ebc.embedding_bags[c.name].weight
            for start in range(0, c.num_embeddings, batch_size):
                ids = torch.arange(start, min(start + batch_size, c.num_embeddings))
                weight[start : start + ids.numel()] = composed_embeddings(module, c.name, ids).to(weight)
    return ebc
