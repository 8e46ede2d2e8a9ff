"""The container images (deploy/docker), built and run for real where a Docker daemon answers: MILI's serves a
mounted checkpoint as a non-root user on a read-only root filesystem, configured by MILI_* variables alone; its
HEALTHCHECK turns healthy; the official openai client gets a completion, directly and through the router image;
`docker stop` (SIGTERM) lets a stream in flight finish whole and the container exits 0; MAX's compile cache lands
on the /cache volume.

No registry can be reached from this project's machines, so the base image is made here by
deploy/docker/local-base-image.sh (debootstrap) unless the default python:3.11-slim-bookworm is already present.
The first build downloads MILI's dependencies into the image (~1.5 GB, several minutes); Docker's layer cache
makes later builds take about a minute. Without a Docker daemon the test is skipped, saying why (.ci/run starts
one where it can).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mili.checkpoints import cached_checkpoint
from tests.servers import ROOT, free_port

DEFAULT_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "mili-local/python:3.11-bookworm"
IMAGE = "mili-test:latest"
ROUTER_IMAGE = "mili-router-test:latest"
UID = "10001"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def daemon_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out: no Docker daemon answers"
    if info.returncode != 0:
        return f"no Docker daemon answers (docker info: {info.stderr.strip().splitlines()[-1:]})"
    return None


def base_image() -> str:
    """The default base if it is here already; otherwise one made from Debian's packages (no registry needed)."""
    for image in (DEFAULT_BASE, LOCAL_BASE):
        if docker("image", "inspect", image, check=False).returncode == 0:
            return image
    if shutil.which("debootstrap") is None:
        pytest.skip(f"no base image ({DEFAULT_BASE} cannot be pulled without a registry) and no debootstrap to make "
                    f"one (apt-get install debootstrap)")
    subprocess.run([str(ROOT / "deploy" / "docker" / "local-base-image.sh"), LOCAL_BASE], check=True, timeout=900)
    return LOCAL_BASE


def image_id(tag: str) -> str | None:
    found = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def build_image(dockerfile: str, context: str, tag: str, base: str) -> None:
    """docker build with the classic builder (DOCKER_BUILDKIT=0: this machine's Docker has no buildx) and host
    networking (pip in the build reaches the package index as the host does). The image this tag named before is
    removed once replaced, with the layers only it used: each change of the sources would otherwise leave ~1.7 GB
    behind. (The build stage's layers stay: they are the cache that makes the next build take a minute.)"""
    previous = image_id(tag)
    started = time.monotonic()
    build = subprocess.run(["docker", "build", "--network", "host", "-f", dockerfile, "--build-arg",
                            f"BASE_IMAGE={base}", "-t", tag, context], cwd=ROOT, capture_output=True, text=True,
                           timeout=2400, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, f"docker build -f {dockerfile}:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"built {tag} on {base} in {time.monotonic() - started:.0f} s")
    if previous is not None and previous != image_id(tag):
        docker("rmi", previous, check=False)  # refused (and kept) while a container still uses it


@pytest.fixture(scope="module")
def image() -> str:
    if reason := daemon_unavailable():
        pytest.skip(reason)
    build_image("deploy/docker/Dockerfile", ".", IMAGE, base_image())
    return IMAGE


@pytest.fixture(scope="module")
def router_image(image: str) -> str:
    """deploy/docker/router.Dockerfile on the same base (after `image`, so the daemon and base are known good)."""
    build_image("deploy/docker/router.Dockerfile", "deploy/docker", ROUTER_IMAGE, base_image())
    return ROUTER_IMAGE


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """The image serving the tiny test checkpoint (mounted read-only) on a free port; yields (name, url, cache)."""
    # A copy the container's user (uid 10001) can read: the shared checkpoint cache may be private to root.
    model = Path(shutil.copytree(cached_checkpoint("tiny-tied-gqa2-d64"), tmp_path / "model"))
    for path in (tmp_path, model, *model.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)  # ... and writes MAX's compile cache here
    port = free_port()
    name = f"mili-test-{uuid.uuid4().hex[:8]}"
    docker("run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "--volume", f"{model}:/models/tiny:ro", "--volume", f"{cache}:/cache",
           "--env", "MILI_MODEL=/models/tiny", "--env", f"MILI_PORT={port}", "--env", "MILI_HOST=127.0.0.1",
           "--env", "MILI_SERVED_MODEL_NAME=tiny", "--env", "MILI_KV_CACHE_MEMORY=2e8",
           "--env", "MILI_MAX_MODEL_LEN=256", "--env", "MILI_SHUTDOWN_GRACE=30", image)
    try:
        yield name, f"http://127.0.0.1:{port}", cache
    finally:
        logs = docker("logs", "--tail", "40", name, check=False)
        print(f"container log (last lines):\n{logs.stdout}{logs.stderr}")
        docker("rm", "--force", name, check=False)


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name).stdout)[0]


def wait_serving(name: str, url: str, timeout_s: float) -> None:
    """Until /health answers 200; fails at once, with the log, if the container exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = inspect(name)["State"]
        if not state["Running"]:
            logs = docker("logs", "--tail", "30", name, check=False)
            raise AssertionError(f"the container exited ({state['ExitCode']}) while starting:\n{logs.stderr}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the container did not start serving"
        time.sleep(1)


def assert_the_router_image_routes_to(router_image: str, replica_url: str) -> None:
    """The router image in front of the running MILI container: ready once it sees the replica, and a completion
    through it comes back from MILI under the served name."""
    port, metrics_port = free_port(), free_port()
    name = f"mili-router-test-{uuid.uuid4().hex[:8]}"
    docker("run", "--detach", "--name", name, "--network", "host", router_image, "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-port", str(metrics_port), "--worker-urls", replica_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, docker("logs", "--tail", "20", name, check=False).stderr
            time.sleep(1)
        through = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = through.completions.create(model="tiny", prompt="Routed", max_tokens=4, extra_body={"ignore_eos": True})
        assert out.model == "tiny" and out.usage.completion_tokens == 4
    finally:
        docker("rm", "--force", name, check=False)


@pytest.mark.slow
def test_the_image_serves_drains_on_sigterm_and_keeps_its_compile_cache(container, router_image):
    name, url, cache = container
    wait_serving(name, url, timeout_s=900)
    config = inspect(name)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert docker("exec", name, "id", "-u").stdout.strip() == UID
    deadline = time.monotonic() + 90  # HEALTHCHECK runs every 15 s: healthy after the first check passes
    while inspect(name)["State"]["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {inspect(name)['State']['Health']}"
        time.sleep(2)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny", prompt="Hello from a container", max_tokens=8,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.choices[0].text
    assert_the_router_image_routes_to(router_image, url)

    # docker stop sends SIGTERM: the stream in flight must finish whole, then the container exits 0.
    stream = client.completions.create(model="tiny", prompt="A long answer", max_tokens=200, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    stopper = subprocess.Popen(["docker", "stop", "--time", "60", name], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 503  # draining: no new work
    chunks += list(stream)
    assert stopper.wait(timeout=90) == 0
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish_reasons == ["length"] and chunks[-1].usage.completion_tokens == 200  # the stream ran to its end
    state = inspect(name)["State"]
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert any((cache / "modular").rglob("*")), "MAX's compile cache did not land on the /cache volume"
