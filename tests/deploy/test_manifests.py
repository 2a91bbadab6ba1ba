"""Every manifest set the project ships (the chart for each ci/*-values.yaml and for its
defaults, and k8s/) checked offline by real schemas: Kubernetes' own for core kinds
(kubernetes-validate), KubeRay v1.7.0's CRDs for the RayService and the RayCluster it makes,
Ray Serve's and the project's for serveConfigV2."""

from __future__ import annotations

import json
import os
import re
from pathlib import PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import CI_VALUES
from tests.deploy.kube import (
    REPO,
    crd_validator,
    name_errors,
    one,
    ray_containers,
    raycluster_of,
    schema_errors,
    serve_config_errors,
    serve_config_of,
    strict_schema,
)

SOURCES = [f"helm:{path.name}" for path in CI_VALUES] + ["helm:defaults", "k8s"]
# Kubernetes versions the core kinds are validated against: the oldest the chart's kubeVersion
# admits and the newest kubernetes-validate 1.37.0 knows.
KUBE_VERSIONS = ["1.29.0", "1.37.0"]
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")
KNOWN_KINDS = {
    "Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget", "Pod",
    "RayService", "PodMonitor",
}  # fmt: skip
# What a deployment may change in serve_config.yaml's application, and why:
# generator_num_gpus (a GPU per replica), generator_autoscaling (Serve autoscaling with the Ray
# autoscaler), ingress_replicas (more than one behind a shared image store), settings (SDSERVE_*
# come from env vars instead). http_options.host: the proxy must listen on the pod's address.
DOCUMENTED_OVERRIDES = {
    "generator_num_gpus", "generator_autoscaling", "ingress_replicas", "settings",
}  # fmt: skip
# Settings every Ray container gets as env vars (the builder runs on the head, replicas on
# workers).
SETTINGS_ENV = {
    "SDSERVE_MODELS", "SDSERVE_DATABASE_URL", "SDSERVE_ADMIN_KEY", "SDSERVE_PUBLIC_BASE_URL",
    "SDSERVE_IMAGE_STORE_URL", "SDSERVE_DEMO_KEY",
}  # fmt: skip
FROM_SECRET = {
    "SDSERVE_DATABASE_URL",
    "SDSERVE_ADMIN_KEY",
    "SDSERVE_WEBHOOK_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def rayservice(manifests, source) -> dict:
    return one(manifests[source], "RayService")


def ray_version() -> str:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    (version,) = [line.split("==")[1] for line in lines if line.startswith("ray==")]
    return version


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("source", SOURCES)
def test_core_kinds_pass_kubernetes_validate_strict(manifests, source, kube_version):
    documents = manifests[source]
    assert {d["kind"] for d in documents} <= KNOWN_KINDS
    core = [d for d in documents if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    # The pod templates inside the RayService are core PodTemplateSpecs: check them too.
    cluster = rayservice(manifests, source)["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        name = group.get("groupName", "head")
        core.append(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
             "template": group["template"]}
        )  # fmt: skip
    for document in core:
        try:
            kubernetes_validate.validate(document, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(
                f"{document['kind']}/{document['metadata']['name']}: {path}: {error.message}"
            )


@pytest.mark.parametrize("source", SOURCES)
def test_rayservice_and_its_raycluster_pass_the_kuberay_crds(manifests, source):
    service = rayservice(manifests, source)
    assert service["apiVersion"] == "ray.io/v1"
    assert schema_errors(crd_validator("RayService"), service) == []
    cluster = raycluster_of(service)
    assert schema_errors(crd_validator("RayCluster"), cluster) == []
    assert name_errors("RayService", service["metadata"]["name"]) == []
    assert name_errors("RayCluster", cluster["metadata"]["name"]) == []


def test_crd_validation_rejects_unknown_fields_and_wrong_types(manifests):
    """The CRD check is not vacuous: a typo'd field or a wrong type fails it."""
    service = rayservice(manifests, "k8s")
    typo = json.loads(json.dumps(service))
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    errors = schema_errors(crd_validator("RayService"), typo)
    assert any("'rayStartParam' was unexpected" in e for e in errors), errors

    wrong = json.loads(json.dumps(service))
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    container = wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    container["volumeMounts"][0]["readonly"] = True
    container["resources"]["limits"]["cpu"] = "eight"
    errors = schema_errors(crd_validator("RayService"), wrong)
    assert any("maxReplicas: 'four' is not of type 'integer'" in e for e in errors), errors
    assert any("'readonly' was unexpected" in e for e in errors), errors
    assert any("limits.cpu: 'eight' does not match" in e for e in errors), errors


def test_strict_schema_keeps_what_the_crd_leaves_open():
    """x-kubernetes-preserve-unknown-fields and maps stay open, `nullable` admits null, every
    other object rejects unknown fields (KubeRay v1.7.0's CRDs happen to use only the last)."""
    crd_schema = {
        "type": "object",
        "properties": {
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"known": {"type": "string"}},
            },
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "closed": {"type": "object", "properties": {"known": {"type": "string"}}},
            "maybe": {"type": "string", "nullable": True},
        },
    }
    validator = jsonschema.Draft7Validator(strict_schema(crd_schema))
    assert validator.is_valid({"open": {"known": "a", "extra": 1}, "map": {"any": "b"}})
    assert validator.is_valid({"maybe": None})
    assert not validator.is_valid({"closed": {"extra": 1}})
    assert not validator.is_valid({"unknown": 1})
    assert not validator.is_valid({"open": {"known": 1}})


@pytest.mark.parametrize("source", SOURCES)
def test_serve_config_passes_ray_serve_and_the_app_builder(manifests, source):
    config = serve_config_of(rayservice(manifests, source))
    assert serve_config_errors(config) == []


def test_serve_config_check_is_not_vacuous():
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    broken = json.loads(json.dumps(local))
    broken["applications"][0]["args"]["max_batch_sise"] = 4
    broken["applications"][0]["import_pathh"] = "x"
    broken["applications"].append({**local["applications"][0], "name": "b", "route_prefix": "/b"})
    broken["applications"][1]["import_path"] = "service.serving.app:no_such_builder"
    errors = serve_config_errors(broken)
    assert any("max_batch_sise" in e for e in errors), errors
    assert any("import_pathh" in e for e in errors), errors
    assert any("no_such_builder" in e for e in errors), errors


@pytest.mark.parametrize("source", SOURCES)
def test_serve_config_is_the_local_one_apart_from_documented_overrides(manifests, source):
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    deployed = serve_config_of(rayservice(manifests, source))
    assert deployed["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    assert set(deployed) == set(local)
    (local_app,) = local["applications"]
    (app,) = deployed["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {
        k: v for k, v in local_app.items() if k != "args"
    }
    local_args = {k: v for k, v in local_app["args"].items() if k not in DOCUMENTED_OVERRIDES}
    args = {k: v for k, v in app["args"].items() if k not in DOCUMENTED_OVERRIDES}
    assert args == local_args


@pytest.mark.parametrize("source", SOURCES)
def test_ray_version_is_the_images(manifests, source):
    assert rayservice(manifests, source)["spec"]["rayClusterConfig"]["rayVersion"] == ray_version()


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("source", SOURCES)
def test_settings_reach_every_ray_container_and_parse(manifests, source, monkeypatch):
    from service.config import known_variables, load_settings

    secret_names = set()
    for group, _, container in ray_containers(rayservice(manifests, source)):
        env = env_of(container)
        assert set(env) >= SETTINGS_ENV, f"{group} lacks {SETTINGS_ENV - set(env)}"
        # a misspelt name would only be warned of, and its setting silently left at the default
        unknown = {n for n in env if n.startswith("SDSERVE_")} - known_variables()
        assert not unknown, f"{group}: {sorted(unknown)} are no sdserve settings"
        assert env["SDSERVE_DEMO_KEY"]["value"] == "", f"{group}: no demo key in a deployment"
        for name in FROM_SECRET & set(env):
            secret_names.add(env[name]["valueFrom"]["secretKeyRef"]["name"])
        # What the replicas' Settings would read: Secret values stand in as placeholders.
        for name in [n for n in os.environ if n.startswith("SDSERVE_")]:
            monkeypatch.delenv(name)
        for name, entry in env.items():
            if not name.startswith("SDSERVE_"):
                continue
            secret = entry.get("valueFrom", {}).get("secretKeyRef")
            if secret and secret.get("optional"):
                continue  # a Secret without the key leaves the variable unset
            value = entry.get("value")
            if name == "SDSERVE_DATABASE_URL":
                value = "postgresql+psycopg://sdserve:pw@postgresql:5432/sdserve"
            elif name == "SDSERVE_ADMIN_KEY":
                value = "sk-placeholder"
            assert value is not None, f"{group}: {name} has neither a value nor a Secret"
            monkeypatch.setenv(name, value)
        settings = load_settings()
        assert settings.demo_key == ""
        assert settings.admin_key == "sk-placeholder"
        assert settings.webhook_secret is None  # optional: unsigned webhooks without it
        assert all(PurePosixPath(p).is_absolute() for p in settings.models.values())
        assert settings.public_base_url.startswith(("http://", "https://"))
    assert len(secret_names) == 1, "every secret setting comes from one Secret"


@pytest.mark.parametrize("source", SOURCES)
def test_model_folders_are_mounted_read_only_where_replicas_run(manifests, source):
    service = rayservice(manifests, source)
    cluster = service["spec"]["rayClusterConfig"]
    # No replica on the head: ingress and generator (which read the model folders) run on
    # workers.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group, spec, container in ray_containers(service):
        if group == "head":
            continue
        models = json.loads(env_of(container)["SDSERVE_MODELS"]["value"])
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for folder in models.values():
            mounts = [
                m for m in container.get("volumeMounts", [])
                if PurePosixPath(folder).is_relative_to(m["mountPath"])
            ]  # fmt: skip
            assert len(mounts) == 1, f"{group}: {folder} is not mounted"
            (mount,) = mounts
            assert mount.get("readOnly") is True, f"{group}: {mount['mountPath']} is writable"
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"].get("readOnly") is True
            else:
                # The tiny demo model: an init container builds each folder into an emptyDir.
                assert "emptyDir" in volume
                (init,) = spec["initContainers"]
                script = " ".join(init["command"] + init["args"])
                assert f'sdserve tiny-model "{folder}"' in script


@pytest.mark.parametrize("source", SOURCES)
def test_the_compile_cache_is_a_writable_volume_where_the_generator_runs(manifests, source):
    """Without it every replica start compiles afresh (75.6 s instead of 31.5 s on an H200)."""
    (workers,) = rayservice(manifests, source)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = workers["template"]["spec"]
    (container,) = spec["containers"]
    directory = env_of(container)["SDSERVE_COMPILE_CACHE_DIR"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly"), "the generator writes its compiled kernels there"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    assert not volume.get("persistentVolumeClaim", {}).get("readOnly")
    assert volume.get("emptyDir", {}).get("medium") != "Memory", "a cache of GiBs, not in RAM"


@pytest.mark.parametrize("source", SOURCES)
def test_workers_have_the_gpus_the_generator_asks_for(manifests, source):
    service = rayservice(manifests, source)
    args = serve_config_of(service)["applications"][0]["args"]
    gpus_per_replica = args.get("generator_num_gpus", 0)
    cluster = service["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    spec = workers["template"]["spec"]
    container = spec["containers"][0]
    limits = container["resources"].get("limits", {})
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if not gpus_per_replica:
        assert gpus == 0, "a CPU deployment should not hold GPUs"
        return
    assert gpus >= gpus_per_replica
    requests = container["resources"].get("requests", {})
    assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (shm_volume,) = [v for v in spec["volumes"] if v["name"] == shm[0]["name"]]
    assert shm_volume["emptyDir"]["medium"] == "Memory"
    if source != "helm:defaults":  # the chart's default leaves node labels to the operator
        assert spec.get("nodeSelector"), "GPU workers need a nodeSelector for GPU nodes"
    # Serve autoscaling of the generator, with Ray's autoscaler adding workers to fit it.
    autoscaling = args["generator_autoscaling"]
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(autoscaling)
    assert cluster["enableInTreeAutoscaling"] is True
    replicas_per_worker = gpus // gpus_per_replica
    assert workers["maxReplicas"] * replicas_per_worker >= autoscaling["max_replicas"]


@pytest.mark.parametrize("source", SOURCES)
def test_metrics_port_is_exported_and_scraped(manifests, source):
    service = rayservice(manifests, source)
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group, (_, _, container) in zip(groups, ray_containers(service), strict=True):
        port = int(group["rayStartParams"]["metrics-export-port"])
        assert {"name": "metrics", "containerPort": port} in container["ports"]
    monitors = [d for d in manifests[source] if d["kind"] == "PodMonitor"]
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        for group in groups:
            labels = group["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), "the PodMonitor misses a Ray pod"
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("source", SOURCES)
def test_resource_names_are_valid(manifests, source):
    for document in manifests[source]:
        name = document["metadata"]["name"]
        assert len(name) <= 63 and DNS_1123_SUBDOMAIN.match(name), (document["kind"], name)


def test_kustomization_lists_every_manifest():
    folder = REPO / "k8s"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_secret_holds_every_key_the_rayservice_reads(kustomized):
    secret = one(kustomized, "Secret")
    for _, _, container in ray_containers(one(kustomized, "RayService")):
        for entry in container["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]
                # an optional key (the webhook secret) is left for the operator to add
                assert ref.get("optional") or ref["key"] in secret["stringData"], ref
    # no placeholder may sign webhooks on an unedited apply
    assert "webhook-secret" not in secret["stringData"]


def test_k8s_and_the_chart_give_the_same_settings(manifests):
    """The plain manifests and the chart's production values set the same env vars."""

    def names(source):
        return {
            name
            for _, _, container in ray_containers(rayservice(manifests, source))
            for name in env_of(container)
        }

    production = names("helm:gpu-production-values.yaml")
    assert names("k8s") <= production, names("k8s") - production


def test_k8s_mounts_the_claim_it_defines(kustomized):
    claim = one(kustomized, "PersistentVolumeClaim")["metadata"]["name"]
    service = one(kustomized, "RayService")
    for group, spec, _ in ray_containers(service):
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        ]
        assert claims == ([] if group == "head" else [claim])


def test_k8s_image_is_set_by_kustomize(kustomized):
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    for _, _, container in ray_containers(one(kustomized, "RayService")):
        assert container["image"] == expected
