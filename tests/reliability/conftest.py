"""Reliability and security suite: faults injected into the running service, bad input thrown at
it, attacks tried. Each test records what it tried and what it saw (`record`); a full passing
run rewrites the table in docs/reliability.md, and the last test checks the committed table is
that one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability import table
from tests.reliability.helpers import InProcessApi, build_api

HERE = Path(__file__).parent
CHECK_TEST = "test_the_committed_table_is_current"

# nodeid -> rows it recorded; filled by the `record` fixture
ROWS: dict[str, list[table.Row]] = {}
_state = {"expected": set(), "passed": set(), "full": False}


@pytest.fixture()
def record(request):
    """`record(area, case, outcome)`: a row of docs/reliability.md, called after the asserts."""
    test = f"{Path(request.node.fspath).stem}::{request.node.originalname}"

    def add(area: str, case: str, outcome: str) -> None:
        ROWS.setdefault(request.node.nodeid, []).append(table.Row(area, case, outcome, test))

    return add


def recorded_rows() -> list[table.Row]:
    return [row for rows in ROWS.values() for row in rows]


def full_run() -> bool:
    """Every reliability test was collected, and every one but the table check passed."""
    return _state["full"] and _state["expected"] <= _state["passed"]


def _ours(item) -> bool:
    return Path(item.fspath).parent == HERE


def pytest_collection_modifyitems(session, config, items):
    # The table check runs last, after every test that records a row.
    items.sort(key=lambda item: item.name == CHECK_TEST)
    ours = [item for item in items if _ours(item)]
    _state["expected"] = {item.nodeid for item in ours if item.name != CHECK_TEST}
    modules = {Path(item.fspath).name for item in ours}
    every_module = {path.name for path in HERE.glob("test_*.py")}
    narrowed = any("::" in arg for arg in config.args) or config.option.keyword
    narrowed = narrowed or config.option.markexpr or getattr(config.option, "lf", False)
    _state["full"] = bool(ours) and modules == every_module and not narrowed


def pytest_deselected(items):
    if any(_ours(item) for item in items):
        _state["full"] = False


def pytest_runtest_logreport(report):
    # A strict xfail (a known finding that needs a fix elsewhere) counts: its row says so.
    if report.when == "call" and (report.passed or hasattr(report, "wasxfail")):
        _state["passed"].add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """After a full run in which every reliability test passed: rewrite the committed table."""
    if not full_run() or os.environ.get("CI"):
        return
    if table.rewrite(table.render(recorded_rows())):
        print(f"\n{table.DOC} rewritten from this run's outcomes: commit it")


@pytest.fixture()
def api(tmp_path) -> InProcessApi:
    """The real HTTP layer, SQLite and image files, with a fake engine and fleet."""
    built = build_api(tmp_path)
    yield built
