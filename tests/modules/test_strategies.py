"""The strategy interface: every registered strategy keeps its promises, and a new one is one class
(the example of docs/strategies.md, run as written)."""

import re
import warnings

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import MultiHashConfigError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, to_multihash_configs
from torchrec_multihash.modules.strategies import StrategyName, registered_strategies, registry, strategy_class

from tests.helpers import ROOT

DOCS = ROOT / "docs" / "strategies.md"
N, DIM = 10_007, 8


def table(strategy, **kw):
    return MultiHashEmbeddingBagConfig(name="t", num_embeddings=N, embedding_dim=DIM, feature_names=["f"], strategy=strategy, **kw)


EXAMPLES = [
    table("full"),
    table("hash", num_collisions=5),
    table("qr", num_collisions=13, operation="add", stack_parts=False),
    table("qr", num_collisions=13, operation="concat", dims=[5, 3]),
    table("generalized_qr", moduli=[7, 11, 131], operation="mult"),
    table("crt", moduli=[101, 103]),
    table("learned", mapping_rows=300),
    table("learned", mapping_rows=300, mapping_ids=2_000),
    table("crt", moduli=[17, 19], mapping_rows=300),
]


def test_every_built_in_name_has_its_class():
    assert [str(n) for n in StrategyName] == registered_strategies()[: len(StrategyName)]
    for n in StrategyName:
        assert strategy_class(n).name == n == str(n)
    with pytest.raises(MultiHashConfigError, match=r"strategy must be one of \['full', 'hash'"):
        table("lsh")


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: f"{c.strategy}-{c.operation}-{c.mapping_ids}")
def test_interface_agrees_with_the_module_it_builds(cfg):
    impl = cfg.strategy_impl()
    subs = impl.sub_tables()
    ebc = MultiHashEmbeddingBagCollection([cfg])
    weights = ebc.sub_table_weights()
    # names, sizes and dims of the sub-tables are what the module holds
    assert {s.name: (s.num_embeddings, s.embedding_dim) for s in subs} == {k: tuple(w.shape) for k, w in weights.items()}
    # every id lands inside every sub-table
    rows_in = torch.arange(impl.domain)
    for part, s in zip(impl.partition(rows_in), subs):
        assert int(part.min()) >= 0 and int(part.max()) < s.num_embeddings
    # bytes: the weights plus the mapping's state dict entries (its buffers and its shape), as allocated
    allocated = sum(w.numel() * w.element_size() for w in weights.values())
    allocated += sum(b.numel() * b.element_size() for m in ebc.learned_mappings().values() for b in m.state_dict().values())
    assert impl.memory_bytes() == ebc.memory_bytes() == allocated
    assert impl.looks_up_per_id() == (impl.num_partitions() > 1 and cfg.operation == "mult")


COMPRESSING = [n for n in registered_strategies() if strategy_class(n).compresses]


@pytest.mark.parametrize("strategy", COMPRESSING)
@pytest.mark.parametrize("compression", [4, 16])
def test_converter_reaches_the_factor_it_reports(strategy, compression):
    plain = [EmbeddingBagConfig(name="t", num_embeddings=1_000_003, embedding_dim=16, feature_names=["f"])]
    cfg = to_multihash_configs(plain, compression, strategy=strategy)[0]
    s = strategy_class(strategy).sized_for(1_000_003, 16, compression, "mult", strategy_class(strategy).default_partitions)
    ebc = MultiHashEmbeddingBagCollection([cfg], device=torch.device("meta"))
    assert ebc.full_memory_bytes() / ebc.memory_bytes() == pytest.approx(s.factor, rel=1e-9)
    assert s.factor >= compression / 1.02


@pytest.fixture
def docs_example():
    code = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    yield namespace["DoubleHash"]
    registry._REGISTRY.pop("double_hash")


def test_docs_example_adds_a_strategy_in_one_class(docs_example):
    m0, m1 = 97, 101
    cfg = MultiHashEmbeddingBagConfig(
        name="t_ad",
        num_embeddings=10**8,
        embedding_dim=4,
        feature_names=["ad"],
        strategy="double_hash",
        moduli=[m0, m1],
        operation="add",
        stack_parts=False,
    )
    assert isinstance(cfg.strategy_impl(), docs_example)
    ebc = MultiHashEmbeddingBagCollection([cfg])
    ids = torch.tensor([5, 10**12, 97 * 101 + 5, 3, 7])  # any int64 id: accepts_any_id
    kjt = KeyedJaggedTensor(keys=["ad"], values=ids, lengths=torch.tensor([2, 1, 2]))
    w = ebc.sub_table_weights()
    want = [sum(w["t_ad__p0"][x % m0] + w["t_ad"][x % m1] for x in bag) for bag in ([5, 10**12], [97 * 101 + 5], [3, 7])]
    assert torch.allclose(ebc(kjt).values(), torch.stack(want))
    # the converter sizes it like any other strategy
    plain = [EmbeddingBagConfig(name="t_ad", num_embeddings=10**6, embedding_dim=16, feature_names=["ad"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (converted,) = to_multihash_configs(plain, 16, strategy="double_hash", operation="add")
    ratio = MultiHashEmbeddingBagCollection([converted], device=torch.device("meta")).memory_bytes() / (10**6 * 16 * 4)
    assert 1 / 16 / 1.10 < ratio <= 1 / 16 * 1.02
    # and auto picks it like a built-in one, in the order of its candidates
    from torchrec_multihash.auto import TableStatistics, choose_tables

    stats = {"t_ad": TableStatistics.from_counts("t_ad", torch.ones(10**6, dtype=torch.int64))}
    for candidates in (["double_hash"], ["double_hash", "qr"], ["full", "double_hash"]):
        (choice,) = choose_tables(plain, stats, 10**6 * 16 * 4 // 8, threshold=200, candidates=candidates)
        assert choice.strategy == "double_hash" and choice.reason.endswith("every id keeps its own combination of rows"), choice.reason
    (choice,) = choose_tables(plain, stats, 10**6 * 16 * 4 // 8, threshold=200, candidates=["qr", "double_hash"])
    assert choice.strategy == "qr"
