"""``torchrec-multihash export``: a trained model as one TorchScript file, its tables quantized,
that ``torch.jit.load`` runs on (dense features, KJT) with torch, torchrec and fbgemm_gpu alone."""

import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_configs import DataType

from torchrec_multihash.app.config import Config, ConfigError, config_parser, load_config
from torchrec_multihash.app.data import make_data
from torchrec_multihash.app.model import build_model, is_mch, multihash_module
from torchrec_multihash.app.quiet import quiet
from torchrec_multihash.app.run_folder import check_checkpoint_run
from torchrec_multihash.app.train_state import checkpoint_dir
from torchrec_multihash.argtypes import file_to_write
from torchrec_multihash.distributed.checkpoint import find_checkpoint, load_checkpoint
from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.inference import QUANT_DTYPES, embedding_bytes, export_model, quantize_embeddings


def load_trained_model(cfg: Config, checkpoint: Path) -> nn.Module:
    """The config's DLRM (unsharded, CPU) with the weights, and learned mappings, of ``checkpoint``
    (the run folder's only while it is that of the run the folder belongs to: ``run_folder``)."""
    if is_mch(cfg):
        raise ConfigError(
            "export does not support embeddings.strategy mch (TorchRec's MCH remapper, a training baseline): "
            "its remapper has no quantized or scripted inference path in this project"
        )
    found = find_checkpoint(checkpoint)
    if found is None:
        raise ConfigError(f"no checkpoint in {checkpoint} (train with train.checkpoint_every > 0, or give --checkpoint)")
    if Path(checkpoint).resolve() == checkpoint_dir(cfg).resolve():
        check_checkpoint_run(Path(cfg.train.output_dir), found)
    # the table sizes (a vocabulary's come from the run: that of the data the checkpoint was trained on)
    data = make_data(cfg, 0, 1, Path(cfg.train.output_dir), checkpoint)
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature
    trained = DLRMTrain(build_model(cfg, device=torch.device("cpu")))
    load_checkpoint(checkpoint, trained)
    return trained.model


def evaluate_model(model: nn.Module, batches: Iterable[Batch]) -> Dict[str, float]:
    """AUC and log loss of ``model(dense, kjt)`` (eager or scripted) over ``batches``."""
    auroc, loss_sum, n = BinaryAUROC(), 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b.dense_features, b.sparse_features).squeeze(-1)
            auroc.update(torch.sigmoid(logits), b.labels.long())
            loss_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels, reduction="sum"))
            n += b.labels.numel()
    return {"auc": float(auroc.compute()), "logloss": loss_sum / max(n, 1)}


def _report(model: nn.Module, dtype: Optional[torch.dtype], row_alignment: Optional[int]) -> str:
    ebc = multihash_module(model)
    stored = embedding_bytes(quantize_embeddings(model, dtype, row_alignment=row_alignment) if dtype is not None else model)
    full = ebc.full_memory_bytes()
    rows = "/".join(sorted({"fp16" if t.data_type == DataType.FP16 else "fp32" for t in ebc.multihash_configs()}))
    return (
        f"Embedding bytes: {stored:,} exported vs {ebc.memory_bytes():,} trained ({rows} rows) and {full:,} for fp32 full "
        f"tables: {full / stored:.1f}x smaller than the full tables"
    )


# notices of torch's TorchScript compiler and DCP's single-process load that say nothing to the user
_NOTICES = ("The TorchScript type system", "TorchScript will treat type annotations", "torch.distributed is disabled")


def main(argv: Optional[List[str]] = None) -> int:
    p = config_parser("torchrec-multihash export", __doc__)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: train.output_dir/checkpoint)")
    p.add_argument("--out", type=file_to_write, required=True, help="the TorchScript file to write")
    p.add_argument("--dtype", choices=[*QUANT_DTYPES, "fp32"], default="int8", help="row format of the exported tables (fp32: as trained)")
    p.add_argument("--row-alignment", type=int, default=None, help="bytes each quantized row is padded to (TorchRec's default: 16)")
    p.add_argument("--evaluate", action="store_true", help="AUC and log loss of the trained and the exported model on the test data")
    args = p.parse_args(argv)
    dtype = QUANT_DTYPES.get(args.dtype)
    with quiet(), warnings.catch_warnings():
        for notice in _NOTICES:
            warnings.filterwarnings("ignore", message=f"{notice}.*")
        try:
            cfg = load_config(args.config, args.set)
            model = load_trained_model(cfg, args.checkpoint or checkpoint_dir(cfg))
            scripted = export_model(model, dtype, row_alignment=args.row_alignment)
        except MultiHashError as e:
            print(f"torchrec-multihash export: {e}", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(scripted, str(args.out))
        what = f"{args.dtype} tables" if dtype is not None else "the tables as trained"
        print(f"Wrote {args.out} ({what}). {_report(model, dtype, args.row_alignment)}")
        if args.evaluate:
            data = make_data(cfg, 0, 1, Path(cfg.train.output_dir), args.checkpoint or checkpoint_dir(cfg))
            for name, m in (("trained", model), ("exported", scripted)):
                r = evaluate_model(m, data.test())
                print(f"{name:9s} test AUC {r['auc']:.4f}, log loss {r['logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
