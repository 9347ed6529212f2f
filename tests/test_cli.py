"""The command line: gradfd check (exit codes, formats, conversions) and gradfd bench (outputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gradfd import cli
from gradfd.demo import bench
from helpers import CLI_TARGETS as TARGETS



@pytest.fixture
def targets(tmp_path):
    path = tmp_path / "targets.py"
    path.write_text(TARGETS)
    return str(path)


def run(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_exit_codes_and_table(targets, capsys):
    code, out, _ = run(["check", f"{targets}:good", "--no-progress"], capsys)
    assert code == 0 and "gradfd.check: PASSED" in out
    code, out, _ = run(["check", f"{targets}:bad", "--no-progress"], capsys)
    assert code == 1 and "FAILED" in out and "disagreeing entries" in out
    code, out, _ = run(["check", f"{targets}:ready_report"], capsys)
    assert code == 0 and "PASSED" in out


def test_check_takes_a_module(targets, capsys):
    code, out, _ = run(["check", f"{targets}:module_only", "--no-progress", "--dtype", "float64"], capsys)
    assert code == 0 and "0.weight" in out and "float64" in out and "projection" in out
    code, out, _ = run(["check", f"{targets}:module_and_loss", "--no-progress"], capsys)
    assert code == 0 and "weight" in out and "bias" in out and "projection" not in out


def test_nothing_compared_exits_1(targets, capsys):
    code, out, _ = run(["check", f"{targets}:nothing_compared", "--no-progress"], capsys)
    assert code == 1 and "PASSED (but nothing could be compared for params[0]" in out


def test_check_json_output(targets, capsys):
    code, out, _ = run(["check", f"{targets}:bad", "--format", "json", "--no-progress"], capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and data["tensors"][0]["disagree"] >= 1


def test_check_takes_a_reference_and_the_dtype(targets, capsys):
    code, out, _ = run(["check", f"{targets}:softmax_against_reference", "--dtype", "float16", "--format", "json",
                        "--no-progress"], capsys)
    t = json.loads(out)["tensors"][0]
    assert code == 0 and t["mode"] == "reference" and t["dtype"] == "float16" and t["passed"]


def test_check_converts_dtype_and_uses_the_mode(targets, capsys):
    code, out, _ = run(["check", f"{targets}:good", "--dtype", "float32", "--mode", "sample", "--samples", "5",
                        "--format", "json", "--no-progress"], capsys)
    t = json.loads(out)["tensors"][0]
    assert code == 0 and t["dtype"] == "float32" and t["checked"] == 5 and t["mode"] == "sample"


@pytest.mark.parametrize("args,message", [
    (["check", "no_colon_here"], "expected path/to/file.py:function"),
    (["check", "/nonexistent/file.py:f"], "no such file"),
    (["check", "{targets}:missing"], "has no function 'missing'"),
    (["check", "{targets}:not_a_problem"], "must return (func, params), (func, params, reference), (module, inputs), "
                                           "(module, inputs, loss) or a CheckReport, got int"),
    (["check", "{targets}:good", "--samples", "0"], "--samples and --directions must be positive"),
    (["bench", "--device", "tpu"], "--device takes cpu and/or cuda"),
    (["check", "{targets}:good", "--distributed"], "--distributed runs under torchrun: torchrun --nproc-per-node N"),
    (["check", "{targets}:good", "--distributed", "--distributed-timeout", "0"],
     "--distributed-timeout must be a positive, finite number of seconds, got 0"),
])
def test_usage_errors_exit_2_with_a_message(targets, capsys, args, message):
    args = [a.replace("{targets}", targets) for a in args]
    code, _, err = run(args, capsys)
    assert code == 2 and message in err


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "x.py:f", "--mode", "quick"])
    assert exc.value.code == 2


def test_python_dash_m_runs_the_cli(targets):
    proc = subprocess.run([sys.executable, "-m", "gradfd", "check", f"{targets}:good", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "PASSED" in proc.stdout


def test_torchrun_shares_a_check_and_rank_0_prints_the_report(targets):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gradfd",
                           "check", f"{targets}:good", "--distributed", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("PASSED") == 1 and "distributed over 2 ranks (gloo)" in proc.stdout


def test_bench_writes_json_markdown_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")

    def tiny(device, quick):
        def build():
            x = torch.randn(12, dtype=torch.float64, device=device, requires_grad=True)
            return (lambda x: torch.tanh(x).pow(2).sum()), (x,), 0
        return [("tiny tanh", 12, build)]

    monkeypatch.setattr(bench, "_suite_problems", tiny)
    code, out, _ = run(["bench", "--quick", "--out", str(tmp_path), "--device", "cpu,cuda"], capsys)
    assert code == 0 and "tiny tanh" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "cores", "torch", "date"} <= set(data["machine"])
    methods = {r["method"] for r in data["rows"]}
    assert {"reference loop", "gradfd generic", "gradcheck slow", "gradcheck fast"} <= methods
    for r in data["rows"]:
        if r["method"] in ("reference loop", "gradfd generic"):
            assert r["error"] < 1e-8 and r["seconds"] > 0  # checked against autograd before timing
    assert (tmp_path / "bench.png").stat().st_size > 1000 and (tmp_path / "bench.md").exists()
    if not torch.cuda.is_available():
        assert "cuda: skipped, no CUDA device" in out


def test_check_takes_the_order_and_forward_ad(targets, capsys):
    code, out, _ = run(["check", f"{targets}:good", "--order", "2", "--forward-ad", "--format", "json",
                        "--no-progress"], capsys)
    names = [t["name"] for t in json.loads(out)["tensors"]]
    assert code == 0 and names == ["grad(params[0]) wrt params[0]", "grad(params[0]) wrt grad_outputs[0]",
                                   "grad(params[0]) wrt params[0] (forward AD)",
                                   "grad(params[0]) wrt grad_outputs[0] (forward AD)"]
    code, out, _ = run(["check", f"{targets}:good", "--forward-ad", "--mode", "directional", "--no-progress"], capsys)
    assert code == 0 and "params[0] (forward AD)" in out and "dirs" in out
