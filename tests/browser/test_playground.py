"""The playground as a person uses it, in headless Chromium against the real server: fill the
form, generate, see the images, the seed, the time and the cost; see the API's errors next to
their fields; copy the code; on a phone-sized screen too. Screenshots go to test-artifacts/."""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
import subprocess
import sys
from decimal import Decimal

import pytest
import requests
from PIL import Image

from service.pricing import Plan
from tests.browser.conftest import PHONE

pytestmark = pytest.mark.slow

PRICE = Decimal("0.0047")


def open_playground(page, server, key: str | None = None):
    page.goto(server.base_url + "/")
    page.wait_for_selector("body[data-ready=true]")
    if key is not None:
        page.fill("#key", key)
        page.press("#key", "Tab")  # `change` loads the key's plan and models
        page.wait_for_function(
            "document.querySelector('#account').textContent.includes(':')"
            " || document.querySelector('#key-error').textContent !== ''"
        )


def fill_form(page, *, prompt="a lighthouse at dusk, oil painting", **fields):
    page.fill("#prompt", prompt)
    advanced = {"samples", "num_inference_steps", "guidance_scale", "seed", "scheduler"}
    if set(fields) & advanced and page.get_attribute("#advanced", "open") is None:
        page.click("#advanced summary")
    for name, value in fields.items():
        if name == "scheduler":
            page.select_option("#scheduler", value)
        else:
            page.fill(f"#{name}", str(value))


def record_status_changes(page):
    """Every text the status badge shows from now on, in order (kept in window.__statuses)."""
    page.evaluate(
        """() => {
            const badge = document.querySelector('#status');
            window.__statuses = [badge.textContent];
            new MutationObserver(() => window.__statuses.push(badge.textContent))
                .observe(badge, {childList: true, characterData: true, subtree: true});
        }"""
    )


def loaded_images(page, count: int) -> list[dict]:
    page.wait_for_function(
        f"""() => {{
            const images = [...document.querySelectorAll('#gallery img')];
            return images.length === {count} && images.every(i => i.complete && i.naturalWidth);
        }}"""
    )
    return page.eval_on_selector_all(
        "#gallery img",
        "images => images.map(i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight}))",
    )


def balance_of(page) -> Decimal:
    text = page.inner_text("#account")
    return Decimal(re.search(r"balance ([\d.]+)\$", text).group(1))


def test_generate_shows_the_images_seed_time_and_cost(page, server, artifacts):
    open_playground(page, server, server.demo_key)
    assert page.inner_text("#status") == "Idle"
    assert page.inner_text("#price-line") == f"Per image generation will cost {PRICE}$"
    assert page.eval_on_selector_all("#model_id option", "o => o.map(x => x.value)") == [
        "stable-diffu"
    ]
    lora = page.query_selector("#lora_model")
    assert lora.is_disabled() and lora.input_value() == ""
    assert page.inner_text("#lora_model option") == "none"
    balance = balance_of(page)

    fill_form(page, width=128, height=128, samples=2, num_inference_steps=2, seed=4242)
    assert page.inner_text("#cost-estimate") == (
        f"This request: 2 × {PRICE}$ = {PRICE * 2}$ from your balance."
    )
    record_status_changes(page)
    page.click("#generate")

    images = loaded_images(page, 2)
    assert [(i["w"], i["h"]) for i in images] == [(128, 128), (128, 128)]
    for image in images:
        response = requests.get(image["src"], timeout=30)
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (128, 128)
    statuses = page.evaluate("window.__statuses")
    assert statuses[0] == "Idle"
    assert any(s.startswith("Processing") for s in statuses), statuses
    assert statuses[-1].startswith("Done in"), statuses

    assert page.inner_text("#result-seed") == "4242"
    assert re.fullmatch(r"\d+\.\d\d s", page.inner_text("#result-time"))
    assert page.inner_text("#result-size") == "128×128, 2 images"
    assert page.inner_text("#result-cost") == f"{PRICE * 2}$ (2 × {PRICE}$)"
    # the key's balance is read again: exactly the call's cost was debited
    page.wait_for_function(
        f"document.querySelector('#account').textContent.includes('balance {balance - PRICE * 2}$')"
    )
    page.screenshot(path=artifacts / "playground-desktop.png", full_page=True)


