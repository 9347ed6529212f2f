"""Issue 21's per-layer table: the structured engine on convolution, normalisation, pooling, embedding, softmax,
attention and cross-entropy layers, against the generic engine and the reference loop, with its error against autograd.

    uv run python benchmarks/bench_layers.py              # records results/layers.json, renders it into docs/
    uv run python benchmarks/bench_layers.py --no-record

Each case is ``numerical_gradient`` of one layer's parameter (or input) inside a small loss. "structured": the whole
gradient, ``engine="structured"`` (the median of up to 3 runs). "generic" (``engine="batched"``) and "loop"
(gradfd.reference, the lesson's algorithm) are timed on a subsample of coordinates and multiplied by N: extrapolated,
not measured on the whole gradient. Steps: 1e-5 in float64 (the reference's), the automatic steps in float32. The
error is the largest difference from autograd's gradient over its largest entry (float32: autograd in float64 of
the same draw). The cases are smooth (tanh, not ReLU) except max pooling, so the error is the engine's, not a
switch's.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from bench_structured import _generic_per_coordinate, _reference_per_coordinate, _timed
from sections import arguments, caption, record

from gradfd import engine
from gradfd.demo import bench

COMMAND = "uv run python benchmarks/bench_layers.py"
SAMPLE = 128  # coordinates the generic engine is timed on (the reference loop: a quarter of them)


def _cases():
    """name -> builder(seed, dtype) -> (func, params): the checked tensor is ``params[0]``; every tensor is drawn in
    float64 and cast to ``dtype`` (a seed's float32 draw is its float64 one, rounded)."""
    dt = torch.float64

    def rn(g, *shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    def conv(g):
        x, b = rn(g, 8, 16, 32, 32), rn(g, 32, scale=0.1)
        return (lambda w: torch.tanh(F.conv2d(x, w, b, padding=1)).pow(2).mean()), (rn(g, 32, 16, 3, 3, scale=0.1),)

    def conv_mse(g):
        x, t = rn(g, 8, 16, 32, 32), rn(g, 8, 32, 32, 32)
        return (lambda w: F.mse_loss(F.conv2d(x, w, padding=1), t)), (rn(g, 32, 16, 3, 3, scale=0.1),)

    def conv1d(g):
        x = rn(g, 8, 32, 256)
        return (lambda w: torch.tanh(F.conv1d(x, w, stride=2, groups=4)).pow(2).mean()), (rn(g, 32, 8, 5, scale=0.2),)

    def conv_input(g):
        w = rn(g, 16, 8, 3, 3, scale=0.2)
        return (lambda x: torch.tanh(F.conv2d(x, w, padding=1)).pow(2).mean()), (rn(g, 4, 8, 16, 16),)

    def two_convs(g):
        x, w2 = rn(g, 8, 8, 24, 24), rn(g, 32, 16, 3, 3, scale=0.1)
        return (lambda w: torch.tanh(F.conv2d(torch.tanh(F.conv2d(x, w, padding=1)), w2)).pow(2).mean(),
                (rn(g, 16, 8, 3, 3, scale=0.2),))

    def bn(training):
        def make(g):
            x, rm = rn(g, 8, 16, 24, 24), rn(g, 32, scale=0.2)
            rv = torch.rand(32, generator=g, dtype=torch.float64).to(dt)
            gamma, beta, w2 = 1 + rn(g, 32, scale=0.1), rn(g, 32, scale=0.1), rn(g, 8, 32, 3, 3, scale=0.1)
            return (lambda w: F.conv2d(torch.tanh(F.batch_norm(F.conv2d(x, w, padding=1), None if training else rm,
                                                           None if training else rv + 0.5, gamma, beta, training)),
                                       w2).pow(2).mean(), (rn(g, 32, 16, 3, 3, scale=0.1),))
        return make

    def layer_norm(g):
        x, p = rn(g, 64, 256), rn(g, 128, 10, scale=0.1)
        return (lambda w: torch.tanh(F.layer_norm(x @ w, (128,)) @ p).pow(2).mean()), (rn(g, 256, 128, scale=0.06),)

    def group_norm(g):
        x = rn(g, 8, 16, 24, 24)
        return (lambda w: torch.tanh(F.group_norm(F.conv2d(x, w, padding=1), 8)).pow(2).mean(),
                (rn(g, 32, 16, 3, 3, scale=0.1),))

    def pools(g):
        x = rn(g, 8, 16, 32, 32)
        return (lambda w: (lambda h: F.max_pool2d(h, 2).pow(2).mean() + F.avg_pool2d(h, 2).pow(2).mean())(
            torch.tanh(F.conv2d(x, w, padding=1))), (rn(g, 32, 16, 3, 3, scale=0.1),))

    def embedding(g):
        idx, p = torch.randint(0, 2000, (32, 64), generator=g), rn(g, 64, 10, scale=0.2)
        return (lambda e: torch.tanh(F.embedding(idx, e) @ p).pow(2).mean()), (rn(g, 2000, 64),)

    def softmax(g):
        x = rn(g, 8, 16, 32, 32)
        return (lambda w: F.softmax(F.conv2d(x, w, padding=1), 1).pow(2).mean()), (rn(g, 32, 16, 3, 3, scale=0.1),)

    def attention(g):
        x, wk, wv = rn(g, 8, 64, 128), rn(g, 128, 128, scale=128**-0.5), rn(g, 128, 128, scale=128**-0.5)

        def heads(t):
            return t.view(8, 64, 4, 32).transpose(1, 2)

        def func(w):
            out = F.scaled_dot_product_attention(heads(x @ w), heads(x @ wk), heads(x @ wv))
            return torch.tanh(out.transpose(1, 2).reshape(8, 64, 128)).pow(2).mean()

        return func, (rn(g, 128, 128, scale=128**-0.5),)

    def mlp_ce(g):
        x, w2, b2 = rn(g, 32, 256), rn(g, 512, 10, scale=512**-0.5), rn(g, 10, scale=0.1)
        y = torch.randint(0, 10, (32,), generator=g)
        return (lambda w: F.cross_entropy(F.gelu(x @ w) @ w2 + b2, y)), (rn(g, 256, 512, scale=256**-0.5),)

    builders = {
        "conv2d weight 32x16x3x3, tanh, mean square (8x16x32x32)": conv,
        "conv2d weight under MSE (the fused kernel)": conv_mse,
        "conv1d weight 32x8x5, stride 2, 4 groups (8x32x256)": conv1d,
        "conv2d input 4x8x16x16": conv_input,
        "two convs: the first's weight, through tanh and the second": two_convs,
        "conv, batch norm (eval), tanh, conv": bn(False),
        "conv, batch norm (train: batch statistics), tanh, conv": bn(True),
        "linear 256x128, layer norm, linear (64 rows)": layer_norm,
        "conv, group norm (8 groups)": group_norm,
        "conv, tanh, max and average pooling": pools,
        "embedding 2000x64, 32x64 indices": embedding,
        "conv, softmax over channels": softmax,
        "attention: the query's projection 128x128, 4 heads, 8x64 tokens": attention,
        "linear 256x512, GELU, linear 512x10, cross-entropy (the fused kernel)": mlp_ce,
    }

    def at(make):
        def build(seed: int, dtype: torch.dtype):
            nonlocal dt
            dt = dtype
            return make(torch.Generator().manual_seed(seed))
        return build

    return {name: at(make) for name, make in builders.items()}


def _autograd64(func64, params) -> torch.Tensor:
    ps = [p.detach().double().clone().requires_grad_(k == 0) for k, p in enumerate(params)]
    return torch.autograd.grad(func64(*ps), ps[0])[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run_case(name: str, build, dtype: torch.dtype, progress) -> dict:
    func64, _ = build(0, torch.float64)
    func, params = build(0, dtype)
    n = params[0].numel()
    h = 1e-5 if dtype == torch.float64 else None
    progress(f"{name}, {dtype}: structured")
    seconds, got = _timed(lambda: engine.numerical_gradient(func, params, 0, h=h, engine="structured"), "cpu")
    ev = engine.evaluate(func, params, 0, steps=1e-5, coords=torch.arange(min(n, 8)), engine="structured")
    exact = _autograd64(func64, params)
    progress(f"{name}, {dtype}: generic and loop (subsamples)")
    generic = _generic_per_coordinate(func, params, min(SAMPLE, n), "cpu") * n
    loop = _reference_per_coordinate(func, params, min(SAMPLE // 4, n)) * n
    row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "entries": n, "structured": seconds,
           "generic": generic, "loop": loop, "error": _rel(got, exact),
           "widened": [x for x in ev.notes if "widened" in x or "fused" in x]}
    if dtype == torch.float32:
        row["generic_error"] = _rel(engine.numerical_gradient(func, params, 0, h=None, engine="batched"), exact)
    print(row, flush=True)
    return row


def _node_noise(func, func64, params, engine_name: str) -> float:
    """The node-to-node rounding noise of an engine's losses: the standard deviation, over the stencil nodes of 64
    coordinates (4-point stencil, step 1e-2), of each node's loss minus the float64 loss at the same (float32) node,
    less the coordinate's mean (what every node of a coordinate shares cancels in its differences)."""
    ev = engine.evaluate(func, params, 0, engine=engine_name, steps=1e-2, stencil="four_point",
                         coords=torch.arange(min(64, params[0].numel())))
    losses = ev.losses + ev.loss_offset
    err = torch.empty_like(losses)
    for m in range(losses.shape[1]):
        for s in range(losses.shape[0]):
            q = [t.double().clone() for t in params]
            c = int(ev.coords[m])
            q[0].view(-1)[c] = params[0].view(-1)[c].double() + float(ev.displacement[s, m])
            err[s, m] = float(losses[s, m]) - float(func64(*q))
    return float((err - err.mean(0, keepdim=True)).std())


def node_noise() -> list[dict]:
    """float32: the structured engine's node-to-node noise beside the generic engine's (a fresh forward per node),
    on a Linear and a conv1d weight, through the fused kernel (``tanh(.)**2`` summed; an MSE) and the interpreter."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(64, 16, generator=g, dtype=torch.float64)
    W = torch.randn(32, 16, generator=g, dtype=torch.float64) / 6
    x, w1 = torch.randn(3, 4, 11, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, generator=g,
                                                                               dtype=torch.float64) / 3
    cases = {
        "Linear, tanh(.)**2 summed (fused kernel)": (lambda a: lambda w: torch.tanh(a @ w).pow(2).sum(), X, W),
        "Linear, tanh, MSE against targets (fused kernel)": (
            lambda a: lambda w: F.mse_loss(torch.tanh(a @ w), Y.to(a.dtype)), X, W),
        "Linear, sin summed (interpreter)": (lambda a: lambda w: torch.sin(a @ w).sum(), X, W),
        "conv1d, tanh(.)**2 summed (fused kernel)": (
            lambda a: lambda w: torch.tanh(F.conv1d(a, w, groups=2)).pow(2).sum(), x, w1),
        "conv1d, sin summed (interpreter)": (lambda a: lambda w: torch.sin(F.conv1d(a, w, groups=2)).sum(), x, w1),
    }
    rows = []
    for name, (make, inp, w) in cases.items():
        func, func64, params = make(inp.float()), make(inp), (w.float(),)
        got = {e: _node_noise(func, func64, params, e) for e in ("structured", "batched")}
        rows.append({"case": name, "structured": got["structured"], "generic": got["batched"]})
        print(rows[-1], flush=True)
    return rows


def render(data: dict) -> str:
    lines = [caption(data), "",
             "`numerical_gradient` of one layer's parameter inside a small loss (central differences; steps 1e-5 in "
             "float64, automatic in float32). \"structured\": measured, the whole gradient. \"generic\" and "
             "\"loop\": per-coordinate cost on a subsample times N (extrapolated). \"error\": the largest difference "
             "from autograd over autograd's largest entry (float32: against float64 autograd of the same draw; the "
             "generic engine's in brackets).", "",
             "| layer | dtype | entries | structured | generic (extrap.) | loop (extrap.) | vs generic | vs loop | "
             "error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        err = f"{r['error']:.1e}" + (f" ({r['generic_error']:.1e})" if "generic_error" in r else "")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['entries']:,} | {r['structured']:.3g} s | "
                     f"{r['generic']:.3g} s | {r['loop']:.3g} s | {r['generic'] / r['structured']:.0f}x | "
                     f"{r['loop'] / r['structured']:.0f}x | {err} |")
    lines += ["", "Node-to-node rounding noise in float32: the standard deviation of each stencil node's loss minus "
              "the float64 loss at the same node, less what a coordinate's nodes share (64 coordinates, 4-point "
              "stencil, step 1e-2). \"generic\": a fresh forward per node.", "",
              "| case | structured | generic | ratio |", "|---|---|---|---|"]
    for r in data["noise"]:
        lines.append(f"| {r['case']} | {r['structured']:.2g} | {r['generic']:.2g} | "
                     f"{r['structured'] / r['generic']:.2f} |")
    return "\n".join(lines)


RENDER = {"layers": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--cases", default=None, help="comma-separated substrings of case names (default: all)")
    args = ap.parse_args()
    progress = lambda msg: print("  ..", msg, file=sys.stderr, flush=True)  # noqa: E731
    cases = _cases()
    if args.cases:
        cases = {k: v for k, v in cases.items() if any(s in k for s in args.cases.split(","))}
    rows = [run_case(name, build, dtype, progress) for name, build in cases.items()
            for dtype in (torch.float32, torch.float64)]
    data = {"machine": bench.machine_info(), "command": COMMAND, "rows": rows, "noise": node_noise()}
    print(record("layers", data, write=not args.no_record))


if __name__ == "__main__":
    main()
