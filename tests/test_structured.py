"""The structured engine (gradfd/structured/): its kernels against their pure-PyTorch twins, its losses against the
generic engine and the reference on every supported pattern, its refusals, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from functions import FUNCTIONS
from helpers import ALL_DEVICES, ALL_FLOAT_DTYPES, DTYPES, assert_unchanged, snapshot

import gradfd
from gradfd import engine, ops, reference, structured
from gradfd.structured import StructuredUnsupported

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason=f"kernels unavailable: {ops.unavailable_reason()}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def _agrees_with_reference(got: torch.Tensor, ref: torch.Tensor, loss: float, h: float = 1e-5,
                           truth: torch.Tensor | None = None) -> bool:
    """Within 1e-9 of the largest entry -- plus the reference's own rounding, a few ``eps*|loss|/h``, which matters only
    where a whole gradient is tiny next to its loss (a bias whose residuals nearly cancel): the reference and the
    generic engine round the full loss, and nothing can agree with them more closely than that. The test data keep
    that term below 1e-9 of the gradient in most draws.

    With ``truth`` (autograd's gradient), an entry also agrees when it is as close to the truth as the reference is,
    within the same bound: a loss whose terms round worse than the loss (a saturated sigmoid under
    ``binary_cross_entropy``: ``log(1 - p)`` with ``1 - p`` ~ 1e-6) leaves the reference, which rounds every term at
    every node, ~1e-9 off the truth, and the structured engine, which rounds the changed terms alone, off by as much
    the other way (seed 531974108)."""
    scale = ref.abs().max().item()
    bound = 1e-9 * scale + 8 * 2.2e-16 * abs(loss) / h
    got, ref = got.double(), ref.double()
    agree = (got - ref).abs() <= bound
    if truth is not None:
        truth = truth.double()
        agree |= (got - truth).abs() <= bound + (ref - truth).abs()
    return bool(agree.all())


# --------------------------------------------------------------------------------------------------------------
# kernels against their twins


def _kernel_inputs(device, dtype, n=13, k=5, d=7, c=40, s=4):
    base = torch.randn(n, k, dtype=torch.float64).to(dtype).to(device)
    features = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    target = torch.randn(n, k, dtype=torch.float64).to(dtype).to(device)
    column = torch.randint(0, k, (c,), device=device)
    feature = torch.randint(0, d, (c,), device=device)
    delta = (torch.randn(s, c, dtype=torch.float64) * 1e-2).to(device)
    return base, features, target, column, feature, delta


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_update_matches_reference(seed, device, dtype):
    base, features, _, column, feature, delta = _kernel_inputs(device, dtype)
    got = structured.linear_update(base, features, column, feature, delta[0].contiguous())
    want = structured.linear_update_reference(base, features, column, feature, delta[0])
    assert got.shape == (column.numel(), base.shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # a float64 multiply and add, each rounded, then one conversion: exact


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("shape", [dict(), dict(n=1, k=1, d=1, c=3, s=1), dict(n=70, k=1, d=300, c=100, s=6)])
def test_linear_update_mse_matches_reference(seed, device, dtype, activation, shape):
    base, features, target, column, feature, delta = _kernel_inputs(device, dtype, **shape)
    got = structured.linear_update_mse(base, features, target, column, feature, delta, activation)
    want = structured.linear_update_mse_reference(base, features, target, column, feature, delta, activation)
    assert got.shape == delta.shape and got.dtype == torch.float64
    # the sums differ in their order only (terms of size ~scale); the activation may differ by an ulp between libm
    # and torch's vectorised version
    scale = float(((1 + base.double().abs() + target.double().abs()) ** 2).sum(0).max())
    eps = 1e-15 if activation in (None, "relu") else 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=0, atol=eps * scale)


def test_structured_ops_pass_opcheck(seed):
    base, features, target, column, feature, delta = _kernel_inputs("cpu", torch.float64)
    structured._ensure_fakes()
    torch.library.opcheck(torch.ops.gradfd.linear_update.default,
                          (base, features, column, feature, delta[0].contiguous()))
    torch.library.opcheck(torch.ops.gradfd.linear_update_mse.default,
                          (base, features, target, column, feature, delta, 1))


def _good_mse_args():
    base, features, target, column, feature, delta = _kernel_inputs("cpu", torch.float64)
    return dict(base=base, features=features, target=target, column=column, feature=feature, delta=delta,
                activation=0)


BAD_KERNEL = [
    ("base 1-D", dict(base=torch.randn(13, dtype=torch.float64)), "base must be 2-D"),
    ("base int", dict(base=torch.ones(13, 5, dtype=torch.int64)), "base must be floating point"),
    ("features rows", dict(features=torch.randn(12, 7, dtype=torch.float64)), "features must be 2-D .* n = 13"),
    ("features dtype", dict(features=torch.randn(13, 7)), "features must have base's dtype"),
    ("target shape", dict(target=torch.randn(13, 4, dtype=torch.float64)), "target must have base's shape"),
    ("column float", dict(column=torch.zeros(40)), "column must be a 1-D int64"),
    ("feature length", dict(feature=torch.zeros(3, dtype=torch.int64)), "feature must be a 1-D int64 .* \\(40\\)"),
    ("column range", dict(column=torch.full((40,), 5)), "column values must lie in \\[0, 5\\), got min 5 and max 5"),
    ("feature range", dict(feature=torch.full((40,), -1)), "feature values must lie in \\[0, 7\\)"),
    ("delta float32", dict(delta=torch.zeros(2, 40)), "delta must be a contiguous \\(S, C\\) float64"),
    ("delta too many nodes", dict(delta=torch.zeros(17, 40, dtype=torch.float64)),
     "delta must have between 1 and 16 rows .stencil nodes., got 17"),
    ("activation", dict(activation=7), "activation must be 0 .identity., 1 .tanh., 2 .relu. or 3 .sigmoid., got 7"),
    ("non-contiguous base", dict(base=torch.randn(5, 13, dtype=torch.float64).t()), "base must be contiguous"),
]


@pytest.mark.parametrize("name,override,message", BAD_KERNEL, ids=[b[0] for b in BAD_KERNEL])
def test_linear_update_mse_checks_name_the_op_and_what_they_got(name, override, message):
    args = _good_mse_args()
    args.update(override)
    with pytest.raises(RuntimeError, match="gradfd::linear_update_mse: " + message):
        torch.ops.gradfd.linear_update_mse(*args.values())


def test_linear_update_checks_name_the_op():
    base, features, _, column, feature, delta = _kernel_inputs("cpu", torch.float64)
    with pytest.raises(RuntimeError, match="gradfd::linear_update: delta must be a contiguous 1-D float64 tensor"):
        structured.linear_update(base, features, column, feature, delta)
    with pytest.raises(ValueError, match="activation must be one of"):
        structured.linear_update_mse(base, features, base, column, feature, delta, "gelu")


def _nll_inputs(device, dtype, n=32, k=10, b=50, bias=True, weight=False):
    """outer_update_nll's arguments: logits of 256 + N(0, 1) and moves of order 1, a row ignored (where n > 2). The
    logits' grid (their spacing at 256) is some 100 times the log-probabilities' (at ~1): a rounding of the logits left
    out moves a log-probability by many units of its last place."""
    base = (256 + torch.randn(n, k, dtype=torch.float64)).to(dtype).to(device)
    rows = torch.randn(b, n, dtype=torch.float64, device=device)
    cols = torch.randn(b, k, dtype=torch.float64, device=device)
    target = torch.randint(0, k, (n,), device=device)
    if n > 2:
        target[1] = -100
    bias_t = torch.randn(k, dtype=torch.float64).to(dtype).to(device) if bias else None
    weight_t = (torch.rand(k, dtype=torch.float64) + 0.5).to(dtype).to(device) if weight else None
    return base, bias_t, rows, cols, target, weight_t


def _nll_rows(args) -> torch.Tensor:
    """``(B, n)``: outer_update_nll of each row alone (a one-row problem per row), float64."""
    base, bias, rows, cols, target, weight = args
    return torch.stack([structured.outer_update_nll(base[r:r + 1].contiguous(), bias, rows[:, r:r + 1].contiguous(),
                                                    cols, target[r:r + 1].contiguous(), weight)
                        for r in range(base.shape[0])], 1)


def _nll_rows_reference(args) -> torch.Tensor:
    base, bias, rows, cols, target, weight = args
    return torch.stack([structured.outer_update_nll_reference(base[r:r + 1], bias, rows[:, r:r + 1], cols,
                                                              target[r:r + 1], weight)
                        for r in range(base.shape[0])], 1)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [dict(), dict(n=1, k=1, b=3), dict(n=9, k=300, b=5), dict(n=70, k=3, b=40)],
                         ids=["32x10", "1x1", "9x300", "70x3"])
@pytest.mark.parametrize("bias,weight", [(True, False), (False, True), (True, True)], ids=["bias", "weight", "both"])
def test_outer_update_nll_matches_reference(seed, device, dtype, shape, bias, weight):
    """Row by row, the kernel's term is the reference's: both round the moved logits, the bias add, the
    log-probability and its product with the weight to the dtype, and may differ only where the log-softmax's own
    rounding (PyTorch sums in another order; the kernel's float exp is a polynomial within 1.5 ulp) tips the
    perturbed or the base log-probability to a neighbouring value: by at most two units of its last place. A rounding
    of the logits left out (before the bias, say) moves a row by up to half the logits' spacing, many of those
    units (``_nll_inputs``)."""
    args = _nll_inputs(device, dtype, bias=bias, weight=weight, **shape)
    got = structured.outer_update_nll(*args)
    assert got.shape == (args[2].shape[0],) and got.dtype == torch.float64
    rows, want = _nll_rows(args), _nll_rows_reference(args)
    torch.testing.assert_close(got, rows.sum(1), rtol=1e-12, atol=1e-12)  # the rows, summed in float64
    logits = args[0].double() + args[2].unsqueeze(2) * args[3].unsqueeze(1)
    ulp = 2 * torch.finfo(dtype).eps * (1 + torch.log_softmax(logits, -1).abs().max().item()) * (
        1 if args[5] is None else 2)
    off = (rows - want).abs()
    assert off.max().item() <= 2 * ulp, (off.max().item(), ulp)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
def test_outer_update_nll_moves_nothing_exactly_and_each_perturbation_alone(seed, device, dtype):
    base, bias, rows, cols, target, weight = _nll_inputs(device, dtype, weight=True)
    rows[::3] = 0  # these perturbations move nothing: the base point is evaluated by the same code
    got = structured.outer_update_nll(base, bias, rows, cols, target, weight)
    assert bool((got[::3] == 0).all())
    part = structured.outer_update_nll(base, bias, rows[5:9].contiguous(), cols[5:9].contiguous(), target, weight)
    torch.testing.assert_close(part, got[5:9], rtol=0, atol=0)


def test_outer_update_nll_passes_opcheck(seed):
    base, bias, rows, cols, target, weight = _nll_inputs("cpu", torch.float64, weight=True)
    structured._ensure_fakes()
    torch.library.opcheck(torch.ops.gradfd.outer_update_nll.default, (base, bias, rows, cols, target, weight, -100))
    ignore3 = torch.where(target < 0, 3, target)
    torch.library.opcheck(torch.ops.gradfd.outer_update_nll.default, (base, None, rows, cols, ignore3, None, 3))


BAD_NLL = [
    ("target out of range", dict(target=torch.full((32,), 10)),
     "target values must lie in \\[0, 10\\) or equal ignore_index = -100, got 10"),
    ("target int32", dict(target=torch.zeros(32, dtype=torch.int32)),
     "target must be a 1-D int64 tensor of n = 32 rows' classes"),
    ("rows float32", dict(rows=torch.zeros(50, 32)), "rows must be a \\(B, n\\) float64 tensor with n = 32"),
    ("cols batch", dict(cols=torch.zeros(49, 10, dtype=torch.float64)),
     "cols must be a \\(B, K\\) float64 tensor with B = 50"),
    ("bias dtype", dict(bias=torch.zeros(10)), "bias must be a 1-D tensor of K = 10 entries in base's dtype"),
    ("weight length", dict(weight=torch.ones(9, dtype=torch.float64)), "weight must be a 1-D tensor of K = 10"),
    ("no classes", dict(base=torch.zeros(32, 0, dtype=torch.float64)), "base must be 2-D \\(n, K\\) with K >= 1"),
    ("non-contiguous rows", dict(rows=torch.zeros(32, 50, dtype=torch.float64).t()), "rows must be contiguous"),
]


@pytest.mark.parametrize("name,override,message", BAD_NLL, ids=[b[0] for b in BAD_NLL])
def test_outer_update_nll_checks_name_the_op_and_what_they_got(name, override, message):
    args = dict(zip(("base", "bias", "rows", "cols", "target", "weight"), _nll_inputs("cpu", torch.float64)))
    args.update(override)
    with pytest.raises(RuntimeError, match="gradfd::outer_update_nll: " + message):
        torch.ops.gradfd.outer_update_nll(*args.values(), -100)


# --------------------------------------------------------------------------------------------------------------
# the models of the issue: structured vs generic vs reference, float64, 1e-9 of the largest entry


def _models(device, dtype):
    """name -> (func, params) for the models the structured engine must run; fresh random data. Targets are offset so
    that no gradient is tiny next to its loss (the reference's rounding, ~eps*|loss|/h, must stay below 1e-9 of the
    gradient for the comparison to mean anything)."""
    n, d, k, c = int(torch.randint(12, 40, ())), int(torch.randint(3, 9, ())), 5, 3
    o = dict(dtype=dtype, device=device)
    X = torch.randn(n, d, **o)
    y = torch.randn(n, 1, **o) + 1
    x = torch.linspace(-1, 1, n, **o).unsqueeze(1)
    t = (torch.rand(n, device=device) > 0.2).to(dtype)
    labels = (torch.rand(n, device=device) ** 2 * c).long()  # skewed towards class 0
    Y = torch.randn(n, c, **o) + 1
    w, b = torch.randn(d, 1, **o) / math.sqrt(d), 0.1 * torch.randn(1, **o)
    w1 = (2 + torch.rand(1, **o)) * torch.randn(1, **o).sign()
    mlp = (torch.randn(d, k, **o) / math.sqrt(d), 0.1 * torch.randn(k, **o), torch.randn(k, c, **o) / math.sqrt(k),
           0.1 * torch.randn(c, **o))
    linear = (torch.randn(k, d, **o) / math.sqrt(d), torch.randn(k, **o))
    Yk = torch.randn(n, k, **o) + 1
    powers = torch.cat([x**p for p in range(4)], 1)

    def mlp_tanh_mse(W1, b1, W2, b2):
        return ((torch.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2).mean()

    def mlp_tanh_ce(W1, b1, W2, b2):
        return F.cross_entropy(torch.tanh(X @ W1 + b1) @ W2 + b2, labels)

    return {
        "linear regression": (lambda w, b: ((X @ w + b - y) ** 2).mean(), (w, b)),
        "linear regression, 1-D w": (lambda w, b: ((X @ w + b - y[:, 0]) ** 2).mean(), (w[:, 0].clone(), b)),
        "quadratic regression": (lambda w1, w2, b: ((w2 * x**2 + w1 * x + b - y) ** 2).mean(),
                                 (w1, -0.5 * torch.randn(1, **o).abs(), 0.1 * torch.randn(1, **o))),
        "polynomial features": (lambda w: ((powers @ w - y) ** 2).mean(), (torch.randn(4, 1, **o),)),
        "logistic regression": (lambda w, b: F.binary_cross_entropy_with_logits((X @ w + b).squeeze(1), t), (w, b)),
        "softmax regression": (lambda W, b: F.cross_entropy(X @ W + b, labels),  # b favours the rarest class
                               (torch.randn(d, c, **o) / math.sqrt(d),
                                torch.tensor([0.0, 0.0, 2.0], **o) + 0.1 * torch.randn(c, **o))),
        "mlp tanh mse": (mlp_tanh_mse, mlp),
        "mlp tanh cross-entropy": (mlp_tanh_ce, mlp),
        "linear layer mse": (lambda W, b: F.mse_loss(F.linear(X, W, b), Yk), linear),
        "linear layer tanh mse": (lambda W, b: F.mse_loss(torch.tanh(F.linear(X, W, b)), Yk), linear),
    }


MODEL_CASES = [(name, idx) for name, (_, params) in _models("cpu", torch.float64).items() for idx in range(len(params))]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name,idx", MODEL_CASES, ids=[f"{n}-{i}" for n, i in MODEL_CASES])
def test_structured_agrees_with_generic_and_reference_in_float64(seed, device, name, idx):
    func, params = _models(device, torch.float64)[name]
    ref = reference.numerical_gradient(func, params, idx)
    generic = gradfd.numerical_gradient(func, params, idx, engine="batched")
    ev = engine.evaluate(func, params, idx, steps=1e-5, engine="structured")
    assert ev.engine == "structured", ev.notes
    got = ev.estimate()[0].reshape(params[idx].shape)
    loss = float(func(*params).detach())
    assert _agrees_with_reference(got, ref, loss)
    assert _agrees_with_reference(got, generic, loss)
    public = gradfd.numerical_gradient(func, params, idx, engine="structured")
    assert public.shape == params[idx].shape and public.dtype == params[idx].dtype
    assert _agrees_with_reference(public, ref, loss)
    # and it is at least that close to the exact derivative (it rounds only the changed terms)
    clones = [p.clone().requires_grad_(k == idx) for k, p in enumerate(params)]
    (exact,) = torch.autograd.grad(func(*clones), clones[idx])
    assert _agrees_with_reference(got, exact, loss)


def test_mlp_relu_agrees_away_from_kinks(seed):
    X = torch.randn(30, 6, dtype=torch.float64)
    Y = torch.randn(30, 3, dtype=torch.float64)
    W1, b1 = torch.randn(6, 8, dtype=torch.float64) / 2.5, 0.1 * torch.randn(8, dtype=torch.float64)
    W2, b2 = torch.randn(8, 3, dtype=torch.float64) / 3, 0.1 * torch.randn(3, dtype=torch.float64)
    pre = X @ W1 + b1
    keep = pre.abs().min(0).values > 1e-2  # hidden units whose pre-activation stays away from the kink
    W1, b1, W2 = W1[:, keep], b1[keep], W2[keep]

    def func(W1, b1, W2, b2):
        return F.mse_loss(torch.relu(X @ W1 + b1) @ W2 + b2, Y)

    # h = 1e-4 moves each pre-activation by ~1e-3 at most, far from its kink; both evaluate the same nodes, so they
    # differ by rounding only: eps * |loss| / h ~ 2e-12 (h = 1e-5 made that 2e-11, over 1e-9 of a largest entry
    # of 0.014 for some draws)
    for idx in range(4):
        params = (W1, b1, W2, b2)
        got = gradfd.numerical_gradient(func, params, idx, h=1e-4, engine="structured")
        want = reference.numerical_gradient(func, params, idx, h=1e-4)
        assert _rel(got, want) <= 1e-9


@pytest.mark.parametrize("stencil", ["central", "four_point", "richardson"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_stencils_and_chunk_boundaries(seed, stencil, chunk_size):
    func, params = _models("cpu", torch.float64)["mlp tanh cross-entropy"]
    for idx in (0, 2):  # widened and fused paths
        got = gradfd.numerical_gradient(func, params, idx, h=1e-3, stencil=stencil, engine="structured",
                                        chunk_size=chunk_size)
        want = gradfd.numerical_gradient(func, params, idx, h=1e-3, stencil=stencil, engine="batched")
        assert _rel(got, want) <= 1e-10


def test_fused_kernel_is_used_for_the_lessons_models(seed):
    for name in ("linear regression", "linear regression, 1-D w", "polynomial features", "linear layer mse",
                 "linear layer tanh mse"):
        func, params = _models("cpu", torch.float64)[name]
        ev = engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
        assert any("fused kernel gradfd::linear_update_mse" in note for note in ev.notes), (name, ev.notes)


def _cross_entropy_heads():
    """name -> (func, params, idx, fused): a moved hidden column or weight row under a Linear and cross-entropy
    (float64); ``fused`` says whether gradfd::outer_update_nll evaluates it (else the moved logits are written out)."""
    n, d, k, c = 24, 5, 7, 4
    o = dict(dtype=torch.float64)
    X, Y = torch.randn(n, d, **o), torch.rand(n, c, **o)
    labels = torch.randint(0, c, (n,))
    ignored = labels.clone()
    ignored[::5] = 3  # ignore_index below
    cw = torch.rand(c, **o) + 0.5
    W1, b1 = torch.randn(d, k, **o) / math.sqrt(d), 0.1 * torch.randn(k, **o)
    W2, b2 = torch.randn(k, c, **o) / math.sqrt(k), 0.1 * torch.randn(c, **o)
    M = torch.randn(d, c, **o)
    masked = b2.clone()
    masked[0] = -math.inf  # class 0 never predicted: an ignored row's stand-in class has logp -inf
    kept = labels.clamp(min=1)
    kept[::4] = -100

    def hidden(W1):
        return torch.tanh(X @ W1 + b1)

    return {
        "hidden column, bias, mean": (lambda W1: F.cross_entropy(F.linear(hidden(W1), W2.t(), b2), labels), (W1,), 0,
                                      True),
        "hidden column, no bias": (lambda W1: F.cross_entropy(hidden(W1) @ W2, labels), (W1,), 0, True),
        "class weights, ignored rows, sum": (
            lambda W1: F.cross_entropy(hidden(W1) @ W2 + b2, ignored, weight=cw, ignore_index=3, reduction="sum"),
            (W1,), 0, True),
        "class weights, mean (over the total weight)": (
            lambda W1: F.cross_entropy(hidden(W1) @ W2 + b2, ignored, weight=cw, ignore_index=3), (W1,), 0, True),
        "the hidden layer read again": (
            lambda W1: (lambda h: F.cross_entropy(h @ W2 + b2, labels) + h.pow(2).mean())(hidden(W1)), (W1,), 0, True),
        "a replaced weight row read again": (
            lambda v: (lambda W: F.cross_entropy(X @ W + b2, labels) + W.abs().sum())(M * v.unsqueeze(1)),
            (torch.randn(d, **o),), 0, True),
        "an expanded parameter as the weight": (lambda v: F.cross_entropy(X @ v.unsqueeze(1).expand(-1, c), labels),
                                                (torch.randn(d, **o),), 0, True),
        "a class masked to -inf, ignored rows": (lambda W1: F.cross_entropy(hidden(W1) @ W2 + masked, kept), (W1,), 0,
                                                 True),
        "a class masked to -inf, ignored rows, per-row losses": (
            lambda W1: F.cross_entropy(hidden(W1) @ W2 + masked, kept, reduction="none").sum(), (W1,), 0, False),
        "a replaced weight row": (lambda v: F.cross_entropy(X @ (M * v.unsqueeze(1)) + b2, labels),
                                  (torch.randn(d, **o),), 0, True),
        "label smoothing (log-softmax read twice)": (
            lambda W1: F.cross_entropy(hidden(W1) @ W2 + b2, labels, label_smoothing=0.1), (W1,), 0, True),
        "softmax of the moved logits": (lambda W1: (torch.softmax(hidden(W1) @ W2 + b2, 1) * Y).sum(), (W1,), 0,
                                        False),
        "log-softmax over the rows": (lambda W1: (F.log_softmax(hidden(W1) @ W2 + b2, 0) * Y).sum(), (W1,), 0, False),
        "per-row losses": (lambda W1: F.cross_entropy(hidden(W1) @ W2 + b2, labels, reduction="none").pow(2).sum(),
                           (W1,), 0, False),
    }


@pytest.mark.parametrize("name", list(_cross_entropy_heads()))
def test_a_moved_column_under_a_linear_and_cross_entropy_agrees_with_the_reference(seed, name):
    """The fused cross-entropy kernel, and the moved logits written out wherever something else reads them, against
    the reference loop in float64 (1e-9 of the largest entry)."""
    func, params, idx, fused = _cross_entropy_heads()[name]
    ev = engine.evaluate(func, params, idx, steps=1e-5, engine="structured", chunk_size=7)
    assert ev.engine == "structured", ev.notes
    assert any("fused kernel gradfd::outer_update_nll" in note for note in ev.notes) == fused, ev.notes
    got = ev.estimate()[0].reshape(params[idx].shape)
    ref = reference.numerical_gradient(func, params, idx)
    assert _agrees_with_reference(got, ref, float(func(*params)))


def test_the_fused_cross_entropy_in_float32_is_its_reference(seed, monkeypatch):
    """Float32 losses through gradfd::outer_update_nll equal those through its PyTorch twin (the logits written out),
    up to the log-softmax's own rounding of a few rows."""
    from gradfd.structured.handlers import losses

    func, params = _models("cpu", torch.float32)["mlp tanh cross-entropy"]
    fused = engine.evaluate(func, params, 0, steps=None, engine="structured")
    assert any("gradfd::outer_update_nll" in note for note in fused.notes), fused.notes
    calls = []

    def twin_kernel(*args):
        calls.append(1)
        return structured.outer_update_nll_reference(*args)

    monkeypatch.setattr(losses, "outer_update_nll", twin_kernel)
    twin = engine.evaluate(func, params, 0, steps=None, engine="structured")
    assert calls  # the twin ran in place of the kernel
    loss = float(func(*params))
    atol = 8 * torch.finfo(torch.float32).eps * loss
    torch.testing.assert_close(fused.losses, twin.losses, rtol=0, atol=atol)
    assert fused.losses.abs().max() > 10 * atol  # the changes are resolved


def test_memory_budget_chunks_the_work_and_changes_nothing(seed):
    func, params = _models("cpu", torch.float64)["mlp tanh mse"]
    small = engine.evaluate(func, params, 0, steps=1e-5, engine="structured", memory_budget="4KB")
    large = engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
    assert small.chunk_size < params[0].numel() <= large.chunk_size
    torch.testing.assert_close(small.losses, large.losses, rtol=1e-14, atol=0)


# Functions that exercise the delta propagation rules (views, broadcasting, reductions, losses, products).
def _patterns():
    n, d, k, c = 9, 6, 4, 3
    o = dict(dtype=torch.float64)
    X, Y = torch.randn(n, d, **o), torch.randn(n, k, **o)
    X3 = torch.randn(2, n, d, **o)
    labels = torch.randint(0, c, (n,))
    class_weight = torch.rand(c, **o) + 0.5
    pos_weight = torch.rand(k, **o) + 0.5
    v = torch.randn(k, **o)
    targets = (Y > 0).to(torch.float64)
    return {
        "view, t, slice, sum(0)": (lambda w: (w.view(3, 4).t()[1:] ** 2).sum(0).exp().sum(), (torch.randn(12, **o),)),
        "reshape then squeeze": (lambda w: (X @ w.reshape(d, 1)).squeeze().tanh().sum(), (torch.randn(d, **o),)),
        "expand and multiply": (lambda w: (w.unsqueeze(0).expand(n, -1) * X).sin().mean(), (torch.randn(d, **o),)),
        "select": (lambda w: ((w[2] * X + w[0]) ** 2).mean() + w[-1], (torch.randn(4, **o),)),
        "strided slices": (lambda w: w[::2].pow(2).sum() + w[1:3].exp().sum(), (torch.randn(7, **o),)),
        "where": (lambda w: torch.where(w > 0, w, 0.1 * w).pow(3).sum(), (torch.randn(8, **o),)),
        "softmax, logsumexp, amax": (lambda W: torch.softmax(X @ W, 0).pow(2).sum() + torch.logsumexp(X @ W, 1).sum()
                                     + (X @ W).amax(1).sum(), (torch.randn(d, k, **o),)),
        "sum keepdim": (lambda W: (X @ W).sum(1, keepdim=True).pow(2).mean(), (torch.randn(d, k, **o),)),
        "weight decay": (lambda W: F.mse_loss(X @ W, Y) + 0.01 * (W**2).sum(), (torch.randn(d, k, **o),)),
        "parameter on both sides": (lambda W: (W.t() @ W).pow(2).sum(), (torch.randn(d, k, **o),)),
        "parameter on the left": (lambda W: torch.tanh(W @ X.t()).pow(2).mean(), (torch.randn(k, d, **o),)),
        "3-D input to linear": (lambda W, b: F.mse_loss(F.linear(X3, W, b), torch.zeros(2, n, k, **o)),
                                (torch.randn(k, d, **o), torch.randn(k, **o))),
        "matrix times vector": (lambda A: (A @ v).pow(2).sum(), (torch.randn(n, k, **o),)),
        "batched products, either side": (lambda B: torch.bmm(B, X3.transpose(1, 2)[:, :, :4]).tanh().sum()
                                          + torch.bmm(X3[:, :4, :5], B).pow(2).sum(),
                                          (torch.randn(2, 5, d, **o),)),
        "division": (lambda w: (X / (1 + w**2)).sum(), (torch.randn(d, **o),)),
        "log_softmax over the batch": (lambda W: F.log_softmax((X @ W).mean(1, keepdim=True) * X[:, :1], 0).sum(),
                                       (torch.randn(d, k, **o),)),
        "softplus and gelu": (lambda W: (F.softplus(X @ W) + F.gelu(X @ W)).mean(), (torch.randn(d, k, **o),)),
        "cross-entropy, weights, ignore_index": (lambda W: F.cross_entropy(X @ W, labels, weight=class_weight,
                                                                           ignore_index=1), (torch.randn(d, c, **o),)),
        "cross-entropy, label smoothing": (lambda W: F.cross_entropy(X @ W, labels, label_smoothing=0.1),
                                           (torch.randn(d, c, **o),)),
        "cross-entropy, sum": (lambda W: F.cross_entropy(X @ W, labels, reduction="sum"), (torch.randn(d, c, **o),)),
        "bce with pos_weight": (lambda W: F.binary_cross_entropy_with_logits(X @ W, targets, pos_weight=pos_weight),
                                (torch.randn(d, k, **o),)),
        "bce of sigmoid": (lambda W: F.binary_cross_entropy(torch.sigmoid(X @ W), targets), (torch.randn(d, k, **o),)),
        "huber and smooth l1": (lambda W: F.huber_loss(X @ W, Y) + F.smooth_l1_loss(X @ W, Y, reduction="sum"),
                                (torch.randn(d, k, **o),)),
        "in-place ops in func": (lambda W: (lambda h: (h.add_(1).relu_() ** 2).mean())(X @ W),
                                 (torch.randn(d, k, **o),)),
        "0-d parameter": (lambda a: torch.tanh(a) * a, (torch.randn((), **o),)),
        "non-contiguous parameter": (lambda W: torch.sigmoid(X @ W).pow(2).mean(), (torch.randn(k, d, **o).t(),)),
        "loss independent of the parameter": (lambda w, b: (X**2).sum() + b.sum(), (torch.randn(3, **o),
                                                                                     torch.randn(2, **o))),
        "parameter times a feature": (lambda w: ((w * X) - 1).pow(2).mean(), (torch.randn(d, **o),)),
    }


PATTERNS = list(_patterns())


@pytest.mark.parametrize("name", PATTERNS)
def test_propagation_rules_agree_with_the_reference(seed, name):
    func, params = _patterns()[name]
    for idx in range(len(params)):
        ev = engine.evaluate(func, params, idx, steps=1e-5, engine="structured", chunk_size=5)
        assert ev.engine == "structured"
        got = ev.estimate()[0].reshape(params[idx].shape)
        ref = reference.numerical_gradient(func, params, idx)
        clones = [p.detach().clone().requires_grad_(k == idx) for k, p in enumerate(params)]
        out = func(*clones)
        truth = (torch.autograd.grad(out, clones[idx], allow_unused=True, materialize_grads=True)[0]
                 if out.requires_grad else torch.zeros_like(clones[idx]))
        assert _agrees_with_reference(got, ref, float(func(*params).detach()), truth=truth)


def test_nn_module_through_functional_call(seed):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, labels = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    names = [name for name, _ in model.named_parameters()]

    def func(*params):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (X,)), labels)

    params = tuple(p.detach().clone() for p in model.parameters())
    for idx in range(len(params)):
        got = gradfd.numerical_gradient(func, params, idx, engine="structured")
        ref = reference.numerical_gradient(func, params, idx)
        assert _agrees_with_reference(got, ref, float(func(*params).detach()))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_shared_test_functions_run_structured(seed, name):
    func, params, idx = FUNCTIONS[name]("cpu", torch.float64)
    ref = reference.numerical_gradient(func, params, idx)
    got = gradfd.numerical_gradient(func, params, idx, engine="structured")
    assert _agrees_with_reference(got, ref, float(func(*params).detach()))


