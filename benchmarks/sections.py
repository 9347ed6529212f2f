"""Generated sections: every block between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in the project's
documents is rendered from a JSON record in ``benchmarks/results/`` by the script that measured it.

Rules (tests/test_generated_sections.py holds them):

* A benchmark script measures, then calls :func:`record` with a JSON-able dict. That writes the record and
  re-renders the section wherever its markers stand. Nothing else writes between markers.
* The text of a section is a pure function of its record (``RENDER[name](data)`` in the script), so the committed
  JSON re-renders to exactly the committed text; a claim such as "bar met" is computed there, never typed.
* Where a section stands (README, ``docs/``, ``benchmarks/RESULTS.md``) is decided by its markers alone: moving a
  table is moving its markers.

    uv run python benchmarks/sections.py           # re-render every section from the committed records
    uv run python benchmarks/sections.py --check   # exit 1, with a diff, where a document differs from its records
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# section -> (the module that measures and renders it, its record under benchmarks/results/)
SECTIONS: dict[str, tuple[str, str]] = {
    "bench-cpu": ("bench_suite", "cpu/bench.json"),
    "engine-cpu": ("bench_engine", "engine-cpu.json"),
    "structured": ("bench_structured", "structured-cpu.json"),
    "structured-cuda": ("bench_structured", "gpu/structured-cuda.json"),
    "layers": ("bench_layers", "layers.json"),
    "jacobian": ("bench_jacobian", "jacobian.json"),
    "custom-op": ("bench_jacobian", "custom-op.json"),
    "accuracy": ("bench_accuracy", "accuracy.json"),
    "accuracy-floor": ("bench_accuracy", "accuracy-floor.json"),
    "verdicts": ("bench_accuracy", "verdicts.json"),
    "check-vs-gradcheck": ("bench_accuracy", "check-vs-gradcheck.json"),
    "domain": ("bench_domain", "domain.json"),
    "poles": ("bench_poles", "poles.json"),
    "conditioning": ("bench_conditioning", "conditioning.json"),
    "opinfo": ("bench_opinfo", "opinfo.json"),
    "opinfo-full": ("bench_opinfo", "opinfo.json"),
    "opinfo-rules": ("bench_opinfo", "opinfo-rules.json"),
    "opinfo-complex": ("bench_opinfo", "opinfo-complex.json"),
    "first-call": ("bench_first_call", "first-call.json"),
    "directional": ("bench_directional", "directional.json"),
    "detection": ("bench_detection", "detection.json"),
    "reference": ("bench_reference", "reference.json"),
    "rules": ("bench_rules", "rules.json"),
    "complex-ops": ("bench_complex", "complex.json"),
    "kinks": ("bench_kinks", "kinks.json"),
    "models": ("bench_models", "models.json"),
    "distributed": ("bench_distributed", "distributed.json"),
    "policy": ("policy_table", "policy.json"),
}

MARKERS = re.compile(r"<!-- ([a-z0-9-]+):begin -->\n(.*?)\n?<!-- \1:end -->", re.S)
ANY_MARKER = re.compile(r"<!--\s*([^>]*?):(begin|end)\s*-->")


def documents() -> list[Path]:
    """Every Markdown file that may hold generated sections: the README, docs/ and benchmarks/."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), *sorted(HERE.glob("**/*.md"))]
    return [p for p in found if p.is_file()]


def load(name: str) -> dict:
    """The JSON record of section ``name``.

    Raises:
        KeyError: ``name`` is not a registered section.
        FileNotFoundError: its record has not been written.
    """
    _, record_path = SECTIONS[name]
    return json.loads((RESULTS / record_path).read_text())


def renderer(name: str) -> Callable[[dict], str]:
    """``RENDER[name]`` of the module that owns section ``name``."""
    module_name, _ = SECTIONS[name]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(module_name).RENDER[name]


def render(name: str) -> str:
    """The text of section ``name``, rendered from its committed record."""
    return renderer(name)(load(name)).rstrip()


def arguments(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's argument parser: its docstring as the help text, and ``--no-record`` (measure and
    print, write nothing). Scripts add their own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-record", action="store_true", help="print only; do not write benchmarks/results or the "
                                                               "documents")
    return ap


def caption(data: dict) -> str:
    """The first line of every section: the machine and date of the run, and the command that reproduces it."""
    from gradfd.demo.bench import describe_machine

    return f"Machine: {describe_machine(data['machine'])}. Command: `{data['command']}`."


def _clean(value):
    """JSON-able copy of ``value``: NaN/inf become None (JSON has no NaN), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def record(name: str, data: dict, *, write: bool = True) -> str:
    """Render section ``name`` from ``data``; with ``write``, save ``data`` as its record and put the text in every
    document that holds the section's markers. Returns the text (scripts print it).

    ``data`` should carry ``machine`` (``gradfd.demo.bench.machine_info()``) and ``command``; NaN and inf are stored
    as null, so the renderer sees exactly what a later re-render will see.
    """
    data = json.loads(json.dumps(_clean(data)))
    text = renderer(name)(data).rstrip()
    if write:
        path = RESULTS / SECTIONS[name][1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        update([name])
    return text


def _replace(body: str, texts: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in texts:
            return m.group(0)
        return f"<!-- {name}:begin -->\n{texts[name]}\n<!-- {name}:end -->"

    return MARKERS.sub(sub, body)


def update(names: list[str] | None = None) -> list[Path]:
    """Re-render ``names`` (default: every section with a record) in every document; returns the changed files."""
    names = [n for n in (names or SECTIONS) if (RESULTS / SECTIONS[n][1]).exists()]
    texts = {}
    for n in names:
        try:
            texts[n] = render(n)
        except Exception as exc:  # an older record's format: left as it stands, and `--check` lists it
            print(f"sections: {n!r} not re-rendered ({type(exc).__name__}: {exc})", file=sys.stderr)
    changed = []
    for path in documents():
        body = path.read_text()
        new = _replace(body, texts)
        if new != body:
            path.write_text(new)
            changed.append(path)
    return changed


def problems() -> list[str]:
    """What keeps the documents from being exactly their records' rendering: unknown markers, sections without a
    record, and sections whose text differs (with a unified diff)."""
    out = []
    for path in documents():
        rel = path.relative_to(ROOT)
        body = path.read_text()
        paired = [f"<!-- {m.group(1)}:{end} -->" for m in MARKERS.finditer(body) for end in ("begin", "end")]
        for m in ANY_MARKER.finditer(body):  # a marker whose partner is missing or misspelt guards nothing
            if m.group(0) not in paired:
                out.append(f"{rel}: marker {m.group(0)!r} has no partner (a section is <!-- x:begin --> ... "
                           "<!-- x:end -->, x in a-z0-9-)")
        for m in MARKERS.finditer(body):
            name, text = m.group(1), m.group(2)
            if name not in SECTIONS:
                out.append(f"{rel}: section {name!r} has no entry in benchmarks/sections.py SECTIONS")
                continue
            try:
                want = render(name)
            except FileNotFoundError:
                out.append(f"{rel}: section {name!r} has no record (benchmarks/results/{SECTIONS[name][1]})")
                continue
            except Exception as exc:  # a record the renderer cannot read (an older format): listed, not fatal
                out.append(f"{rel}: section {name!r} cannot be rendered from its record: {type(exc).__name__}: {exc}")
                continue
            if text.rstrip() != want:
                diff = "\n".join(difflib.unified_diff(text.rstrip().splitlines(), want.splitlines(),
                                                      "committed", "rendered", lineterm="", n=1))
                out.append(f"{rel}: section {name!r} differs from its record:\n{diff}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = ap.parse_args()
    if args.check:
        found = problems()
        print("\n\n".join(found) if found else "every generated section matches its record")
        sys.exit(1 if found else 0)
    for path in update():
        print(f"updated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
