"""The Python examples of the README and of docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(f"{page.relative_to(ROOT)}[python block {k}]", code) for page in PAGES
          for k, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


@pytest.mark.parametrize("name,code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_example_runs(name, code):
    exec(compile(code, name, "exec"), {"__name__": "readme"})


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert "uv run gradfd demo" in text and "uv run pytest" in text


def test_the_readme_stays_a_manual():
    assert len(README.read_text().splitlines()) <= 300, "README.md is the user's manual: long text goes to docs/"
