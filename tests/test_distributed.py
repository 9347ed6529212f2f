"""``distributed=``: one check over the ranks of a torch.distributed group (gradfd/distributed.py).

Two gloo ranks are spawned (``gradfd.demo.distributed.launch``) for the issue's bars: every rank's report equals the
one-process report bitwise, a planted error is located identically, differing parameters and a func raising on one
rank make every rank raise, and a rank that dies or hangs leaves the other an error within the timeout. The rest runs
in this process, on a one-rank group.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
import torch.distributed as dist

import gradfd
from gradfd import distributed as D
from gradfd import engine
from gradfd.demo import distributed as demo

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


bits = demo.bitwise


def untimed(summary: list[dict]) -> list[dict]:
    """A report's summary without its notes (one process's say what its clock chose, and how long tracing took)."""
    return [{**r, "details": {k: v for k, v in r["details"].items() if k != "notes"}} for r in summary]


@contextlib.contextmanager
def one_thread():
    """The spawned ranks run on one thread: the comparisons here do too (a reduction's order may follow threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_true_without_a_process_group_says_how_to_start_one():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for call in (lambda: gradfd.check(lambda w: w.sum(), (w,), distributed=True),
                 lambda: gradfd.numerical_gradient(lambda w: w.sum(), (w,), 0, distributed=True)):
        with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
            call()