# --------------------------------------------------------------------------------------------------------------
# float32


@pytest.mark.parametrize("name", ["linear regression", "linear layer mse", "mlp tanh mse", "softmax regression",
                                  "mlp tanh cross-entropy"])
def test_float32_is_as_accurate_as_the_generic_engine(seed, name):
    # Both sum in float64 now (the structured engine the changed terms, the generic engine the whole loss:
    # gradfd/reductions.py), so neither is reliably the better: over 80 draws the structured error was at most
    # 4.1x the generic one and at most 8.5e-5 of the largest entry; float32 sums gave 1.4e-4 .. 7e-4.
    func, params = _models("cpu", torch.float32)[name]
    exact_params = tuple(p.double() for p in params)

    def in64(*ps):  # the float64 derivative at the same float32 point, by autograd
        return func(*ps)

    p64 = [p.clone().requires_grad_(k == 0) for k, p in enumerate(exact_params)]
    # func closes over float32 data: evaluate it in float64 by casting the data through the parameters' dtype
    (exact,) = torch.autograd.grad(_as_float64(func)(*p64), p64[0])
    got = gradfd.numerical_gradient(func, params, 0, h=None, engine="structured")
    generic = gradfd.numerical_gradient(func, params, 0, h=None, engine="batched")
    assert _rel(got, exact) <= max(2 * _rel(generic, exact), 1.5e-4)


