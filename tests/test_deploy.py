"""docker-compose.yml and the image, checked as far as possible without a Docker engine."""

from __future__ import annotations

import dataclasses
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
    assert set(COMPOSE["volumes"]) == {"kafka-data", "redis-data"}


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