def test_an_embedding_a_vae_upscaling_and_the_safety_check(page, server, artifacts):
    open_playground(page, server, server.demo_key)
    assert page.eval_on_selector_all("#embeddings_model option", "o => o.map(x => x.value)") == [
        "",
        "moody",
    ]
    assert page.eval_on_selector_all("#vae option", "o => o.map(x => x.value)") == ["", "crisp"]
    assert page.is_visible("#safety_checker") and not page.is_checked("#safety_checker")

    fill_form(
        page,
        prompt="a moody lighthouse",
        width=128,
        height=128,
        samples=2,
        seed=7,
        num_inference_steps=2,
    )
    page.select_option("#embeddings_model", "moody")
    page.select_option("#vae", "crisp")
    page.select_option("#upscale", "2")
    page.check("#safety_checker")
    code = page.inner_text("#code-snippet")
    assert '"embeddings_model": "moody"' in code and '"safety_checker": "yes"' in code
    assert '"vae": "crisp"' in code and '"upscale": 2' in code
    page.click("#generate")

    images = loaded_images(page, 2)
    assert page.inner_text("#nsfw-note") == (
        "The safety checker flagged 2 of 2 images: replaced as the request asked."
    )
    captions = page.eval_on_selector_all("#gallery figcaption", "c => c.map(x => x.textContent)")
    assert captions == ["256×256, flagged", "256×256, flagged"]  # 2x upscaled
    # the default treatment: the same notice in place of each picture
    first, second = (requests.get(image["src"], timeout=30).content for image in images)
    assert first == second
    assert Image.open(io.BytesIO(first)).size == (256, 256)
    page.screenshot(path=artifacts / "playground-safety-check.png", full_page=True)

    # unchecked again, and no upscaling: nothing is checked, nothing flagged
    page.uncheck("#safety_checker")
    page.select_option("#upscale", "")
    page.click("#generate")
    page.wait_for_function(
        """() => {
            const captions = [...document.querySelectorAll('#gallery figcaption')];
            return captions.length === 2 && captions.every(c => c.textContent === '128×128');
        }"""
    )
    assert not page.is_visible("#nsfw-note")


def test_token_merging_highres_fix_and_self_attention_guidance_boxes(page, server):
    open_playground(page, server, server.demo_key)
    fill_form(
        page, width=128, height=128, num_inference_steps=2, scheduler="EulerDiscreteScheduler"
    )
    # SAG needs integer timesteps: Euler has none, so its box is off
    assert page.is_disabled("#self_attention")
    assert "needs integer timesteps" in page.inner_text("#self_attention-hint")
    page.select_option("#scheduler", "DDIMScheduler")
    assert not page.is_disabled("#self_attention")
    page.check("#self_attention")
    page.check("#tomesd")
    page.check("#highres_fix")
    code = page.inner_text("#code-snippet")
    assert '"self_attention": "yes"' in code and '"tomesd": "yes"' in code
    assert '"highres_fix": "yes"' in code  # 128 px: served directly, nothing to fix
    page.click("#generate")
    images = loaded_images(page, 1)
    assert (images[0]["w"], images[0]["h"]) == (128, 128)
    # what the server could not honour is said under the result
    assert page.inner_text("#result-not-applied").startswith(
        "highres_fix (128x128 is not above the model's native"
    )
    # back to a sigma scheduler: the box is cleared, and the request no longer asks for SAG
    page.select_option("#scheduler", "EulerDiscreteScheduler")
    assert not page.is_checked("#self_attention")
    assert '"self_attention"' not in page.inner_text("#code-snippet")


