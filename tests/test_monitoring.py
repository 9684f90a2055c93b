"""The shipped monitoring (issue #14 item 5): monitoring/alerts.yml, its promtool unit tests in
monitoring/alerts.test.yml, and monitoring/grafana-dashboard.json.

promtool (Debian's prometheus package, installed by scripts/setup) checks the rules and runs
their unit tests; the rest ties the files to the code: every series a rule or a panel reads is
one the daemon's registry exposes, with labels and label values it really has, and what the
issue asks to be alerted on and shown is there.  One slow test runs a real Prometheus (the same
package) against a real ``twistd anonticket`` with the shipped rules and the dashboard's queries.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from anonticket.metrics import Metrics

from .children import dies_with_parent

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
DOC = REPO / "docs" / "monitoring.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package)"
)

# What issue #14 item 5 asks alerts for, and the series that can show each.  Each entry needs
# every name listed in some alert's expression.
ALERTED = {
    "wallet down": {"anonticket_monitor_last_success_timestamp_seconds"},
    "wallet lagging": {"anonticket_monitor_lag_blocks", "anonticket_wallet_height"},
    "tor not bootstrapped": {"anonticket_tor_bootstrap_percent"},
    "onion not published": {"anonticket_onion_state"},
    "store errors": {"anonticket_store_errors_total"},
    "sync failures (wallet polls)": {"anonticket_monitor_polls_total"},
    "webhook backlog": {
        "anonticket_webhook_oldest_waiting_seconds",
        "anonticket_webhook_failed_events",
    },
    "5xx": {"anonticket_http_responses_total"},
    "daemon down": {"up"},
    "open files": {"process_open_fds", "process_max_fds"},
}

# What the dashboard must show, and the series that show it.
SHOWN = {
    "request rates and 5xx by site": {"anonticket_http_responses_total"},
    "latencies by site": {"anonticket_http_request_duration_seconds_bucket"},
    "redeems": {"anonticket_redeem_requests_total"},
    "spends": {"anonticket_spend_requests_total"},
    "passes": {
        "anonticket_pass_issuance_requests_total",
        "anonticket_pass_verifications_total",
    },
    "monitor lag and last poll": {
        "anonticket_monitor_lag_blocks",
        "anonticket_monitor_last_success_timestamp_seconds",
        "anonticket_monitor_polls_total",
    },
    "wallet height": {"anonticket_wallet_height"},
    "onion state and tor bootstrap": {
        "anonticket_onion_state",
        "anonticket_tor_bootstrap_percent",
    },
    "webhook backlog": {
        "anonticket_webhook_backlog_events",
        "anonticket_webhook_failed_events",
        "anonticket_webhook_oldest_waiting_seconds",
    },
    "store errors": {"anonticket_store_errors_total"},
    "process memory and descriptors": {
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    },
}

NAME = re.compile(r"\b(?:anonticket|process)_[a-z0-9_]*[a-z0-9]\b|\bup\b")
SELECTOR = re.compile(r"\b((?:anonticket|process)_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


# -- the files ------------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text("utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return dashboard


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    # Strings are label values, never metric names: leave them out of the search.
    return set(NAME.findall(re.sub(r'"[^"]*"', '""', expr)))


# -- what the code exposes ------------------------------------------------------------------


class _Site:
    """Enough of a site for Metrics.watch_site: its dropped-connection counters then appear."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refused = self.evicted = self.timed_out = 0


def exposition() -> str:
    metrics = Metrics()
    metrics.watch_site(_Site("public"))
    metrics.watch_site(_Site("internal"))
    return generate_latest(metrics.registry).decode()


class Exposed:
    """Series names, label names and observed label values in a real registry's exposition.

    A family's samples exist only once a child is made, so names also come from the ``# TYPE``
    lines (with the suffixes the text format gives each type) and label names from the
    metric objects; label values only from the samples there are (the fixed sets made at
    start: outcomes, onion states, ...)."""

    SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}

    def __init__(self) -> None:
        text = exposition()
        self.text = text
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = defaultdict(set)
        self.values: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.samples: set[str] = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                for suffix in self.SUFFIXES.get(kind, ("",)):
                    self.names.add(name + suffix)
            elif line and not line.startswith("#"):
                name, _, rest = line.partition("{")
                name = name.split()[0]
                self.names.add(name)
                self.samples.add(name)
                labels = rest.rpartition("}")[0] if rest else ""
                for label, _, value in MATCHER.findall(labels):
                    self.labels[name].add(label)
                    self.values[(name, label)].add(value)
        for collector in Metrics().registry._collector_to_names:
            labelnames = getattr(collector, "_labelnames", ())
            kind = getattr(collector, "_type", "")
            base = getattr(collector, "_name", "")
            if not labelnames or not base:
                continue
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            for suffix in suffixes.get(kind, ("",)):
                self.labels[base + suffix].update(labelnames)


