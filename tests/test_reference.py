"""The reference loop (the lesson's algorithm) against exact derivatives."""

from __future__ import annotations

import torch

from gradfd import reference
from gradfd.demo import problems


def test_reference_matches_exact_derivative_of_a_polynomial(seed):
    x = torch.randn(3, 2, dtype=torch.float64)
    g = reference.numerical_gradient(lambda x: (x**3).sum(), (x,), 0, h=1e-4)
    # central differences of x^3 have truncation error exactly h^2 per entry
    torch.testing.assert_close(g, 3 * x**2 + 1e-8, rtol=1e-9, atol=1e-9)
    assert g.shape == x.shape and g.dtype == x.dtype


def test_reference_runs_the_lessons_example_and_matches_autograd():
    loss, (w, b) = problems.linear_regression(d=1)
    loss(w, b).backward()
    gw = reference.numerical_gradient(loss, (w, b), 0)
    gb = reference.numerical_gradient(loss, (w, b), 1)
    torch.testing.assert_close(gw, w.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gb, b.grad, rtol=1e-8, atol=1e-9)


def test_reference_leaves_params_alone_and_handles_0d(seed):
    a = torch.randn((), dtype=torch.float64)
    before = a.clone()
    g = reference.numerical_gradient(lambda a: a.sin(), (a,), 0)
    assert torch.equal(a, before)
    torch.testing.assert_close(g, a.cos(), rtol=1e-9, atol=1e-10)
