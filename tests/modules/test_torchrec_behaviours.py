"""What TorchRec's own EmbeddingBagCollection tests assert for the stock EBC, asserted for ours with
every strategy: output shape, keys and offsets of unweighted, weighted, shared-table and
shared-feature collections; duplicate names refused; forward on the meta device; construction under
``with torch.device("meta")``; ``embedding_bag_configs()``; the device property; a DLRM around it
trains. Where we differ from TorchRec on purpose, the test asserts ours and says why.
(Tracing and scripting are tested with the inference path.)"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_multihash import InvalidInputError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig

NUM_EMBEDDINGS = 10  # as TorchRec's tests
BATCH = 2
META = torch.device("meta")

STRATEGIES: Dict[str, Dict[str, object]] = {
    "full": dict(strategy="full"),
    "hash": dict(strategy="hash"),
    "qr_add": dict(strategy="qr", operation="add"),
    "qr_mult": dict(strategy="qr", operation="mult"),
    "qr_concat": dict(strategy="qr", operation="concat"),
    "generalized_qr": dict(strategy="generalized_qr", moduli=[4, 3]),
    "crt": dict(strategy="crt", moduli=[3, 4], operation="concat"),
    "learned": dict(strategy="learned"),
}


class Layout(NamedTuple):
    """A collection of TorchRec's tests: its tables (name, dim, features), KJT keys and output."""

    tables: List[Tuple[str, int, List[str]]]
    is_weighted: bool
    kjt_keys: List[str]
    keys: List[str]
    dims: List[int]


LAYOUTS = {
    "unweighted": Layout([("t1", 4, ["f1"]), ("t2", 4, ["f2"])], False, ["f1", "f2"], ["f1", "f2"], [4, 4]),
    "weighted": Layout([("t1", 4, ["f1", "f3"]), ("t2", 5, ["f2"])], True, ["f1", "f3", "f2"], ["f1", "f3", "f2"], [4, 4, 5]),
    "shared_table": Layout([("t1", 4, ["f1", "f2"])], False, ["f1", "f2"], ["f1", "f2"], [4, 4]),
    # TorchRec names the output of a feature that several tables look up ``feature@table``
    "shared_feature": Layout([("t1", 4, ["f1"]), ("t2", 8, ["f1"])], False, ["f1"], ["f1@t1", "f1@t2"], [4, 8]),
}


def configs(layout: Layout, strategy: str) -> List[MultiHashEmbeddingBagConfig]:
    return [
        MultiHashEmbeddingBagConfig(name=n, num_embeddings=NUM_EMBEDDINGS, embedding_dim=d, feature_names=list(fs), **STRATEGIES[strategy])
        for n, d, fs in layout.tables
    ]


