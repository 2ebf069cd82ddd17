"""Every shipped config loads, and its model builds (on the meta device: no memory); the learning-rate
schedule (train.warmup_steps, decay_start, decay_steps) reaches every optimizer."""

from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.app.config import load_config
from torchrec_multihash.app.model import build_model
from torchrec_multihash.modules.strategies import registered_strategies

from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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


# the schedule's factor at some steps with warmup_steps 4, decay_start 10, decay_steps 10
FACTORS = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 1.0, 10: 1.0, 12: 0.64, 15: 0.25, 20: 0.0, 30: 0.0}


def _schedule_config(tmp: str):
    from torchrec_multihash.app.config import Config

    cfg = Config()
    cfg.model.embedding_dim, cfg.model.dense_arch_layer_sizes, cfg.model.over_arch_layer_sizes = 8, [16, 8], [16, 1]
    cfg.embeddings.num_embeddings_per_feature = [50_000, 100]
    cfg.data.train_samples, cfg.data.test_samples = 32 * 31, 64
    t = cfg.train
    t.batch_size, t.embedding_lr, t.dense_lr, t.output_dir = 32, 0.05, 0.01, tmp
    t.warmup_steps, t.decay_start, t.decay_steps = 4, 10, 10
    return cfg


def _kernels(opt):
    """The tables' TBE kernels, under TorchRec's fused optimizers (which hand them their rate)."""
    for _, inner in getattr(opt, "optimizers", []):
        yield from _kernels(inner)
    if hasattr(opt, "_emb_module"):
        yield opt._emb_module


def _train_recording_lrs(rank, world_size, tmp):
    from torchrec_multihash.app.train import train

    seen = []

    def record(run, loss):  # after each step: the rates it used
        fused, dense = (opt for _, opt in run.opt.optimizers)
        kernels = [k.get_learning_rate() for k in _kernels(fused)]
        seen.append(([g["lr"] for g in fused.param_groups], kernels, [g["lr"] for g in dense.param_groups]))

    train(_schedule_config(tmp), on_step=[record])
    assert len(seen) == 31
    for step, factor in FACTORS.items():
        fused, kernels, dense = seen[step]
        assert kernels and fused and dense, seen[step]
        assert fused == pytest.approx([0.05 * factor] * len(fused)), (step, fused)
        assert kernels == pytest.approx([0.05 * factor] * len(kernels)), (step, kernels)  # what the tables were updated with
        assert dense == pytest.approx([0.01 * factor] * len(dense)), (step, dense)


def test_learning_rate_schedule_reaches_the_tables_and_the_dense_layers(tmp_path):
    """Warm-up then squared decay of every rate: the fused embedding optimizer's (and so the
    tables' kernels') and the dense optimizer's, through TorchRec's optimizers in a real run."""
    from tests.helpers.distributed import run_multiprocess

    run_multiprocess(_train_recording_lrs, 1, str(tmp_path))


def test_learning_rate_schedule_resumes_at_its_step():
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from torchrec_multihash.app.optim import lr_schedule

    def rates(t, start, steps):
        w = torch.nn.Parameter(torch.zeros(2))
        opt = CombinedOptimizer([KeyedOptimizerWrapper({"w": w}, lambda p: torch.optim.Adagrad(p, lr=0.01))])
        schedule, got = lr_schedule(opt, t, start), []
        for _ in range(steps):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return got

    t = _schedule_config("unused").train
    straight = rates(t, 0, 31)
    assert [round(straight[s] / 0.01, 4) for s in FACTORS] == list(FACTORS.values())
    assert rates(t, 15, 16) == straight[15:]  # a resumed run continues the schedule
    no_schedule = _schedule_config("unused").train
    no_schedule.warmup_steps = no_schedule.decay_steps = 0
    assert rates(no_schedule, 0, 3) == rates(no_schedule, 10**6, 3) == [0.01] * 3


STRATEGIES = registered_strategies()
SIZE_KEYS = ("num_collisions", "moduli", "mapping_rows", "mapping_ids", "fallback_rows")