def _as_float64(func):
    """``func`` with its closed-over float32 tensors cast to float64 (for the exact derivative)."""
    cells = [cell for cell in (func.__closure__ or ()) if isinstance(cell.cell_contents, torch.Tensor)]
    saved = [cell.cell_contents for cell in cells]

    def run(*params):
        for cell in cells:
            cell.cell_contents = cell.cell_contents.double() if cell.cell_contents.is_floating_point() else \
                cell.cell_contents
        try:
            return func(*params)
        finally:
            for cell, value in zip(cells, saved):
                cell.cell_contents = value

    return run


# --------------------------------------------------------------------------------------------------------------
# refusals, fallbacks, staleness, state


def _refused():
    X = torch.randn(10, 4, dtype=torch.float64)
    w = (torch.randn(4, 1, dtype=torch.float64),)
    return {
        "item": (lambda w: (X @ w).pow(2).sum() * w.sum().item(), w, "aten._local_scalar_dense"),
        "data-dependent branch": (lambda w: (X @ w).sum() if w.sum() > 0 else (X @ w).pow(2).sum(), w,
                                  "aten._local_scalar_dense"),
        "dropout": (lambda w: F.dropout(X @ w, 0.5).pow(2).sum(), w, "random numbers"),
        "attention with dropout": (lambda w: F.scaled_dot_product_attention(*(X @ w.expand(4, 4),) * 3, dropout_p=0.5)
                                   .pow(2).sum(), w, "random numbers"),
        "cumsum": (lambda w: torch.cumsum(X @ w, 0).pow(2).sum(), w, "aten.cumsum"),
        "boolean mask": (lambda w: w[w > 0].sum(), w, "aten.index"),
        "sort": (lambda w: torch.sort(w.flatten()).values[0], w, "aten.sort"),
    }


