# The cache-aware router in front of MILI replicas: sglang-router (PyPI, a Rust binary in a wheel), pinned to the
# version tests/integration/test_routing.py checks against MILI.
#
#   docker build -f deploy/docker/router.Dockerfile -t mili-router:0.3.2 deploy/docker
#   docker run -p 8080:8080 mili-router:0.3.2 --worker-urls http://mili-0:8000 http://mili-1:8000
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG SGLANG_ROUTER_VERSION=0.3.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/router/bin:$PATH
RUN python3 -m venv /opt/router && pip install --quiet "sglang-router==${SGLANG_ROUTER_VERSION}" \
    && useradd --system --uid 10002 --no-create-home --shell /usr/sbin/nologin router
USER 10002
EXPOSE 8080 29000
# /liveness: the process answers; /readiness: at least one healthy MILI replica behind it
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/liveness', timeout=2)"]
ENTRYPOINT ["python3", "-m", "sglang_router.launch_router", "--host", "0.0.0.0", "--port", "8080", \
            "--policy", "cache_aware", "--prometheus-host", "0.0.0.0", "--prometheus-port", "29000"]
