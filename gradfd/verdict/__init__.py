"""The verdict pipeline of :func:`gradfd.check`: plan -> first round -> noise calibration -> refinement ->
judgement -> report, each stage a module with typed records between them.

- :mod:`.policy`: :class:`~.policy.Policy`, every threshold with why it has its value; the seeds.
- :mod:`.estimates`: the estimator (fourth difference, kink and rounding measures, noise median) and the one
  per-entry record, :class:`~.estimates.Entries`.
- :mod:`.judge`: tolerances, floors, the verdict rule, the second look.
- :mod:`.refine`: the refinement and its rules (named predicates), the retreat from a domain's edge.
- :mod:`.plan`, :mod:`.first_round`, :mod:`.noise`, :mod:`.summary`: the stages of full and sample mode;
  :mod:`.coordinates` runs them for one input (and retries where a colored shortcut does not hold).
- :mod:`.directional`: directional mode: its step ladder, verdict rule and retreat (it shares the policy, the floor
  of one value's noise and the detection limits, not the refinement).

What does not live here: the analytical Jacobian and its colored machinery (:mod:`gradfd.jacobian`), the
evaluation of ``func`` (:mod:`gradfd.engine`), the public ``check()`` (:mod:`gradfd.check`). This package imports
nothing at import time, so that importing one of its modules does not import the others.
"""
