"""Settings refuse what a replica could not run with, when they are read: `sdserve` exits with
the field and the rule instead of every replica failing after Ray has started."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.cli import main
from service.config import Settings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"free_images_per_month": -1}, "free_images_per_month must not be negative"),
        ({"default_price_per_image_usd": "-1"}, "default price must not be negative"),
        ({"prices_usd": {"stable-diffu": "0.00000001"}}, "finer than a micro-dollar"),
        ({"demo_key_balance_usd": "-1"}, "demo_key_balance_usd must not be negative"),
        ({"demo_key_balance_usd": "0.0000001"}, "finer than a micro-dollar"),
        ({"gpu_hour_price_usd": "-2"}, "gpu_hour_price_usd must not be negative"),
        ({"max_concurrent_requests": {"gold": 3}}, "unknown plan(s) ['gold']; plans: free, "),
        ({"max_concurrent_requests": {"free": 0}}, "at least 1 for every plan"),
        ({"default_model_id": "nope"}, "model 'nope' (default_model_id / preload_models)"),
        ({"preload_models": ["stable-diffu", "x"]}, "model 'x' (default_model_id / preload"),
        (
            {"models": {"stable-diffu": {"path": "m", "default_steps": 80}}},
            "models.stable-diffu.default_steps 80 is above max_steps 50",
        ),
        ({"max_samples": 100}, "max_samples must be between 1 and 99"),
        ({"max_samples": 0}, "max_samples must be between 1 and 99"),
    ],
)
def test_unusable_settings_are_refused_with_the_rule(fields, message):
    with pytest.raises(ValidationError) as refused:
        Settings(**fields)
    assert message in str(refused.value)


def test_plans_not_named_keep_their_default_limit():
    assert Settings(max_concurrent_requests={"free": 2}).max_concurrent_requests == {
        "free": 2,
        "pay_per_use": 10,
        "premium": 15,
    }


def test_the_cli_says_which_setting_is_wrong_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SDSERVE_DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite")
    monkeypatch.setenv("SDSERVE_FREE_IMAGES_PER_MONTH", "-1")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "free_images_per_month must not be negative" in err
    assert "Traceback" not in err


def test_a_mistyped_variable_is_named_with_the_setting_it_resembles(monkeypatch, caplog):
    from service.config import load_settings

    monkeypatch.setenv("SDSERVE_MODEL", '{"stable-diffu": "x"}')
    monkeypatch.setenv("SDSERVE_URL", "http://elsewhere")  # the chart's test pod reads it
    with caplog.at_level("WARNING", logger="service.config"):
        load_settings()
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "SDSERVE_MODEL is not an sdserve setting: ignored; did you mean SDSERVE_MODELS?"
    ]


def test_max_samples_is_bounded_by_the_output_names():
    """The store serves only `{32 hex}-{index}` names with an index of at most two digits:
    every image of the largest request allowed must have a name it serves."""
    from service.store.images import IMAGE_NAME, output_names

    largest = Settings(max_samples=99).max_samples
    names = output_names("0" * 32, largest, as_base64=False, temp=False)
    assert all(IMAGE_NAME.fullmatch(name) for name in names)
    with pytest.raises(ValidationError, match=f"max_samples must be between 1 and {largest}"):
        Settings(max_samples=largest + 1)


def test_the_cli_names_a_max_samples_too_large(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SDSERVE_DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite")
    monkeypatch.setenv("SDSERVE_MAX_SAMPLES", "150")
    assert main(["keys", "list"]) == 2
    assert "max_samples: max_samples must be between 1 and 99" in capsys.readouterr().err
