"""The table of docs/reliability.md: every fault injected and every class of bad input tried,
with its outcome, as the reliability tests recorded them.

Rows are written by the tests themselves (the `record` fixture), after their assertions, so a
row says what a passing test saw. A full passing run of tests/reliability rewrites the table
between the markers; `test_the_committed_table_is_current` fails when the committed one differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
START = "<!-- reliability-table:start (written by tests/reliability; do not edit) -->"
END = "<!-- reliability-table:end -->"
# The table's sections, in this order.
AREAS = ("fault", "bad input", "security")


@dataclass(frozen=True, order=True)
class Row:
    area: str
    case: str
    outcome: str
    test: str  # module::function that recorded it

    def cells(self) -> list[str]:
        return [self.area, self.case, self.outcome, f"`{self.test}`"]


def render(rows: list[Row]) -> str:
    """The markdown table, rows sorted by area (in AREAS order), then by test and case."""
    if unknown := {row.area for row in rows} - set(AREAS):
        raise ValueError(f"unknown areas {sorted(unknown)}; use one of {AREAS}")
    ordered = sorted(set(rows), key=lambda r: (AREAS.index(r.area), r.test, r.case))
    lines = [
        "| area | fault injected / input tried | outcome | test |",
        "| --- | --- | --- | --- |",
    ]
    for row in ordered:
        lines.append("| " + " | ".join(_cell(c) for c in row.cells()) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def committed(doc: Path = DOC) -> str:
    """The table between the markers of the committed document ('' when absent)."""
    text = doc.read_text() if doc.exists() else ""
    if START not in text or END not in text:
        return ""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def rewrite(table: str, doc: Path = DOC) -> bool:
    """Put `table` between the markers; True when the file changed."""
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc} lacks the table markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    updated = f"{head}{START}\n{table}\n{END}{tail}"
    if updated == text:
        return False
    doc.write_text(updated)
    return True