@pytest.mark.filterwarnings("ignore::gradfd.FallbackWarning")  # the generic engine's own fallbacks (.item())
@pytest.mark.parametrize("name", list(_refused()))
def test_unsupported_functions_raise_naming_the_op_and_fall_back_under_auto(seed, name, monkeypatch):
    func, params, op = _refused()[name]
    with pytest.raises(StructuredUnsupported, match=op.replace(".", r"\.")) as err:
        gradfd.numerical_gradient(func, params, 0, engine="structured")
    assert "engine='auto'" in str(err.value)
    monkeypatch.setattr(structured, "_MIN_WORK", 0)  # make "auto" try the structured engine on this small problem
    monkeypatch.setattr(engine, "_STRUCTURED_MIN_EVALUATIONS", 0)
    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="auto")
    assert ev.engine in ("batched", "loop")
    assert any("structured engine not applicable" in note and op in note for note in ev.notes), ev.notes
    if name != "boolean mask":  # w > 0 may flip at a node: compare like with like
        want = gradfd.numerical_gradient(func, params, 0, engine="batched")
        assert _rel(ev.estimate()[0].reshape(params[0].shape), want) <= 1e-9


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "stored"])
def test_a_refusal_after_some_chunks_falls_back_without_repeating_or_mixing_columns(seed, sink, monkeypatch):
    """A refusal at a later chunk: the columns a sink already took are not delivered again, and losses stored as
    changes from the base are all overwritten by the generic engine's (never a mix of the two)."""
    func, params = _models("cpu", torch.float64)["mlp tanh mse"]
    run = structured.Analysis.run
    calls = []

    def refuse_the_second_chunk(self, coords, moved):
        calls.append(coords.numel())
        if len(calls) == 2:
            raise StructuredUnsupported("aten.test", "refused at the second chunk")
        return run(self, coords, moved)

    monkeypatch.setattr(structured.Analysis, "run", refuse_the_second_chunk)
    monkeypatch.setattr(structured, "_MIN_WORK", 0)  # make "auto" try the structured engine on this small problem
    monkeypatch.setattr(engine, "_STRUCTURED_MIN_EVALUATIONS", 0)
    taken = []
    deliver = (lambda a, b, values, disp: taken.append((a, b, values.clone()))) if sink else None
    m = params[0].numel()
    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="auto", chunk_size=3, sink=deliver)
    assert len(calls) == 2 and any("refused at the second chunk" in note for note in ev.notes), ev.notes
    want = engine.evaluate(func, params, 0, steps=1e-5, engine="batched")
    if sink:
        columns = torch.cat([torch.arange(a, b) for a, b, _ in taken])
        assert sorted(columns.tolist()) == list(range(m))  # every column once
        got = torch.empty_like(want.losses)
        for a, b, values in taken:
            got[:, a:b] = values.view(got.shape[0], b - a)
        torch.testing.assert_close(got, want.losses, rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(ev.losses + ev.loss_offset, want.losses, rtol=1e-12, atol=0)


def test_auto_uses_the_structured_engine_on_large_problems(seed):
    X = torch.randn(64, 256, dtype=torch.float64)
    Y = torch.randn(64, 256, dtype=torch.float64)
    W = torch.randn(256, 256, dtype=torch.float64) / 16

    def func(W):
        return F.mse_loss(X @ W, Y)

    ev = engine.evaluate(func, (W,), 0, steps=1e-5)
    assert ev.engine == "structured", ev.notes
    small = engine.evaluate(lambda w: (X[:, :3] @ w).pow(2).mean(), (torch.randn(3, 1, dtype=torch.float64),), 0,
                            steps=1e-5)
    assert small.engine != "structured"  # a few evaluations: not even considered
    medium = engine.evaluate(lambda w: (X[:, :200] @ w).pow(2).mean(), (torch.randn(200, 1, dtype=torch.float64),),
                             0, steps=1e-5)  # 400 evaluations: considered, and declined as too little work
    assert medium.engine != "structured"
    assert any("structured engine not tried" in note for note in medium.notes)


def test_closures_over_mutated_tensors_are_never_stale(seed):
    X = torch.randn(20, 5, dtype=torch.float64)
    Y = torch.randn(20, 3, dtype=torch.float64)
    W = torch.randn(5, 3, dtype=torch.float64)

    def func(W):
        return F.mse_loss(torch.tanh(X @ W), Y)

    first = gradfd.numerical_gradient(func, (W,), 0, engine="structured")
    X.mul_(2).add_(1)  # the closed-over data changes between calls
    Y.neg_()
    second = gradfd.numerical_gradient(func, (W,), 0, engine="structured")
    want = reference.numerical_gradient(func, (W,), 0)
    assert _rel(second, want) <= 1e-9
    assert _rel(second, first) > 1e-3


def test_callers_tensors_are_unchanged(seed):
    func, params = _models("cpu", torch.float64)["mlp tanh cross-entropy"]
    params = tuple(p.clone().requires_grad_() for p in params)
    snap = snapshot(params)
    for idx in range(4):
        gradfd.numerical_gradient(func, params, idx, engine="structured")
    assert_unchanged(params, snap)


def test_non_finite_losses_are_reported(seed):
    X = torch.rand(8, 3, dtype=torch.float64)
    w = torch.tensor([[1e-6], [1.0], [1.0]], dtype=torch.float64)
    with pytest.raises(engine.NonFiniteLossError, match=r"params\[0\]\[0, 0\]"):
        gradfd.numerical_gradient(lambda w: torch.log(w).sum() + (X @ w).sum(), (w,), 0, h=1e-3,
                                  engine="structured")


def test_bad_engine_name_lists_structured():
    with pytest.raises(ValueError, match=r"engine must be one of \['auto', 'batched', 'loop', 'structured'\]"):
        gradfd.numerical_gradient(lambda x: x.sum(), (torch.randn(3),), 0, engine="structural")


def test_structured_needs_the_kernels(monkeypatch):
    monkeypatch.setitem(ops._state, "module", None)
    monkeypatch.setitem(ops._state, "reason", "JIT build of csrc/ failed: no C++ compiler")
    with pytest.raises(ops.KernelsUnavailableError, match="no C\\+\\+ compiler"):
        gradfd.numerical_gradient(lambda x: x.pow(2).sum(), (torch.randn(5, dtype=torch.float64),), 0,
                                  engine="structured")


# --------------------------------------------------------------------------------------------------------------
# check() on top of the structured engine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["linear regression", "softmax regression", "mlp tanh cross-entropy",
                                  "linear layer mse"])
