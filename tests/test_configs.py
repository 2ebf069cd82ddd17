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


def test_learning_rate_schedule_warms_up_then_decays():
    from torchrec_multihash.app.config import Config
    from torchrec_multihash.app.train import lr_factor

    cfg = Config()
    assert [lr_factor(s, cfg) for s in (0, 10**6)] == [1.0, 1.0]
    cfg.train.warmup_steps, cfg.train.decay_start, cfg.train.decay_steps = 4, 10, 10
    got = [round(lr_factor(s, cfg), 4) for s in (0, 3, 4, 9, 10, 15, 20, 30)]
    assert got == [0.25, 1.0, 1.0, 1.0, 1.0, 0.25, 0.0, 0.0]
