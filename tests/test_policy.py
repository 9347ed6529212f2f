"""The verdict policy: ``check(..., policy=...)`` overrides take effect and are validated; the default policy gives
the default verdicts; and no verdict module holds a numeric literal of its own (every threshold lives in
gradfd/verdict/policy.py)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_unchanged, bitwise_equal, snapshot

import gradfd
from gradfd.demo import bench
from gradfd.verdict.policy import DEFAULT_POLICY, Policy, policy_table, resolve_policy

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_LITERALS = (0, 1, 2)


def _planted_case(error: float = 1e-3):
    """A float64 loss whose backward is off by ``error`` (relative) at one entry, and that entry."""
    x = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    func = lambda t: torch.sin(2 * t).sum()  # noqa: E731
    i = int(torch.cos(2 * x).abs().argmax())
    scale = torch.ones(16, dtype=torch.float64)
    scale[i] = 1 + error
    return bench.plant(func, 0, scale), func, x.requires_grad_(True), i


def test_a_looser_policy_field_changes_a_verdict():
    planted, _, x, i = _planted_case()
    assert gradfd.check(planted, (x,), raise_on_failure=False).tensors[0].disagreeing() == [(i,)]
    # a dtype floor of 1e13 eps (~2e-3 relative in float64) hides the planted 1e-3 error
    loose = gradfd.check(planted, (x,), policy={"floor_eps": 10**13})
    assert loose.passed and loose.tensors[0].agree == 16


def test_a_tighter_policy_field_changes_a_verdict():
    # x**2 in float64: the 4-point stencil is exact, the error estimate is rounding (~4e-11 at the largest entry);
    # a 1e-11 relative error there agrees within 1.5 estimates, not within 0.2 of one
    x = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    i = int(x.abs().argmax())
    scale = torch.ones(16, dtype=torch.float64)
    scale[i] = 1 + 1e-11
    planted = bench.plant(lambda t: (t * t).sum(), 0, scale)
    assert gradfd.check(planted, (x,)).passed
    tight = gradfd.check(planted, (x,), policy=dataclasses.replace(DEFAULT_POLICY, tolerance_safety=0.2),
                         raise_on_failure=False)
    assert tight.tensors[0].disagreeing() == [(i,)]


def test_an_explicit_atol_and_rtol_still_replace_the_policys_floors():
    planted, _, x, i = _planted_case()
    report = gradfd.check(planted, (x,), policy={"floor_eps": 10**13}, atol=0.0, rtol=0.0, raise_on_failure=False)
    assert report.tensors[0].disagreeing() == [(i,)]


def test_the_default_policy_gives_the_default_verdicts_bitwise():
    _, func, x, _ = _planted_case()
    y = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float32).requires_grad_(True)
    for f, p in ((func, x), (lambda t: torch.softmax(t, -1), y), (lambda t: torch.relu(t).pow(2).sum(), y)):
        reports = [gradfd.check(f, (p,), policy=policy) for policy in (None, DEFAULT_POLICY, Policy(), {})]
        for other in reports[1:]:
            for a, b in zip(reports[0].tensors, other.tensors):
                assert (a.agree, a.disagree, a.unresolved, a.worst_index) == (b.agree, b.disagree, b.unresolved,
                                                                               b.worst_index)
                for name, value in a.entries.items():
                    assert bitwise_equal(value, b.entries[name]), name


@pytest.mark.parametrize("policy, error, words", [
    ({"tolerance_safty": 2.0}, ValueError, ["'tolerance_safty'", "tolerance_safety", "floor_eps"]),
    ({"floor_eps": "64"}, TypeError, ["'floor_eps'", "an int", "str"]),
    ({"refine": 4.0}, TypeError, ["'refine'", "an int", "float"]),
    ({"kink_band": True}, TypeError, ["'kink_band'", "a float", "bool"]),
    ({"tolerance_safety": -1.0}, ValueError, ["'tolerance_safety'", "> 0", "-1.0"]),
    ({"refine_rounds": 0}, ValueError, ["'refine_rounds'", "> 0", "0"]),
    ({"refine": 1}, ValueError, ["'refine'", "> 1", "1"]),
    ({"clip": math.nan}, ValueError, ["'clip'", "finite", "nan"]),
    ({"second_look": math.inf}, ValueError, ["'second_look'", "finite", "inf"]),
    (Policy(domain_rounds=0), ValueError, ["'domain_rounds'", "> 0"]),
    (3, TypeError, ["policy must be", "Policy", "mapping", "int"]),
    ("strict", TypeError, ["policy must be", "str"]),
    ([("floor_eps", 64)], TypeError, ["policy must be", "list"]),
    ({"low_quantile": 5.0}, ValueError, ["'low_quantile'", "<= 1", "5.0"]),  # past its segment's draws
    ({"probe_zeros": 3.0}, ValueError, ["'probe_zeros'", "<= 1"]),
    ({"refine": 10**400}, ValueError, ["'refine'", "finite"]),  # not OverflowError
    ({1: 2}, TypeError, ["field names must be strings", "int"]),
])
def test_a_bad_policy_is_an_error_naming_it_and_the_callers_tensors_are_unchanged(policy, error, words):
    _, func, x, _ = _planted_case()
    x.grad = torch.ones_like(x)
    snap = snapshot([x])
    with pytest.raises(error) as info:
        gradfd.check(func, (x,), policy=policy)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_unchanged([x], snap)


def test_the_callers_tensors_are_unchanged_after_a_failed_check_with_a_policy():
    planted, _, x, _ = _planted_case()
    x.grad = torch.full_like(x, 3.0)
    snap = snapshot([x])
    with pytest.raises(gradfd.GradientCheckError):
        gradfd.check(planted, (x,), policy={"tolerance_safety": 2.0})
    assert_unchanged([x], snap)


def test_the_policy_is_frozen_documented_and_tabled():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.floor_eps = 1
    table = policy_table()
    for f in dataclasses.fields(Policy):
        assert f.metadata["why"] and f.metadata["calibrated_by"].startswith("benchmarks/"), f.name
        assert (ROOT / f.metadata["calibrated_by"]).exists(), f.metadata["calibrated_by"]
        assert f"`{f.name}`" in table
        resolve_policy({f.name: getattr(DEFAULT_POLICY, f.name)})  # every default is valid
    assert resolve_policy(None) is DEFAULT_POLICY


def _scanned() -> list[Path]:
    verdict = sorted(p for p in (ROOT / "gradfd" / "verdict").glob("*.py") if p.name != "policy.py")
    return verdict + [ROOT / "gradfd" / "check.py", ROOT / "gradfd" / "jacobian.py"]


def test_no_numeric_literal_outside_the_policy():
    """Every threshold lives in gradfd/verdict/policy.py (memory constants in gradfd/budget.py, dtype constants
    from torch.finfo): the verdict modules, check.py and jacobian.py hold no numeric literal but 0, 1 and 2."""
    found = []
    for path in _scanned():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and type(node.value) in (int, float, complex)
                    and node.value not in ALLOWED_LITERALS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "numeric literals outside the policy:\n" + "\n".join(found)


def test_the_literal_scan_sees_literals():
    tree = ast.parse("x = 0.25 * y + 2 + 1.0 + 0")
    values = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert [v for v in values if v not in ALLOWED_LITERALS] == [0.25]
    assert len(_scanned()) >= 10
