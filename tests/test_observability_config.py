"""The dashboards and alert rules of deploy/: checked by promtool, unit-tested on synthetic
series, and every metric their PromQL reads checked against what the processes export.

The exported names are scraped, not listed by hand: the API is served against a real
database (its collectors read it), the hub's, router's and gateway's modules are
imported as their processes import them, and a health server is started. A dashboard
or rule that queries a metric nobody exports fails here. promtool is Debian's
`prometheus` package (scripts/test installs it); a missing one fails, never skips.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import psycopg
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from alerts.escalation import claim_due
from api.main import READY_TIMEOUT_S, create_app
from devices.kinds import DeviceKind
from devices.watch_ids import RegistryWatches
from gateway.watch_server import WatchCountsCollector, WatchServer, WatchServerConfig
from shouhu.embedded.postgres import LocalPostgres, free_port
from shouhu.health_server import start_health_server
from shouhu.settings import Settings
from tests.support.builders import add_device, add_resident, add_small_county
from tests.support.database import fresh_database
from tests.support.escalation import press

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
OPERATIONS = ROOT / "docs" / "operations.md"
COMPOSE = ROOT / "docker-compose.yml"

# What each long-running process imports for its metrics (launch/cli.py's verbs).
PROCESS_MODULES = ("hub.service", "alerts.router", "alerts.care_sweep", "launch.gateway", "api.main")
# Series Prometheus makes itself, not any process.
PROMETHEUS_MADE = frozenset({"up"})
# The alerts the unit tests must show firing (issue 18).
MUST_FIRE_IN_UNIT_TESTS = frozenset({"ShouhuIncidentUnreached", "ShouhuHubNotReady"})
SEVERITIES = frozenset({"critical", "warning"})

MISSING_PROMTOOL = (
    "promtool is not installed: `apt-get install prometheus` (Debian's package has "
    "/usr/bin/promtool; scripts/test installs it). These tests never skip."
)


# --------------------------------------------------------------------------- PromQL


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLES = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
     "inf", "nan", "Inf", "NaN"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names or values, durations or Grafana variables."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _VARIABLES.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(match.group())
    return names


def exported_sample_names(text: str) -> set[str]:
    """Every sample name the exposition ``text`` declares, whether or not it has samples yet
    (a labelled counter nobody incremented is declared all the same)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names


# --------------------------------------------------------------------------- helpers


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(MISSING_PROMTOOL, pytrace=False)
    return subprocess.run([binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False)


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                yield path.name, panel["title"], target["expr"]


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, spaces to dashes, punctuation dropped."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _api_metrics(postgres: LocalPostgres) -> str:
    """The API's /metrics, served against a fresh database (its collectors read it)."""
    for url in fresh_database(postgres):  # one database, dropped when the loop ends
        with TestClient(create_app(Settings(database_url=url))) as client:
            response = client.get("/metrics")
    assert response.status_code == 200
    return str(response.text)


def _health_server_metrics() -> str:
    """A health server's /metrics, as the hub, the router and the gateway serve it."""
    server = start_health_server(free_port(), lambda: True, host="127.0.0.1")
    try:
        with urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5) as reply:
            return str(reply.read().decode())
    finally:
        server.shutdown()
        server.server_close()


def _gateway_metrics() -> str:
    """The gateway's counts, as `shouhu gateway watch` registers them (never connected here)."""
    registry = CollectorRegistry(auto_describe=False)
    config = WatchServerConfig("mqtt://127.0.0.1:1", "metrics-names", UTC, host="127.0.0.1", port=0)
    registry.register(WatchCountsCollector(WatchServer(config, RegistryWatches(None))))
    return generate_latest(registry).decode()


@pytest.fixture(scope="module")
def exported(postgres: LocalPostgres) -> set[str]:
    """Every metric name the hub, router, gateway and API export, scraped from their /metrics."""
    for module in PROCESS_MODULES:
        importlib.import_module(module)
    texts = (_api_metrics(postgres), _health_server_metrics(), _gateway_metrics())
    return set().union(*(exported_sample_names(text) for text in texts)) | PROMETHEUS_MADE


# --------------------------------------------------------------------------- promtool


def test_the_rules_and_prometheus_yml_pass_promtool_check() -> None:
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout, "prometheus.yml does not load alerts.yml"


def test_the_rules_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_show_the_unreached_and_hub_not_ready_alerts_firing() -> None:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text(encoding="utf-8"))
    fired = {
        case["alertname"]
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired >= MUST_FIRE_IN_UNIT_TESTS


# --------------------------------------------------------------------------- rules


def test_every_rule_waits_has_a_severity_and_says_what_to_do_in_both_languages() -> None:
    anchors = _heading_anchors(OPERATIONS.read_text(encoding="utf-8"))
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names)), "two rules with one name"
    for rule in _rules():
        name = rule["alert"]
        assert "for" in rule, f"{name}: no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        for key in ("summary", "summary_zh", "description", "description_zh"):
            assert notes.get(key), f"{name}: no {key}"
        for key in ("summary_zh", "description_zh"):
            assert re.search(r"[\u4e00-\u9fff]", notes[key]), f"{name}: {key} is not Chinese"
        anchor = name.lower()
        assert notes["runbook"] == f"docs/operations.md#{anchor}", name
        assert f"docs/operations.md#{anchor}" in notes["description"], name
        assert anchor in anchors, f"docs/operations.md has no heading for {name}"


