"""Property tests: the engine agrees with the reference loop on random shapes, functions, engines and chunks."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gradfd
from gradfd import reference

UNARY = {
    "sin": torch.sin,
    "tanh": torch.tanh,
    "exp": lambda t: torch.exp(0.3 * t),
    "square": lambda t: t * t,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
}
REDUCE = {"sum": torch.sum, "mean": torch.mean, "logsumexp": lambda t: torch.logsumexp(t.reshape(-1), 0)}


@st.composite
def problems(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    ops = draw(st.lists(st.sampled_from(sorted(UNARY)), min_size=1, max_size=3))
    reduce = draw(st.sampled_from(sorted(REDUCE)))
    mix = draw(st.booleans()) and len(shape) >= 1
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, ops, reduce, mix, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["auto", "batched", "loop"]), st.sampled_from([None, 1, 2, 5]),
       st.sampled_from(["central", "four_point"]))
def test_engine_matches_reference_on_random_problems(problem, eng, chunk_size, stencil):
    shape, ops, reduce, mix, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    M = torch.randn(shape[-1] if shape else 1, 3, generator=g, dtype=torch.float64) if mix else None

    def func(x):
        t = x
        for name in ops:
            t = UNARY[name](t)
        if M is not None:
            t = t @ M  # mixes the last dimension through a matrix product
        return REDUCE[reduce](t)

    h = 1e-4
    got = gradfd.numerical_gradient(func, (x,), 0, h=h, engine=eng, chunk_size=chunk_size, stencil=stencil)
    if stencil == "central":
        want = reference.numerical_gradient(func, (x,), 0, h=h)
    else:
        xr = x.clone().requires_grad_()
        func(xr).backward()
        want = xr.grad
    assert got.shape == x.shape
    if stencil == "central":
        # the same differences, up to the rounding of the loss values: 1e-9 of the largest entry, plus the
        # loss rounding itself (a few eps*|f| over 2h) for functions whose loss dwarfs their gradient
        bound = 1e-9 * want.abs().max().item() + 8 * 2.0**-52 * abs(float(func(x))) / h
    else:  # against autograd: truncation O(h^4) and rounding amplified by the 4-point weights
        bound = 1e-7 * max(want.abs().max().item(), 1.0) + 32 * 2.0**-52 * abs(float(func(x))) / h
    assert (got - want).abs().max().item() <= bound


ROWWISE = {
    "none": lambda t: t,
    "softmax": lambda t: torch.softmax(t, -1),
    "log_softmax": lambda t: torch.log_softmax(t, -1),
    "layer_norm": lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:]),
    "cumsum": lambda t: torch.cumsum(t, -1),  # outside both hypothesised patterns: exact columns
}


@st.composite
def tensor_problems(draw):
    shape = tuple(draw(st.lists(st.integers(2, 8), min_size=2, max_size=3)))
    ops = draw(st.lists(st.sampled_from(sorted(UNARY)), min_size=1, max_size=2))
    row = draw(st.sampled_from(sorted(ROWWISE)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return shape, ops, row, layout, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_problems())
def test_full_mode_by_colors_and_by_exact_columns_agree_on_random_tensor_functions(problem):
    from helpers import assert_unchanged, snapshot

    shape, ops, row, layout, dtype, seed = problem
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif layout == "expanded":
        x = x[..., :1].expand(x.shape)
    x.requires_grad_()

    def func(x):
        t = x
        for name in ops:
            t = UNARY[name](t)
        return ROWWISE[row](t)

    before = snapshot([x])
    auto = gradfd.check(func, (x,), raise_on_failure=False)  # by colors where a pattern holds
    exact = gradfd.check(func, (x,), raise_on_failure=False, batching="vmap")  # exact columns
    assert_unchanged([x], before)
    for t, e in zip(auto.tensors, exact.tensors):
        assert e.details["engine"] != "colored"
        assert t.disagree == 0 and e.disagree == 0, (str(auto), str(exact))
        assert (t.checked, t.total) == (e.checked, e.total)
        event(f"full mode by {t.details['engine']}")
