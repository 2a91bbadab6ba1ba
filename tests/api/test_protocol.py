"""The request model: coercion of what real clients send, and one message per broken rule."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.protocol import MAX_SEED, RequestError, Text2ImgRequest
from service.config import Settings
from service.registry import ModelInfo

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
        ({"width": "abc"}, "must be an integer"),
        ({"width": 512.5}, "must be an integer"),
        ({"guidance_scale": "NaN"}, "must be a finite number"),
        ({"guidance_scale": "inf"}, "must be a finite number"),
        ({"base64": "maybe"}, 'must be "yes" or "no"'),
        ({"seed": 2**40}, "must be an integer between 1 and"),
        ({"seed": -5}, "must be an integer between 1 and"),
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
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "embeddings_model": "dark"})
    with pytest.raises(RequestError) as info:
        body.to_params(Settings(), SIZES, LORAS, ["moody"])
    assert (
        str(info.value) == "embeddings_model 'dark' is not available; available embeddings: moody"
    )
    assert params(embeddings_model=None)[0].embeddings == ()


def test_vae_names_a_vae_of_the_folder_or_the_models_own():
    vaes = ["ft-mse", "anime"]

    def vae_of(value):
        body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "vae": value})
        return body.to_params(Settings(), SIZES, LORAS, (), vaes)[0].vae

    assert vae_of(" ft-mse ") == "ft-mse"
    for own in (None, "", "null", "default", "None", "auto"):
        assert vae_of(own) is None, own
    body = Text2ImgRequest.model_validate({"key": "k", "prompt": "x", "vae": "kl-f8"})
    with pytest.raises(RequestError) as info:
        body.to_params(Settings(), SIZES, LORAS, (), vaes)
    assert str(info.value) == "vae 'kl-f8' is not available; available VAEs: anime, ft-mse"
    _, options = Text2ImgRequest.model_validate(
        {"key": "k", "prompt": "x", "vae": "anime"}
    ).to_params(Settings(), SIZES, LORAS, (), vaes)
    assert "vae" not in options["not_applied"]


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
