"""The per-id layout of mult tables: the id transform explodes every bag into bags of one id for a
SUM EmbeddingBagCollection, and Combine multiplies the parts per id and pools them back into bags
with one fused op (its own backward). Checked against the naive per-id reference, forward and
gradient, on ragged and empty bags, with weights and MEAN."""

import warnings

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_multihash import MultiHashEmbeddingBagCollection, MultiHashEmbeddingBagConfig, PoolingType
from torchrec_multihash.modules.combine import _column_runs, _compose_per_id_plain, _ComposePerId

from tests.helpers.reference import reference_forward

DIM = 4


def _configs(pooling=PoolingType.SUM):
    return [
        MultiHashEmbeddingBagConfig(
            name="t_a", num_embeddings=60, embedding_dim=DIM, feature_names=["a"], strategy="qr", operation="mult", num_collisions=7, pooling=pooling
        ),
        # a table shared by two features: its parts interleave in TorchRec's output
        MultiHashEmbeddingBagConfig(
            name="t_bc", num_embeddings=50, embedding_dim=DIM, feature_names=["b", "c"], strategy="crt", operation="mult", moduli=[7, 9]
        ),
        # three parts, same dim: the same per-id lookup, another piece
        MultiHashEmbeddingBagConfig(
            name="t_d",
            num_embeddings=120,
            embedding_dim=DIM,
            feature_names=["d"],
            strategy="generalized_qr",
            operation="mult",
            moduli=[4, 5, 6],
            pooling=pooling,
        ),
    ]


def _kjt(weighted, lengths=None, seed=0):
    # batch 4; ragged bags, empty bags, a feature with no id at all (c)
    lengths = lengths or {"a": [3, 0, 1, 2], "b": [0, 5, 0, 1], "c": [0, 0, 0, 0], "d": [2, 2, 0, 7]}
    g = torch.Generator().manual_seed(seed)
    hi = {"a": 60, "b": 50, "c": 50, "d": 120}
    values = torch.cat([torch.randint(0, hi[k], (sum(v),), generator=g) for k, v in lengths.items()])
    kw = {"weights": torch.rand(values.numel(), generator=g) + 0.5} if weighted else {}
    return KeyedJaggedTensor(keys=list(lengths), values=values, lengths=torch.tensor(sum(lengths.values(), [])), **kw)


def test_the_transform_explodes_bags_into_one_bag_per_id():
    ebc = MultiHashEmbeddingBagCollection(_configs(), is_weighted=True)
    kjt = _kjt(weighted=True)
    out = ebc.per_id["per_id_d4"].transform(kjt)
    assert out.stride() == 11  # most ids of a feature: d holds 11
    assert out.weights_or_none() is None  # weights are applied after the product
    by_key = out.to_dict()
    src = kjt.to_dict()
    for key, feature, divisor, modulus in [("a", "a", 7, 0), ("a__r", "a", 1, 7), ("c", "c", 1, 9), ("d", "d", 20, 6), ("d__p1", "d", 4, 5)]:
        n = src[feature].values().numel()
        assert by_key[key].lengths().tolist() == [1] * n + [0] * (11 - n), key
        ids = src[feature].values()
        rows = ids // divisor if modulus == 0 else (ids // divisor) % modulus
        assert by_key[key].values().tolist() == rows.tolist(), key


def _one_hot_kjt(weighted):
    """Every bag of at most one id (some empty): what an undeclared one-hot feature gives."""
    return _kjt(weighted, {"a": [1, 0, 1, 1], "b": [0, 1, 1, 1], "c": [1, 1, 1, 1], "d": [1, 1, 0, 1]}, seed=2)