@pytest.fixture(scope="module")
def exposed() -> Exposed:
    return Exposed()


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    return [(name, MATCHER.findall(body)) for name, body in SELECTOR.findall(expr)]


def every_expression() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in load_rules()] + [
        (f"panel {title!r}", expr) for title, expr in dashboard_queries()
    ]


# -- promtool -------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path):
    """The same unit tests against a copy whose wallet rule waits 10 minutes instead of 2
    must fail: they exercise the rules, not only their syntax."""
    rules = ALERTS.read_text("utf-8")
    broken = rules.replace(
        "time() - anonticket_monitor_last_success_timestamp_seconds > 120\n          and on",
        "time() - anonticket_monitor_last_success_timestamp_seconds > 600\n          and on",
    )
    assert broken != rules, "the rule this test breaks has changed: update the test"
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "AnonticketWalletDown" in result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    """Each query, with the dashboard's variables filled in, as a recording rule: promtool
    parses it as Prometheus would."""
    rules = [
        {
            "record": f"dashboard_query_{n}",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace("$job", "anonticket")
            .replace("$instance", ".*"),
        }
        for n, (_, expr) in enumerate(dashboard_queries())
    ]
    leftover = [r["expr"] for r in rules if "$" in r["expr"]]
    assert not leftover, f"a dashboard variable this test does not know: {leftover}"
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_scrape_configs_in_the_docs_pass_promtool(tmp_path: Path):
    """docs/monitoring.md's prometheus.yml examples, with their files under /etc/prometheus
    put in a temporary directory (the rules: the shipped ones; the TLS files: empty, promtool
    only checks that they are there)."""
    blocks = [
        block
        for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text("utf-8"), re.DOTALL)
        if "scrape_configs:" in block
    ]
    assert len(blocks) >= 2
    for n, block in enumerate(blocks):
        config = block.replace("/etc/prometheus/", f"{tmp_path}/")
        for path in re.findall(rf"{re.escape(str(tmp_path))}/\S+", config):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
        shutil.copy(ALERTS, tmp_path / "anonticket-alerts.yml")
        (tmp_path / f"prometheus-{n}.yml").write_text(config)
        result = promtool("check", "config", str(tmp_path / f"prometheus-{n}.yml"))
        assert result.returncode == 0, result.stdout + result.stderr


# -- the rules ------------------------------------------------------------------------------


def test_the_rules_file_has_no_yaml_aliases():
    # Prometheus reads an aliased `expr: *name` as the text "name", a valid selector that
    # matches nothing: the alert would never fire and promtool would not notice.
    events = yaml.parse(ALERTS.read_text("utf-8"))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent)]