def test_a_bad_width_shows_the_api_message_next_to_width(page, server, artifacts):
    open_playground(page, server, server.demo_key)
    fill_form(page, width=100, height=128, num_inference_steps=2)
    page.click("#generate")
    error = page.wait_for_selector("[data-field=width] .field-error:not(:empty)")
    api = requests.post(
        server.base_url + "/api/v6/images/text2img",
        json={"key": server.demo_key, "prompt": "x", "width": 100, "height": 128},
        timeout=30,
    ).json()
    assert (
        error.inner_text()
        == api["message"]
        == ("width must be a multiple of 8 between 64 and 1024")
    )
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.inner_text("#height-error") == ""
    assert page.inner_text("#status") == "Error"
    assert page.query_selector_all("#gallery img") == []
    assert not page.is_visible("#result")
    page.screenshot(path=artifacts / "playground-error.png", full_page=True)

    # typing a new value clears the message; two bad fields get one message each
    page.fill("#width", "128")
    assert page.inner_text("#width-error") == ""
    fill_form(page, samples=9, num_inference_steps=999)
    page.click("#generate")
    page.wait_for_selector("#num_inference_steps-error:not(:empty)")
    assert page.inner_text("#samples-error") == "samples must be an integer between 1 and 4"
    assert page.inner_text("#num_inference_steps-error") == (
        "num_inference_steps must be an integer between 1 and 50"
    )
    assert page.inner_text("#form-error") == ""


def test_key_and_credit_errors(page, server):
    open_playground(page, server, "not-a-key")
    assert page.inner_text("#key-error") == "Invalid API key"
    fill_form(page, width=128, height=128, num_inference_steps=2)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent === 'Error'")
    assert page.inner_text("#key-error") == "Invalid API key"

    page.fill("#key", "")
    page.click("#generate")
    assert page.inner_text("#key-error") == "key is required: paste your API key"

    # an error that names no field is shown under the Generate button
    poor = server.create_key("browser-poor", Plan.PAY_PER_USE, Decimal("0.001"))
    page.fill("#key", poor)
    page.press("#key", "Tab")
    page.wait_for_function("document.querySelector('#account').textContent.includes('0.001$')")
    page.click("#generate")
    page.wait_for_selector("#form-error:not(:empty)")
    assert page.inner_text("#form-error") == (
        f"Insufficient credits: this request costs {PRICE} USD, your balance is 0.001 USD"
    )
    assert page.inner_text("#key-error") == ""


def test_a_key_is_remembered_only_when_asked_and_only_if_valid(page, server):
    open_playground(page, server, server.demo_key)
    assert "pay per use" in page.inner_text("#account")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#key") == ""  # not asked to remember it

    page.check("#remember-key")
    page.fill("#key", "not-a-typo-to-keep")
    page.press("#key", "Tab")
    page.wait_for_selector("#key-error:not(:empty)")
    assert page.inner_text("#key-error") == "Invalid API key"
    assert page.evaluate("localStorage.getItem('sdserve.apiKey')") is None

    page.fill("#key", server.demo_key)
    page.press("#key", "Tab")
    page.wait_for_function("document.querySelector('#account').textContent.includes('balance')")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#key") == server.demo_key and page.is_checked("#remember-key")
    page.wait_for_function("document.querySelector('#account').textContent.includes('balance')")
    page.uncheck("#remember-key")  # forgotten at once
    assert page.evaluate("localStorage.getItem('sdserve.apiKey')") is None


