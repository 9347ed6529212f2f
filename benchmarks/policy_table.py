"""The policy table of docs/verdicts.md: every field of ``gradfd.verdict.policy.Policy`` with its default, the rule
behind it and the benchmark that calibrated it, recorded from the live dataclass (tests/test_generated_sections.py
fails when the record and the code differ).

    uv run python benchmarks/policy_table.py
"""

from __future__ import annotations

import dataclasses

from sections import record

from gradfd.verdict.policy import DEFAULT_POLICY, Policy

COMMAND = "uv run python benchmarks/policy_table.py"


def fields() -> list[dict]:
    """One row per Policy field, from the dataclass itself."""
    return [{"name": f.name, "value": getattr(DEFAULT_POLICY, f.name), "why": f.metadata["why"],
             "calibrated_by": f.metadata["calibrated_by"]} for f in dataclasses.fields(Policy)]


def _cell(text: str) -> str:
    """``text`` inside a Markdown table cell: its bars escaped."""
    return text.replace("|", "\\|")


def render(data: dict) -> str:
    lines = [f"Generated from `gradfd.verdict.policy.Policy` by `{data['command']}`; pass overrides as "
             "`gradfd.check(..., policy={field: value})`.", "",
             "| field | default | rule | calibrated by |", "|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['value']!r} | {_cell(r['why'])} | `{r['calibrated_by']}` |" for r in data["fields"]]
    return "\n".join(lines)


RENDER = {"policy": render}


def main() -> None:
    print(record("policy", {"command": COMMAND, "fields": fields()}))


if __name__ == "__main__":
    main()
