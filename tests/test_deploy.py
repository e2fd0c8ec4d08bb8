"""docker-compose.yml and the image, checked as far as possible without a Docker engine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import yaml

from cartwise.cli import main as cli_main
from cartwise.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SETTINGS = {f"CARTWISE_{f.name.upper()}" for f in dataclasses.fields(Settings)}


def test_every_cartwise_variable_is_a_setting_and_parses():
    for name, svc in COMPOSE["services"].items():
        env = svc.get("environment", {})
        for key in env:
            if key.startswith("CARTWISE_"):
                assert key in SETTINGS, f"{name}: {key} is not a setting"
        values = {k.removeprefix("CARTWISE_").lower(): v for k, v in env.items()
                  if k.startswith("CARTWISE_")}
        for field in dataclasses.fields(Settings):
            if field.name in values and field.type in ("int", "float"):
                float(values[field.name])  # numbers must be numbers


def test_images_and_files_exist():
    worker = COMPOSE["services"]["worker"]
    dockerfile = ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]
    assert dockerfile.is_file()
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"COPY (\S+)", line)
        if m and not m.group(1).startswith("--"):
            assert (ROOT / m.group(1)).exists(), m.group(1)


def test_commands_are_real_cli_commands(capsys):
    for name in ("worker", "simulator", "api"):
        command = COMPOSE["services"][name]["command"]
        try:
            cli_main([command[0], "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, (name, command)
        assert "usage: cartwise" in capsys.readouterr().out


def test_kafka_is_kraft_and_redis_is_persistent_with_a_password():
    kafka = COMPOSE["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka
    redis_cmd = COMPOSE["services"]["redis"]["command"]
    assert "--appendonly" in redis_cmd and "--requirepass" in redis_cmd
    url = COMPOSE["services"]["worker"]["environment"]["CARTWISE_REDIS_URL"]
    assert url.startswith("redis://:") and "@redis:6379" in url
    assert COMPOSE["services"]["worker"]["environment"]["CARTWISE_BROKER"] == "kafka:9092"
    assert set(COMPOSE["volumes"]) == {"kafka-data", "redis-data", "prometheus-data",
                                       "grafana-data"}


def test_api_service_listens_where_it_publishes_and_needs_keys():
    api = COMPOSE["services"]["api"]
    env = api["environment"]
    assert env["CARTWISE_API_HOST"] == "0.0.0.0"
    assert api["ports"] == [f"{env['CARTWISE_API_PORT']}:{env['CARTWISE_API_PORT']}"]
    assert env["CARTWISE_API_PORT"] in " ".join(api["healthcheck"]["test"])
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    # Keys must come from the operator: compose refuses to start without them.
    assert ":?" in env["CARTWISE_API_KEYS"]
    assert env["CARTWISE_REDIS_URL"] == COMPOSE["services"]["worker"]["environment"][
        "CARTWISE_REDIS_URL"]
    assert api["image"] == COMPOSE["services"]["worker"]["image"]


def known_metrics() -> set[str]:
    """Every sample name the worker and the API expose (with _total, _bucket, ...)."""
    from api.metrics import ApiMetrics
    from streams.metrics import WorkerCollector
    from streams.stats import Stats

    api = ApiMetrics()
    api.observe("GET", "/x", 200, 0.001)
    api.ingest.labels("events", "accepted", "").inc()
    api.fallback.labels("trending").inc()
    api.rate_limited.labels("read").inc()
    api.stream_lag.labels("t", "0").set(0)
    api.stream_stalled.labels("t", "0").set(0)
    names = {s.name for fam in api.registry.collect() for s in fam.samples}
    stats = Stats("w")
    stats.counters.update({"applied.view": 1, "dlq.bad_json": 1, "duplicate": 1,
                           "context.errors": 1, "context.checkpoint_conflicts": 1})
    stats.seconds["context.process"] = 1.0
    stats.observe("user", 0.1)
    with stats.redis_write("user_lists"):
        pass
    with contextlib.suppress(ConnectionError), stats.redis_write("catalog"):
        raise ConnectionError("down")
    stats.partitions = [{"stage": "context", "topic": "t", "partition": 0, "size": 1,
                         "checkpoint": 0, "lag": 0}]
    names |= {s.name for fam in WorkerCollector(stats).collect() for s in fam.samples}
    return names


def metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b(cartwise_[a-z_]+)\b", expr))
    assert words, expr
    return words


def test_monitoring_files_exist_and_match_the_metrics_we_expose():
    known = known_metrics()
    for name in ("prometheus", "grafana"):
        for volume in COMPOSE["services"][name]["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), (name, src)
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in prom["scrape_configs"]}
    worker_env = COMPOSE["services"]["worker"]["environment"]
    api_env = COMPOSE["services"]["api"]["environment"]
    assert ports == {"cartwise-worker": int(worker_env["CARTWISE_METRICS_PORT"]),
                     "cartwise-api": int(api_env["CARTWISE_API_PORT"])}
    mounted = {v.split(":")[1] for v in COMPOSE["services"]["prometheus"]["volumes"]}
    assert set(prom["rule_files"]) <= mounted

    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for wanted in ("CartwiseLagGrowing", "CartwisePartitionStalled", "CartwiseFreshnessP99High",
                   "CartwiseDeadLetterSpike"):
        assert wanted in alerts
    docs = (ROOT / "docs/operations.md").read_text().lower()
    for name, rule in alerts.items():
        assert metric_names(rule["expr"]) <= known, name
        anchor = rule["annotations"]["runbook"].split("#")[1]
        heading = anchor.replace("-", " ")
        assert re.search(rf"^#+ {heading}$", docs, re.M), (name, anchor)  # the runbook exists

    dash = json.loads((ROOT / "deploy/grafana/dashboards/cartwise.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        assert metric_names(expr) <= known, expr
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in COMPOSE["services"]["prometheus"]["ports"]


def test_kubernetes_manifests_are_consistent():
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/cartwise.yaml").read_text()))
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    env = {**by_kind["ConfigMap"]["cartwise"]["data"],
           **by_kind["Secret"]["cartwise"]["stringData"]}
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    Settings.from_env()  # the defaults parse; values below must too
    for field in dataclasses.fields(Settings):
        key = f"CARTWISE_{field.name.upper()}"
        if key in env and field.type in ("int", "float"):
            float(env[key])
    deployments = by_kind["Deployment"]
    api = deployments["cartwise-api"]["spec"]["template"]["spec"]["containers"][0]
    worker = deployments["cartwise-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["ports"][0]["containerPort"] == int(env["CARTWISE_API_PORT"])
    assert worker["ports"][0]["containerPort"] == int(env["CARTWISE_METRICS_PORT"])
    for c in (api, worker):
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        cli_args = c["args"]
        try:
            cli_main([cli_args[0], "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
    # Every PodDisruptionBudget and Service selects the pods of a Deployment.
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for kind in ("PodDisruptionBudget", "Service"):
        for name, d in by_kind[kind].items():
            sel = d["spec"]["selector"].get("matchLabels", d["spec"]["selector"])
            assert any(sel.items() <= lab.items() for lab in labels), (kind, name)
    assert set(by_kind["PodDisruptionBudget"]) == set(deployments)
