"""Every shipped config loads, and its model builds (on the meta device: no memory)."""

from pathlib import Path

import pytest
import torch

from torchrec_multihash.app.config import load_config
from torchrec_multihash.app.model import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds(path):
    cfg = load_config(path)
    if not cfg.embeddings.num_embeddings_per_feature:  # sizes come from a vocabulary pass
        cfg.embeddings.num_embeddings_per_feature = [1000] * 26
    model = build_model(cfg, device=torch.device("meta"))
    ebc = model.sparse_arch.embedding_bag_collection
    if cfg.embeddings.strategy != "full":
        ratio = ebc.full_memory_bytes() / ebc.memory_bytes()
        assert ratio > 0.9 * cfg.embeddings.compression, (path.name, ratio)


def test_real_vocabulary_sizes():
    kaggle = load_config(Path(CONFIGS[0]).parent / "criteo_kaggle_full.yaml").embeddings.num_embeddings_per_feature
    assert len(kaggle) == 26 and sum(kaggle) == 33_762_577  # the Q-R paper's 33.76M ids
    tb = load_config(Path(CONFIGS[0]).parent / "criteo_1tb_qr.yaml").embeddings.num_embeddings_per_feature
    assert len(tb) == 26 and max(tb) == 48_937_457
