"""CheckReport.plot_entry: the function along one checked coordinate, the stencil nodes at each step, autograd's
tangent and the finite-difference slope, the kink marker; lookups by record name (check_module's parameter
names too), bad input, the caller's tensors untouched, and ``gradfd check --plot DIR``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradfd
from gradfd import cli, stencils
from gradfd.plot import GRID_POINTS
from helpers import CLI_TARGETS

pytest.importorskip("matplotlib")


class PlantedSin(torch.autograd.Function):
    """sin(x) with a backward that is wrong on entry 2 only (cos(x) + 0.5 there)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        d = g * x.cos()
        d[2] = d[2] + 0.5 * g[2]
        return d


def _planted(x: torch.Tensor) -> torch.Tensor:
    return PlantedSin.apply(x).sum()


def _lines(fig) -> dict:
    return {line.get_gid(): line for line in fig.axes[0].lines if line.get_gid()}


def _slope(line) -> float:
    x, y = line.get_xdata(), line.get_ydata()
    return float((y[-1] - y[0]) / (x[-1] - x[0]))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_planted_wrong_backward_shows_two_slopes_and_the_nodes(seed, tmp_path):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(_planted, (x,), raise_on_failure=False)
    t = report["params[0]"]
    assert t.disagreeing() == [(2,)]
    path = tmp_path / "entry.png"
    fig = report.plot_entry("params[0]", (2,), path=str(path))
    assert path.stat().st_size > 0
    lines = _lines(fig)
    x2 = float(x.detach()[2])
    assert _slope(lines["analytical"]) == pytest.approx(torch.cos(x[2]).item() + 0.5, rel=1e-12)
    assert _slope(lines["numerical"]) == pytest.approx(float(t.entries["numerical"][2]), rel=1e-12)
    assert _slope(lines["numerical"]) == pytest.approx(torch.cos(x[2]).item(), abs=1e-6)
    for gid in ("analytical", "numerical"):  # lines through the origin
        xs, ys = lines[gid].get_xdata(), lines[gid].get_ydata()
        assert ys[0] == pytest.approx(_slope(lines[gid]) * xs[0])
    # the function: sin along the coordinate, as the change from the unperturbed value, on the fine grid
    f = lines["function"]
    assert len(f.get_xdata()) == GRID_POINTS
    expected = torch.sin(x2 + torch.tensor(f.get_xdata(), dtype=torch.float64)) - math.sin(x2)
    assert torch.allclose(torch.tensor(f.get_ydata()), expected, atol=1e-12)
    # the nodes: the first-round step (the automatic one) and the refined ones, h / 4**r
    h0 = float(stencils.automatic_steps(x.detach()[2:3], stencils.get_stencil("four_point"))[0])
    offsets = stencils.get_stencil("four_point").offsets
    nodes = sorted(g for g in lines if g.startswith("nodes"))
    assert nodes[:2] == ["nodes0", "nodes1"]
    for r, gid in enumerate(nodes):
        assert list(lines[gid].get_xdata()) == pytest.approx([o * h0 / 4**r for o in offsets], rel=1e-9)
    assert "kink" not in lines
    title = fig.axes[0].get_title()
    assert "disagree" in title and f"{float(t.entries['analytical'][2]):.6g}" in title and "tolerance" in title


def test_a_relu_at_its_switch_is_marked_as_a_kink(seed):
    x = torch.randn(5, dtype=torch.float64)
    x = x.sign() * (x.abs() + 0.1)  # no other switch within the steps
    x[1] = 0.0  # relu switches exactly here
    x.requires_grad_()
    report = gradfd.check(lambda x: (torch.relu(x) + 0.5 * x * x).sum(), (x,), raise_on_failure=False)
    t = report["params[0]"]
    assert t.flagged() == [(1,)]
    fig = report.plot_entry("params[0]", (1,))
    lines = _lines(fig)
    assert "kink" in lines and 0.0 in list(lines["kink"].get_xdata())
    assert "unresolved" in fig.axes[0].get_title()
    assert _slope(lines["analytical"]) == pytest.approx(float(t.entries["analytical"][1]))
    # a smooth entry of the same function shows no kink
    assert "kink" not in _lines(report.plot_entry("params[0]", (3,)))