def _tables(strategy: str, overrides: str, compression: float = 4):
    """The tables of a config of three features (50,000, 10,000 and 100 ids) at ``compression``."""
    from torchrec_multihash.app.model import build_tables

    cfg = load_config(
        None,
        [
            "embeddings.num_embeddings_per_feature=[50000, 10000, 100]",
            f"embeddings.strategy={strategy}",
            f"embeddings.compression={compression}",
            f"embeddings.overrides={overrides}",
        ],
    )
    return {t.name: t for t in build_tables(cfg)}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("configured", STRATEGIES)
def test_an_override_of_the_strategy_gets_that_strategy_sized_for_the_compression(configured, strategy):
    """Nothing of the configured strategy's sizing (qr's num_collisions, crt's moduli, learned's
    mapping_rows) is carried over to the strategy an override names: the table is that strategy
    as the converter sizes it at embeddings.compression."""
    from torchrec_multihash import to_multihash_configs

    tables = _tables(configured, f"{{t_C1: {{strategy: {strategy}}}}}")
    plain = EmbeddingBagConfig(name="t_C1", num_embeddings=50_000, embedding_dim=64, feature_names=["C1"])
    want = to_multihash_configs([plain], 4, strategy=strategy)[0]
    got = tables["t_C1"]
    assert got.strategy == strategy
    assert {k: getattr(got, k) for k in SIZE_KEYS} == {k: getattr(want, k) for k in SIZE_KEYS}
    if strategy != "full":
        impl = got.strategy_impl()
        assert 3.9 < 50_000 * 64 * 4 / impl.memory_bytes() < 4.5
    # the other tables keep the configured strategy
    assert tables["t_C2"].strategy == configured and tables["t_C3"].strategy == "full"


def test_an_override_that_gives_sizes_takes_them_and_nothing_else():
    tables = _tables("qr", "{t_C1: {strategy: crt, moduli: [223, 227]}, t_C3: {strategy: crt, moduli: [9, 13]}}")
    assert (tables["t_C1"].moduli, tables["t_C1"].num_collisions) == ([223, 227], None)
    assert (tables["t_C3"].strategy, tables["t_C3"].moduli) == ("crt", [9, 13])  # under the threshold, as told
    # learned sized by num_collisions: its rows come from them, not from the sizing at the compression
    tables = _tables("qr", "{t_C1: {strategy: learned, num_collisions: 2}}")
    assert (tables["t_C1"].mapping_rows, tables["t_C1"].num_collisions) == (25_000, 2)
    # sizes without a strategy: the configured one, even for a table under the threshold
    tables = _tables("qr", "{t_C3: {num_collisions: 5}}")
    assert (tables["t_C3"].strategy, tables["t_C3"].num_collisions) == ("qr", 5)
    # an operation of its own: sized for it (concat halves each partition's dim, so more rows)
    tables = _tables("qr", "{t_C1: {operation: concat}}")
    impl = tables["t_C1"].strategy_impl()
    assert tables["t_C1"].operation == "concat" and 3.9 < 50_000 * 64 * 4 / impl.memory_bytes() < 4.5


@pytest.mark.parametrize(
    "override,match",
    [
        (
            "{t_C1: {num_embeddings: 10}}",
            "embeddings.overrides.t_C1.num_embeddings cannot be set per table: it comes from embeddings.num_embeddings_per_feature",
        ),
        ("{t_C1: {embedding_dim: 8}}", "embeddings.overrides.t_C1.embedding_dim cannot be set per table: it comes from model.embedding_dim"),
        ("{t_C2: {name: x}}", "embeddings.overrides.t_C2.name cannot be set per table: a table is named t_<feature>"),
        ("{t_C1: {feature_names: [C2]}}", "embeddings.overrides.t_C1.feature_names cannot be set per table: each table looks up its own feature"),
        ("{t_C1: {pooling: MEAN}}", "embeddings.overrides.t_C1.pooling cannot be set per table: the app builds every table with TorchRec's default"),
        (
            "{t_C1: {colisions: 4}}",
            r"embeddings.overrides.t_C1.colisions: not a table option; an override may set \['strategy', 'operation', 'num_collisions'",
        ),
    ],
)
def test_an_override_of_a_field_the_app_sets_is_refused_naming_where_it_comes_from(override, match):
    from torchrec_multihash.app.config import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        _tables("qr", override)
    assert "\n" not in str(e.value)