def test_a_batch_without_ids_keeps_its_empty_bags_and_gives_zeros():
    ebc = MultiHashEmbeddingBagCollection(_configs())
    kjt = KeyedJaggedTensor(keys=["a", "b", "c", "d"], values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(12, dtype=torch.long))
    assert ebc.per_id["per_id_d4"].transform(kjt).stride() == 3  # no bag of several ids: the one-hot layout
    out = ebc(kjt).values()
    assert out.shape == (3, 4 * DIM) and not out.any()


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_gradient_match_the_naive_reference(pooling, weighted, one_hot):
    """Ragged bags (exploded), or a one-hot batch of the undeclared tables, whose transform keeps
    its bags (every sub-feature its feature's lengths, batch 4)."""
    torch.manual_seed(0)
    cfgs = _configs(pooling)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=weighted)
    assert not ebc.pooled and list(ebc.per_id) == ["per_id_d4"]
    kjt = _one_hot_kjt(weighted) if one_hot else _kjt(weighted)
    if one_hot:
        looked_up = ebc.per_id["per_id_d4"].transform(kjt)
        assert looked_up.stride() == 4
        source = kjt.to_dict()
        for key, jt in looked_up.to_dict().items():  # a, a__r, b, b__p0, ...: their feature's bags
            assert jt.lengths().tolist() == source[key.split("__")[0]].lengths().tolist(), key
        assert looked_up.weights_or_none() is None  # weights are applied after the product
    _assert_matches_the_reference(ebc, cfgs, kjt)


def _assert_matches_the_reference(ebc, cfgs, kjt):
    """``ebc``'s outputs and sub-table gradients (batch 4) equal the naive per-id reference's."""
    upstream = torch.randn(4, 4 * DIM, generator=torch.Generator().manual_seed(1))
    out = ebc(kjt)
    (out.values() * upstream).sum().backward()
    weights = {n: w.detach().clone().requires_grad_() for n, w in ebc.sub_table_weights().items()}
    ref = reference_forward(cfgs, weights, kjt)
    expected = torch.cat([ref[k] for k in out.keys()], dim=1)
    torch.testing.assert_close(out.values(), expected)
    (expected * upstream).sum().backward()
    for name, w in ebc.sub_table_weights().items():
        torch.testing.assert_close(w.grad, weights[name].grad, msg=name)


def _case(k, n=2, dtype=torch.double):
    """A per-id output with ``n`` features of ``k`` parts in random column order, one block unread."""
    g = torch.Generator().manual_seed(k)
    dim, batch, rows = 3, 4, 6
    width = n * k * dim + dim  # one column block that this piece does not read
    values = torch.randn(rows, width, generator=g, dtype=dtype)
    order = torch.randperm(n * k, generator=g).tolist()
    keys = ["unread"] + [f"f{i // k}_p{i % k}" for i in order]
    kt = KeyedTensor(keys=keys, length_per_key=[dim] * len(keys), values=values)
    runs = _column_runs(kt, [[f"f{f}_p{p}" for p in range(k)] for f in range(n)], [2 if k > 1 else 0] * n)
    index = torch.randint(0, batch * n, (rows * n,), generator=g)
    scale = torch.rand(rows * n, generator=g, dtype=dtype)
    scale[-3:] = 0  # padding rows
    # naive: per row and feature the product of its parts, scaled, summed into its bag
    naive = torch.zeros(batch * n, dim, dtype=dtype)
    for r in range(rows):
        for f in range(n):
            prod = torch.ones(dim, dtype=dtype)
            for p in range(k):
                c = keys.index(f"f{f}_p{p}") * dim
                prod = prod * values[r, c : c + dim]
            naive[index[r * n + f]] += scale[r * n + f] * prod
    return values, runs, index, scale, batch, n, dim, naive.view(batch, n * dim)


@pytest.mark.parametrize("rows_a_chunk", [None, 1, 4])
@pytest.mark.parametrize("k,n", [(1, 2), (2, 2), (3, 2), (4, 3), (2, 5)])
def test_the_fused_op_passes_gradcheck_and_equals_the_plain_ops_and_a_naive_loop(k, n, rows_a_chunk, monkeypatch):
    values, runs, index, scale, batch, n, dim, naive = _case(k, n)
    if rows_a_chunk is not None:  # the op's row chunks (6 rows: 6 chunks, or one of 4 and one of 2)
        monkeypatch.setattr("torchrec_multihash.modules.combine._ROW_CHUNK_BYTES", rows_a_chunk * n * dim * values.element_size())
    values.requires_grad_()
    fused = _ComposePerId.apply(values, runs, index, scale, (batch, n, dim), None)
    plain = _compose_per_id_plain(values, runs, index, scale, batch, n, dim)
    torch.testing.assert_close(fused, naive)
    torch.testing.assert_close(plain, naive)
    assert torch.autograd.gradcheck(lambda v: _ComposePerId.apply(v, runs, index, scale, (batch, n, dim), None), (values,))
    # the block no part reads gets a zero gradient, not garbage
    (grad,) = torch.autograd.grad(fused.sum(), values)
    assert not grad[:, :dim].any()


