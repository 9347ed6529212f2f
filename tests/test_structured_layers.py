"""The structured engine's layer handlers (gradfd/structured/handlers/layers.py and attention.py): convolution,
batch/layer/group normalisation, pooling, embedding and attention, each against the pure-Python reference in float64
(the same nodes, every perturbed loss a fresh forward), against the exact derivative in float32 (no less accurate
than the generic engine), on fresh draws (the ``seed`` fixture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from test_structured import _agrees_with_reference, _rel

import gradfd
from gradfd import engine, ops, reference, structured
from gradfd.structured import StructuredUnsupported
from gradfd.structured.handlers.attention import draws_random_numbers as attention_draws_random_numbers

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason=f"kernels unavailable: {ops.unavailable_reason()}")


def _layers(seed: int, dtype=torch.float64):
    """name -> (func, params): one draw per seed, its tensors drawn in float64 and cast to ``dtype`` (the float32
    draw of a seed is the float64 one rounded)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def ru(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x, x1, y = rn(3, 4, 9, 8), rn(3, 4, 11), rn(3, 6, 5, 4)
    W, Wg, W2, W2g, W1d = rn(6, 4, 3, 3) / 4, rn(6, 2, 3, 3) / 3, rn(5, 6, 3, 3) / 5, rn(6, 3, 3, 3) / 4, rn(6, 2, 3) / 3
    b = rn(6) / 4
    rm, rv = rn(6) / 5, ru(6) + 0.5
    g, beta = ru(6) + 0.5, rn(6) / 5
    idx = torch.randint(0, 7, (4, 5), generator=gen)
    labels = torch.randint(0, 5, (3,), generator=gen)
    E, target = rn(7, 3), rn(3, 6, 9, 8)
    A, Wq, Wk, Wv, Wp = rn(2, 5, 8), rn(8, 8) / 3, rn(8, 8) / 3, rn(8, 8) / 3, rn(8, 24) / 3
    mask, K, V, masks = rn(5, 5), rn(2, 2, 5, 4), rn(2, 2, 5, 4), rn(2, 1, 5, 5)

    def heads(t):  # (2, 5, 8) -> 2 heads of 4 features, (2, 2, 5, 4)
        return t.view(2, 5, 2, 4).transpose(1, 2)

    def attention(wq, **options):
        out = F.scaled_dot_product_attention(heads(A @ wq), heads(A @ Wk), heads(A @ Wv), **options)
        return out.transpose(1, 2).reshape(2, 5, 8).tanh().pow(2).mean()

    def packed(w):  # one projection for query, key and value, split by unbind
        q, k, v = (A @ w).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).pow(2).sum()

    def sliced(w):  # ... split by slicing: a perturbation that misses a slice leaves it at position 0
        p = A @ w
        return F.scaled_dot_product_attention(heads(p[..., :8]), heads(p[..., 8:16]), heads(p[..., 16:])).sin().sum()

    return {
        "conv2d weight and bias, stride, padding, dilation, groups": (
            lambda w, bias: torch.tanh(F.conv2d(x, w, bias, stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                                                groups=2)).pow(2).mean(),
            (Wg.clone(), b.clone())),
        "conv2d weight under MSE (the fused kernel)": (
            lambda w: F.mse_loss(F.conv2d(x, w, b, padding=1), target), (W.clone(),)),
        "conv1d weight, groups": (lambda w: torch.tanh(F.conv1d(x1, w, b, stride=2, padding=1, groups=2)).pow(2).sum(),
                                  (W1d.clone(),)),
        "conv2d input": (lambda inp: torch.tanh(F.conv2d(inp, W, b, padding=1)).mean(), (x.clone(),)),
        "two convs (the change of a channel reaches the second)": (
            lambda w: torch.tanh(F.conv2d(torch.tanh(F.conv2d(x, w, b, padding=1)), W2, padding=1)).pow(2).mean(),
            (W.clone(),)),
        "two convs, the second grouped and strided": (
            lambda w: F.conv2d(torch.sigmoid(F.conv2d(x, w, b)), W2g, stride=2, groups=2).pow(2).mean(),
            (W.clone(),)),
        "batch norm eval": (
            lambda w: F.conv2d(torch.tanh(F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, g, beta)), W2).pow(2).mean(),
            (W.clone(),)),
        "batch norm train (batch statistics)": (
            lambda w: (F.batch_norm(F.conv2d(x, w, b, padding=1), None, None, g, beta, training=True)
                       * target).tanh().sum(),
            (W.clone(),)),
        "batch norm train, the input perturbed": (
            lambda t: torch.tanh(F.batch_norm(t, None, None, g, beta, training=True)).pow(3).sum(), (y.clone(),)),
        "batch norm eval, the input perturbed": (
            lambda t: torch.tanh(F.batch_norm(t, rm, rv, g, beta)).pow(3).sum(), (y.clone(),)),
        "layer norm over (C, H, W) and over W": (
            lambda w: (F.layer_norm(F.conv2d(x, w, b), (6, 7, 6)).pow(3).mean()
                       + torch.tanh(F.layer_norm(F.conv2d(x, w, b), (6,))).sum()), (W.clone(),)),
        "group norm": (lambda w: torch.tanh(F.group_norm(F.conv2d(x, w, b), 3, g, beta)).pow(2).sum(), (W.clone(),)),
        "max, average and adaptive pooling": (
            lambda w: (lambda h: F.max_pool2d(h, 2).pow(2).sum() + F.avg_pool2d(h, 3, stride=2, padding=1).sum()
                       + F.adaptive_avg_pool2d(h, (2, 3)).pow(2).sum() + F.adaptive_max_pool2d(h, 2).sum())(
                torch.tanh(F.conv2d(x, w, b, padding=1))), (W.clone(),)),
        "1-d pooling": (lambda w: (lambda h: F.max_pool1d(h, 3).pow(2).sum() + F.avg_pool1d(h, 2).sum())(
            torch.tanh(F.conv1d(x1, w, groups=2))), (W1d.clone(),)),
        "a small CNN under cross-entropy": (
            lambda w1, w2: F.cross_entropy(F.adaptive_avg_pool2d(torch.relu(F.conv2d(
                F.avg_pool2d(torch.relu(F.conv2d(x, w1, b, padding=1)), 2), W2[:, :6])), 1).flatten(1) + w2,
                labels), (W.clone(), torch.zeros(1, dtype=dtype))),
        "embedding": (lambda e: torch.tanh(F.embedding(idx, e) @ E[:3].t()).pow(2).sum(), (E.clone(),)),
        "conv1d input": (lambda inp: torch.tanh(F.conv1d(inp, W1d, b, padding=2, groups=2)).pow(2).mean(),
                         (x1.clone(),)),
        "the input through conv, batch norm eval, layer and group norm, pooling (one sample each)": (
            lambda inp: (lambda h: F.avg_pool2d(F.group_norm(F.layer_norm(h, (6, 9, 8)), 3), 2).pow(2).sum())(
                torch.tanh(F.batch_norm(F.conv2d(inp, W, b, padding=1), rm, rv, g, beta))), (x.clone(),)),
        "batch norm eval and train after a second conv (whole tensors)": (
            lambda w: (lambda h: F.batch_norm(h, rm[:5], rv[:5], g[:5], beta[:5]).sin().sum()
                       + F.batch_norm(h, None, None, training=True).pow(3).sum())(
                F.conv2d(torch.tanh(F.conv2d(x, w, b, padding=1)), W2)), (W.clone(),)),
        "embedding with padding_idx": (lambda e: torch.tanh(F.embedding(idx, e, padding_idx=2) @ E[:3].t()).sum(),
                                       (E.clone(),)),
        "softmax over channels and over width": (
            lambda w: (F.softmax(F.conv2d(x, w, b), 1).pow(2).sum() + F.log_softmax(F.conv2d(x, w, b), 3).sum()),
            (W.clone(),)),
        "attention, the query's projection": (attention, (Wq.clone(),)),
        "attention with a mask and a scale": (lambda w: attention(w, attn_mask=mask, scale=0.5), (Wq.clone(),)),
        "attention, a packed projection split by unbind, causal": (packed, (Wp.clone(),)),
        "attention, a packed projection split by slicing (every plane, densified)": (sliced, (Wp.clone(),)),
        "attention, key and value": (lambda k, v: F.scaled_dot_product_attention(heads(A), k, v).sin().sum(),
                                     (K.clone(), V.clone())),
        "attention with a mask per sample, the key's projection": (
            lambda w: F.scaled_dot_product_attention(heads(A @ Wq), heads(A @ w), heads(A @ Wv),
                                                     attn_mask=masks).tanh().sum(), (Wk.clone(),)),
        "grouped-query attention (one key and value head), the query": (
            lambda q: F.scaled_dot_product_attention(q, K[:, :1], V[:, :1], enable_gqa=True).pow(2).sum(),
            (heads(A).clone(),)),
        "batched products, whole matrices (a sample's attention written out)": (
            lambda q: ((q @ K.transpose(-2, -1) * 0.5).softmax(-1) @ V).pow(2).sum(), (heads(A).clone(),)),
    }