def test_check_module_rows_are_found_by_parameter_name(seed):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 3, dtype=torch.float64)
    report = gradfd.check_module(net, x, loss=lambda out: out.pow(2).mean())
    t = report["0.weight"]
    fig = report.plot_entry("0.weight", (1, 2))
    assert fig.axes[0].get_title().startswith("0.weight [1, 2]: agree")
    lines = _lines(fig)
    row = int((t.entries["index"] == 1 * 3 + 2).nonzero())
    assert _slope(lines["analytical"]) == pytest.approx(float(t.entries["analytical"][row]), rel=1e-12)
    assert _slope(lines["numerical"]) == pytest.approx(_slope(lines["analytical"]), rel=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_a_tensor_valued_function_draws_the_compared_output_entry(seed):
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(lambda z: (torch.tanh(z), z.pow(3)), (z,))
    name = "output[1] wrt params[0]"
    fig = report.plot_entry(name, ((1, 2), (1, 2)))
    lines = _lines(fig)
    z12 = float(z.detach()[1, 2])
    f = lines["function"]
    expected = (z12 + torch.tensor(f.get_xdata())) ** 3 - z12**3
    assert torch.allclose(torch.tensor(f.get_ydata()), expected, atol=1e-12)
    assert _slope(lines["analytical"]) == pytest.approx(3 * z12**2, rel=1e-12)
    # an off-diagonal entry of the Jacobian is flat along its coordinate
    flat = report.plot_entry(name, ((0, 0), (1, 2)))
    assert max(abs(v) for v in _lines(flat)["function"].get_ydata()) == 0.0


def test_bad_input_names_the_argument(seed):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(_planted, (x,), raise_on_failure=False)
    with pytest.raises(KeyError, match=r"no checked tensor named 'W'.*params\[0\]"):
        report.plot_entry("W", (2,))
    for bad in [(6,), (1, 2), ("a",), ((0,), (1,))]:
        with pytest.raises(ValueError, match="index"):
            report.plot_entry("params[0]", bad)
    vector = gradfd.check(lambda z: torch.tanh(z), (torch.randn(3, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(ValueError, match=r"index: .*\(output index, input index\)"):
        vector.plot_entry("output[0] wrt params[0]", (1,))
    directional = gradfd.check(lambda x: x.sin().sum(), (x,), mode="directional")
    with pytest.raises(ValueError, match="directional mode has no per-entry coordinate"):
        directional.plot_entry("params[0]", (1,))
    big = torch.randn(40, dtype=torch.float64, requires_grad=True)
    sampled = gradfd.check(lambda x: x.sin().sum(), (big,), mode="sample", samples=4)
    unchecked = next(i for i in range(40) if i not in sampled["params[0]"].entries["index"].tolist())
    with pytest.raises(ValueError, match="index: .*not among the checked entries"):
        sampled.plot_entry("params[0]", (unchecked,))
    report.tensors[0].plot_context = None  # as a report rebuilt elsewhere would be
    with pytest.raises(ValueError, match="no function to evaluate"):
        report.plot_entry("params[0]", (2,))


def test_the_context_stays_out_of_repr_comparison_and_json(seed):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    t = gradfd.check(lambda x: x.sin().sum(), (x,))["params[0]"]
    assert t.plot_context is not None and "plot_context" not in repr(t) and "plot_context" not in t.to_dict()


def test_the_callers_tensors_and_rng_are_untouched(seed):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    report = gradfd.check(lambda x, w: PlantedSin.apply(x * w).sum() + torch.rand(()).double() * 0, (x, w),
                          wrt=0, raise_on_failure=False)
    x_bits, w_bits = x.detach().clone(), w.clone()
    rng = torch.get_rng_state()
    report.plot_entry("params[0]", report["params[0]"].flagged()[0])
    assert torch.equal(x.detach().view(torch.int64), x_bits.view(torch.int64))
    assert torch.equal(w.view(torch.int64), w_bits.view(torch.int64))
    assert x.grad is None and w.grad is None and x.requires_grad and not w.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    # nor do the report's own copies move: a second plot draws the same curve
    first = _lines(report.plot_entry("params[0]", (2,)))["function"].get_ydata()
    second = _lines(report.plot_entry("params[0]", (2,)))["function"].get_ydata()
    assert list(first) == list(second)




def test_cli_plot_writes_pngs_of_the_worst_entries(tmp_path, capsys, seed):
    target = tmp_path / "targets.py"
    target.write_text(CLI_TARGETS)
    out = tmp_path / "plots"
    code = cli.main(["check", f"{target}:bad", "--no-progress", "--plot", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    files = sorted(out.glob("*.png"))
    assert 1 <= len(files) <= 5 and all(f.name.startswith("params_0-") for f in files)
    assert all(f"wrote {f}" in printed for f in files) and all(f.stat().st_size > 0 for f in files)
    assert Path(files[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = cli.main(["check", f"{target}:good", "--no-progress", "--plot", str(tmp_path / "none")])
    assert code == 0 and not list((tmp_path / "none").glob("*.png"))


def test_a_report_keeps_no_copy_and_refuses_to_plot_params_changed_since(seed):
    """The record holds references to the caller's tensors, not clones (a model's parameters are not doubled while a
    report lives); a tensor modified in place after the check is refused, naming it."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(lambda x: x.sin().sum(), (x,))
    assert report["params[0]"].plot_context.params[0] is x
    report.plot_entry("params[0]", (2,))
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(ValueError, match=r"params\[0\] was modified in place since the check"):
        report.plot_entry("params[0]", (2,))


def test_an_inference_tensor_argument_is_kept_without_a_version(seed):
    with torch.inference_mode():
        data = torch.randn(5, dtype=torch.float64)  # inference tensors have no version counter
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(lambda x, d: (x.sin() * d).sum(), (x, data), wrt=0)
    assert report.passed
    report.plot_entry("params[0]", (1,))


def test_a_module_parameter_changed_since_the_check_is_named(seed):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    report = gradfd.check_module(net, torch.randn(4, 3, dtype=torch.float64), loss=lambda out: out.pow(2).mean())
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    with pytest.raises(ValueError, match=r"0\.weight was modified in place since the check"):
        report.plot_entry("0.weight", (0, 1))