def test_every_alert_says_what_to_do_and_where():
    doc = DOC.read_text("utf-8")
    headings = set(re.findall(r"^###? `?(Anonticket\w+)`?\s*$", doc, re.MULTILINE))
    names = [rule["alert"] for rule in load_rules()]
    assert len(names) == len(set(names)), "two rules share an alert name"
    for rule in load_rules():
        name = rule["alert"]
        assert name.startswith("Anonticket"), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert f"See docs/monitoring.md, {name}." in annotations["description"], name
        assert name in headings, f"docs/monitoring.md has no section for {name}"
    assert headings == set(names), f"sections for no alert: {headings - set(names)}"


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet():
    tests = yaml.safe_load(ALERT_TESTS.read_text("utf-8"))
    assert tests["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in load_rules()}
    assert names <= fired, f"never expected to fire: {names - fired}"
    assert names <= quiet, f"never expected to stay quiet: {names - quiet}"


def test_the_issues_alerts_are_all_there():
    used: set[str] = set()
    for rule in load_rules():
        used |= metric_names(rule["expr"])
    for what, needed in ALERTED.items():
        assert needed <= used, f"no alert on {what}: {needed - used} unused"


# -- tie to code ----------------------------------------------------------------------------


def test_every_series_read_is_one_the_daemon_exposes(exposed: Exposed):
    for where, expr in every_expression():
        names = metric_names(expr)
        assert names, f"{where} reads no anonticket, process or up series: {expr}"
        missing = names - {"up"} - exposed.names
        assert not missing, f"{where} reads series the daemon does not expose: {missing}"


def test_every_label_matched_is_one_the_series_has(exposed: Exposed):
    for where, expr in every_expression():
        for name, matchers in selectors(expr):
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    continue
                assert label in exposed.labels[name], f"{where}: {name} has no label {label}"
                known = exposed.values.get((name, label))
                if not known:
                    continue  # children made on first use (codes, operations): any value
                if op == "=":
                    wanted = {value}
                elif op == "=~" and re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
                    wanted = set(value.split("|"))
                else:
                    continue
                assert wanted <= known, f"{where}: {name}{{{label}}} is never {wanted - known}"


def test_the_wallet_rule_sees_a_wallet_never_reached(exposed: Exposed):
    """AnonticketWalletDown assumes the last-success timestamp is 0, not absent, before the
    first successful poll (so a wallet down since the start fires), and that the polls
    counter has no series before a poll ends (so a --no-monitor node never fires)."""
    assert "anonticket_monitor_last_success_timestamp_seconds 0.0" in exposed.text.splitlines()
    assert "anonticket_monitor_polls_total" not in exposed.samples


def test_the_dashboard_shows_what_the_issue_asks():
    used: set[str] = set()
    for _, expr in dashboard_queries():
        used |= metric_names(expr)
    for what, needed in SHOWN.items():
        assert needed <= used, f"the dashboard does not show {what}: {needed - used}"


# -- the dashboard --------------------------------------------------------------------------


def test_the_dashboard_is_importable_grafana_json():
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard.get("id") is None, "an exported id would clash on import"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for source in [panel["datasource"]] + [t["datasource"] for t in targets]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in targets:
            # Every query follows the job and instance chosen at the top.
            for name, matchers in selectors(target["expr"]):
                chosen = {label for label, _, value in matchers if value == f"${label}"}
                assert chosen == TARGET_LABELS, f"{panel['title']}: {name} ignores $job/$instance"


def test_the_dashboard_panels_do_not_overlap():
    taken: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


# -- a real Prometheus against a real daemon ------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


def prometheus_query(port: int, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    assert answer["status"] == "success", (query, answer)
    return answer


def wait_for(what: str, check: Any, log: Path, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except OSError:
            found = None  # Prometheus not listening yet
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")
def test_a_real_prometheus_scrapes_the_daemon_and_runs_the_rules(tmp_path: Path):
    """twistd anonticket with a wallet that is not there, scraped over loopback every second
    by Prometheus with the shipped rules: the scrape passes the internal site's Host check,
    every rule evaluates without error on real series, the wallet alert goes pending and the
    others stay quiet, and every dashboard query answers (the gauges with data)."""
    from .daemonproc import Daemon
    from .monero_regtest import free_port

    daemon = Daemon(
        tmp_path / "data",
        "--wallet-rpc",
        f"http://127.0.0.1:{free_port()}",
        "--poll-interval",
        "1",
    ).start()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": "anonticket",
                            "static_configs": [{"targets": [f"127.0.0.1:{daemon.internal_port}"]}],
                        }
                    ],
                }
            )
        )
        log = tmp_path / "prometheus.log"
        assert PROMETHEUS is not None
        with open(log, "wb") as out:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=dies_with_parent(),
            )

        def up() -> bool:
            result = prometheus_query(port, 'up{job="anonticket"}')["data"]["result"]
            return bool(result) and result[0]["value"][1] == "1"

        wait_for("the daemon scraped", up, log)

        def pending(name: str) -> list[Any]:
            query = f'ALERTS{{alertname="{name}", alertstate="pending"}}'
            result: list[Any] = prometheus_query(port, query)["data"]["result"]
            return result

        wait_for("AnonticketWalletDown pending", lambda: pending("AnonticketWalletDown"), log)
        # A few more rounds of scrapes and evaluations, then every rule has run on real series.
        time.sleep(3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as r:
            groups = json.loads(r.read())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(load_rules())
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        active = prometheus_query(port, "ALERTS")["data"]["result"]
        names = {alert["metric"]["alertname"] for alert in active}
        # Not an onion (--public tcp): no tor alert; scraped: not down; no error answered.
        assert names == {"AnonticketWalletDown"}, names

        for title, expr in dashboard_queries():
            query = (
                expr.replace("$__rate_interval", "1m")
                .replace("$job", "anonticket")
                .replace("$instance", ".*")
            )
            result = prometheus_query(port, query)["data"]["result"]
            if title in {"Version", "Scraped", "Onion state", "Resident memory", "Uptime"}:
                assert result, f"panel {title!r} has no data: {query}"
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        daemon.stop()
