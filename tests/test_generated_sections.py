"""Every section between generated markers is exactly its script's rendering of its committed JSON record
(benchmarks/sections.py), and no bar verdict is typed by hand outside them."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sections  # noqa: E402


def test_every_generated_section_is_its_records_rendering():
    found = sections.problems()
    assert not found, "re-render with `uv run python benchmarks/sections.py`:\n\n" + "\n\n".join(found)


def test_every_recorded_section_stands_in_a_document():
    present = {m.group(1) for path in sections.documents() for m in sections.MARKERS.finditer(path.read_text())}
    recorded = {name for name, (_, record) in sections.SECTIONS.items() if (sections.RESULTS / record).exists()}
    assert recorded - present == set(), "records whose section no document shows"


def test_a_hand_edited_section_is_caught(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    name = next(m.group(1) for m in sections.MARKERS.finditer(readme))
    assert not [p for p in sections.problems() if f"section {name!r}" in p and p.startswith("README.md")]
    edited = readme.replace(f"<!-- {name}:begin -->\n", f"<!-- {name}:begin -->\nedited by hand\n", 1)
    (tmp_path / "README.md").write_text(edited)
    monkeypatch.setattr(sections, "documents", lambda: [tmp_path / "README.md"])
    monkeypatch.setattr(sections, "ROOT", tmp_path)
    found = sections.problems()
    assert len(found) == 1 and f"section {name!r} differs" in found[0] and "-edited by hand" in found[0]


def test_an_unknown_section_is_caught(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("<!-- made-up:begin -->\n| a table |\n<!-- made-up:end -->\n")
    monkeypatch.setattr(sections, "documents", lambda: [tmp_path / "README.md"])
    monkeypatch.setattr(sections, "ROOT", tmp_path)
    assert sections.problems() == ["README.md: section 'made-up' has no entry in benchmarks/sections.py SECTIONS"]


@pytest.mark.parametrize("body", [
    "<!-- domain:begin -->\n| a table |\n",  # its end deleted: the text below it would be unguarded
    "<!-- domain:begin -->\n| a table |\n<!-- domian:end -->\n",  # misspelt
    "| a table |\n<!-- domain:end -->\n",
])
def test_an_unpaired_marker_is_caught(tmp_path, monkeypatch, body):
    (tmp_path / "README.md").write_text(body)
    monkeypatch.setattr(sections, "documents", lambda: [tmp_path / "README.md"])
    monkeypatch.setattr(sections, "ROOT", tmp_path)
    found = sections.problems()
    assert found and all("has no partner" in f for f in found)


def _outside_sections(text: str) -> str:
    return sections.MARKERS.sub("", text)


@pytest.mark.parametrize("path", sections.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_bar_verdict_is_typed_by_hand(path):
    """"met", "NOT met" and "bar met" are computed by the renderers; outside generated sections they may not appear."""
    typed = [line for line in _outside_sections(path.read_text()).splitlines() if re.search(r"\bmet\b", line)]
    assert typed == [], f"{path.name}: a bar verdict typed by hand; compute it in the section's renderer"


def test_the_policy_table_is_the_policy():
    """docs/verdicts.md's policy table is recorded from gradfd.verdict.policy.Policy; a change of a default, a rule
    or a field, without rerunning benchmarks/policy_table.py, fails here."""
    import policy_table

    assert sections.load("policy")["fields"] == json.loads(json.dumps(policy_table.fields()))