def test_an_override_of_an_unknown_table_names_the_closest_and_the_tables():
    from torchrec_multihash.app.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown table\(s\) \['C3'\] \(did you mean 't_C3'\?\); the tables are \['t_C1', 't_C2', 't_C3'\]"):
        _tables("qr", "{C3: {strategy: full}}")


def test_synthetic_multi_hot_features_get_bags_of_several_ids_and_the_others_are_declared_one_hot():
    from torchrec_multihash.app.config import ConfigError
    from torchrec_multihash.app.data import make_data
    from torchrec_multihash.app.model import build_tables

    path = Path(CONFIGS[0]).parent / "synthetic_multi_hot.yaml"
    small = [
        "embeddings.num_embeddings_per_feature=[1000, 1000, 1000, 1000, 1000, 1000]",
        "model.embedding_dim=8",
        "data.multi_hot_features=[C2, C5]",
    ]
    small += ["model.dense_arch_layer_sizes=[16, 8]", "train.batch_size=64", "data.train_samples=128"]
    cfg = load_config(path, small)
    tables = {t.name: t for t in build_tables(cfg)}
    assert [n for n, t in tables.items() if t.max_ids_per_bag != 1] == ["t_C2", "t_C5"]
    ebc = build_model(cfg, device=torch.device("meta")).sparse_arch.embedding_bag_collection
    per_id = sorted(c.name for g in ebc.per_id.values() for c in g.tables.embedding_bag_configs())
    assert per_id == ["t_C2", "t_C2__r", "t_C5", "t_C5__r"]  # the one-hot features' mult tables are looked up pooled
    kjt = next(make_data(cfg, 0, 1, Path(".")).train(0, 0)).sparse_features.to_dict()
    assert {f: int(jt.lengths().max()) > 1 for f, jt in kjt.items()} == {f"C{i}": i in (2, 5) for i in range(1, 7)}
    # an override or embeddings.max_ids_per_bag decides over the data's declaration
    mine = {t.name: t for t in build_tables(load_config(path, [*small, "embeddings.overrides={t_C1: {max_ids_per_bag: 3}}"]))}
    assert mine["t_C1"].max_ids_per_bag == 3 and mine["t_C3"].max_ids_per_bag == 1
    with pytest.raises(ConfigError, match=r"data.multi_hot_features names \['C9'\], not features of this config"):
        load_config(path, [*small, "data.multi_hot_features=[C9]"])
    with pytest.raises(ConfigError, match="data.multi_hot_features makes synthetic bags of several ids; data.format is 'criteo_tsv'"):
        load_config(path, [*small, "data.format=criteo_tsv"])


def test_floats_as_people_write_them_and_keys_given_twice(tmp_path):
    from torchrec_multihash.app.config import ConfigError, load_config

    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number it is
    t = load_config("configs/quickstart.yaml", ["train.dense_lr=1e-3", "train.embedding_lr=5E-2", "train.checkpoint_every_minutes=1e1"]).train
    assert (t.dense_lr, t.embedding_lr, t.checkpoint_every_minutes) == (0.001, 0.05, 10.0)
    with pytest.raises(ConfigError, match="train.dense_lr: expected float, got 'fast'"):
        load_config("configs/quickstart.yaml", ["train.dense_lr=fast"])
    # a key given twice would silently keep the last: refused, naming both lines
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  batch_size: 64\n  epochs: 1\n  batch_size: 128\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: key 'batch_size' is given twice \(lines 2 and 4\)"):
        load_config(dup)


def test_table_sizes_past_int64_bytes_are_refused():
    from torchrec_multihash.app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"\[99999999999999999999\] rows of dim 16 would take more bytes than an int64 counts"):
        load_config("configs/quickstart.yaml", ["embeddings.num_embeddings_per_feature=[99999999999999999999, 5]"])
