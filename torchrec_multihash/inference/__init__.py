"""Inference: quantized sub-tables (TorchRec's quantized modules) and scripted, servable models."""

from torchrec_multihash.inference.export import export_model  # noqa: F401
from torchrec_multihash.inference.quantize import QUANT_DTYPES, embedding_bytes, quantize_embeddings  # noqa: F401
