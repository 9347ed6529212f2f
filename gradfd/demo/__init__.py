"""Demo and benchmark material, never imported by ``import gradfd`` (tests/test_layout.py):

- :mod:`.problems`: the lesson's models and a few more, as ``(func, params)`` (the demo, tests and benchmarks);
- :mod:`.bench`: the benchmark harness (timing, machine description, seed ranges) and the measurements behind the
  tables that ``benchmarks/`` renders;
- :mod:`.walkthrough`: ``gradfd demo``.

The CLI imports them only for ``gradfd demo`` and ``gradfd bench``.
"""
