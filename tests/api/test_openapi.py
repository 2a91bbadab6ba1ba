"""The OpenAPI document, /docs and /llms.txt describe this server as it really is: every
ModelsLab route with its request fields (bounds, defaults, descriptions) and its bodies, with
the operator's settings rather than the defaults."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.api.protocol import Text2ImgRequest
from service.api.routes import create_app
from service.config import Settings
from service.engine.schedulers import SCHEDULERS
from service.serving.ingress import build_image_service
from tests.api.test_routes import FakeEngine, write_model_configs

KEY = "test-key"
JOB_ROUTES = {
    "/api/v6/images/text2img",
    "/api/v6/images/fetch/{job_id}",
    "/api/v6/images/fetch",
    "/api/v7/images/text-to-image",
    "/api/v7/images/fetch/{job_id}",
    "/api/v3/text2img",
    "/api/v3/fetch/{job_id}",
    "/api/v4/dreambooth",
    "/api/v4/dreambooth/fetch",
    "/api/v4/dreambooth/fetch/{job_id}",
    "/api/v1/enterprise/images/text2img",
    "/api/v1/enterprise/images/fetch/{job_id}",
}
OTHER_ROUTES = {
    "/api/v4/dreambooth/model_list",
    "/api/v3/system_load",
    "/api/v6/processing/request_count",
    "/api/v1/enterprise/usage",
}
TEXT2IMG_ROUTES = {p for p in JOB_ROUTES if "fetch" not in p}
JOB_BODIES = ("SuccessResponse", "ProcessingResponse", "FailedResponse", "ErrorResponse")


def make_client(tmp_path, **overrides) -> TestClient:
    write_model_configs(tmp_path / "model")
    settings = Settings(
        models={"stable-diffu": str(tmp_path / "model")},
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        image_store_url=str(tmp_path / "images"),
        public_base_url="http://sdserve.test",
        demo_key=KEY,
        **{"min_size": 64, **overrides},
    )
    app = create_app(settings.max_body_bytes, settings.strict_http_status)
    app.state.service = build_image_service(settings, FakeEngine())
    return TestClient(app)


@pytest.fixture()
def client(tmp_path):
    with make_client(tmp_path) as client:
        yield client


@pytest.fixture()
def document(client):
    return client.get("/openapi.json").json()


def operation(document, path):
    return document["paths"][path]["post"]


def test_every_modelslab_route_is_documented(document):
    api_paths = {p for p in document["paths"] if p.startswith("/api/")}
    assert api_paths >= JOB_ROUTES | OTHER_ROUTES
    for path in api_paths:
        op = operation(document, path)
        assert op.get("description"), f"{path} has no description"
        assert "200" in op["responses"], path
        # every route names the error envelope and never FastAPI's own {"detail": [...]}
        assert "#/components/schemas/ErrorResponse" in str(op["responses"]), path
    assert "HTTPValidationError" not in str(document)


def test_job_routes_list_success_processing_failed_and_error_bodies(document):
    for path in JOB_ROUTES:
        ok = operation(document, path)["responses"]["200"]["content"]["application/json"]
        refs = {ref["$ref"].rsplit("/", 1)[1] for ref in ok["schema"]["anyOf"]}
        assert refs == set(JOB_BODIES), path
        assert set(ok["examples"]) == {"success", "processing", "failed", "error"}, path
        assert {ex["value"]["status"] for ex in ok["examples"].values()} == {
            "success",
            "processing",
            "failed",
            "error",
        }
        responses = operation(document, path)["responses"]
        assert {"429", "413", "503", "4XX"} <= set(responses), path
    schemas = document["components"]["schemas"]
    for name in JOB_BODIES:
        assert schemas[name]["description"] and schemas[name]["examples"], name
    for field in ("generationTime", "output", "meta"):
        assert schemas["SuccessResponse"]["properties"][field]["description"]
    for field in ("eta", "fetch_result", "future_links"):
        assert schemas["ProcessingResponse"]["properties"][field]["description"]


def test_text2img_routes_take_the_request_model(document):
    for path in TEXT2IMG_ROUTES:
        body = operation(document, path)["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].endswith("/Text2ImgRequest"), path


def test_each_request_field_has_a_description_and_the_servers_bounds(document):
    fields = document["components"]["schemas"]["Text2ImgRequest"]["properties"]
    assert set(Text2ImgRequest.model_fields) == set(fields)
    for name, field in fields.items():
        assert len(field.get("description", "")) > 10, f"{name} has no useful description"
    for name in ("width", "height"):
        assert (fields[name]["minimum"], fields[name]["maximum"]) == (64, 1024)
        assert fields[name]["multipleOf"] == 8
    assert (fields["samples"]["minimum"], fields["samples"]["maximum"]) == (1, 4)
    assert (fields["num_inference_steps"]["minimum"], fields["num_inference_steps"]["maximum"]) == (
        1,
        50,
    )
    assert (fields["guidance_scale"]["minimum"], fields["guidance_scale"]["maximum"]) == (1, 20)
    assert (fields["clip_skip"]["minimum"], fields["clip_skip"]["maximum"]) == (1, 8)
    assert (fields["seed"]["minimum"], fields["seed"]["maximum"]) == (-1, 2**32 - 1)
    assert document["components"]["schemas"]["Text2ImgRequest"]["required"] == ["prompt"]
    assert fields["model_id"]["examples"] == ["stable-diffu"]
    assert sorted(fields["scheduler"]["examples"]) == sorted(SCHEDULERS)
    assert fields["scheduler"]["examples"][0] == fields["scheduler"]["default"]
    for scheduler in SCHEDULERS:
        assert scheduler in fields["scheduler"]["description"]


def test_documented_defaults_are_the_ones_applied(client, document):
    """The schema's defaults are written by hand; this keeps them equal to what the server
    resolves for a request that sends only a prompt."""
    fields = document["components"]["schemas"]["Text2ImgRequest"]["properties"]
    service = client.app.state.service
    params, options = Text2ImgRequest(prompt="x").to_params(
        service.settings, service.registry.infos(), service.registry.lora_ids()
    )
    assert fields["model_id"]["default"] == params.model_id
    assert fields["negative_prompt"]["default"] == params.negative_prompt
    assert fields["samples"]["default"] == params.samples
    assert fields["num_inference_steps"]["default"] == params.num_inference_steps
    assert fields["guidance_scale"]["default"] == params.guidance_scale
    assert fields["scheduler"]["default"] == params.scheduler
    assert fields["use_karras_sigmas"]["default"] is params.use_karras_sigmas
    assert fields["algorithm_type"]["default"] == (params.algorithm_type or "none")
    assert fields["clip_skip"]["default"] == params.clip_skip
    assert [fields["width"]["examples"][0], fields["height"]["examples"][0]] == [
        params.width,
        params.height,
    ]
    for toggle in ("base64", "temp", "instant_response"):
        assert fields[toggle]["default"] is options[toggle]


def test_operator_settings_change_the_documented_bounds(tmp_path):
    with make_client(tmp_path, min_size=128, max_size=512, max_steps=20, max_samples=2) as client:
        fields = client.get("/openapi.json").json()["components"]["schemas"]["Text2ImgRequest"][
            "properties"
        ]
        rejected = client.post(
            "/api/v6/images/text2img", json={"key": KEY, "prompt": "x", "width": 520}
        ).json()
        config = client.get("/playground/config").json()
        listed = client.post("/api/v4/dreambooth/model_list", json={"key": KEY}).json()
    assert (fields["width"]["minimum"], fields["width"]["maximum"]) == (128, 512)
    assert fields["num_inference_steps"]["maximum"] == 20
    # the default steps a client (the playground's form) would send back are allowed
    assert fields["num_inference_steps"]["default"] == 20
    assert config["fields"]["num_inference_steps"]["default"] == 20
    assert [m["default_steps"] for m in config["models"]] == [20]
    assert [m["default_steps"] for m in listed] == [20]
    assert fields["samples"]["maximum"] == 2
    # the document and the validator agree
    assert rejected["message"] == "width must be a multiple of 8 between 128 and 512"


def test_docs_pages_use_no_cdn(client):
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
        assert urls, path
        for url in urls:
            assert url.startswith("/"), f"{path} loads {url}"
            assert client.get(url).status_code == 200, url
        assert "cdn." not in page.text and "fonts.googleapis" not in page.text
    assert client.get("/static/docs/not-there.js").status_code == 404


def test_llms_txt_summarises_routes_models_and_bounds(client):
    response = client.get("/llms.txt")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert text.startswith("# sdserve\n\n> ")
    assert "- `stable-diffu` (default): 256x256, 30 steps by default, 0.0047 USD per image" in text
    assert "- LoRAs (`lora_model`): none installed" in text
    for path in JOB_ROUTES | OTHER_ROUTES:
        assert f"http://sdserve.test{path}" in text, path
    assert "- `width` (integer, 64-1024, multiple of 8)" in text
    assert "- `num_inference_steps` (integer, 1-50, default 30)" in text
    assert "- `prompt` (string, required)" in text
    assert "free keys: 25 images a calendar month" in text
    assert len(text) < 12_000  # concise


def test_llms_txt_lists_prices_per_model(tmp_path):
    with make_client(tmp_path, prices_usd={"stable-diffu": "0.01"}) as client:
        text = client.get("/llms.txt").text
    assert "0.01 USD per image" in text
