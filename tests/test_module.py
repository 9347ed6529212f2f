"""gradfd.check_module: rows named by parameter, tied and frozen parameters, keyword inputs, the default loss,
module state bitwise intact (BatchNorm in train mode, dropout, .grad, flags), a planted error located, bad input."""

from __future__ import annotations

import pytest
import torch

import gradfd
from gradfd.module import PROJECTION_SEED


def _snapshot(module: torch.nn.Module) -> dict:
    state = {f"state:{k}": v.clone() for k, v in module.state_dict(keep_vars=True).items()}
    state.update({f"grad:{n}": None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()})
    state.update({f"flag:{n}": m.training for n, m in module.named_modules()})
    state.update({f"requires_grad:{n}": p.requires_grad for n, p in module.named_parameters()})
    return state


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8)
                                                                                        if x.is_floating_point() else x,
                                                                                        y.view(-1).view(torch.uint8)
                                                                                        if y.is_floating_point() else y)):
                return False
        elif x != y:
            return False
    return True


def _cnn(train: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    return m.double().train(train)


def test_rows_are_named_by_parameter_and_a_correct_mlp_passes():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    report = gradfd.check_module(m, x, loss=lambda out: torch.nn.functional.cross_entropy(out, y))
    assert report.passed and report.verified
    assert [t.name for t in report.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "0.weight" in str(report)


@pytest.mark.parametrize("train", [False, True])
def test_module_state_is_bitwise_intact(train):
    m = _cnn(train)
    m[0].weight.grad = torch.full_like(m[0].weight, 7.0)
    before = _snapshot(m)
    report = gradfd.check_module(m, torch.randn(4, 2, 5, 5, dtype=torch.float64), mode="sample", samples=16)
    assert report.passed
    assert _same(before, _snapshot(m))
    assert int(m[1].num_batches_tracked) == 0


def test_state_is_intact_after_a_failed_call_too():
    m = _cnn(True)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="loss must return a one-element"):
        gradfd.check_module(m, torch.randn(4, 2, 5, 5, dtype=torch.float64), loss=lambda out: out)
    assert _same(before, _snapshot(m))


def test_dropout_sees_the_same_draws_at_every_point():
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.3), torch.nn.Linear(7, 1)).double().train()
    x = torch.randn(3, 5, dtype=torch.float64)
    rng = torch.get_rng_state()
    report = gradfd.check_module(m, x, loss=lambda out: out.sum())
    assert report.passed and report.verified
    assert torch.equal(rng, torch.get_rng_state())


def test_frozen_parameters_are_listed_and_wrt_patterns_select():
    m = _cnn(False)
    m[1].weight.requires_grad_(False)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    report = gradfd.check_module(m, x)
    assert "1.weight" not in [t.name for t in report.tensors]
    assert any("1.weight" in n and "requires_grad=False" in n for n in report.notes)
    report = gradfd.check_module(m, x, wrt="*.bias")
    assert [t.name for t in report.tensors] == ["0.bias", "1.bias", "5.bias"]
    report = gradfd.check_module(m, x, wrt=["0.weight", "1.weight"])  # a frozen one, asked for by name
    assert [t.name for t in report.tensors] == ["0.weight", "1.weight"]


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx, *, scale):
        return self.head(torch.tanh(self.embed(idx)) * scale)


def test_tied_weights_are_checked_once_under_every_name_with_keyword_inputs():
    torch.manual_seed(2)
    m = _Tied().double()
    idx = torch.tensor([0, 3, 5, 1])
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.5
    report = gradfd.check_module(m, idx, kwargs={"scale": scale}, check_inputs=True)
    assert [t.name for t in report.tensors] == ["embed.weight = head.weight", "kwargs['scale']"]
    assert report.passed and report.verified
    assert any(f"seed {PROJECTION_SEED}" in n for n in report.notes)  # the 4x6 output was projected


def test_a_gru_passes_under_the_default_loss():
    torch.manual_seed(4)
    gru = torch.nn.GRU(3, 4, batch_first=True).double()
    report = gradfd.check_module(gru, torch.randn(2, 3, 3, dtype=torch.float64), raise_on_failure=False)
    assert report.passed and report.verified
    assert any("projection" in n for n in report.notes)


