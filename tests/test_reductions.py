"""Float64 reductions of low-precision losses (gradfd/reductions.py): what is intercepted, that the value is the
loss's own, that the engine falls back when it is not, and what it buys in accuracy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_DEVICES, assert_unchanged, snapshot

import gradfd
from gradfd import engine, reductions
from gradfd.demo import bench

LOW = [torch.float32, torch.float16, torch.bfloat16]


def _under_mode(f, *args):
    mode = reductions.Float64Reductions()
    with mode:
        out = f(*args)
    return out, mode.count


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name,f", [
    ("sum", lambda x: x.sum()), ("mean", lambda x: x.mean()), ("torch.sum", lambda x: torch.sum(x)),
    ("torch.mean", lambda x: torch.mean(x)), ("sum all dims", lambda x: x.sum((0, 1))),
    ("mean all dims", lambda x: x.mean(dim=(-1, 0))),
])
def test_full_reductions_return_float64_sums_of_the_same_terms(seed, device, dtype, name, f):
    x = torch.randn(7, 5, device=device).to(dtype)
    out, count = _under_mode(f, x)
    assert count == 1 and out.dtype == torch.float64 and out.dim() == 0
    assert torch.equal(out, f(x.double()))  # the terms in x's dtype, summed in float64


@pytest.mark.parametrize("name,f", [
    ("dim", lambda x: x.sum(0)), ("keepdim", lambda x: x.sum((0, 1), keepdim=True)),
    ("explicit dtype", lambda x: x.sum(dtype=torch.float32)), ("nll with class weights", lambda x: F.cross_entropy(
        x, torch.tensor([0, 1, 2, 3, 4, 0, 1]), weight=torch.linspace(0.5, 1.5, 5))),
    ("reduction none", lambda x: F.mse_loss(x, torch.zeros_like(x), reduction="none")),
])
def test_other_reductions_are_left_as_written(seed, name, f):
    x = torch.randn(7, 5)
    out, count = _under_mode(f, x)
    assert count == 0 and out.dtype == torch.float32
    assert torch.equal(out, f(x))


def test_float64_tensors_are_left_alone(seed):
    x = torch.randn(7, 5, dtype=torch.float64)
    out, count = _under_mode(lambda t: t.sum(), x)
    assert count == 0 and torch.equal(out, x.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name,f", [
    ("mse", lambda x, t, r: F.mse_loss(x, t, reduction=r)),
    ("l1", lambda x, t, r: F.l1_loss(x, t, reduction=r)),
    ("smooth l1", lambda x, t, r: F.smooth_l1_loss(x, t, reduction=r, beta=0.5)),
    ("huber", lambda x, t, r: F.huber_loss(x, t, reduction=r, delta=0.7)),
    ("bce with logits", lambda x, t, r: F.binary_cross_entropy_with_logits(x, t.sigmoid(), reduction=r,
                                                                           pos_weight=torch.full((5,), 2.0))),
    ("bce", lambda x, t, r: F.binary_cross_entropy(x.sigmoid(), t.sigmoid(), reduction=r)),
    ("cross entropy", lambda x, t, r: F.cross_entropy(x, torch.tensor([0, 4, -100, 2, 1, -100, 3]), reduction=r)),
    ("cross entropy, smoothed", lambda x, t, r: F.cross_entropy(x, torch.tensor([0, 4, 2, 2, 1, 0, 3]),
                                                                reduction=r, label_smoothing=0.1)),
    ("cross entropy, soft targets", lambda x, t, r: F.cross_entropy(x, t.softmax(-1), reduction=r)),
    ("nll", lambda x, t, r: F.nll_loss(x.log_softmax(-1), torch.tensor([0, 4, 7, 2, 1, 7, 3]) % 5, reduction=r,
                                       ignore_index=2)),
])
def test_losses_reduce_their_terms_in_float64_to_the_losss_own_value(seed, name, f, reduction):
    x, t = torch.randn(7, 5), torch.randn(7, 5)
    out, count = _under_mode(f, x, t, reduction)
    assert count == 1 and out.dtype == torch.float64
    exact = f(x.double(), t.double(), reduction)  # the same loss with every step in float64
    assert abs(float(out) - float(exact)) <= 1e-6 * abs(float(exact))
    assert reductions.consistent(f(x, t, reduction), out)


def test_a_func_whose_value_changes_under_the_mode_is_evaluated_as_written(seed):
    x = torch.randn(50, requires_grad=True)

    def fussy(x):  # reads the dtype of its own reduction
        s = torch.exp(x).sum()
        return s if s.dtype == torch.float32 else 2 * s

    problem = engine.prepare(fussy, (x,), 0)
    problem.rng.close()
    assert not problem.reduce64 and problem.base_loss.dtype == torch.float32
    report = gradfd.check(fussy, (x,))
    assert report.passed
    assert not any("float64" in n for n in report.tensors[0].details["notes"])


def test_tensor_valued_functions_and_float64_losses_are_not_reduced(seed):
    x = torch.randn(20, requires_grad=True)
    p = engine.prepare(lambda x: torch.exp(x) * x.sum(), (x,), 0, vector=True)
    p.rng.close()
    assert not p.reduce64
    p = engine.prepare(lambda x: torch.exp(x).sum(), (x.double(),), 0)
    p.rng.close()
    assert not p.reduce64


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("eng,batching", [("auto", "auto"), ("batched", "vmap"), ("loop", "loop")])
def test_float32_losses_are_reduced_in_float64_by_every_engine(seed, device, eng, batching):
    x = torch.randn(300, device=device, requires_grad=True)
    snap = snapshot([x])
    f = lambda x: torch.exp(0.5 * x).sum()  # noqa: E731
    exact = 0.5 * torch.exp(0.5 * x.detach().double())
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FallbackWarning)
        ev = engine.evaluate(f, (x,), 0, stencil="four_point", engine=eng, batching=batching)
    assert any("reductions in float64" in n for n in ev.notes)
    numerical, _ = ev.estimate()
    rel = ((numerical - exact).abs() / exact.abs()).median()
    # the loss rounded to float32 leaves ~1e-4 here (eps32 * |loss| / h, |loss| ~ 340); its terms ~1e-6
    assert rel < 1e-5, float(rel)
    report = gradfd.check(f, (x,), engine=eng, batching=batching)
    assert report.passed
    assert_unchanged([x], snap)


def test_stacking_keeps_the_loss_as_written_and_agrees(seed):
    x = torch.randn(64, requires_grad=True)
    f = lambda x: torch.exp(0.5 * x).sum(-1)  # noqa: E731  (one loss per stacked row)
    report = gradfd.check(f, (x,), engine="batched", batching="stack")
    assert report.passed and report.tensors[0].details["batching"] == "stack"


def _planted_layer_is_flagged(dtype=torch.float32, factor=1.001) -> bool:
    """A 1e-3 relative error on the largest entry of a tanh layer's weight (MSE over 64 samples): flagged there?"""
    w = torch.randn(40, 3).to(dtype).requires_grad_()
    X = (torch.randn(64, 40) / 40**0.5).to(dtype)
    y = torch.randn(64, 3).to(dtype)
    f0 = lambda w: F.mse_loss(torch.tanh(X @ w), y)  # noqa: E731
    (g,) = torch.autograd.grad(f0(w), w)
    where = divmod(int(g.abs().argmax()), 3)
    scale = torch.ones(40, 3, dtype=dtype)
    scale[where] = factor
    report = gradfd.check(bench.plant(f0, 0, scale), (w,), raise_on_failure=False)
    t = report.tensors[0]
    return not report.passed and t.worst_index == where and t.disagree == 1


