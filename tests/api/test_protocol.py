"""The request model: coercion of what real clients send, and one message per broken rule."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.protocol import MAX_SEED, RequestError, Text2ImgRequest, UsageRequest
from service.config import Settings
from service.registry import ModelInfo
from service.store.jobs import Job
from service.store.keys import ApiKey
from tests.recording import HOSTED_API_NULLS

SIZES = {
    "stable-diffu": ModelInfo("stable-diffu", Path("m"), 768, 768, 30, "v_prediction", 768, 768),
    "other": ModelInfo("other", Path("o"), 512, 512, 20, "epsilon", 512, 512),
}
LORAS = ("style", "detail")


def params(settings=None, **fields):
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "a cat", **fields})
    return body.to_params(settings or Settings(), SIZES, LORAS)


def error_of(**fields) -> str:
    with pytest.raises(RequestError) as info:
        params(**fields)
    return str(info.value)


def test_defaults_follow_the_model():
    p, options = params()
    assert (p.model_id, p.width, p.height, p.samples) == ("stable-diffu", 768, 768, 1)
    assert (p.num_inference_steps, p.guidance_scale, p.scheduler) == (
        30,
        7.5,
        "UniPCMultistepScheduler",
    )
    assert p.use_karras_sigmas is True and p.clip_skip == 1
    assert 1 <= p.seed <= MAX_SEED
    assert options["base64"] is False and options["instant_response"] is False
    other, _ = params(model_id="other")
    assert (other.width, other.num_inference_steps, other.loras) == (512, 20, ())


def test_loras_and_strengths():
    assert params(lora_model="style")[0].loras == (("style", 1.0),)
    assert params(lora_model="style, detail", lora_strength="0.5")[0].loras == (
        ("style", 0.5),
        ("detail", 0.5),
    )
    assert params(lora_model="style,detail", lora_strength="0.3,0.9")[0].loras == (
        ("style", 0.3),
        ("detail", 0.9),
    )


def test_numbers_as_strings_and_toggles_as_words():
    p, options = params(
        width="512",
        height=" 256 ",
        samples="2",
        num_inference_steps="20.0",
        guidance_scale="5",
        seed="1234",
        use_karras_sigmas="no",
        base64="yes",
        instant_response=True,
        temp="false",
        clip_skip="2",
    )
    assert (p.width, p.height, p.samples, p.num_inference_steps) == (512, 256, 2, 20)
    assert (p.guidance_scale, p.seed, p.use_karras_sigmas, p.clip_skip) == (5.0, 1234, False, 2)
    assert options["base64"] is True and options["instant_response"] is True
    assert options["temp"] is False


@pytest.mark.parametrize("unset", [None, "", "null", "None"])
def test_a_toggle_sent_as_null_in_any_spelling_takes_its_default(unset):
    p, options = params(use_karras_sigmas=unset, base64=unset, upscale=unset)
    assert p.use_karras_sigmas is True and options["base64"] is False and p.upscale == 1


@pytest.mark.parametrize("seed", [None, "", -1, "-1", 0, "0", "null"])
def test_every_spelling_of_random_seed(seed):
    seeds = {params(seed=seed)[0].seed for _ in range(5)}
    assert len(seeds) > 1


def test_scheduler_without_suffix_and_algorithm_type():
    p, _ = params(scheduler="DPMSolverMultistep", algorithm_type="dpmsolver+++")
    assert p.scheduler == "DPMSolverMultistepScheduler" and p.algorithm_type == "dpmsolver+++"
    assert params(algorithm_type="none")[0].algorithm_type is None
    shouted, _ = params(scheduler="dpmsolvermultistep", algorithm_type="DPMSolver+++")
    assert shouted.algorithm_type == "dpmsolver+++"  # any letter case, as scheduler names


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"width": 250}, "width must be a multiple of 8 between 256 and 1024"),
        ({"width": 1032}, "width must be a multiple of 8 between 256 and 1024"),
        ({"height": 513}, "height must be a multiple of 8 between 256 and 1024"),
        ({"samples": 5}, "samples must be an integer between 1 and 4"),
        ({"samples": "0"}, "samples must be an integer between 1 and 4"),
        ({"num_inference_steps": 51}, "num_inference_steps must be an integer between 1 and 50"),
        ({"guidance_scale": 25}, "guidance_scale must be a number between 1 and 20"),
        ({"clip_skip": 9}, "clip_skip must be an integer between 1 and 8"),
        ({"scheduler": "Nope"}, "scheduler must be one of: "),
        ({"model_id": "sdxl"}, "model_id 'sdxl' is not available; available models: other, "),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"webhook": "ftp://x"}, "webhook must be an http:// or https:// URL"),
        ({"algorithm_type": "bogus"}, "algorithm_type must be one of: none, "),
        ({"lora_model": "foo"}, "lora_model 'foo' is not available; available LoRAs: detail, "),
        ({"lora_model": "style", "lora_strength": "2"}, "lora_strength must be between 0.1"),
        ({"lora_model": "style,detail", "lora_strength": "0.5,0.5,0.5"}, "one per lora_model"),
        ({"lora_model": "style,style"}, "must not name the same LoRA twice"),
    ],
)
def test_each_rule_names_the_field(fields, expected):
    assert expected in error_of(**fields)


def test_several_broken_rules_are_all_reported():
    message = error_of(width=100, samples=9)
    assert "width must be" in message and "samples must be" in message


def test_operator_bounds_apply():
    settings = Settings(min_size=64, max_size=512, max_steps=10)
    assert params(settings, width=64, height=64)[0].width == 64
    with pytest.raises(
        RequestError, match="num_inference_steps must be an integer between 1 and 10"
    ):
        params(settings, num_inference_steps=20)
    assert params(settings, width=64, height=64)[0].num_inference_steps == 10  # 30, capped


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"guidance_scale": "NaN"}, "must be a finite number between 1 and 20"),
        ({"guidance_scale": "inf"}, "must be a finite number between 1 and 20"),
        ({"guidance_scale": "abc"}, "guidance_scale\n  Value error, must be a number between 1"),
        ({"base64": "maybe"}, 'must be "yes" or "no"'),
        ({"seed": 2**40}, "must be an integer between 1 and"),
        ({"seed": -5}, "must be an integer between 1 and"),
        ({"seed": "abc"}, f"must be an integer between 1 and {MAX_SEED}, or null/-1 for random"),
        ({"seed": 1.5}, f"must be an integer between 1 and {MAX_SEED}, or null/-1 for random"),
        ({"prompt": ["a", "b"]}, "must be a string"),
    ],
)
def test_coercion_errors(fields, expected):
    with pytest.raises(ValidationError) as info:
        Text2ImgRequest.model_validate({"key": "k", "prompt": "a cat", **fields})
    assert expected in str(info.value)


def test_unknown_fields_are_kept_aside_and_not_applied_ones_reported():
    body = Text2ImgRequest.model_validate(
        {"key": "k", "prompt": "x", "watermark": "no", "panorama": "yes", "tomesd": "no"}
    )
    assert body.ignored_fields() == ["panorama", "watermark"]
    _, options = body.to_params(Settings(), SIZES, LORAS)
    assert options["not_applied"] == ["panorama"]
    _, options = params(safety_checker="yes")
    assert any("safety_checker" in item for item in options["not_applied"])


def test_safety_checker_runs_only_where_one_is_configured():
    configured = Settings(safety_checker="/models/checker")
    asked, options = params(configured, safety_checker="yes", safety_checker_type="blur")
    assert asked.safety_checker and asked.safety_checker_type == "blur"
    assert options["not_applied"] == []
    not_asked, _ = params(configured, safety_checker="no")
    assert not not_asked.safety_checker
    assert not_asked.safety_checker_type == "sensitive_content_text"  # the default treatment

    enforced = Settings(safety_checker="/models/checker", safety_checker_mode="always")
    assert params(enforced, safety_checker="no")[0].safety_checker

    unconfigured, options = params(safety_checker="yes")
    assert not unconfigured.safety_checker
    assert options["not_applied"] == ["safety_checker (no safety checker model is configured)"]


def test_safety_checker_type_must_be_a_known_treatment():
    message = error_of(safety_checker="yes", safety_checker_type="blurry")
    assert message == (
        "safety_checker_type must be one of: sensitive_content_text, blur, pixelate, black"
    )
    assert params(safety_checker_type=" PIXELATE ")[0].safety_checker_type == "pixelate"


def test_embeddings_model_names_embeddings_of_the_folder():
    body = Text2ImgRequest.model_validate(
        {"key": "k", "prompt": "a moody cat", "embeddings_model": " moody, glow ,moody"}
    )
    p, options = body.to_params(Settings(), SIZES, LORAS, ["glow", "moody"])
    assert p.embeddings == ("moody", "glow")
    assert "embeddings_model" not in options["not_applied"]
    assert params(embeddings_model=None)[0].embeddings == ()


def test_an_unknown_embedding_is_dropped_and_reported_not_applied():
    body = Text2ImgRequest.model_validate(
        {"key": "k", "prompt": "x", "embeddings_model": "dark, moody, blue"}
    )
    p, options = body.to_params(Settings(), SIZES, LORAS, ["moody"])
    assert p.embeddings == ("moody",)
    assert options["not_applied"] == [
        "embeddings_model 'dark' (not available; available embeddings: moody)",
        "embeddings_model 'blue' (not available; available embeddings: moody)",
    ]
    p, options = params(embeddings_model="dark")  # a server without embeddings
    assert p.embeddings == ()
    assert options["not_applied"] == [
        "embeddings_model 'dark' (not available; available embeddings: none)"
    ]


def test_vae_names_a_vae_of_the_folder_or_the_models_own():
    vaes = ["ft-mse", "anime"]

    def vae_of(value):
        body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "vae": value})
        return body.to_params(Settings(), SIZES, LORAS, (), vaes)[0].vae

    assert vae_of(" ft-mse ") == "ft-mse"
    for own in (None, "", "null", "default", "None", "auto"):
        assert vae_of(own) is None, own
    _, options = Text2ImgRequest.model_validate(
        {"key": "k", "prompt": "x", "vae": "anime"}
    ).to_params(Settings(), SIZES, LORAS, (), vaes)
    assert "vae" not in options["not_applied"]


def test_an_unknown_vae_is_dropped_and_reported_not_applied():
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "vae": "kl-f8"})
    p, options = body.to_params(Settings(), SIZES, LORAS, (), ["ft-mse", "anime"])
    assert p.vae is None  # the model's own VAE decodes
    assert options["not_applied"] == ["vae 'kl-f8' (not available; available VAEs: anime, ft-mse)"]
    with pytest.raises(ValidationError) as info:  # a value that is no id stays an error
        Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "vae": ["anime"]})
    assert "vae\n  Value error, must be a string" in str(info.value)


@pytest.mark.parametrize(
    ("value", "factor"),
    [
        ("yes", 2), (True, 2), ("2", 2), (3, 3), ("4x", 4), (" 4 ", 4), (4.0, 4),
        ("no", 1), (False, 1), ("", 1), (None, 1), (0, 1), ("1", 1),
    ],
)  # fmt: skip
def test_upscale_is_yes_or_a_factor(value, factor):
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "upscale": value})
    p, options = body.to_params(Settings(upscaler="/models/x2.pth"), SIZES, LORAS)
    assert p.upscale == factor
    assert options["not_applied"] == []


@pytest.mark.parametrize("value", ["maybe", 5, "8x", -2, 2.5, [2]])
def test_other_upscale_values_are_refused_naming_the_field(value):
    with pytest.raises(ValidationError) as info:
        Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "upscale": value})
    assert 'must be "no", "yes" (2x) or a factor of 2, 3 or 4' in str(info.value)


def test_upscale_without_an_upscaler_is_reported_not_applied():
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "upscale": "yes"})
    p, options = body.to_params(Settings(), SIZES, LORAS)
    assert p.upscale == 1
    assert options["not_applied"] == ["upscale (no upscaler model is configured)"]


def test_tomesd_asks_for_token_merging_unless_the_server_turned_it_off():
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "tomesd": "yes"})
    p, options = body.to_params(Settings(), SIZES, LORAS)
    assert p.tomesd and options["not_applied"] == []
    assert not params(tomesd="no")[0].tomesd and not params()[0].tomesd
    p, options = body.to_params(Settings(tomesd_ratio=0), SIZES, LORAS)
    assert not p.tomesd
    assert options["not_applied"] == ["tomesd (token merging is off on this server)"]
    assert p.batch_key() != body.to_params(Settings(), SIZES, LORAS)[0].batch_key()


def test_self_attention_applies_with_integer_timestep_schedulers_only():
    guided, options = params(self_attention="yes", scheduler="DDIM")
    assert guided.self_attention and options["not_applied"] == []
    assert not params(self_attention="no")[0].self_attention
    euler, options = params(self_attention="yes", scheduler="EulerDiscreteScheduler")
    assert not euler.self_attention
    assert options["not_applied"] == [
        "self_attention (needs a scheduler with integer timesteps, not EulerDiscreteScheduler)"
    ]


def test_highres_fix_applies_above_the_native_pixel_count():
    fixed, options = params(highres_fix="yes", width=1024, height=1024)
    assert fixed.highres_fix and options["not_applied"] == []
    assert fixed.batch_key() != params(width=1024, height=1024)[0].batch_key()
    native, options = params(highres_fix="yes", width=768, height=768)
    assert not native.highres_fix
    assert options["not_applied"] == [
        "highres_fix (768x768 is not above the model's native 768x768)"
    ]
    assert params(model_id="other", highres_fix="yes", width=512, height=640)[0].highres_fix
    ipndm, options = params(highres_fix="yes", width=1024, height=1024, scheduler="IPNDM")
    assert not ipndm.highres_fix
    assert options["not_applied"] == ["highres_fix (IPNDMScheduler cannot re-noise latents)"]


def test_a_scheduler_combination_the_engine_cannot_build_is_an_error_before_queueing():
    message = error_of(scheduler="DPMSolverSinglestep", algorithm_type="sde-dpmsolver")
    assert "algorithm_type: 'sde-dpmsolver' is not supported by DPMSolverSinglestepScheduler" in (
        message
    )
    with pytest.raises(RequestError, match="num_inference_steps: 60 is out of range for LCM"):
        params(Settings(max_steps=100), scheduler="LCM", num_inference_steps=60)
    assert params(Settings(max_steps=100), num_inference_steps=60)[0].num_inference_steps == 60


def test_scheduler_options_that_do_not_apply_are_said_not_applied():
    p, options = params(algorithm_type="dpmsolver+++")
    assert p.scheduler == "UniPCMultistepScheduler" and p.algorithm_type is None
    assert "algorithm_type (UniPCMultistepScheduler does not take one)" in options["not_applied"]

    p, options = params(scheduler="DDIM", use_karras_sigmas="yes")
    assert p.use_karras_sigmas is False
    assert "use_karras_sigmas (DDIMScheduler has no sigma schedule)" in options["not_applied"]

    p, options = params(scheduler="DDIM")
    assert p.use_karras_sigmas is False and options["not_applied"] == []
    p, options = params(scheduler="EulerDiscrete", use_karras_sigmas="yes")
    assert p.use_karras_sigmas is True and options["not_applied"] == []


# ---- blank-like text, stored lengths, default sizes, clip_skip, type errors -------------------

BLANK_SPELLINGS = [None, "", "null", "none", "NULL", " None ", "  "]
# Optional text fields, with a value each that changes what a request resolves to.
TEXT_FIELDS = {
    "model_id": "other",
    "negative_prompt": "blurry",
    "scheduler": "DDIM",
    "algorithm_type": "dpmsolver+++",
    "lora_model": "style",
    "lora_strength": "0.5",
    "embeddings_model": "moody",
    "vae": "anime",
    "safety_checker_type": "blur",
    "webhook": "https://example.com/hook",
    "track_id": "order-17",
}


def resolved(**fields):
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "a cat", "seed": 7, **fields})
    p, options = body.to_params(Settings(), SIZES, LORAS, ["moody"], ["anime"])
    return p, options


@pytest.mark.parametrize("blank", BLANK_SPELLINGS)
@pytest.mark.parametrize("field", sorted(TEXT_FIELDS))
def test_a_blank_like_text_field_is_not_set(field, blank):
    """What the hosted API's docs put in their examples ("webhook": "null", "scheduler":
    "none", ...) means "not set": the request resolves as if the field were omitted."""
    assert resolved(**{field: blank}) == resolved()


def test_the_text_fields_tried_for_blank_spellings_do_change_a_request():
    for field, value in TEXT_FIELDS.items():
        if field == "lora_strength":
            assert resolved(lora_model="style", lora_strength=value) != resolved(lora_model="style")
        else:
            assert resolved(**{field: value}) != resolved(), field


def test_hosted_api_example_values_are_served_with_defaults():
    p, options = resolved(**HOSTED_API_NULLS)
    assert options["webhook"] is None and options["track_id"] is None
    assert p.negative_prompt == "" and p.scheduler == "UniPCMultistepScheduler"
    assert p.loras == () and p.embeddings == () and p.vae is None and p.algorithm_type is None
    assert options["not_applied"] == []


@pytest.mark.parametrize("prompt", [None, "", "null", "NONE", " none "])
def test_a_null_prompt_is_refused_as_missing(prompt):
    assert error_of(prompt=prompt) == "prompt must be a non-empty string"


def test_text_that_only_contains_null_is_kept():
    p, options = resolved(negative_prompt="null hypothesis", track_id="none-17")
    assert p.negative_prompt == "null hypothesis" and options["track_id"] == "none-17"
    assert params(prompt="null island")[0].prompt == "null island"


def column_length(table, name: str) -> int | None:
    return table.__table__.c[name].type.length


@pytest.mark.parametrize(
    ("field", "column", "text"),
    [
        ("track_id", column_length(Job, "track_id"), "t"),
        ("model_id", column_length(Job, "model_id"), "m"),
        ("webhook", None, "https://example.com/" + "h"),  # a Text column: bounded here anyway
    ],
)
def test_stored_text_fields_are_bounded_below_their_column(field, column, text):
    """A value longer than its column is a named error here, never a database error (HTTP 500
    on PostgreSQL) when the job row is written."""
    limit = Text2ImgRequest.model_json_schema()["properties"][field]["maxLength"]
    if column is not None:
        assert limit <= column
    too_long = text.ljust(limit + 1, "x")
    with pytest.raises(ValidationError) as info:
        Text2ImgRequest.model_validate({"key": "k", "prompt": "x", field: too_long})
    assert f"must be at most {limit} characters" in str(info.value)
    assert str(info.value).splitlines()[1] == field
    fits = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", field: too_long[:limit]})
    assert getattr(fits, field) == too_long[:limit]


def test_track_id_of_its_column_length_is_stored_as_sent():
    limit = column_length(Job, "track_id")
    assert resolved(track_id="é" * limit)[1]["track_id"] == "é" * limit
    with pytest.raises(ValidationError, match=f"must be at most {limit} characters"):
        resolved(track_id="é" * (limit + 1))


def test_usage_key_name_is_bounded_by_the_key_name_column():
    limit = column_length(ApiKey, "name")
    assert UsageRequest.model_validate({"key": "k", "key_name": "n" * limit}).key_name
    with pytest.raises(ValidationError, match=f"must be at most {limit} characters"):
        UsageRequest.model_validate({"key": "k", "key_name": "n" * (limit + 1)})
    assert UsageRequest.model_validate({"key": "k", "key_name": "null"}).key_name is None


@pytest.mark.parametrize(
    ("bounds", "model_id", "size"),
    [
        ({"max_size": 512}, "stable-diffu", 512),  # 768 native, capped
        ({"max_size": 500}, "stable-diffu", 496),  # the largest multiple of 8 allowed
        ({"min_size": 640}, "other", 640),  # 512 native, raised to the smallest allowed
        ({"max_size": 512}, "other", 512),  # already within the bounds
    ],
)
def test_the_models_default_size_is_kept_within_the_operators_bounds(bounds, model_id, size):
    settings = Settings(**bounds)
    p, _ = params(settings, model_id=model_id)
    assert (p.width, p.height) == (size, size)
    assert settings.min_size <= p.width <= settings.max_size and p.width % 8 == 0
    only_width, _ = params(settings, model_id=model_id, width=size)
    assert (only_width.width, only_width.height) == (size, size)


def test_clip_skip_is_bounded_by_the_models_text_encoder_depth():
    shallow = {
        "tiny": ModelInfo("tiny", Path("t"), 512, 512, 30, "epsilon", 512, 512, 5),
        "deep": ModelInfo("deep", Path("d"), 512, 512, 30, "epsilon", 512, 512, 23),
    }

    def clip_skip_of(model_id, clip_skip):
        body = Text2ImgRequest.model_validate(
            {"key": "k", "prompt": "x", "model_id": model_id, "clip_skip": clip_skip}
        )
        return body.to_params(Settings(default_model_id="stable-diffu"), shallow)[0].clip_skip

    assert clip_skip_of("tiny", 5) == 5
    with pytest.raises(RequestError) as info:
        clip_skip_of("tiny", 6)
    assert str(info.value) == (
        "clip_skip must be an integer between 1 and 5 (the text encoder of 'tiny' has 5 layers)"
    )
    assert clip_skip_of("deep", 8) == 8
    with pytest.raises(RequestError, match="^clip_skip must be an integer between 1 and 8$"):
        clip_skip_of("deep", 9)
    # a model whose depth is unknown keeps 1..8
    assert params(clip_skip=8)[0].clip_skip == 8


@pytest.mark.parametrize(
    ("settings", "fields", "expected"),
    [
        ({}, {"width": "abc"}, "width must be a multiple of 8 between 256 and 1024"),
        ({}, {"height": 512.5}, "height must be a multiple of 8 between 256 and 1024"),
        (
            {"min_size": 64, "max_size": 512},
            {"width": True},
            "width must be a multiple of 8 between 64 and 512",
        ),
        ({}, {"samples": "two"}, "samples must be an integer between 1 and 4"),
        ({"max_samples": 8}, {"samples": [2]}, "samples must be an integer between 1 and 8"),
        (
            {"max_steps": 20},
            {"num_inference_steps": "many"},
            "num_inference_steps must be an integer between 1 and 20",
        ),
        ({}, {"clip_skip": "x"}, "clip_skip must be an integer between 1 and 8"),
    ],
)
def test_a_value_of_the_wrong_type_gets_the_fields_rule(settings, fields, expected):
    assert error_of(settings=Settings(**settings), **fields) == expected


def test_wrong_types_are_reported_with_the_other_broken_rules():
    message = error_of(width="wide", samples=9, prompt="")
    assert message == (
        "prompt must be a non-empty string; width must be a multiple of 8 between 256 and 1024; "
        "samples must be an integer between 1 and 4"
    )
