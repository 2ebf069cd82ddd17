"""TorchRec's inference path: the module inside DLRM is fx-traced with TorchRec's tracer, scripted
(traced or not), saved and loaded, with the eager model's outputs, for every strategy."""

import io

import pytest
import torch
import torchrec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash import InvalidInputError, MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig

from tests.helpers import ROOT

N, DIM = 1000, 8


def table(name, features, **kw):
    return MultiHashEmbeddingBagConfig(name=name, num_embeddings=N, embedding_dim=DIM, feature_names=features, **kw)


CASES = {
    "full": [table("a", ["f0"], strategy="full")],
    "hash": [table("a", ["f0"], strategy="hash", num_collisions=7)],
    "qr_mult": [table("a", ["f0"], strategy="qr", num_collisions=9)],
    "qr_add_mean": [table("a", ["f0"], strategy="qr", num_collisions=9, operation="add", pooling=PoolingType.MEAN)],
    "crt_concat": [table("a", ["f0"], strategy="crt", moduli=[31, 37], operation="concat")],
    "generalized_qr": [table("a", ["f0"], strategy="generalized_qr", moduli=[5, 7, 29])],
    "learned_dense": [table("a", ["f0"], strategy="learned", mapping_rows=50)],
    "learned_sparse_then_qr": [table("a", ["f0"], strategy="qr", num_collisions=5, mapping_rows=60, mapping_ids=100)],
    "learned_sparse_shared": [table("a", ["f0"], strategy="learned", mapping_rows=40, mapping_ids=30, fallback_rows=40)],
    "mixed_shared_feature": [
        table("a", ["f0", "f1"], strategy="qr", num_collisions=9),
        table("b", ["f1"], strategy="crt", moduli=[31, 37], operation="add"),
        MultiHashEmbeddingBagConfig(name="c", num_embeddings=N, embedding_dim=4, feature_names=["f0"], strategy="qr", num_collisions=9),
    ],
}


