"""Fixtures of the deployment checks: helm and kubectl (installed by `make deploy-tools`), the
chart rendered once per ci/*-values.yaml, and the kustomized k8s/ manifests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy.kube import CHART, HELM, KUBECTL, REPO, load_documents, run

# The Kubernetes version the chart is rendered for: the oldest its kubeVersion admits.
KUBE_VERSION = "1.29.0"
# What the Prometheus Operator serves; passed to `helm template` as a capability.
PODMONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The smallest values that render the chart's defaults (its production layout).
REQUIRED_VALUES = [
    "database.url=postgresql+psycopg://sdserve:pw@postgresql:5432/sdserve",
    "imageStore.url=s3://bucket/prefix",
]


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    """helm and kubectl; `make deploy-tools` fetches them when this checkout has none."""
    if not (HELM.exists() and KUBECTL.exists()):
        result = subprocess.run(
            ["make", "-s", "deploy-tools"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0, f"make deploy-tools failed:\n{result.stderr}"
    return {"helm": HELM, "kubectl": KUBECTL}


@pytest.fixture(scope="session")
def helm_env(tools, tmp_path_factory) -> dict[str, str]:
    """Keeps helm's cache, config and data out of the user's home."""
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="session")
def helm(tools, helm_env):
    """Runs helm; returns the CompletedProcess."""

    def helm_run(*args: str | Path) -> subprocess.CompletedProcess:
        return run([tools["helm"], *args], env=helm_env)

    return helm_run


@pytest.fixture(scope="session")
def render(helm):
    """`helm template` of the chart; returns its documents or fails with helm's message."""

    def render_chart(
        *args: str | Path,
        release: str = "sdserve",
        capabilities: bool = True,
        namespace: str = "sdserve",
    ) -> list[dict]:
        command = ["template", release, CHART, "--namespace", namespace]
        command += ["--kube-version", KUBE_VERSION]
        if capabilities:
            command += ["--api-versions", PODMONITOR_API]
        result = helm(*command, *args)
        assert result.returncode == 0, result.stderr
        return load_documents(result.stdout)

    return render_chart


@pytest.fixture(scope="session")
def rendered(render) -> dict[str, list[dict]]:
    """Every manifest set the project ships: the chart per ci values file, the chart's
    defaults, and k8s/."""
    return {
        **{f"helm:{path.name}": render("-f", path) for path in CI_VALUES},
        "helm:defaults": render(*(a for v in REQUIRED_VALUES for a in ("--set", v))),
    }


@pytest.fixture(scope="session")
def kustomized(tools) -> list[dict]:
    result = run([tools["kubectl"], "kustomize", REPO / "k8s"])
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


@pytest.fixture(scope="session")
def manifests(rendered, kustomized) -> dict[str, list[dict]]:
    return {**rendered, "k8s": kustomized}
