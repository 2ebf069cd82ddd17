"""A servable model: quantized tables, traced with TorchRec's tracer, scripted."""

import copy
from typing import Optional

import torch
import torchrec
from torch import nn

from torchrec_multihash.inference.quantize import quantize_embeddings, refuse_mch


def export_model(model: nn.Module, dtype: Optional[torch.dtype] = torch.qint8, row_alignment: Optional[int] = None) -> torch.jit.ScriptModule:
    """A TorchScript copy of ``model`` (float, unsharded) with its tables quantized to ``dtype``
    (None: kept float), for ``torch.jit.save``. It runs where torch, torchrec and fbgemm_gpu are
    installed, without this package. The input checks of eager mode are not part of it.
    ``row_alignment``: see ``quantize_embeddings``."""
    refuse_mch(model, "export_model")
    model = copy.deepcopy(model).eval()
    if dtype is not None:
        model = quantize_embeddings(model, dtype, inplace=True, row_alignment=row_alignment)
    return torch.jit.script(torchrec.fx.symbolic_trace(model))