# --------------------------------------------------------------------------- metric names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job) (rate(foo_total{a="b", le="+Inf"}[5m]))', {"foo_total"}),
        ("a / on (x) group_left (y) b offset 15m > 0 unless c", {"a", "b", "c"}),
        ('label_replace(max by (i) (q{lane=~"x|y"}), "lane", "alarm", "", "") > 0', {"q"}),
        ("histogram_quantile(0.99, sum(rate(h_bucket[$__rate_interval])) by (le))", {"h_bucket"}),
        ("max without (instance) (nobody_exports_this) == 0 and bool 1e3", {"nobody_exports_this"}),
    ],
)
def test_metric_names_finds_what_a_query_reads(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_exported_names_are_scraped_from_every_process(exported: set[str]) -> None:
    # One of each: the hub, the router, the gateway, the API's database collectors, a health server.
    for name in (
        "shouhu_hub_dead_letters_total",
        "shouhu_router_step_lateness_seconds_bucket",
        "shouhu_watch_gateway_events_total",
        "shouhu_incidents_unreached_total",
        "shouhu_camera_uptime_ratio",
        "shouhu_database_up",
        "shouhu_ready",
        "process_start_time_seconds",
    ):
        assert name in exported, name
    assert "shouhu_no_such_metric_total" not in exported


def test_every_metric_the_rules_read_is_exported(exported: set[str]) -> None:
    unknown = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - exported)
        for rule in _rules()
        if metric_names(rule["expr"]) - exported
    }
    assert unknown == {}


def test_every_metric_the_dashboards_read_is_exported(exported: set[str]) -> None:
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    unknown = [
        (board, title, sorted(metric_names(expr) - exported))
        for board, title, expr in _dashboard_queries()
        if metric_names(expr) - exported
    ]
    assert unknown == []


# --------------------------------------------------------------------------- Grafana


def test_the_dashboards_cover_the_issue_and_use_the_provisioned_data_source() -> None:
    source = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    uids = [json.loads(path.read_text(encoding="utf-8"))["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)), "two dashboards with one uid"
    read: set[str] = set()
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, f"{path.name}: {panel['title']}"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid, f"{path.name}: {panel['title']}"
                read |= metric_names(target["expr"])
    for wanted in (
        "shouhu_hub_messages_received_total",  # ingest rates
        "shouhu_hub_commit_seconds_bucket",  # ingest lag
        "shouhu_hub_dead_letters_total",  # dead letters by reason
        "shouhu_sos_press_to_first_request_seconds_bucket",  # SOS press -> page
        "shouhu_router_step_lateness_seconds_bucket",  # step lateness
        "shouhu_incidents_unreached_total",  # unreached incidents
        "shouhu_router_attempts_total",  # provider errors by channel
        "shouhu_devices_by_area",  # devices online by kind and area
        "shouhu_camera_uptime_ratio",  # 在线率
    ):
        assert wanted in read, wanted


def test_compose_mounts_what_grafana_and_prometheus_are_told_to_read() -> None:
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]

    def mounts(service: str) -> dict[str, str]:
        pairs = (volume.split(":")[:2] for volume in services[service]["volumes"])
        return {target: source for source, target in pairs}

    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "shouhu.yml").read_text())
    assert grafana[provider["providers"][0]["options"]["path"]] == "./deploy/grafana/dashboards"
    prometheus = mounts("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert prometheus[f"/etc/prometheus/{rule_file}"] == f"./deploy/prometheus/{rule_file}"


# --------------------------------------------------------------------------- the metrics the rules need


def _value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return None


def test_a_health_server_reports_shouhu_ready_as_its_readyz() -> None:
    ready = [True]
    server = start_health_server(free_port(), lambda: ready[0], host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urlopen(f"{base}/metrics", timeout=5) as reply:
            assert _value(reply.read().decode(), "shouhu_ready") == 1.0
        ready[0] = False
        with urlopen(f"{base}/metrics", timeout=5) as reply:
            assert _value(reply.read().decode(), "shouhu_ready") == 0.0
    finally:
        server.shutdown()
        server.server_close()


def test_the_api_reports_ready_and_the_database_up(database_url: str) -> None:
    with TestClient(create_app(Settings(database_url=database_url))) as client:
        text = client.get("/metrics").text
    assert _value(text, "shouhu_ready") == 1.0
    assert _value(text, "shouhu_database_up") == 1.0


def test_a_scrape_while_the_database_is_away_says_so_quickly() -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=1"
    with TestClient(create_app(Settings(database_url=nowhere))) as client:
        started = time.monotonic()
        response = client.get("/metrics")
        took = time.monotonic() - started
    assert response.status_code == 200
    assert _value(response.text, "shouhu_ready") == 0.0
    assert _value(response.text, "shouhu_database_up") == 0.0
    assert "shouhu_camera_uptime_ratio" not in response.text, "the readers were not skipped"
    # One readiness check, not a pool timeout per reader: well inside a 10 s scrape timeout.
    assert took < READY_TIMEOUT_S + 1.5


def test_a_step_claimed_late_is_measured(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        tree = add_small_county(conn)
        add_resident(conn, "R", grid=tree.grid_a)
        add_device(conn, "W", kind=DeviceKind.WRISTBAND, resident="R")
    pressed = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    press(database_url, "W", pressed)
    labels = {"kind": "step"}
    count = REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_sum", labels) or 0.0
    late = REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_bucket", {**labels, "le": "30.0"}) or 0.0
    with psycopg.connect(database_url) as conn:
        assert len(claim_due(conn, pressed + timedelta(seconds=42), 10)) == 1
    assert REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_count", labels) == count + 1
    assert REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_sum", labels) == pytest.approx(total + 42)
    assert REGISTRY.get_sample_value("shouhu_router_step_lateness_seconds_bucket", {**labels, "le": "30.0"}) == late