LAYERS = list(_layers(0))


@pytest.mark.parametrize("name", LAYERS)
def test_layers_agree_with_the_reference_in_float64(seed, name):
    func, params = _layers(seed)[name]
    for idx in range(len(params)):
        ev = engine.evaluate(func, params, idx, steps=1e-5, engine="structured", chunk_size=37)
        assert ev.engine == "structured", ev.notes
        got = ev.estimate()[0].reshape(params[idx].shape)
        ref = reference.numerical_gradient(func, params, idx)
        assert _agrees_with_reference(got, ref, float(func(*params).detach())), (name, idx, _rel(got, ref))


@pytest.mark.parametrize("name", [n for n in LAYERS if "max" not in n and "1-d pooling" not in n
                                  and "CNN" not in n])
def test_layers_in_float32_are_as_accurate_as_the_generic_engine(seed, name):
    # (smooth functions: at float32's steps a switch inside a stencil says nothing about the engine's accuracy)
    func, params = _layers(seed, torch.float32)[name]
    func64, _ = _layers(seed)[name]
    for idx in range(len(params)):
        clones = [p.double().requires_grad_(k == idx) for k, p in enumerate(params)]
        (exact,) = torch.autograd.grad(func64(*clones), clones[idx])
        got = gradfd.numerical_gradient(func, params, idx, h=None, engine="structured")
        generic = gradfd.numerical_gradient(func, params, idx, h=None, engine="batched")
        assert _rel(got, exact) <= max(2 * _rel(generic, exact), 2e-4), (name, idx, _rel(got, exact),
                                                                          _rel(generic, exact))


