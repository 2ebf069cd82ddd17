"""Quantizes every inner table of a model: TorchRec's ``quantize_embeddings`` over its
``EmbeddingBagCollection`` s (pooled and per-id lookups) and, in other models, its
``EmbeddingCollection`` s, which TorchRec's function leaves in float unless told."""

import copy
from typing import Dict, Optional

import torch
from torch import nn
from torchrec.inference.modules import quantize_embeddings as torchrec_quantize_embeddings
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from torchrec_multihash.errors import MultiHashError


def refuse_mch(model: nn.Module, what: str) -> None:
    """Raises MultiHashError if ``model`` holds TorchRec's MCH tables (the training baseline), which
    ``what`` does not support."""
    if any(isinstance(m, ManagedCollisionEmbeddingBagCollection) for m in model.modules()):
        raise MultiHashError(
            f"{what} does not support TorchRec's MCH tables (embeddings.strategy mch, a training baseline): their remapper "
            "has no quantized or scripted inference path in this project; export a multi-hash model instead"
        )


# the row formats TorchRec's quantized tables support, by the name the export command takes
QUANT_DTYPES: Dict[str, torch.dtype] = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16}


def quantize_embeddings(model: nn.Module, dtype: torch.dtype = torch.qint8, inplace: bool = False, row_alignment: Optional[int] = None) -> nn.Module:
    """``model`` with every stock TorchRec table inside it (ours and any other) replaced by
    TorchRec's quantized module of rows in ``dtype`` (``torch.qint8``, ``torch.quint4x2`` or
    ``torch.float16``); outputs stay float32. The result runs, traces and scripts as the float model.
    ``row_alignment``: bytes each stored row is padded to (TorchRec's default 16 suits GPU kernels;
    4 stores small rows tighter)."""
    refuse_mch(model, "quantize_embeddings")
    if not inplace:
        model = copy.deepcopy(model)
    if row_alignment is not None:
        quant_prep_customize_row_alignment(model, [EmbeddingBagCollection, EmbeddingCollection], row_alignment)
    return torchrec_quantize_embeddings(
        model,
        dtype,
        True,
        additional_qconfig_spec_keys=[EmbeddingCollection],
        additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
    )


def _stored_bytes(module: nn.Module) -> int:
    """Bytes of one table module's weights as stored."""
    if isinstance(module, (QuantEmbeddingBagCollection, QuantEmbeddingCollection)):
        # FBGEMM's kernels hold each group's rows in one buffer (int4 packed two to a byte, the per-row
        # scale and bias, rows padded to the row alignment), which a TorchScript export stores as it is;
        # the module's state_dict shows int4 rows as UInt4Tensor views of twice their bytes
        kernels = module._emb_modules
        return sum(t.numel() * t.element_size() for k in kernels for t in (k.weights_host, k.weights_dev, k.weights_uvm))
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def embedding_bytes(model: nn.Module) -> int:
    """Bytes the model's embedding tables take as stored (what a TorchScript export of it holds): float
    weights of TorchRec's modules, or the quantized rows of its quantized modules as FBGEMM keeps them
    (packed, with their per-row scale and bias, padded to the row alignment), plus our learned mappings."""
    from torchrec_multihash.modules.learned_mapping import LearnedMapping

    tables = (EmbeddingBagCollection, EmbeddingCollection, QuantEmbeddingBagCollection, QuantEmbeddingCollection, LearnedMapping)
    return sum(_stored_bytes(module) for module in model.modules() if isinstance(module, tables))