def test_a_lost_answer_and_a_failing_fetch_neither_lose_nor_repeat_the_job(page, server):
    """A send reaches the server but its answer is lost (a 503 in its place): the page sends
    again with the same Idempotency-Key, so the job is made and charged once. A poll that meets
    a 503 is asked again until the images arrive."""
    open_playground(page, server, server.demo_key)
    balance = balance_of(page)
    fill_form(page, width=128, height=128, num_inference_steps=2, seed=11)
    unavailable = json.dumps({"status": "error", "message": "database down", "retry_after": 1})
    sends, polls = [], []

    def lose_first_answer(route):
        sends.append(route.request.headers.get("idempotency-key"))
        answer = route.fetch()  # the server made the job
        if len(sends) == 1:
            route.fulfill(status=503, body=unavailable, content_type="application/json")
        else:
            route.fulfill(response=answer)

    def fail_first_poll(route):
        polls.append(route.request.url)
        if len(polls) == 1:
            route.fulfill(status=503, body=unavailable, content_type="application/json")
        else:
            route.continue_()

    page.route("**/api/v6/images/text2img", lose_first_answer)
    page.click("#generate")
    first = loaded_images(page, 1)
    assert len(sends) == 2 and sends[0] == sends[1] and sends[0].startswith("playground-")
    page.unroute("**/api/v6/images/text2img")

    page.route("**/api/v6/images/fetch/**", fail_first_poll)
    page.fill("#seed", "12")
    page.click("#generate")
    page.wait_for_function(
        f"[...document.querySelectorAll('#gallery img')].every(i => i.src !== {first[0]['src']!r})"
    )
    loaded_images(page, 1)
    assert len(polls) >= 2 and page.inner_text("#status").startswith("Done in")
    page.wait_for_function(
        f"document.querySelector('#account').textContent.includes('balance {balance - 2 * PRICE}$')"
    )


def test_a_job_past_the_pages_patience_is_handed_back_with_check_again(page, server):
    page.clock.install()
    open_playground(page, server, server.demo_key)
    fill_form(page, width=128, height=128, num_inference_steps=2)
    # the server answers "processing" for as long as this route stands
    page.route(
        "**/api/v6/images/fetch/**",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body=json.dumps(
                {"status": "processing", "id": route.request.url.rsplit("/", 1)[-1], "eta": 1}
            ),
        ),
    )
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Proc')")
    page.clock.fast_forward(700_000)
    page.wait_for_selector("#pending:not([hidden])")
    assert page.inner_text("#status") == "Still processing"
    assert "is still processing after" in page.inner_text("#pending-text")
    assert not page.is_disabled("#generate")
    page.unroute("**/api/v6/images/fetch/**")
    page.click("#check-again")
    loaded_images(page, 1)
    assert page.inner_text("#status").startswith("Done in")
    assert not page.is_visible("#pending")


def test_a_number_box_holding_no_number_is_refused_not_dropped(page, server):
    open_playground(page, server, server.demo_key)
    fill_form(page, height=128)
    page.fill("#width", "")
    page.click("#width")
    page.keyboard.type("12e")
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "text2img" in r.url else None)
    page.click("#generate")
    assert page.inner_text("#width-error") == "width must be a number"
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert sent == []


def test_free_and_premium_keys_cost_nothing(page, server):
    free = server.create_key("browser-free", Plan.FREE)
    open_playground(page, server, free)
    assert page.inner_text("#account") == (
        "browser-free: free plan, 5 of 5 free images left this month"
    )
    fill_form(page, width=128, height=128, samples=2, num_inference_steps=2)
    assert page.inner_text("#cost-estimate") == (
        "This request uses 2 of your 5 free images left this month (0$)."
    )
    page.click("#generate")
    loaded_images(page, 2)
    assert page.inner_text("#result-cost") == "0$ (2 of your free monthly images)"
    page.wait_for_function(
        "document.querySelector('#account').textContent.includes('3 of 5 free images left')"
    )
    page.fill("#samples", "4")
    assert page.inner_text("#cost-estimate") == (
        "This request needs 4 images, but only 3 of your free images are left this month:"
        " it will be refused."
    )

    premium = server.create_key("browser-premium", Plan.PREMIUM)
    page.fill("#key", premium)
    page.press("#key", "Tab")
    page.wait_for_function("document.querySelector('#account').textContent.includes('premium')")
    assert page.inner_text("#cost-estimate") == "Premium plan: this request costs 0$."
    assert page.inner_text("#price-line") == f"Per image generation will cost {PRICE}$"


def snippet(page, lang: str) -> str:
    page.click(f"[role=tab][data-lang={lang}]")
    assert page.get_attribute(f"[role=tab][data-lang={lang}]", "aria-selected") == "true"
    return page.inner_text("#code-snippet")


