"""`sdserve keys …` and `sdserve usage` against a SQLite file, through their argparse wiring."""

from __future__ import annotations

import argparse
import json
import uuid
from decimal import Decimal

import pytest

from service.config import Settings
from service.pricing import PlanLimits
from service.store.admin_cli import add_subcommands
from service.store.db import make_engine, make_sessionmaker
from service.store.jobs import JobStore
from service.store.keys import KeyStore


@pytest.fixture()
def sdserve(tmp_path, capsys):
    """Run one `sdserve …` command line; returns (exit code, stdout, stderr)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'sdserve.db'}")
    parser = argparse.ArgumentParser(prog="sdserve")
    add_subcommands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(argv)
        code = args.run(args, settings=settings)
        out, err = capsys.readouterr()
        return code, out, err

    run.settings = settings
    return run


def test_keys_lifecycle(sdserve):
    code, out, _ = sdserve("keys", "create", "--name", "alice", "--plan", "pay_per_use",
                           "--balance", "0.5", "--admin")  # fmt: skip
    assert code == 0 and "will not be shown again" in out
    plaintext = next(w for w in out.split() if w.startswith("sk-"))
    assert sdserve("keys", "create", "--name", "bob", "--plan", "free")[0] == 0

    code, out, _ = sdserve("keys", "topup", "alice", "0.25")
    assert code == 0 and "balance 0.75 USD" in out
    code, out, _ = sdserve("keys", "revoke", "bob")
    assert code == 0 and "Revoked key 'bob'" in out

    code, out, _ = sdserve("keys", "create", "--name", "carol", "--plan", "premium",
                           "--expires", "2099-01-31T00:00Z")  # fmt: skip
    assert code == 0 and "expires 2099-01-31 00:00 UTC" in out

    code, out, _ = sdserve("keys", "list")
    lines = [line.split() for line in out.splitlines()]
    assert lines == [
        ["ID", "NAME", "PLAN", "ADMIN", "BALANCE_USD", "EXPIRES", "STATUS"],
        ["1", "alice", "pay_per_use", "yes", "0.75", "never", "active"],
        ["2", "bob", "free", "no", "-", "never", "revoked"],
        ["3", "carol", "premium", "no", "-", "2099-01-31", "00:00", "UTC", "active"],
    ]
    assert plaintext not in out

    code, out, _ = sdserve("keys", "expire", "alice", "--at", "30d")
    assert code == 0 and "Key 'alice' (id 1) expires 20" in out
    code, out, _ = sdserve("keys", "expire", "alice", "--never")
    assert code == 0 and "never expires" in out

    engine = make_engine(sdserve.settings.database_url)
    assert KeyStore(make_sessionmaker(engine)).authenticate(plaintext).name == "alice"
    engine.dispose()


@pytest.mark.parametrize(
    "argv",
    [
        ("keys", "revoke", "nobody"),
        ("keys", "topup", "nobody", "1"),
        ("keys", "create", "--name", "p", "--plan", "premium", "--balance", "1"),
        ("usage", "--key", "nobody"),
        ("keys", "expire", "nobody", "--never"),
        ("keys", "create", "--name", "q", "--plan", "free", "--expires", "2001-01-01T00:00Z"),
    ],
)
def test_errors_are_reported_not_raised(sdserve, argv):
    code, out, err = sdserve(*argv)
    assert code == 1 and out == "" and err.startswith("error: ")


def test_bad_amounts_and_dates_are_usage_errors(sdserve):
    for argv in [
        ("keys", "topup", "a", "0.0000001"),
        ("usage", "--since", "March"),
        ("keys", "create", "--name", "n", "--plan", "free", "--expires", "2027-01-31"),
        ("keys", "expire", "a", "--at", "soon"),
    ]:
        with pytest.raises(SystemExit):
            sdserve(*argv)


def test_usage_table_and_json(sdserve):
    sdserve("keys", "create", "--name", "alice", "--plan", "pay_per_use", "--balance", "1")
    engine = make_engine(sdserve.settings.database_url)
    sessions = make_sessionmaker(engine)
    key = KeyStore(sessions).find("alice")
    jobs = JobStore(sessions, PlanLimits.from_settings(sdserve.settings))
    for samples in (1, 2):
        job = jobs.create(
            request_id=str(uuid.uuid4()), key=key, model_id="stable-diffu", samples=samples,
            params={}, meta={}, output_names=[], unit_price=Decimal("0.0047"),
        )  # fmt: skip
        jobs.finish(job.id, generation_time=1.0)
    engine.dispose()

    code, out, _ = sdserve("usage", "--key", "alice", "--since", "2000-01-01")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["KEY", "PLAN", "MODEL", "IMAGES", "AMOUNT_USD"],
        ["alice", "pay_per_use", "stable-diffu", "3", "0.0141"],
        ["TOTAL", "3", "0.0141"],
    ]
    code, out, _ = sdserve("usage", "--json")
    assert code == 0 and json.loads(out) == {
        "usage": [
            {"key_id": 1, "key": "alice", "plan": "pay_per_use", "model_id": "stable-diffu",
             "images": 3, "amount_usd": "0.0141"}
        ],
        "total_images": 3,
        "total_amount_usd": "0.0141",
    }  # fmt: skip
    code, out, _ = sdserve("usage", "--since", "2999-01-01", "--json")
    assert json.loads(out)["usage"] == []


@pytest.mark.parametrize(
    ("argv", "argument", "says"),
    [
        (("keys", "topup", "team-a", "9999999999999"), "usd", "at most 1000000000 USD"),
        (("keys", "create", "--name", "big", "--plan", "pay_per_use", "--balance", "1e20"),
         "--balance", "at most 1000000000 USD"),
        (("keys", "create", "--name", "n", "--plan", "free", "--expires", "9999999d"),
         "--expires", "out of range"),
        (("keys", "expire", "a", "--at", "99999999999999999999h"), "--at", "out of range"),
        (("keys", "create", "--name", "n", "--plan", "free", "--expires",
          "9999-12-31T23:00-05:00"), "--expires", "out of range"),
    ],
)  # fmt: skip
def test_out_of_range_amounts_and_expiries_are_usage_errors(sdserve, capsys, argv, argument, says):
    with pytest.raises(SystemExit) as exited:
        sdserve(*argv)
    assert exited.value.code == 2
    _, err = capsys.readouterr()
    [message] = [line for line in err.splitlines() if "error:" in line]
    assert f"argument {argument}: " in message and says in message
    assert "Traceback" not in err


def test_a_top_up_past_the_largest_balance_is_refused(sdserve):
    sdserve("keys", "create", "--name", "team-a", "--plan", "pay_per_use", "--balance", "999999999")
    code, out, err = sdserve("keys", "topup", "team-a", "2")
    assert (code, out) == (1, "")
    assert err == (
        "error: a top-up of 2 USD would bring key 'team-a''s balance to 1000000001 USD; "
        "a balance is at most 1000000000 USD\n"
    )
    assert sdserve("keys", "topup", "team-a", "1")[1].endswith("balance 1000000000 USD.\n")


def test_keys_are_named_or_numbered(sdserve):
    sdserve("keys", "create", "--name", "team-a", "--plan", "pay_per_use")
    sdserve("keys", "create", "--name", "1", "--plan", "pay_per_use")  # id 2
    code, out, _ = sdserve("keys", "topup", "2", "5")  # no key is named "2": the id
    assert code == 0 and "to '1': balance 5 USD" in out
    code, out, _ = sdserve("keys", "revoke", "1")  # the key named "1", not ID 1
    assert code == 0 and "Revoked key '1' (id 2)" in out
    code, out, _ = sdserve("keys", "expire", "2", "--never")
    assert code == 0 and "Key '1' (id 2) never expires" in out
    code, _, _ = sdserve("usage", "--key", "2")
    assert code == 0
    code, out, err = sdserve("keys", "revoke", "3")
    assert (code, out, err) == (1, "", "error: No API key named or numbered '3'\n")
    assert [line.split()[-1] for line in sdserve("keys", "list")[1].splitlines()] == [
        "STATUS", "active", "revoked"
    ]  # fmt: skip


def test_the_key_argument_help_says_it_takes_an_id(sdserve, capsys):
    for command in ("revoke", "topup", "expire"):
        with pytest.raises(SystemExit):
            sdserve("keys", command, "--help")
        text = " ".join(capsys.readouterr().out.split())  # as argparse wraps it
        assert "name the key's name, or its ID (keys list) when no key has that name" in text


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u@127.0.0.1:1/db", "notaurl", "sqlite:////proc/nope/db"]
)
def test_a_database_that_cannot_be_opened_is_one_line_naming_the_setting(url, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("SDSERVE_DATABASE_URL", url)
    assert main(["keys", "list"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("sdserve: SDSERVE_DATABASE_URL: the database cannot be opened: ")
    assert "Traceback" not in said and len(said.strip().splitlines()) == 1