def test_a_planted_error_is_still_caught_in_float32(seed):
    # statistical in float32 (the error is a few standard deviations of the loss's rounding at the automatic step):
    # 191 of 200 draws when written; asserted on 10 fresh draws, like test_check.py's float32 detection tests
    # (>= 7: a chance failure is below 1e-3 at that rate)
    flagged = sum(_planted_layer_is_flagged() for _ in range(10))
    assert flagged >= 7, f"flagged {flagged} of 10"


def test_stacked_rows_reduce_as_single_calls_do():
    """Given the parameter stacked along a leading batch dimension, ``exp(x / 2).sum(-1)`` reduces every other
    dimension: in float64, one loss per row, as a single call's full reduction is. Summed in float32 against a
    float64 base point, 12 of 300 correct checks failed (these three draws among them)."""
    f = lambda x: torch.exp(0.5 * x).sum(-1)  # noqa: E731
    with reductions.Float64Reductions(batch_dims=1, batch=5) as mode:
        rows = f(torch.randn(5, 64))
    assert mode.count == 1 and rows.dtype == torch.float64 and rows.shape == (5,)
    with reductions.Float64Reductions(batch_dims=1, batch=5) as mode:
        assert f(torch.randn(5, 64)).sum().dtype == torch.float64  # the per-row losses, then func's own sum
        torch.randn(5, 64).sum()  # over the batch too: not one loss per row, left as written
        assert torch.randn(3, 7).sum(-1).dtype == torch.float32  # a constant without the batch: as written
    assert mode.count == 1
    for seed in (17, 26, 31):
        torch.manual_seed(seed)
        x = torch.randn(64, requires_grad=True)
        report = gradfd.check(f, (x,), engine="batched", batching="stack", raise_on_failure=False)
        assert report.passed and report.tensors[0].details["batching"] == "stack", (seed, report)