def test_the_code_panel_renders_the_current_settings(page, server, tmp_path):
    open_playground(page, server, server.demo_key)
    fill_form(
        page,
        prompt="a 'quoted' \"prompt\"",
        width=128,
        height=136,
        num_inference_steps=2,
        seed=77,
        scheduler="EulerDiscreteScheduler",
    )
    expected = {
        "key": "YOUR_API_KEY",
        "model_id": "stable-diffu",
        "prompt": "a 'quoted' \"prompt\"",
        "width": 128,
        "height": 136,
        "samples": 1,
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "seed": 77,
        "scheduler": "EulerDiscreteScheduler",
    }
    url = server.base_url + "/api/v6/images/text2img"

    # Python + requests: runs as it is, once the key is filled in
    python = snippet(page, "python")
    script = tmp_path / "snippet.py"
    script.write_text(python.replace("YOUR_API_KEY", server.demo_key))
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    outputs = ast.literal_eval(run.stdout)
    assert Image.open(io.BytesIO(requests.get(outputs[0], timeout=30).content)).size == (128, 136)

    # cURL: its URL and JSON body, sent as the shell would send them
    words = shlex.split(snippet(page, "curl").replace("\\\n", " "))
    assert words[:3] == ["curl", "-X", "POST"] and words[3] == url
    assert words[words.index("-H") + 1] == "Content-Type: application/json"
    body = json.loads(words[words.index("-d") + 1])
    assert body == expected
    sent = requests.post(url, json={**body, "key": server.demo_key}, timeout=120).json()
    assert sent["status"] == "success" and sent["meta"]["seed"] == 77

    modelslab = snippet(page, "modelslab")
    compile(modelslab, "modelslab.py", "exec")
    assert f'client.base_url = "{server.base_url}/api/"' in modelslab
    assert "api = Community(client=client, enterprise=False)" in modelslab
    assert "        width=128,\n        height=136," in modelslab
    assert "seed=77" in modelslab and "guidance_scale=7.5" in modelslab

    javascript = snippet(page, "javascript")
    assert f'fetch("{url}"' in javascript
    literal = javascript[javascript.index("JSON.stringify(") + 15 : javascript.index("),\n});")]
    assert json.loads(literal) == expected

    php = snippet(page, "php")
    assert f"curl_init('{url}')" in php
    assert "'prompt' => 'a \\'quoted\\' \"prompt\"'," in php and "'height' => 136," in php

    # the chosen language is remembered
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_attribute("[role=tab][data-lang=php]", "aria-selected") == "true"


def test_phone_width(phone_page, server, artifacts):
    page = phone_page
    open_playground(page, server, server.demo_key)
    width = PHONE["width"]
    # nothing sticks out sideways, and the form comes before the output
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    form = page.query_selector("#playground-form").bounding_box()
    output = page.query_selector(".output-panel").bounding_box()
    assert form["width"] <= width and output["y"] >= form["y"] + form["height"]
    button = page.query_selector("#generate").bounding_box()
    assert button["x"] >= 0 and button["x"] + button["width"] <= width

    fill_form(page, width=128, height=128, num_inference_steps=2)
    page.click("#generate")
    (image,) = loaded_images(page, 1)
    assert (image["w"], image["h"]) == (128, 128)
    shown = page.query_selector("#gallery img").bounding_box()
    assert shown["x"] >= 0 and shown["x"] + shown["width"] <= width
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.screenshot(path=artifacts / "playground-phone.png", full_page=True)


def test_api_reference_renders_without_a_cdn(page, server):
    page.goto(server.base_url + "/docs")
    page.wait_for_selector(".opblock")
    shown = page.eval_on_selector_all(
        ".opblock-summary-path", "p => p.map(x => x.dataset.path || x.innerText)"
    )
    paths = [p.replace("\u200b", "") for p in shown]
    document = requests.get(server.base_url + "/openapi.json", timeout=30).json()
    assert set(paths) == set(document["paths"])

    page.goto(server.base_url + "/llms.txt")
    assert page.inner_text("body").startswith("# sdserve")