def test_bad_arguments_name_distributed():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="distributed must be False, True, a torch.distributed ProcessGroup.*got str"):
        gradfd.check(lambda w: w.sum(), (w,), distributed="yes")
    for timeout in (-1, float("inf")):
        with pytest.raises(ValueError, match="distributed's timeout must be a positive, finite number of seconds"):
            gradfd.check(lambda w: w.sum(), (w,), distributed=D.Distributed(timeout=timeout))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A one-rank gloo group in this process."""
    rendezvous = tmp_path_factory.mktemp("rendezvous") / "file"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """The suite scenario (equality problems, planted error, differing params, a raising func) on 2 gloo ranks, with
    a fresh seed."""
    import random

    seed = random.SystemRandom().randrange(2**31)
    t0 = time.perf_counter()
    results = demo.launch(2, "suite", seed=seed, timeout=60.0)
    return seed, results, time.perf_counter() - t0


def test_every_rank_returns_the_one_process_report_bitwise(two_ranks, group):
    seed, (rank0, rank1), _ = two_ranks
    assert isinstance(rank0["equal"], dict), rank0["equal"]
    timeless = [{k: (v[0], v[2]) if isinstance(v, tuple) else v for k, v in r["equal"].items()}
                for r in (rank0, rank1)]
    assert bits(timeless[0]) == bits(timeless[1]), f"the ranks' reports differ (seed {seed})"
    with one_thread():
        # one process, the same choices: a one-rank group (choices without timing) ...
        one = demo._equal(0, 1, seed=seed)
        # ... and, where the choices are pinned, a plain check with no group at all
        plain = {name: demo.summary(gradfd.check(func, params, raise_on_failure=False, progress=False, **options))
                 for name, (func, params, options) in demo.problems(seed).items() if "engine" in options}
        net, x = demo._module(seed)
        plain["check_module"] = demo.summary(gradfd.check_module(net, x, raise_on_failure=False, progress=False,
                                                                 engine="batched", chunk_size=16))
        points = demo._points(seed, False)
    for name, (summary, _, notes, _) in ((k, v) for k, v in rank0["equal"].items() if isinstance(v, tuple)):
        assert bits(summary) == bits(one[name][0]), f"{name}: 2 ranks differ from 1 (seed {seed})"
        if name in plain:  # (a plain check's choices equal the split's where they are pinned; its notes time)
            assert bits(untimed(summary)) == bits(untimed(plain[name])), \
                f"{name}: 2 ranks differ from a plain check (seed {seed})"
        assert any(n.startswith("distributed over 2 ranks (gloo)") for n in notes)
    assert bits(rank0["equal"]["numerical_gradient"]) == bits(one["numerical_gradient"])
    assert bits(rank0["equal"]["points"]) == bits(points)


def test_the_split_is_real_every_rank_computes_blocks(two_ranks):
    seed, ranks, _ = two_ranks
    notes = {name: v[2][-1] for name, v in ranks[0]["equal"].items() if isinstance(v, tuple)}
    rounds = {name: int(n.split(" rounds of the split")[0].split("(")[-1]) for name, n in notes.items()}
    computed = [{name: v[3] for name, v in r["equal"].items() if isinstance(v, tuple) and v[3] is not None}
                for r in ranks]
    # every engine and mode dealt chunks out, to both ranks ("mlp auto": its tensors fit the chunks that settle its
    # choices; "conv structured": one chunk after the first)
    assert all(r >= 1 for name, r in rounds.items() if name != "mlp auto"), rounds
    assert rounds["mlp batched"] >= 10 and rounds["mlp directional"] >= 2, rounds
    for name in computed[0]:
        if name not in ("mlp auto", "conv structured"):
            assert computed[0][name] >= 1 and computed[1][name] >= 1, (name, computed)


def test_a_planted_error_is_located_identically(two_ranks, group):
    seed, (rank0, rank1), _ = two_ranks
    with one_thread():
        plain = demo._planted(0, 0, seed=seed)
    assert rank0["planted"] == rank1["planted"] == plain
    assert rank0["planted"] == [("params[0]", "FAIL", [demo.PLANTED])]


def raised(rank: dict, scenario: str, kind: str, *texts: str) -> float:
    """Assert that ``scenario`` raised ``kind`` on this rank, its message and notes holding every one of ``texts``;
    return the seconds it took."""
    outcome, got, message, seconds = rank[scenario]
    assert (outcome, got) == ("raised", kind), rank[scenario]
    assert all(t in message for t in texts), (texts, message)
    return seconds


def test_parameters_that_differ_make_every_rank_raise_naming_them(two_ranks):
    for rank in two_ranks[1]:
        assert raised(rank, "differ", "DistributedError", "differ in params (ranks 1 differ from rank 0)",
                      "tensors intact: True") < 60


def test_func_raising_on_one_rank_raises_on_every_rank_naming_it(two_ranks):
    for rank in two_ranks[1]:
        # the same type on every rank, a note naming rank 1; an exception no other rank can rebuild: the same
        # DistributedError everywhere
        assert raised(rank, "raises", "KeyError", "planted failure on rank 1", "tensors intact: True",
                      "raised on rank 1 of 2 of a distributed check") < 60
        raised(rank, "unpicklable", "DistributedError",
               "rank 1 of 2 of a distributed check raised _Unpicklable: planted on rank 1")


def test_an_error_outside_the_split_reaches_the_other_rank_as_a_distributed_error(two_ranks):
    rank0, rank1 = two_ranks[1]
    raised(rank1, "forwarded", "ValueError", "planted failure on rank 1, under autograd")
    text = "rank 1 of 2 of a distributed check raised ValueError: planted failure on rank 1, under autograd"
    assert raised(rank0, "forwarded", "DistributedError", text) < 60


def test_ranks_out_of_step_raise_instead_of_mixing_payloads(two_ranks):
    for rank in two_ranks[1]:
        raised(rank, "out of step", "DistributedError", "out of step",
               "rank 0 at step of rank 0; rank 1 at step of rank 1")


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_leaves_the_other_an_error_within_the_timeout(how):
    timeout = 8.0
    rank0, _ = demo.launch(2, "killed", timeout=timeout, how=how)
    assert raised({"killed": rank0}, "killed", "DistributedError", "did not answer within 8 s") < timeout + 5


def test_on_one_rank_the_callers_tensors_are_unchanged_and_the_report_notes_the_split(group, seed):
    w = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 12, dtype=torch.float64)
    before = w.detach().clone()
    version = w._version
    report = gradfd.check(lambda w: torch.tanh(x @ w).square().sum(), (w,), distributed=group)
    assert report.passed and torch.equal(w.detach(), before) and w._version == version and w.grad is None
    assert report.notes[-1].startswith("distributed over 1 ranks (gloo)")
    assert D.active() is None  # the session ends with the check


def test_a_check_failing_on_one_rank_still_raises_gradient_check_error(group):
    with one_thread():
        with pytest.raises(gradfd.GradientCheckError) as info:
            gradfd.check(lambda x: (demo._PlantedSin.apply(x) * 2).sum(),
                         (torch.randn(30, 20, dtype=torch.float64, requires_grad=True),), distributed=True)
    assert info.value.report.tensors[0].disagreeing() == [demo.PLANTED]


def test_module_checks_share_too_and_leave_the_module_intact(group, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 6, dtype=torch.float64)
    with one_thread():
        shared = gradfd.check_module(net, x, distributed=True, engine="batched", memory_budget="1MB")
        plain = gradfd.check_module(net, x, engine="batched", memory_budget="1MB")
    assert shared.passed
    assert bits(untimed(demo.summary(shared))) == bits(untimed(demo.summary(plain)))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_directional_mode_on_one_rank_and_with_one_direction(group, seed):
    w = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    func = lambda w: torch.tanh(w).square().sum()  # noqa: E731
    with one_thread():
        for directions in (1, 5):
            plain = gradfd.check(func, (w,), mode="directional", directions=directions)
            shared = gradfd.check(func, (w,), mode="directional", directions=directions, distributed=group)
            assert plain.passed and bits(untimed(demo.summary(shared))) == bits(untimed(demo.summary(plain)))


def test_fingerprints_see_values_shapes_and_dtypes():
    a = torch.arange(6.0)
    assert D.fingerprint(a) == D.fingerprint(a.clone())
    for other in (a.reshape(2, 3), a.double(), a + torch.tensor([0, 0, 0, 0, 0, 1e-6])):
        assert D.fingerprint(other) != D.fingerprint(a)


def test_a_structured_refusal_in_a_shared_chunk_delivers_each_column_once(group, seed, monkeypatch):
    """The structured engine refuses at its third chunk, the second shared one: the first two chunks reached the sink
    (the first before the share, the second in an earlier round), so the generic fallback starts at the third."""
    from gradfd import structured

    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 5, dtype=torch.float64)
    params = (torch.randn(12, 5, dtype=torch.float64),)

    def func(w):
        return (torch.tanh(x @ w) - y).square().mean()

    run, calls = structured.Analysis.run, []

    def refuse_the_third_chunk(self, coords, moved):
        calls.append(coords.numel())
        if len(calls) == 3:
            raise structured.StructuredUnsupported("aten.test", "refused at the third chunk")
        return run(self, coords, moved)

    monkeypatch.setattr(structured.Analysis, "run", refuse_the_third_chunk)
    monkeypatch.setattr(structured, "_MIN_WORK", 0)  # make "auto" try the structured engine on this small problem
    monkeypatch.setattr(engine, "_STRUCTURED_MIN_EVALUATIONS", 0)
    taken = []
    with D.resolve(group).running({"params": params}):
        ev = engine.evaluate(func, params, 0, steps=1e-5, engine="auto", chunk_size=3,
                             sink=lambda a, b, values, disp: taken.append((a, b, values.clone())))
    assert len(calls) == 3 and any("refused at the third chunk" in note for note in ev.notes), ev.notes
    columns = torch.cat([torch.arange(a, b) for a, b, _ in taken])
    assert sorted(columns.tolist()) == list(range(params[0].numel()))  # every column once
    want = engine.evaluate(func, params, 0, steps=1e-5, engine="batched").losses
    got = torch.empty_like(want)
    for a, b, values in taken:
        got[:, a:b] = values.view(got.shape[0], b - a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