def test_check_runs_on_the_structured_engine(seed, dtype, name):
    func, params = _models("cpu", dtype)[name]
    params = tuple(p.clone().requires_grad_() for p in params)
    report = gradfd.check(func, params, engine="structured")
    assert report.passed, str(report)
    assert all(t.details.get("engine") == "structured" for t in report.tensors), [t.details for t in report.tensors]


def test_check_flags_a_wrong_gradient_on_the_structured_engine(seed):
    X = torch.randn(16, 5, dtype=torch.float64)
    Y = torch.randn(16, 4, dtype=torch.float64)

    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(W):
            return X @ W

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            g = X.t() @ grad
            g[2, 1] *= 1.001  # one entry off by 1e-3 relative
            return g

    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(lambda W: F.mse_loss(Bad.apply(W), Y), (W,), engine="structured", raise_on_failure=False)
    assert not report.passed
    assert report.tensors[0].worst_index == (2, 1)


def test_the_slab_count_is_repeatable():
    """The bytes a chunk's perturbed values take (which size the chunks) do not depend on reused addresses."""
    from gradfd import engine
    from gradfd.structured import Analysis

    g = torch.Generator().manual_seed(11)
    X, Y = torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(32, 24, generator=g, dtype=torch.float64)
    W = torch.randn(24, 24, generator=g, dtype=torch.float64) / 5

    def loss(W):
        z = X @ W
        for _ in range(6):
            z = torch.tanh(z) * 1.5 + 0.1
        return ((z - Y) ** 2).mean()

    problem = engine.prepare(loss, (W,), 0)
    analysis = Analysis(problem)
    coords = torch.arange(48)
    moved = torch.linspace(-1e-3, 1e-3, 4, dtype=torch.float64)[:, None].expand(4, 48).contiguous()
    counts = set()
    for _ in range(5):
        analysis.run(coords, moved)
        counts.add(analysis.bytes)
    assert len(counts) == 1 and counts.pop() > 0
