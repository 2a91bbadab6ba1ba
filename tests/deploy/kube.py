"""Offline checks of Kubernetes manifests: CRD schemas as strict JSON Schema, the Serve config
inside a RayService, and the small parsers the deployment tests share."""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sdserve"
CRDS = REPO.parent / "shared" / "crds"
TOOLS = REPO / "build" / "tools"
HELM = TOOLS / "helm"
KUBECTL = TOOLS / "kubectl"

# KubeRay's name limits (ray-operator/controllers/ray/utils/constant.go): a RayCluster name is at
# most 53 characters, 63 minus "-serve-svc"; a RayService's 47, since KubeRay appends 6
# characters ("-" and 5 random ones) to it to name the RayService's RayCluster.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields, as the API server's
    strict field validation (kubectl's default) does: every object with `properties` and no
    `additionalProperties` gets `additionalProperties: false`, except where the CRD says
    `x-kubernetes-preserve-unknown-fields: true`. `nullable` becomes a null type."""
    schema = copy.deepcopy(schema)

    def convert(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                convert(item)
            return
        if not isinstance(node, dict):
            return
        for key in ("properties", "patternProperties", "definitions"):
            for child in (node.get(key) or {}).values():
                convert(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict | list):
                convert(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            if key in node:
                convert(node[key])
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
        if "properties" in node and "additionalProperties" not in node and not preserve:
            node["additionalProperties"] = False

    convert(schema)
    return schema


@cache
def crd_validator(kind: str, version: str = "v1") -> jsonschema.Draft7Validator:
    """A validator for `kind` (RayService, RayCluster) from the KubeRay CRDs in shared/crds.

    The root `metadata` is ObjectMeta, which the API server checks itself; check names with
    `name_errors`. CEL rules (x-kubernetes-validations) are not evaluated: in KubeRay v1.7 they
    only guard `managedBy` and immutability.
    """
    paths = sorted(CRDS.glob(f"{kind.lower()}s-v*.yaml"))
    assert paths, f"no {kind} CRD in {CRDS} (KubeRay's CRDs live in shared/crds beside the repo)"
    path = paths[-1]
    # 1 MB of YAML: libyaml's loader reads it in a tenth of the pure-Python one's time.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, path
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    ]


def name_errors(kind: str, name: str) -> list[str]:
    limit = {"RayService": MAX_RAYSERVICE_NAME, "RayCluster": MAX_RAYCLUSTER_NAME}[kind]
    errors = []
    if len(name) > limit:
        errors.append(f"{kind} name {name!r} is {len(name)} characters, KubeRay allows {limit}")
    if not DNS_1035_LABEL.match(name):
        errors.append(f"{kind} name {name!r} is not a DNS-1035 label")
    return errors


def raycluster_of(rayservice: dict) -> dict:
    """The RayCluster KubeRay makes for a RayService: its rayClusterConfig, named after it."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": f"{rayservice['metadata']['name']}-abcde"},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def unknown_keys(data: dict, model) -> set[str]:
    """Keys a pydantic model would silently ignore (Ray's Serve schemas allow extra fields)."""
    return set(data) - set(model.model_fields)


def serve_config_errors(config: dict) -> list[str]:
    """Everything wrong with a Serve config as Ray Serve and the project would see it: Ray's own
    schema (ServeDeploySchema, unknown keys included), the import path, AppConfig on `args`,
    Serve's AutoscalingConfig on the generator's autoscaling."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    errors: list[str] = []
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as error:  # pydantic's ValidationError, and Ray's own ValueErrors
        return [f"ServeDeploySchema: {error}"]
    errors += [f"unknown Serve config key {k!r}" for k in unknown_keys(config, ServeDeploySchema)]
    errors += [
        f"unknown http_options key {k!r}"
        for k in unknown_keys(config.get("http_options") or {}, HTTPOptionsSchema)
    ]
    for app in config["applications"]:
        errors += [
            f"unknown application key {k!r}" for k in unknown_keys(app, ServeApplicationSchema)
        ]
        module_name, _, attribute = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attribute, None)
        if not callable(builder):
            errors.append(f"import_path {app['import_path']!r} does not name a callable")
        from service.config import Settings
        from service.serving.app import AppConfig

        try:
            args = AppConfig.model_validate(app.get("args") or {})
        except Exception as error:
            errors.append(f"AppConfig: {error}")
            continue
        try:
            # Settings from args alone (the environment fills the rest on the cluster).
            Settings.model_validate(args.settings)
        except Exception as error:
            errors.append(f"args.settings: {error}")
        if args.generator_autoscaling:
            autoscaling = args.generator_autoscaling
            errors += [
                f"unknown generator_autoscaling key {k!r}"
                for k in unknown_keys(autoscaling, AutoscalingConfig)
            ]
            try:
                AutoscalingConfig.model_validate(autoscaling)
            except Exception as error:
                errors.append(f"generator_autoscaling: {error}")
    return errors


def ray_containers(rayservice: dict) -> Iterator[tuple[str, dict, dict]]:
    """(group, pod spec, Ray container) for the head and every worker group; the Ray container
    is the first, as KubeRay expects."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    yield "head", head, head["containers"][0]
    for group in cluster.get("workerGroupSpecs") or []:
        spec = group["template"]["spec"]
        yield group["groupName"], spec, spec["containers"][0]


def one(documents: list[dict], kind: str) -> dict:
    found = [d for d in documents if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def load_documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def run(
    command: list[str | Path], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, timeout=120
    )


def dashboard_files() -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))
    }
