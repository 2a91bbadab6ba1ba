"""The Helm chart: `helm lint --strict`, what each value switches on or off, and values that
must fail with a message saying what to change."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import tomllib

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CI_VALUES, REQUIRED_VALUES
from tests.deploy.kube import (
    CHART,
    MAX_RAYSERVICE_NAME,
    REPO,
    dashboard_files,
    one,
    ray_containers,
)

SMOKE = CHART / "ci" / "cpu-smoke-values.yaml"
PRODUCTION = CHART / "ci" / "gpu-production-values.yaml"


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def kinds(documents: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in documents)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict(helm, values):
    result = helm("lint", "--strict", CHART, "-f", values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_values_cover_a_cpu_smoke_and_a_gpu_production_install():
    assert {p.name for p in CI_VALUES} >= {SMOKE.name, PRODUCTION.name}
    smoke = yaml.safe_load(SMOKE.read_text())
    assert smoke["workers"]["gpus"] == 0 and smoke["models"]["source"] == "tiny"
    production = yaml.safe_load(PRODUCTION.read_text())
    assert production["workers"]["gpus"] >= 1 and production["models"]["source"] == "pvc"


def test_chart_follows_the_project_version(rendered):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    service = one(rendered["helm:defaults"], "RayService")
    for _, _, container in ray_containers(service):
        assert container["image"].endswith(f":{project['version']}")


def test_kube_version_is_enforced(helm):
    result = helm("template", "x", CHART, "-f", SMOKE, "--kube-version", "1.28.9")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "Kubernetes version" in result.stderr, result.stderr


def test_values_schema_knows_every_app_config_arg():
    """serve.args is AppConfig: the schema lists exactly its fields, so a typo fails at
    `helm install` instead of when Serve deploys the application."""
    from ray.serve.config import AutoscalingConfig

    from service.serving.app import AppConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    args = schema["properties"]["serve"]["properties"]["args"]
    assert args["additionalProperties"] is False
    assert set(args["properties"]) == set(AppConfig.model_fields)
    autoscaling = args["properties"]["generator_autoscaling"]["properties"]
    assert set(autoscaling) <= set(AutoscalingConfig.model_fields)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)


def test_podmonitor_only_when_asked_and_the_api_exists(render):
    assert "PodMonitor" in kinds(render("-f", PRODUCTION))
    assert "PodMonitor" not in kinds(render("-f", PRODUCTION, capabilities=False))
    assert "PodMonitor" not in kinds(render("-f", SMOKE))


def test_grafana_dashboards_configmap_holds_every_dashboard(rendered):
    documents = rendered["helm:gpu-production-values.yaml"]
    configmap = one(documents, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = dashboard_files()
    assert set(configmap["data"]) == set(files)
    for name, dashboard in files.items():
        assert json.loads(configmap["data"][name]) == dashboard
    assert "ConfigMap" not in kinds(rendered["helm:cpu-smoke-values.yaml"])


def test_dashboard_shows_requests_by_status():
    dashboard = dashboard_files()["sdserve.json"]
    assert dashboard["title"] and dashboard["uid"]
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert "sum(rate(ray_sdserve_requests_total[5m])) by (status)" in expressions
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos"} <= set(panel)


def test_pdb_keeps_all_but_max_unavailable_workers(rendered):
    values = yaml.safe_load(PRODUCTION.read_text())
    documents = rendered["helm:gpu-production-values.yaml"]
    pdb = one(documents, "PodDisruptionBudget")
    # minAvailable, never maxUnavailable: RayCluster has no scale subresource, and the
    # disruption controller refuses every eviction of such pods under maxUnavailable.
    assert "maxUnavailable" not in pdb["spec"]
    expected = values["workers"]["minReplicas"] - values["podDisruptionBudget"]["maxUnavailable"]
    assert pdb["spec"]["minAvailable"] == expected
    cluster = one(documents, "RayService")["spec"]["rayClusterConfig"]
    selector = pdb["spec"]["selector"]["matchLabels"].items()
    (workers,) = cluster["workerGroupSpecs"]
    assert selector <= workers["template"]["metadata"]["labels"].items()
    assert not selector <= cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
    # One worker at minimum: a budget could only forbid every drain, so there is none.
    assert "PodDisruptionBudget" not in kinds(rendered["helm:cpu-smoke-values.yaml"])


def secret_refs(documents: list[dict]) -> set[str]:
    return {
        entry["valueFrom"]["secretKeyRef"]["name"]
        for _, _, container in ray_containers(one(documents, "RayService"))
        for entry in container["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }


def test_chart_made_secret(rendered, render):
    documents = rendered["helm:cpu-smoke-values.yaml"]
    secret = one(documents, "Secret")
    smoke = yaml.safe_load(SMOKE.read_text())
    assert secret["stringData"] == {
        "database-url": smoke["database"]["url"],
        "admin-key": smoke["adminKey"],
    }
    assert secret_refs(documents) == {secret["metadata"]["name"]}
    # No admin key given: one is generated (and kept across upgrades through `lookup`).
    generated = one(rendered["helm:defaults"], "Secret")["stringData"]["admin-key"]
    assert generated.startswith("sk-") and len(generated) >= 40
    # A webhook secret goes there too when given, and every container reads it (optional key).
    signed = render(*sets(*REQUIRED_VALUES, "webhookSecret=whsec-123"))
    assert one(signed, "Secret")["stringData"]["webhook-secret"] == "whsec-123"
    for _, _, container in ray_containers(one(signed, "RayService")):
        [ref] = [e for e in container["env"] if e["name"] == "SDSERVE_WEBHOOK_SECRET"]
        assert ref["valueFrom"]["secretKeyRef"]["key"] == "webhook-secret"
        assert ref["valueFrom"]["secretKeyRef"]["optional"] is True
    # S3 credentials go to the same Secret when asked.
    s3 = render(
        *sets(*REQUIRED_VALUES, "imageStore.s3.credentialsFromSecret=true"),
        *sets("imageStore.s3.accessKeyId=AKIA1", "imageStore.s3.secretAccessKey=s3cr3t"),
    )
    assert {"aws-access-key-id", "aws-secret-access-key"} <= set(one(s3, "Secret")["stringData"])


def test_existing_secret(rendered):
    documents = rendered["helm:gpu-production-values.yaml"]
    assert "Secret" not in kinds(documents)
    assert secret_refs(documents) == {yaml.safe_load(PRODUCTION.read_text())["existingSecret"]}


def test_helm_test_pod_posts_a_text2img_request(rendered):
    documents = rendered["helm:cpu-smoke-values.yaml"]
    pod = one(documents, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    compile(script, "helm-test", "exec")
    assert '"/api/v6/images/text2img"' in script
    env = {e["name"]: e for e in container["env"]}
    name = one(documents, "RayService")["metadata"]["name"]
    assert env["SDSERVE_URL"]["value"].startswith(f"http://{name}-serve-svc.")
    assert env["SDSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"


def test_helm_test_script_passes_against_a_server_whose_images_are_on_a_cdn(rendered):
    """The script, run against a stand-in server: it polls a processing job, then fetches the
    image through the serve Service even when the output URL is a CDN's."""
    (container,) = one(rendered["helm:cpu-smoke-values.yaml"], "Pod")["spec"]["containers"]
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 32
    seen = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            done = self.path.startswith("/api/v6/images/fetch/")
            answer = (
                {"status": "success", "output": ["https://cdn.example.com/outputs/ab-0.png"]}
                if done
                else {"status": "processing", "id": 7}
            )
            self._send(json.dumps(answer).encode(), "application/json")

        def do_GET(self):
            seen.append((self.path, None))
            if self.path == "/images/ab-0.png":
                self._send(png, "image/png")
            else:
                self.send_error(404)

        def _send(self, data, content_type):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    env |= {"SDSERVE_URL": f"http://127.0.0.1:{server.server_port}", "SDSERVE_ADMIN_KEY": "k"}
    try:
        # the script sleeps 5 s between polls: one poll here
        result = subprocess.run(
            [sys.executable, "-c", container["args"][0]],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert "ok: 40 bytes of PNG from https://cdn.example.com/outputs/ab-0.png" in result.stdout
    assert [path for path, _ in seen] == [
        "/api/v6/images/text2img",
        "/api/v6/images/fetch/7",
        "/images/ab-0.png",
    ]


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("prod", "prod-sdserve"),
        ("team-sdserve", "team-sdserve"),
        ("a" * 40, "a" * 40),  # "<release>-sdserve" would be 48: the release name alone
        ("b" * MAX_RAYSERVICE_NAME, "b" * MAX_RAYSERVICE_NAME),
    ],
)
def test_release_names_give_a_rayservice_name_that_fits(render, release, expected):
    assert one(render("-f", SMOKE, release=release), "RayService")["metadata"]["name"] == expected


