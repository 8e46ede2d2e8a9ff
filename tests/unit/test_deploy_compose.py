"""deploy/compose: MILI + Prometheus + Grafana. The compose file, the Prometheus config and every PromQL query of
the Grafana dashboard are valid (checked by docker-compose and promtool, which need no daemon and no network);
the files agree with each other (mounted paths exist, the dashboard's datasource is the provisioned one); and
every metric the dashboard charts is one that `mili serve` exports, on the fake engine and on a real server.

promtool and docker-compose come from Debian (apt-get install prometheus docker-compose). Without them these
checks skip, except under CI (the variable CI set), where a missing tool is a failure: CI must run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mili.checkpoints import cached_checkpoint
from tests.servers import ROOT, mili_serve

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "mili.yaml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "mili.json"

# What the dashboard must chart, as exposed (mili/server/metrics.py: counters gain _total, histograms are read
# through _bucket; gauges keep their names, mili_preemptions_total included).
CHARTED = {
    "mili_time_to_first_token_seconds_bucket", "mili_inter_token_latency_seconds_bucket",
    "mili_e2e_request_latency_seconds_bucket", "mili_request_queue_time_seconds_bucket",
    "mili_prompt_tokens_total", "mili_generation_tokens_total", "mili_cached_prompt_tokens_total",
    "mili_requests_running", "mili_requests_waiting", "mili_kv_cache_usage_ratio", "mili_preemptions_total",
    "mili_requests_finished_total", "mili_requests_aborted_total", "mili_requests_rejected_total",
    "mili_spec_decode_acceptance_rate", "mili_spec_decode_mean_accepted_length",
}
METRIC_NAME = re.compile(r"\bmili_[A-Za-z0-9_]+")
# Grafana's interval variables, then template variables in each of its spellings: $job, ${job}, ${job:regex},
# [[job]]. promtool knows neither, so the tests put in what Grafana would.
GRAFANA_INTERVAL = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")
TEMPLATE_VARIABLE = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\]")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\s*\)$")
# ${VAR:-default} or ${VAR-default} in compose.yaml, resolved to its default (what a bare `up` gets).
COMPOSE_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def required_tool(name: str, package: str) -> str:
    """The tool's path; skips when it is missing, but fails under CI, which installs it to run these checks."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (apt-get install {package}; CI installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: CI must install it")
        pytest.skip(reason)
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows (Grafana nests them under the row)."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def panel_queries() -> list[str]:
    return [target["expr"] for panel in panels(dashboard()["panels"]) for target in panel.get("targets", [])]


def variable_selectors() -> list[str]:
    """The series selectors inside the template variables' label_values(SELECTOR, label) queries."""
    selectors = []
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("definition") or variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(query.strip())
        assert match, f"template variable {variable['name']}: expected label_values(selector, label), got {query!r}"
        selectors.append(match["selector"])
    return selectors


def as_promql(query: str) -> str:
    """A dashboard query as Prometheus would receive it from Grafana."""
    promql = TEMPLATE_VARIABLE.sub("mili", GRAFANA_INTERVAL.sub("1m", query))
    assert "$" not in promql and "[[" not in promql, f"a Grafana variable the tests do not know: {query!r}"
    return promql


def referenced_metrics() -> set[str]:
    names = {name for query in panel_queries() + variable_selectors() for name in METRIC_NAME.findall(query)}
    assert names, "no mili_ metric found in the dashboard's queries"
    return names


def compose() -> dict[str, Any]:
    """compose.yaml with each ${VAR:-default} replaced by its default (as `up` with no variables set)."""
    return yaml.safe_load(COMPOSE_VARIABLE.sub(lambda m: m["default"] or "", COMPOSE_FILE.read_text()))


def seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s", "15m") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    hours, minutes, secs = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def test_promtool_accepts_the_prometheus_config():
    promtool = required_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_mili_every_5s():
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    mili = jobs["mili"]
    assert mili.get("metrics_path", "/metrics") == "/metrics" and mili["scrape_interval"] == "5s"
    assert [target for config in mili["static_configs"] for target in config["targets"]] == ["mili:8000"]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    """promtool parses each query (with Grafana's variables filled in) as a recording rule: a typo fails here."""
    promtool = required_tool("promtool", "prometheus")
    queries = panel_queries() + variable_selectors()
    assert len(queries) >= len(CHARTED)
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(query)} for i, query in enumerate(queries)]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout, result.stdout


def test_dashboard_charts_every_mili_metric():
    missing = CHARTED - referenced_metrics()
    assert not missing, f"the dashboard charts none of {sorted(missing)}"


def test_dashboard_uses_the_provisioned_datasource():
    uids = {source["uid"] for source in load_yaml(DATASOURCES)["datasources"]}
    assert uids == {"mili-prometheus"}
    board = dashboard()
    used = [item["datasource"] for panel in panels(board["panels"]) if panel["type"] != "row"
            for item in (panel, *panel["targets"])]
    used += [variable["datasource"] for variable in board["templating"]["list"]]
    assert used and all(source == {"type": "prometheus", "uid": "mili-prometheus"} for source in used), used


def test_docker_compose_accepts_the_compose_file():
    docker_compose = required_tool("docker-compose", "docker-compose")
    # No daemon needed: `config` interpolates variables and validates against the compose schema.
    result = subprocess.run([docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                            text=True, cwd=COMPOSE_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_exist_and_grafana_finds_the_dashboards():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"mili", "prometheus", "grafana"}
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = source
            # Host paths start with . or /; anything else is a named volume, which must be declared.
            if not source.startswith((".", "/")):
                assert source in spec["volumes"], f"named volume {source} is not declared"
            elif target != "/models":  # the models folder is the user's (MILI_MODELS_DIR)
                assert (COMPOSE_DIR / source).exists(), f"{source} (mounted at {target}) is missing"
    assert mounts["/models"] == "./models" and mounts["/cache"] == "mili-cache"
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    mounted = COMPOSE_DIR / mounts[provider["options"]["path"]]
    assert (mounted / DASHBOARD.name).samefile(DASHBOARD)
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


def test_compose_builds_the_repository_image():
    build = compose()["services"]["mili"]["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file(), f"{build['dockerfile']} is missing"


def test_mili_service_health_and_shutdown():
    mili = compose()["services"]["mili"]
    test = mili["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"] and "http://127.0.0.1:8000/health" in test[-1]
    assert seconds(mili["healthcheck"]["start_period"]) >= 300, "the first start compiles the graph: minutes"
    # Docker must wait out MILI's own drain before it sends SIGKILL.
    assert seconds(mili["stop_grace_period"]) > float(mili["environment"]["MILI_SHUTDOWN_GRACE"])
    assert mili["ports"] == ["8000:8000"] and mili["environment"]["MILI_HOST"] == "0.0.0.0"
    assert mili["restart"] in ("always", "unless-stopped", "on-failure")


def exported_sample_names(text: str) -> set[str]:
    """Every sample name of a /metrics scrape: foo_total, foo_bucket, foo_sum, foo_count, gauges as they are."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_a_real_server_exports_every_metric_the_dashboard_charts():
    """The names only exist once exported: speculation on (its gauges), one finished request (the labelled
    mili_requests_finished_total), on a real `mili serve` of the tiny random checkpoint."""
    args = ["--model", str(cached_checkpoint("tiny-tied-gqa2-d64")), "--served-model-name", "tiny",
            "--speculative", "ngram", "--kv-cache-memory", "2e8", "--max-model-len", "160"]
    with mili_serve(args, "deploy-compose") as (url, _):
        for prompt in ("one two three one two three one two", "the dashboard charts"):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 8}, timeout=300)
            assert response.status_code == 200, response.text
        scrape = httpx.get(f"{url}/metrics", timeout=30)
    assert scrape.status_code == 200
    missing = referenced_metrics() - exported_sample_names(scrape.text)
    assert not missing, f"the dashboard queries metrics that mili serve does not export: {sorted(missing)}"