class _Planted(torch.autograd.Function):
    """Identity forward; the backward scales one entry's gradient by 1.01 (a 1% error)."""

    @staticmethod
    def forward(w, flat):
        return w.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.flat = inputs[1]

    @staticmethod
    def backward(ctx, g):
        scale = torch.ones(g.numel(), dtype=g.dtype, device=g.device)
        scale[ctx.flat] = 1.01
        return g * scale.view_as(g), None


class _Conv(torch.nn.Module):
    def __init__(self, flat):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.flat = flat

    def forward(self, x):
        w = _Planted.apply(self.conv.weight, self.flat)
        return torch.nn.functional.conv2d(x, w, self.conv.bias).tanh().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_planted_error_on_one_conv_weight_entry_is_located(dtype):
    torch.manual_seed(5)
    m = _Conv(flat=0).to(dtype)
    flat = int(m.conv.weight.detach().abs().reshape(-1).argmax())
    m.flat = flat
    report = gradfd.check_module(m, torch.randn(3, 2, 6, 6, dtype=dtype), raise_on_failure=False)
    assert not report.passed
    t = report["conv.weight"]
    assert t.disagree >= 1
    assert t.disagreeing(limit=1)[0] == tuple(int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                                                   m.conv.weight.shape))
    assert report["conv.bias"].passed
    with pytest.raises(gradfd.GradientCheckError, match="conv.weight"):
        gradfd.check_module(m, torch.randn(3, 2, 6, 6, dtype=dtype))


def test_bad_input_names_the_argument():
    m = _cnn(False)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        gradfd.check_module(lambda x: x, x)
    with pytest.raises(ValueError, match=r"wrt: \['nope\*'\] match no parameter"):
        gradfd.check_module(m, x, wrt="nope*")
    with pytest.raises(TypeError, match="wrt must be"):
        gradfd.check_module(m, x, wrt=3)
    with pytest.raises(ValueError, match="loss must return a one-element"):
        gradfd.check_module(m, x, loss=lambda out: out * 2)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple"):
        gradfd.check_module(m, {"x": x})
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        gradfd.check_module(m, x, kwargs=[1])
    frozen = _cnn(False).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to check"):
        gradfd.check_module(frozen, x)
    with pytest.raises(TypeError, match="check_module got params="):
        gradfd.check_module(m, x, params=(x,))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="inputs must be on the module's device"):
            gradfd.check_module(m, x.cuda())


def test_inputs_on_another_device_are_refused(monkeypatch):
    m = _cnn(False)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="inputs must be on the module's device"):
        gradfd.check_module(m, x)


def test_one_tensor_passed_twice_is_two_inputs():
    class Bilinear(torch.nn.Module):
        def forward(self, a, b):
            return (a * b.exp()).sum()

    x = torch.randn(3, dtype=torch.float64)
    report = gradfd.check_module(Bilinear(), (x, x), check_inputs=True)
    assert [t.name for t in report.tensors] == ["inputs[0]", "inputs[1]"]
    assert report.verified
    for name, want in (("inputs[0]", x.exp()), ("inputs[1]", x * x.exp())):  # d/da and d/db, not a lost input's 0
        e = report[name].entries
        assert torch.allclose(e["analytical"][e["index"].argsort()], want), name


class _RunningScale(torch.nn.Module):
    """Normalises by a running maximum that its forward updates in place (no BatchNorm: not handled by gradfd)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("peak", torch.ones(()))

    def forward(self, x):
        y = self.lin(x)
        self.peak.copy_(torch.maximum(self.peak, y.detach().abs().max()))
        return y / self.peak


def test_a_forward_that_updates_a_buffer_is_refused_and_the_module_is_intact():
    m = _RunningScale().double()
    before = _snapshot(m)
    with pytest.raises(ValueError, match=r"module: its forward updates the buffer\(s\) \['peak'\] in place"):
        gradfd.check_module(m, 3 * torch.randn(4, 3, dtype=torch.float64), loss=lambda out: out.pow(2).sum())
    assert _same(before, _snapshot(m))