def features(keys, weighted=False):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (len(keys) * 3,), generator=g)
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def model_of(tables, weighted=False):
    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection(tables, is_weighted=weighted)
    g = torch.Generator().manual_seed(1)
    for m in ebc.learned_mappings().values():  # a fitted mapping: 2/3 of the ids known
        s = m.expected
        ids = torch.randperm(N, generator=g)[: min(s.mapping_ids, 2 * N // 3)]
        m.assign(ids, torch.randint(0, s.known_rows(), (ids.numel(),), generator=g))
    return (
        DLRM(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[DIM], over_arch_layer_sizes=[4, 1])
        if all(c.embedding_dim == DIM for c in tables)
        else ebc
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", list(CASES))
def test_traced_and_scripted_models_give_the_eager_outputs(case, weighted):
    tables = CASES[case]
    model = model_of(tables, weighted)
    keys = sorted({f for t in tables for f in t.feature_names})
    kjt = features(keys, weighted)
    args = (kjt,) if isinstance(model, MultiHashEmbeddingBagCollection) else (torch.randn(3, 3), kjt)

    def out(m):
        y = m(*args)
        return y.values() if hasattr(y, "values") and not isinstance(y, torch.Tensor) else y

    eager = out(model)
    traced = torchrec.fx.symbolic_trace(model)
    assert "check" not in traced.code  # the eager-mode input checks are not part of the graph
    scripted_trace = torch.jit.script(traced)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted_trace, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for m in (traced, scripted_trace, scripted, loaded):
        torch.testing.assert_close(out(m), eager, atol=0, rtol=0)


def test_tracing_leaves_the_eager_checks_in_place():
    model = model_of(CASES["qr_mult"])
    torchrec.fx.symbolic_trace(model)
    bad = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([N]), lengths=torch.tensor([1, 0, 0]))
    with pytest.raises(InvalidInputError, match="id 1000"):
        model(torch.randn(3, 3), bad)


@pytest.mark.parametrize("dtype,tolerance", [(torch.qint8, 0.02), (torch.quint4x2, 0.15), (torch.float16, 2e-3)], ids=["int8", "int4", "fp16"])
@pytest.mark.parametrize("case", ["full", "hash", "qr_mult", "qr_add_mean", "crt_concat", "learned_sparse_then_qr", "mixed_shared_feature"])
def test_quantized_tables_of_every_strategy_trace_script_and_stay_close(case, dtype, tolerance):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    from torchrec_multihash.inference import embedding_bytes, quantize_embeddings

    model = model_of(CASES[case])
    quantized = quantize_embeddings(model, dtype, row_alignment=4)
    # every inner table is TorchRec's quantized module: the per-id EmbeddingCollection too
    assert not any(type(m) in (EmbeddingBagCollection, EmbeddingCollection) for m in quantized.modules())
    # fewer bytes, counted as stored (int4 packed two to a byte, not as the UInt4Tensor views of the state_dict)
    assert embedding_bytes(quantized) < embedding_bytes(model)
    keys = sorted({f for t in CASES[case] for f in t.feature_names})
    ebc = lambda m: m if isinstance(m, MultiHashEmbeddingBagCollection) else m.sparse_arch.embedding_bag_collection  # noqa: E731
    kjt = features(keys)
    want, got = ebc(model)(kjt).values(), ebc(quantized)(kjt).values()
    # rows are quantized per row: errors within a fraction of the largest embedding value
    assert (got - want).abs().max() <= tolerance * want.abs().max(), (got - want).abs().max()
    args = (kjt,) if isinstance(model, MultiHashEmbeddingBagCollection) else (torch.randn(3, 3), kjt)
    eager = quantized(*args)
    eager = eager.values() if not isinstance(eager, torch.Tensor) else eager
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(quantized))(*args)
    scripted = scripted.values() if not isinstance(scripted, torch.Tensor) else scripted
    torch.testing.assert_close(scripted, eager, atol=0, rtol=0)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's first example: build, forward, DLRM, quantize, trace, script, save, serve."""
    import re

    readme = ROOT / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(readme), "exec"), namespace)
    assert namespace["logits"].shape == (2, 1)
    assert (tmp_path / "model.pt").is_file()
    # int8 rows of dim 16: 16 bytes + scale and bias, padded to 32 (TorchRec: 16-byte rows) vs 64 in float;
    # FBGEMM's buffers add a little padding between tables (160 bytes here)
    assert namespace["embedding_bytes"](namespace["quantized"]) <= namespace["ebc"].memory_bytes() / 2 * 1.001


class _FromTensors(torch.nn.Module):
    """A module of plain tensors in and out (what torch.export takes): the KJT built inside."""

    def __init__(self, ebc, keys):
        super().__init__()
        self.ebc, self.keys = ebc, keys

    def forward(self, values, lengths, weights=None):
        return self.ebc(KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, weights=weights)).values()


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_export_of_every_strategy_matches_eager(case, weighted, strict):
    # torch.export (the path to AOTInductor): qr mult, qr add and crt failed (a data-dependent batch
    # size, a fused op with out=; under strict export, Dynamo refused as_strided's storage_offset());
    # the exported program must give the eager outputs on other bags too
    tables = CASES[case]
    model = model_of(tables, weighted)
    ebc = model.sparse_arch.embedding_bag_collection if isinstance(model, DLRM) else model
    keys = sorted({f for t in tables for f in t.feature_names})
    m = _FromTensors(ebc.eval(), keys)
    kjt = features(keys, weighted)
    args = (kjt.values(), kjt.lengths(), kjt.weights_or_none())
    ids = {0: torch.export.Dim.DYNAMIC}  # any number of ids; the batch as given
    program = torch.export.export(m, args, dynamic_shapes=(ids, None, ids if weighted else None), strict=strict)
    g = torch.Generator().manual_seed(5)
    for lengths in (kjt.lengths(), torch.ones_like(kjt.lengths()), torch.randint(0, 6, kjt.lengths().shape, generator=g)):
        n = int(lengths.sum())
        values = torch.randint(0, N, (n,), generator=g)
        weights = torch.rand(n, generator=g) if weighted else None
        torch.testing.assert_close(program.module()(values, lengths, weights), m(values, lengths, weights))
