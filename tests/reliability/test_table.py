"""The table of docs/reliability.md is the one this suite produces (see conftest.py)."""

from __future__ import annotations

from tests.reliability import table
from tests.reliability.conftest import full_run, recorded_rows


def test_the_committed_table_is_current():
    rows = recorded_rows()
    assert rows, "no reliability test recorded a row"
    produced = table.render(rows)
    committed = table.committed()
    hint = (
        f"{table.DOC} is not the table the suite produces: a full passing run of "
        "`pytest tests/reliability` rewrites it (outside CI); commit the result"
    )
    if full_run():
        assert committed == produced, hint
    else:  # a partial run: each row it recorded must be in the committed table
        missing = [row for row in produced.splitlines()[2:] if row not in committed]
        assert not missing, f"{hint}\nmissing rows:\n" + "\n".join(missing)