def test_layers_keep_the_region_narrow_where_they_can(seed):
    # a first conv's weight moves one channel through tanh; the second conv widens it to the whole output
    func, params = _layers(seed)["two convs (the change of a channel reaches the second)"]
    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
    widened = [n for n in ev.notes if "widened" in n]
    assert widened and "convolution_1" in widened[0] and "convolution," not in widened[0] + ",", ev.notes
    func, params = _layers(seed)["conv2d weight under MSE (the fused kernel)"]
    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
    assert any("fused kernel" in n for n in ev.notes), ev.notes

def test_attention_runs_on_the_moved_heads_planes_alone(seed, monkeypatch):
    # a query projection's entry moves one head of every sample: the op's output region is that head (axes (1,));
    # a grouped-query attention's head dim (2 query heads, 1 key head) is not shared: a moved query entry's sample
    from gradfd.structured import handlers
    from gradfd.structured.handlers import attention

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    regions = []

    def spy(*args, **kwargs):
        out = attention.handle_attention(*args, **kwargs)
        regions.append(out[0].axes)
        return out

    monkeypatch.setitem(handlers.HANDLERS, op, spy)
    for name, axes in [("attention, the query's projection", (1,)),
                       ("grouped-query attention (one key and value head), the query", (0,))]:
        regions.clear()
        func, params = _layers(seed)[name]
        engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
        assert regions and set(regions) == {axes}, (name, regions)


def test_attention_draws_random_numbers_only_with_dropout():
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    aten = torch.ops.aten
    cpu = aten._scaled_dot_product_flash_attention_for_cpu.default
    efficient = aten._scaled_dot_product_efficient_attention.default
    cases = [(cpu, (q, q, q), {}, False), (cpu, (q, q, q, 0.0), {}, False), (cpu, (q, q, q, 0.1), {}, True),
             (cpu, (q, q, q), {"dropout_p": 0.2}, True), (efficient, (q, q, q, None, False, 0.0), {}, False),
             (efficient, (q, q, q, None, False, 0.5), {}, True), (aten.native_dropout.default, (q, 0.0, True), {}, True)]
    for op, args, kwargs, random in cases:
        node = graph.call_function(op, args, kwargs)
        assert attention_draws_random_numbers(node) is random, (op, args, kwargs)


def test_a_saved_statistic_read_downstream_is_refused_naming_the_op(seed):
    x = torch.randn(4, 3, 5, dtype=torch.float64)

    def func(w):  # the batch variance of a train-mode norm, read back through torch.var_mean's twin
        h = x * w.view(1, 3, 1)
        out, mean, invstd = torch.ops.aten.native_batch_norm(h, None, None, None, None, True, 0.1, 1e-5)
        return out.sum() + invstd.sum()

    with pytest.raises(StructuredUnsupported, match="native_batch_norm"):
        gradfd.numerical_gradient(func, (torch.rand(3, dtype=torch.float64) + 0.5,), 0, engine="structured")