BAD_VALUES = {
    "typo'd key": (sets("workers.gpuz=1"), "additional properties 'gpuz' not allowed"),
    "typo'd serve arg": (sets("serve.args.max_batch_sise=4"), "'max_batch_sise' not allowed"),
    "negative GPUs per worker": (sets("workers.gpus=-1"), "at '/workers/gpus': minimum"),
    "num_gpus: -1": (
        sets("serve.args.generator_num_gpus=-1"),
        "at '/serve/args/generator_num_gpus': minimum",
    ),
    "unknown model source": (sets("models.source=nfs"), "at '/models/source'"),
    "replica bigger than a worker": (
        sets("workers.gpus=1", "serve.args.generator_num_gpus=2"),
        "generator_num_gpus (2) is more than a worker has",
    ),
    "GPU generator on CPU workers": (
        sets("serve.args.generator_num_gpus=1"),
        "no worker could host a generator replica",
    ),
    "fullnameOverride too long": (sets("fullnameOverride=" + "f" * 48), "/fullnameOverride"),
    "more generator replicas than workers host": (
        sets(
            "workers.gpus=1",
            "workers.maxReplicas=2",
            "autoscaler.enabled=true",
            "serve.args.generator_num_gpus=1",
            "serve.args.generator_replicas=3",
        ),
        "3 generator replicas asked for (serve.args), but the workers host at most 2",
    ),
    "replicas past the workers, the autoscaler off": (
        sets(
            "workers.gpus=1",
            "autoscaler.enabled=false",
            "serve.args.generator_num_gpus=1",
            "serve.args.generator_replicas=2",
        ),
        "the autoscaler being off",
    ),
    "baked models looked for on the volume path": (
        sets("models.source=image"),
        "set models.mountPath to it",
    ),
    "compile cache on no claim": (
        sets("workers.compileCache.type=pvc"),
        "workers.compileCache.existingClaim is empty",
    ),
    "compile cache on the read-only models": (
        sets("workers.compileCache.mountPath=/models/cache"),
        "compileCache.mountPath lies in models.mountPath",
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(helm, case):
    args, message = BAD_VALUES[case]
    result = helm("template", "sdserve", CHART, "-f", SMOKE, *args)
    assert result.returncode != 0, f"{case}: rendered anyway"
    assert message in result.stderr, result.stderr


def test_compile_cache_can_be_a_shared_claim_or_nothing(render):
    def worker(*args):
        (group,) = one(render("-f", SMOKE, *args), "RayService")["spec"]["rayClusterConfig"][
            "workerGroupSpecs"
        ]
        spec = group["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        return env, spec["containers"][0]["volumeMounts"], spec["volumes"]

    env, mounts, volumes = worker(
        *sets("workers.compileCache.type=pvc", "workers.compileCache.existingClaim=cc")
    )
    (volume,) = [v for v in volumes if v["name"] == "compile-cache"]
    assert volume["persistentVolumeClaim"] == {"claimName": "cc"}
    assert env["SDSERVE_COMPILE_CACHE_DIR"] == "/home/ray/compile-cache"
    env, mounts, volumes = worker(*sets("workers.compileCache.type=none"))
    assert "SDSERVE_COMPILE_CACHE_DIR" not in env
    assert "compile-cache" not in {m["name"] for m in mounts} | {v["name"] for v in volumes}


def test_required_values_are_named(helm):
    result = helm("template", "sdserve", CHART)
    assert result.returncode != 0
    assert "database.url is required" in result.stderr, result.stderr
    result = helm("template", "sdserve", CHART, *sets(REQUIRED_VALUES[0]))
    assert "imageStore.url is required" in result.stderr, result.stderr


def test_a_60_character_release_name_fails(helm):
    result = helm("template", "r" * 60, CHART, "-f", SMOKE)
    assert result.returncode != 0
    assert "the length must not be longer than 53" in result.stderr, result.stderr


def test_a_release_name_over_kuberays_limit_fails(helm):
    result = helm("template", "r" * 50, CHART, "-f", SMOKE)
    assert result.returncode != 0
    assert f"is 50 characters; KubeRay allows at most {MAX_RAYSERVICE_NAME}" in result.stderr


def test_install_dry_run_shows_the_notes(helm):
    """NOTES.txt renders (helm template skips it) and tells how to reach the service."""
    result = helm("install", "smoke", CHART, "-f", SMOKE, "--dry-run=client", "--namespace", "sd")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/smoke-sdserve-serve-svc 8000:8000" in notes
    assert "random-weight demo model" in notes
