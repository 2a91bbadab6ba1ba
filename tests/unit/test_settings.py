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
        ({"default_price_per_image_usd": "-1"}, "default_price_per_image_usd must not be negative"),
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


def refusal(**fields) -> str:
    """The refusal as `sdserve` prints it: one `field: rule` line per problem (service.cli)."""
    with pytest.raises(ValidationError) as refused:
        Settings(**fields)
    lines = []
    for problem in refused.value.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_steps": 0}, "max_steps: Input should be greater than or equal to 1"),
        ({"max_body_bytes": -1}, "max_body_bytes: Input should be greater than or equal to 1"),
        ({"webhook_attempts": 0}, "webhook_attempts: Input should be greater than or equal to 1"),
        ({"min_size": -8}, "min_size: Input should be greater than or equal to 1"),
        ({"max_size": -8}, "max_size: Input should be greater than or equal to 8"),
        ({"min_size": 2048}, "min_size 2048 is above max_size 1024"),
        ({"min_size": 1001, "max_size": 1007}, "min_size 1001 to max_size 1007 holds no multiple"),
        ({"sync_window_s": -1}, "sync_window_s: Input should be greater than or equal to 0"),
        ({"webhook_timeout_s": -3}, "webhook_timeout_s: Input should be greater than 0"),
        (
            {"webhook_backoff_s": -1},
            "webhook_backoff_s: Input should be greater than or equal to 0",
        ),
        ({"eta_seconds_per_step": 0}, "eta_seconds_per_step: Input should be greater than 0"),
        ({"sync_window_s": "inf"}, "sync_window_s: Input should be a finite number"),
        ({"heartbeat_interval_s": "nan"}, "heartbeat_interval_s: Input should be a finite number"),
    ],
)
def test_bounds_and_durations_that_would_refuse_every_request_are_refused(fields, message):
    assert message in refusal(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"sync_window_s": 0},  # answer 'processing' at once
        {"webhook_backoff_s": 0},  # retry at once
        {"max_size": 500},  # the largest size allowed is 496 (tests/api/test_protocol.py)
        {"min_size": 250, "max_size": 256},
        {"heartbeat_interval_s": 0.5, "orphan_after_s": 1},
        {"device": "cuda:1"},
        {"batch_buckets": [2]},
        {"public_base_url": "https://sdserve.example.com/api"},
    ],
)
def test_values_with_a_meaning_are_kept(fields):
    assert Settings(**fields).model_dump(include=set(fields)) == fields


@pytest.mark.parametrize("buckets", [[], [0], [-4, 8], [1, 2]])
def test_batch_buckets_hold_at_least_one_guided_image(buckets):
    assert "batch_buckets: batch_buckets needs at least one bucket, each of at least 2 rows" in (
        refusal(batch_buckets=buckets)
    )


@pytest.mark.parametrize("field", ["public_base_url", "image_url_base"])
@pytest.mark.parametrize("url", ["localhost:8000", "sdserve.example.com", "http://", "ftp://x"])
def test_returned_urls_must_be_http_urls_with_a_host(field, url):
    assert f"{field}: {url!r} is not an http:// or https:// URL with a host" in refusal(
        **{field: url}
    )


def test_orphans_are_jobs_that_missed_two_heartbeats():
    defaults = Settings()
    assert defaults.orphan_after_s >= 2 * defaults.heartbeat_interval_s
    assert (
        "orphan_after_s 5 must be at least 2 x heartbeat_interval_s (10): else the jobs of a "
        "live replica are taken over"
    ) in refusal(orphan_after_s=5)
    assert "orphan_after_s 30 must be at least 2 x heartbeat_interval_s (40)" in refusal(
        heartbeat_interval_s=20
    )
    assert Settings(heartbeat_interval_s=15).orphan_after_s == 30


@pytest.mark.parametrize(("name", "size"), [("width", 100), ("height", 0), ("width", -512)])
def test_a_models_size_is_a_positive_multiple_of_8(name, size):
    models = {"stable-diffu": {"path": "m", name: size}}
    assert f"models.stable-diffu.{name} must be a positive multiple of 8, got {size}" in (
        refusal(models=models)
    )
    assert Settings(models={"stable-diffu": {"path": "m", name: 512}})


def test_prices_of_models_not_served_are_refused():
    message = refusal(
        models={"stable-diffu": "a", "sdxl": "b"}, prices_usd={"stable-difu": "0.01", "sd": "1"}
    )
    assert (
        "prices_usd names model(s) 'sd', 'stable-difu' that are not in models (it would price "
        "nothing); models: sdxl, stable-diffu"
    ) in message
    assert Settings(prices_usd={"stable-diffu": "0.01"}).prices_usd


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "mps", ""])
def test_device_is_one_the_engine_runs_on(device):
    assert f"device: device must be auto, cpu, cuda or cuda:N (N: a GPU index), got {device!r}" in (
        refusal(device=device)
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"prices_usd": {"stable-diffu": "1e-7"}},
            "prices_usd.stable-diffu: 1E-7 USD is finer than a micro-dollar (0.000001 USD)",
        ),
        (
            {"demo_key_balance_usd": 0.1234567},
            "demo_key_balance_usd: 0.1234567 USD is finer than a micro-dollar",
        ),
        (
            {"models": {"stable-diffu": {"path": "m", "price_per_image_usd": "0.00470001"}}},
            "models.stable-diffu.price_per_image_usd: 0.00470001 USD is finer than a micro-dollar",
        ),
        (
            {"default_price_per_image_usd": "0.0047001"},
            "default_price_per_image_usd: 0.0047001 USD is finer than a micro-dollar",
        ),
        (
            {"prices_usd": {"stable-diffu": "-0.01"}},
            "prices_usd.stable-diffu must not be negative, got -0.01 USD",
        ),
        ({"default_price_per_image_usd": "Infinity"}, "default_price_per_image_usd: Input should"),
    ],
)
def test_an_inexact_price_names_its_setting(fields, message):
    assert message in refusal(**fields)


@pytest.mark.parametrize("name", ["lora_dir", "embeddings_dir", "vae_dir"])
def test_a_folder_that_is_set_but_missing_is_named(tmp_path, name):
    """Checked by `check_folders`, not when the settings are read: the Ray head builds the
    application and need not mount the folders the generators read."""
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"^{name} {missing} is not a folder"):
        Settings(**{name: str(missing)}).check_folders()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"^{name} .*file is not a folder"):
        Settings(**{name: str(tmp_path / "file")}).check_folders()
    Settings(**{name: str(tmp_path)}).check_folders()  # a folder, even empty
    Settings(**{name: ""}).check_folders()  # empty: none, like unset
    Settings().check_folders()  # the defaults: none


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