def assign_mappings(module: MultiHashEmbeddingBagCollection) -> None:
    """Gives every learned table a small random mapping (ids 0..N-1 to the rows before the fallback);
    on meta there is nothing to assign (a meta forward infers shapes without a mapping)."""
    g = torch.Generator().manual_seed(0)
    for mapping in module.learned_mappings().values():
        if mapping.rows.is_meta:
            continue
        ids = torch.randperm(NUM_EMBEDDINGS, generator=g)[: NUM_EMBEDDINGS // 2]
        rows = torch.randint(0, mapping.fallback_start, (ids.numel(),), generator=g)
        mapping.assign(ids, rows)


def build(layout: Layout, strategy: str, device: Optional[torch.device] = None, **kw) -> MultiHashEmbeddingBagCollection:
    module = MultiHashEmbeddingBagCollection(configs(layout, strategy), is_weighted=layout.is_weighted, device=device, **kw)
    assign_mappings(module)
    return module


def kjt(keys: List[str], weighted: bool = False) -> KeyedJaggedTensor:
    """Two ids per bag, as TorchRec's tests: feature ``i`` holds ids ``4i .. 4i+3`` modulo N."""
    n = len(keys) * BATCH * 2
    return KeyedJaggedTensor.from_offsets_sync(
        keys=keys,
        values=torch.arange(n) % NUM_EMBEDDINGS,
        offsets=torch.arange(0, n + 1, 2),
        weights=torch.linspace(0.5, 2.0, n) if weighted else None,
    )


def assert_layout(out: KeyedTensor, layout: Layout, device: torch.device) -> None:
    assert out.values().size() == (BATCH, sum(layout.dims))
    assert out.values().device == device
    assert out.keys() == layout.keys
    assert out.length_per_key() == layout.dims
    offsets = [0]
    for d in layout.dims:
        offsets.append(offsets[-1] + d)
    assert out.offset_per_key() == offsets


def tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_output_shape_keys_and_offsets(name, strategy):
    layout = LAYOUTS[name]
    out = build(layout, strategy)(kjt(layout.kjt_keys, layout.is_weighted))
    assert_layout(out, layout, torch.device("cpu"))


@pytest.mark.parametrize("name", LAYOUTS)
def test_full_tables_give_the_stock_ebc_output(name):
    layout = LAYOUTS[name]
    ours = build(layout, "full")
    stock = EmbeddingBagCollection(ours.embedding_bag_configs(), is_weighted=layout.is_weighted)
    weights = ours.sub_table_weights()
    # a full table is one sub-table of the logical table's size, in table order
    for config, sub in zip(ours.embedding_bag_configs(), ours.sub_table_configs()):
        with torch.no_grad():
            weights[sub.name].copy_(stock.embedding_bags[config.name].weight)
    features = kjt(layout.kjt_keys, layout.is_weighted)
    got, want = ours(features), stock(features)
    assert got.keys() == want.keys() and got.offset_per_key() == want.offset_per_key()
    torch.testing.assert_close(got.values(), want.values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_features_no_table_looks_up(strategy):
    # TorchRec's unweighted test feeds a key ("f3") that no table looks up, and the stock EBC ignores
    # it. Ours refuses it by default (a misspelt feature would otherwise silently train nothing);
    # strict_features=False gives TorchRec's behaviour.
    layout = LAYOUTS["unweighted"]
    features = kjt(["f1", "f3", "f2"])
    with pytest.raises(InvalidInputError, match="f3"):
        build(layout, strategy)(features)
    assert_layout(build(layout, strategy, strict_features=False)(features), layout, torch.device("cpu"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_duplicate_table_names_are_refused(strategy):
    # TorchRec raises ValueError("Duplicate table name"); ours is a MultiHashConfigError, a ValueError
    layout = Layout([("t1", 4, ["f1"]), ("t1", 4, ["f2"])], False, ["f1", "f2"], ["f1", "f2"], [4, 4])
    with pytest.raises(ValueError, match="t1"):
        build(layout, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_on_meta(name, strategy):
    # TorchRec runs models on meta to infer shapes: no host sync (the id check) may read meta data
    layout = LAYOUTS[name]
    module = build(layout, strategy, device=META)
    out = module(kjt(layout.kjt_keys, layout.is_weighted).to(META))
    assert_layout(out, layout, META)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_built_under_a_meta_device_context(strategy):
    # as TorchRec's EBC, the tables (and learned mappings) take the device of the context: a model
    # built this way allocates no memory
    layout = LAYOUTS["weighted"]
    with torch.device("meta"):
        module = MultiHashEmbeddingBagCollection(configs(layout, strategy), is_weighted=True)
    assert module.device == META
    assert {n: t.device for n, t in tensors(module).items()} == {n: META for n in tensors(module)}
    if strategy == "learned":
        assert module.learned_mappings()
    assign_mappings(module)
    assert_layout(module(kjt(layout.kjt_keys, True).to(META)), layout, META)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_property(strategy):
    layout = LAYOUTS["unweighted"]
    assert build(layout, strategy).device == torch.device("cpu")
    module = build(layout, strategy, device=META)
    assert module.device == META
    assert all(t.device == META for t in tensors(module).values())
    # an explicit device wins over the context's, as in TorchRec
    with torch.device("meta"):
        module = MultiHashEmbeddingBagCollection(configs(layout, strategy), device=torch.device("cpu"))
    assert module.device == torch.device("cpu")
    assert all(t.device == torch.device("cpu") for t in tensors(module).values())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_embedding_bag_configs_are_torchrecs(name, strategy):
    # TorchRec returns the configs it was given; ours returns the logical tables as plain
    # EmbeddingBagConfigs (not our subclass), so code that rebuilds a stock EBC from them, as DLRM
    # and TorchRec's tools read them, sees ordinary tables
    layout = LAYOUTS[name]
    module = build(layout, strategy)
    got = module.embedding_bag_configs()
    assert all(type(c) is EmbeddingBagConfig for c in got)
    mine = module.multihash_configs()
    fields = ("name", "num_embeddings", "embedding_dim", "feature_names", "pooling", "data_type", "weight_init_min", "weight_init_max")
    assert [[getattr(c, f) for f in fields] for c in got] == [[getattr(c, f) for f in fields] for c in mine]
    stock = EmbeddingBagCollection(got, is_weighted=layout.is_weighted)
    want = stock(kjt(layout.kjt_keys, layout.is_weighted))
    assert_layout(want, layout, torch.device("cpu"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inside_dlrm_forward_and_backward(strategy):
    torch.manual_seed(0)
    layout = LAYOUTS["unweighted"]
    module = build(layout, strategy)
    model = DLRM(embedding_bag_collection=module, dense_in_features=3, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    logits = model(torch.rand(BATCH, 3), kjt(layout.kjt_keys))
    assert logits.shape == (BATCH, 1)
    logits.sum().backward()
    grads = {name: w.grad for name, w in module.sub_table_weights().items()}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), grads


@pytest.mark.parametrize("strategy", ["qr_mult", "qr_add", "learned"])
def test_reset_parameters_draws_the_sub_tables_again_within_their_ranges(strategy):
    module = build(LAYOUTS["unweighted"], strategy)
    mappings = {name: m.rows.clone() for name, m in module.learned_mappings().items()}
    before = {name: w.detach().clone() for name, w in module.sub_table_weights().items()}
    with torch.no_grad():
        for w in module.sub_table_weights().values():
            w.fill_(100.0)  # out of every initial range
    module.reset_parameters()
    for config in module.sub_table_configs():
        w = module.sub_table_weights()[config.name]
        assert not torch.equal(w, before[config.name]), config.name  # drawn again
        assert config.get_weight_init_min() <= float(w.min()) and float(w.max()) <= config.get_weight_init_max(), config.name
    for name, rows in mappings.items():  # fitted, not drawn: kept
        assert torch.equal(module.learned_mappings()[name].rows, rows)


def test_embedding_bags_is_a_read_only_view_of_the_sub_tables():
    # TorchRec's tools (its EBC tests' test_device, ...) read .embedding_bags: each sub-table's module
    module = build(LAYOUTS["unweighted"], "qr_mult")
    bags = module.embedding_bags
    weights = module.sub_table_weights()
    assert set(weights) <= set(bags) and all(bags[name].weight is w for name, w in weights.items())
    assert all(t.name in bags for t in module.multihash_configs())  # every table's name too
    with pytest.raises(TypeError):
        bags["t_new"] = torch.nn.EmbeddingBag(2, 2)  # read-only
    stacked = MultiHashEmbeddingBagCollection(
        [MultiHashEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=4, feature_names=["f"], num_collisions=5, operation="add")]
    )
    assert stacked.embedding_bags["t"] is stacked.embedding_bags["t__parts"]  # a stacked add's name: its one table
    assert torch.jit.script(stacked) is not None  # the view is left out of TorchScript
    assert isinstance(module.combine, torch.nn.Module)  # other attributes as before
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        _ = module.nothing


def test_the_docstring_example_prints_what_it_says(capsys):
    """``MultiHashEmbeddingBagCollection``'s ``Example::``, run as written: it prints its ``>>>`` lines."""
    import inspect
    import textwrap

    import torchrec_multihash.modules.multihash_embedding_bag as module

    doc = inspect.getdoc(module.MultiHashEmbeddingBagCollection)
    example = textwrap.dedent(doc.split("Example::\n", 1)[1])
    code = "\n".join(line for line in example.splitlines() if not line.startswith(">>>"))
    said = [line[4:] for line in example.splitlines() if line.startswith(">>> ")]
    exec(compile(code, module.__file__, "exec"), dict(vars(module)))
    assert capsys.readouterr().out.splitlines() == said
