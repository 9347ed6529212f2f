"""Batchable forms of the ops that ``torch.func.vmap`` cannot batch, so that one such op does not send a whole
function to the per-coordinate loop.

Rule: a form is the same mathematical function built from ops that batch -- PyTorch's own decomposition of the op,
or its own reference formulation -- never a derivative and never an approximation. Its rounding differs from the
fused kernel's in the last bits, and every perturbed point of a check goes through the same form, so differences
are taken between values computed alike; the unperturbed point keeps ``func``'s own path, so what is compared with
it (the centre node of a fourth difference, which outputs a perturbation moved) carries the two paths' rounding
difference (1 ulp for float32 attention on a CPU). The forms apply only to the ``"vmap+forms"`` strategy, tried
after plain vmap failed (tests/test_engine.py::test_an_op_without_a_batching_rule_batches_through_its_batchable_form),
and only to functions that draw no random numbers: another formulation draws dropout masks differently, so a
function that consumed random numbers at its unperturbed point is refused (``RuntimeError``: the next strategy runs;
tests/test_engine.py::test_a_random_function_is_not_evaluated_in_batchable_forms). The switches it sets are
process-wide (``torch.backends.mha``, the SDPA backends, ``torch.nn.functional.linear``): not for checks running
concurrently in threads.

- ``gru``, ``lstm``, ``rnn_tanh``, ``rnn_relu`` (``torch.nn.GRU``/``LSTM``/``RNN``): PyTorch's aten decompositions
  (``torch._decomp``), per-time-step matrix products and pointwise ops;
- ``scaled_dot_product_attention``: its math formulation (``SDPBackend.MATH``); the fused kernels (flash, the CPU
  flash kernel) have no batching rule;
- ``torch.nn.MultiheadAttention``/``TransformerEncoderLayer``'s fused fast path (``torch._native_multi_head_attention``,
  ``torch._transformer_encoder_layer_fwd``): switched off (``torch.backends.mha``) for the call, so the modules take
  their composite path through the two above;
- ``linear`` over an input of more than two dimensions: the input folded to two (``(..., in) -> (-1, in)``), as
  ``at::linear`` folds a contiguous input itself. Under vmap, a batched weight against an unfolded non-contiguous
  input (MultiheadAttention's ``(L, N, E)`` view of a batch-first input) lowers to a matmul that materialises the
  weight once per row block (measured: a 201 MB copy for 64 perturbed ``in_proj_weight`` of a d=128 encoder layer,
  1.36 ms per point against 0.18 ms folded; benchmarks/bench_models.py). ``torch.nn.functional.linear`` is
  replaced for the call, so the calls made inside ``multi_head_attention_forward`` fold too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["BatchableForms", "batchable_forms"]

_RNN_OPS = ("gru", "lstm", "rnn_tanh", "rnn_relu")
_RNN_INPUT_ARGS = 9  # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


class BatchableForms(TorchFunctionMode):
    """Reroutes the ops of the module docstring to their batchable forms; ``used`` names the forms that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # the ``.input`` overload (args[3] is has_biases); ``.data`` (packed sequences) takes params there
        if (name in _RNN_OPS and len(args) == _RNN_INPUT_ARGS and not kwargs and isinstance(args[0], torch.Tensor)
                and isinstance(args[3], bool)):
            from torch._decomp import decomposition_table

            self.used.add(f"{name} (its aten decomposition)")
            return decomposition_table[getattr(torch.ops.aten, name).input](*args)
        if func is torch.nn.functional.scaled_dot_product_attention:  # (runs under SDPBackend.MATH: below)
            self.used.add("scaled_dot_product_attention (its math formulation)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def batchable_forms() -> Iterator[BatchableForms]:
    """Within this context, the ops of the module docstring run in their batchable forms: RNN ops rerouted by
    :class:`BatchableForms` (which sees the calls made at the top level of ``func``), attention in its math
    formulation wherever it is called (``sdpa_kernel``), the fused attention fast path off, ``linear`` folded. The
    caller's ``torch.backends.mha`` setting, SDPA backends and ``torch.nn.functional.linear`` are restored on exit,
    whatever happens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath, linear = torch.backends.mha.get_fastpath_enabled(), torch.nn.functional.linear
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]), BatchableForms() as mode:
            torch.nn.functional.linear = _folded(linear, mode)
            yield mode
    finally:
        torch.nn.functional.linear = linear
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _folded(linear, mode: BatchableForms):
    """``linear`` with an input of more than two dimensions folded to two (the module docstring)."""

    def folded_linear(input, weight, bias=None):
        if input.dim() <= 2 or input.is_nested:
            return linear(input, weight, bias)
        mode.used.add("linear (its input folded to 2-D)")
        return linear(input.flatten(0, -2), weight, bias).unflatten(0, input.shape[:-1])

    return folded_linear