def test_features_whose_parts_advance_by_one_stride_are_one_product():
    keys = ["a_q", "b_q", "c_q", "a_r", "b_r", "c_r"]
    kt = KeyedTensor(keys=keys, length_per_key=[4] * 6, values=torch.zeros(2, 24))
    assert _column_runs(kt, [["a_q", "a_r"], ["b_q", "b_r"], ["c_q", "c_r"]], [2, 2, 2]) == [(2, 3, 2, 4, 0, [0, 12], [4, 4])]
    interleaved = KeyedTensor(keys=["a_q", "a_r", "b_q", "b_r"], length_per_key=[4] * 4, values=torch.zeros(2, 16))
    assert _column_runs(interleaved, [["a_q", "a_r"], ["b_q", "b_r"]], [2, 2]) == [(2, 2, 2, 4, 0, [0, 4], [8, 8])]


def test_scripted_and_traced_models_give_the_eager_outputs():
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    ebc = MultiHashEmbeddingBagCollection(_configs(PoolingType.MEAN), is_weighted=True)
    kjt = _kjt(weighted=True)
    eager = ebc(kjt).values()
    traced = symbolic_trace(ebc)
    torch.testing.assert_close(traced(kjt).values(), eager)
    scripted = torch.jit.script(traced)
    torch.testing.assert_close(scripted(kjt).values(), eager)


@pytest.mark.parametrize("flat", [True, False])
def test_an_exploded_batch_never_has_the_input_batch_size(flat, monkeypatch):
    """The combine reads a per-id output of ``batch`` rows as the one-hot layout: a batch with a bag
    of several ids whose most ids per feature equal the batch size gets one more padding bag."""
    if not flat:  # the per-feature path (large CPU batches, learned mappings)
        monkeypatch.setattr("torchrec_multihash.modules.id_transform.FLAT_CPU_MAX_IDS", 0)
    torch.manual_seed(0)
    cfgs = _configs()
    ebc = MultiHashEmbeddingBagCollection(cfgs)
    lengths = {"a": [2, 0, 1, 1], "b": [0, 1, 1, 1], "c": [1, 1, 1, 1], "d": [1, 1, 0, 1]}  # a: 4 ids in 4 bags
    values = torch.cat([torch.arange(sum(v)) for v in lengths.values()])
    kjt = KeyedJaggedTensor(keys=list(lengths), values=values, lengths=torch.tensor(sum(lengths.values(), [])))
    assert ebc.per_id["per_id_d4"].transform(kjt).stride() == 5
    weights = {n: w.detach() for n, w in ebc.sub_table_weights().items()}
    ref = reference_forward(cfgs, weights, kjt)
    out = ebc(kjt)
    torch.testing.assert_close(out.values(), torch.cat([ref[k] for k in out.keys()], dim=1))
    one_hot = _one_hot_kjt(False)
    assert ebc.per_id["per_id_d4"].transform(one_hot).stride() == 4
    ref = reference_forward(cfgs, weights, one_hot)
    torch.testing.assert_close(ebc(one_hot).values(), torch.cat([ref[k] for k in out.keys()], dim=1))


def test_traced_and_scripted_models_explode_a_one_hot_batch_to_the_same_outputs():
    import torchrec

    cfgs = _configs(PoolingType.MEAN)
    ebc = MultiHashEmbeddingBagCollection(cfgs, is_weighted=True)
    kjt = _one_hot_kjt(True)
    eager = ebc(kjt).values()
    traced = torchrec.fx.symbolic_trace(ebc)
    torch.testing.assert_close(traced(kjt).values(), eager)
    scripted = torch.jit.script(traced)
    torch.testing.assert_close(scripted(kjt).values(), eager)