def _falls_back_under_auto(func, params, op: str, monkeypatch) -> None:
    """``func`` is refused naming ``op``, and ``"auto"`` (made to try the structured engine) falls back to the generic
    engine with a note naming it, and the reference's gradient."""
    with pytest.raises(StructuredUnsupported, match=op.replace(".", r"\.")):
        gradfd.numerical_gradient(func, params, 0, engine="structured")
    monkeypatch.setattr(structured, "_MIN_WORK", 0)  # make "auto" try the structured engine on this small problem
    monkeypatch.setattr(engine, "_STRUCTURED_MIN_EVALUATIONS", 0)
    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="auto")
    assert ev.engine in ("batched", "loop")
    assert any("structured engine not applicable" in note and op in note for note in ev.notes), ev.notes
    got = ev.estimate()[0].reshape(params[0].shape)
    assert _rel(got, reference.numerical_gradient(func, params, 0)) <= 1e-9


def test_a_loss_that_reads_pooling_indices_is_refused_and_auto_falls_back(seed, monkeypatch):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def func(w):  # the indices of a max pool, read back as numbers
        values, indices = F.max_pool2d(F.conv2d(x, w), 2, return_indices=True)
        return values.pow(2).sum() + 1e-3 * indices.double().sum()

    _falls_back_under_auto(func, (torch.randn(4, 3, 3, 3, dtype=torch.float64),), "max_pool2d_with_indices",
                           monkeypatch)


@pytest.mark.parametrize("form", ["fused", "written out"])
def test_attention_over_every_plane_is_refused_and_auto_falls_back(seed, form, monkeypatch):
    # nn.MultiheadAttention's reshapes merge the heads with the batch: a projection's column then moves every
    # (sample, head) plane, and every perturbation is a whole attention; the generic engine is faster there
    x, wk = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)

    def merged(t):  # (2, 5, 8) -> (2 * 2 heads, 5, 4), then back to (2, 2, 5, 4)
        return t.view(2, 5, 2, 4).transpose(1, 2).reshape(4, 5, 4)

    def func(w):
        q, k = merged(x @ w), merged(x @ wk)
        if form == "fused":
            return F.scaled_dot_product_attention(q.view(2, 2, 5, 4), k.view(2, 2, 5, 4), k.view(2, 2, 5, 4)).sum()
        return ((q @ k.transpose(1, 2)).softmax(-1) @ k).pow(2).sum()

    params = (torch.randn(8, 8, dtype=torch.float64),)
    with pytest.raises(StructuredUnsupported, match="spans every"):
        gradfd.numerical_gradient(func, params, 0, engine="structured")
    _falls_back_under_auto(func, params, "flash_attention_for_cpu" if form == "fused" else "aten.bmm", monkeypatch)


def test_a_check_whose_attention_regions_differ_by_chunk_is_judged_once_per_column(seed):
    # a projection split by slicing leaves a perturbation that misses a slice at position 0: whether the operands'
    # planes agree differs from chunk to chunk. The handler densifies those chunks (never refuses one chunk after
    # another ran: the generic engine would then deliver the earlier columns a second time to the verdict)
    func, params = _layers(seed)["attention, a packed projection split by slicing (every plane, densified)"]
    t = gradfd.check(func, (params[0].clone().requires_grad_(),), engine="structured", chunk_size=16).tensors[0]
    assert t.passed and t.checked == params[0].numel() == t.agree + t.unresolved, str(t)
    assert t.details["engine"] == "structured", t.details


def test_a_transposed_convolution_is_refused_and_auto_falls_back(seed, monkeypatch):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    _falls_back_under_auto(lambda w: F.conv_transpose2d(x, w).pow(2).sum(),
                           (torch.randn(3, 2, 3, 3, dtype=torch.float64),), "transposed", monkeypatch)


def test_module_state_is_bitwise_intact_after_a_structured_check(seed):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    state = list(model.parameters()) + list(model.buffers())
    before = snapshot(state)
    report = gradfd.check_module(model, x, loss=lambda out: out.pow(2).mean(), wrt=["0.*", "5.*"],
                                 engine="structured", raise_on_failure=False)
    assert report.passed, str(report)
    assert_unchanged(state, before)
    assert not model.training