@pytest.mark.parametrize("k,n", [(2, 5), (3, 4), (4, 3)])
def test_the_fused_ops_reuse_one_gradient_tensor_a_call_site_and_leave_their_input_alone(k, n):
    """With a buffer (a Combine's, one per call site), a fused op whose runs read every column writes
    its gradient into the tensor the buffer holds, step after step (grown when a batch has more
    rows), never into its input: the gradients equal the plain ops', a second backward through a
    retained graph is exact, and the input is unchanged."""
    from torchrec_multihash.modules import combine

    values, _, index, scale, batch, n, dim, _ = _case(k, n)
    read_all = values[:, dim:].clone()  # without the block no part reads
    runs = [combine._Run(2, n, k, dim, 0, [p * n * dim for p in range(k)], [dim] * k)]  # part p of feature f at (p * n + f) * dim
    buffer = []
    ops = {
        "per_id": (
            lambda v: _ComposePerId.apply(v, runs, index, scale, (batch, n, dim), buffer),
            lambda v: _compose_per_id_plain(v, runs, index, scale, batch, n, dim),
        ),
        "pooled": (lambda v: combine._ComposeRuns.apply(v, runs, n * dim, buffer), lambda v: combine._compose_runs_plain(v, runs)),
    }
    for name, (fused, plain) in ops.items():
        buffer.clear()
        out_rows = batch if name == "per_id" else read_all.size(0)
        g = torch.randn(out_rows, n * dim, dtype=values.dtype)
        leaf = read_all.clone().requires_grad_()
        (expected,) = torch.autograd.grad(plain(leaf), leaf, g)
        seen = []
        for _ in range(2):  # two steps: the same tensor
            inner = leaf * 1  # an op's output, as an inner lookup's
            inner.register_hook(lambda grad, seen=seen: seen.append(grad.data_ptr()))
            out = fused(inner)
            (got,) = torch.autograd.grad(out, leaf, g, retain_graph=True)
            torch.testing.assert_close(got, expected, msg=name)
            (again,) = torch.autograd.grad(out, leaf, g)  # the graph retained: the input was not written
            torch.testing.assert_close(again, expected, msg=name)
            torch.testing.assert_close(inner, leaf, msg=name)
        assert len(buffer) == 1 and seen == [buffer[0].data_ptr()] * 4, name


@pytest.mark.parametrize("flat", [True, False])
def test_one_hot_features_padded_by_multi_hot_ones_get_one_warning_naming_the_fix(flat, monkeypatch):
    """Undeclared one-hot features that share the per-id lookup with a multi-hot one are padded to
    its id count: the module says so once, naming them, their tables and max_ids_per_bag=1."""
    if not flat:
        monkeypatch.setattr("torchrec_multihash.modules.id_transform.FLAT_CPU_MAX_IDS", 0)
    ebc = MultiHashEmbeddingBagCollection(_configs())
    lengths = {"a": [9, 8, 9, 7], "b": [1, 1, 0, 1], "c": [1, 1, 1, 1], "d": [1, 0, 1, 1]}  # a: 33 ids; b, c, d one-hot
    kjt = KeyedJaggedTensor(
        keys=list(lengths), values=torch.cat([torch.arange(sum(v)) for v in lengths.values()]), lengths=torch.tensor(sum(lengths.values(), []))
    )
    with pytest.warns(
        UserWarning,
        match=r"feature\(s\) \['b', 'c', 'd'\] held at most one id a bag, .*multi-hot \['a'\], so each is padded to 33 bags .*max_ids_per_bag=1: \['t_bc', 't_d'\]",
    ):
        ebc(kjt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ebc(kjt)  # once
        MultiHashEmbeddingBagCollection(_configs())(_kjt(False))  # bags of a few ids each: little padding, no warning


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_retained_graph_backs_up_twice_as_torchrecs_ebc_does(one_hot):
    """``backward(retain_graph=True)`` then ``backward()``: each gives the same gradients (nothing
    the graph saved was written over)."""
    ebc = MultiHashEmbeddingBagCollection(_configs())
    out = ebc(_one_hot_kjt(False) if one_hot else _kjt(False)).values()
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward(retain_graph=True)
    once = {name: w.grad.clone() for name, w in ebc.sub_table_weights().items()}
    (out * upstream).sum().backward()
    for name, w in ebc.sub_table_weights().items():
        torch.testing.assert_close(w.grad, 2 * once[name], msg=name)


def test_the_gradient_tensors_kept_between_steps_are_not_pickled_or_copied():
    import copy

    ebc = MultiHashEmbeddingBagCollection(_configs())
    ebc(_kjt(False)).values().sum().backward()
    assert ebc.combine._gradient_buffers  # kept for the next step
    for twin in (copy.deepcopy(ebc), torch.load(_saved(ebc), weights_only=False)):
        assert twin.combine._gradient_buffers == {}
        torch.testing.assert_close(twin(_kjt(False)).values(), ebc(_kjt(False)).values())


def _saved(module):
    import io

    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf
