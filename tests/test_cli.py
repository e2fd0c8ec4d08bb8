"""The command line: expected failures end in one line with a hint and a non-zero exit (each
run as a real subprocess), every command's help describes it and shows defaults, the demo
names the file with its exports and keys, `demo --rate 0` idles, `api --workers N` serves."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from cartwise.cli import build_parser
from cartwise.embedded import free_port
from cartwise.harness import stop_worker, wait_http, worker_env

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CARTWISE_")}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "cartwise", *args], env=full, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_no_redis_is_one_line_with_a_hint():
    proc = cli("show", "item", "x",
               env={"CARTWISE_REDIS_URL": f"redis://:secret@127.0.0.1:{closed_port()}"})
    line = one_line_failure(proc, "cartwise show: cannot reach Redis", "CARTWISE_REDIS_URL")
    assert "secret" not in line  # the password is not printed
    one_line_failure(cli("stats", env={"CARTWISE_REDIS_URL": f"redis://127.0.0.1:"
                                       f"{closed_port()}"}), "cannot reach Redis")


def test_no_broker_is_one_line_with_a_hint(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("event_id,type,user_id,item_id,ts\ne1,view,u1,a,1700000000\n")
    proc = cli("import", "events", str(path), env={
        "CARTWISE_BROKER": f"127.0.0.1:{closed_port()}",
        "CARTWISE_REDIS_URL": f"redis://127.0.0.1:{closed_port()}"})
    one_line_failure(proc, "cartwise import events: cannot reach the broker", "CARTWISE_BROKER")


@pytest.mark.parametrize("args, needle", [
    (("import", "events"), "the following arguments are required: file"),
    (("import", "events", "x.csv", "--preset", "nope"), "invalid choice: 'nope'"),
    (("import", "events", "x.csv", "--map", "colour=c"), "unknown field 'colour'"),
    (("demo", "--rate", "fast"), "invalid float value: 'fast'"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("simulate", "--rate", "0"), "--rate must be above 0"),
    (("api", "--workers", "0"), "--workers must be 1 or more"),
])
def test_bad_arguments_are_one_line_with_a_hint(args, needle, tmp_path):
    (tmp_path / "x.csv").write_text("event_id\n")
    line = one_line_failure(cli(*args, cwd=tmp_path), needle)
    assert line.startswith("cartwise")


def test_a_bad_setting_is_one_line_with_a_hint(tmp_path):
    for args in (("show", "item", "x"), ("demo",)):
        one_line_failure(cli(*args, env={"CARTWISE_PARTITIONS": "many"}, cwd=tmp_path),
                         "bad setting", "CARTWISE_")
    assert not (tmp_path / ".cartwise").exists()  # the demo started nothing
    # Apache Kafka refuses a group session under 6 s and the worker would idle without a word.
    one_line_failure(cli("worker", env={"CARTWISE_SESSION_TIMEOUT_S": "3"}, cwd=tmp_path),
                     "CARTWISE_SESSION_TIMEOUT_S=3", "6..1800")
    # The learned blend is the library's only, so far: a worker must not silently ignore it.
    one_line_failure(cli("worker", env={"CARTWISE_MODEL": "blend_rate=0.1"}, cwd=tmp_path),
                     "blend_rate", "remove it from CARTWISE_MODEL")


def test_bad_files_are_one_line_with_a_hint(tmp_path):
    one_line_failure(cli("import", "events", str(tmp_path / "missing.csv")), "no such file")
    (tmp_path / "events.txt").write_text("{}\n")
    one_line_failure(cli("import", "events", str(tmp_path / "events.txt"), "--dry-run"),
                     "--format csv or --format jsonl")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("event_id,type,user_id,item_id,ts\ne1,view,Zoë,a,1700000000\n"
                      .encode("latin-1"))
    one_line_failure(cli("import", "events", str(latin), "--dry-run"), "--encoding")
    proc = cli("import", "events", str(latin), "--dry-run", "--encoding", "latin-1")
    assert proc.returncode == 0, proc.stderr


def test_rejected_lines_exit_1_with_their_numbers_and_jobs_agree(tmp_path):
    path = tmp_path / "events.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["event_id", "type", "user_id", "item_id", "ts"])
        for i in range(3000):
            w.writerow([f"e{i}", "view" if i % 500 else "jump", f"u{i % 50}", f"i{i % 70}",
                        1_700_000_000 + i])
    runs = [cli("import", "events", str(path), "--dry-run", "--json", "--batch", "256",
                "--jobs", jobs) for jobs in ("1", "2")]
    for proc in runs:
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.splitlines()[0].startswith("events.csv:2: unknown_type (type)")
        assert "events.csv:502: unknown_type" in proc.stderr
    one, two = (orjson.loads(p.stdout) for p in runs)
    assert one["sent"] == two["sent"] == 2994 and one["rejected"] == two["rejected"] == \
           {"unknown_type": 6}


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((name, sub))
                out += [(f"{name} {n}", p) for n, p in commands(sub)]
    return out


def test_every_command_has_a_description_and_shows_defaults():
    found = commands(build_parser())
    assert {"demo", "api", "import events", "import catalog", "evaluate"} <= \
           {n for n, _ in found}
    for name, p in found:
        assert p.description, name
        text = p.format_help()
        assert p.description.split()[0] in text, name
        for action in p._actions:
            if action.default not in (None, False, [], argparse.SUPPRESS) and action.help:
                assert "default" in action.help or f"(default: {action.default})" in text, \
                    (name, action.dest)


def test_demo_at_rate_0_is_idle_and_names_its_exports_file(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cartwise", "demo", "--rate", "0",
                             "--port", str(port)], cwd=tmp_path, start_new_session=True,
                            env={**{k: v for k, v in os.environ.items()
                                    if not k.startswith("CARTWISE_")}, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env_file = tmp_path / ".cartwise" / "demo" / "demo.env"
    try:
        deadline = time.monotonic() + 120
        while not env_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.2)
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in env_file.read_text().splitlines()
                       if line.startswith("export "))
        assert {"CARTWISE_BROKER", "CARTWISE_REDIS_URL", "CARTWISE_API_URL",
                "CARTWISE_DEMO_READ_KEY", "CARTWISE_DEMO_INGEST_KEY",
                "CARTWISE_DEMO_ADMIN_KEY"} <= set(exports)
        assert env_file.stat().st_mode & 0o077 == 0  # keys: readable by the owner only
        base = exports["CARTWISE_API_URL"]
        wait_http(base + "/ready", proc)
        got = httpx.get(base + "/v1/items/pho-000/suggestions",
                        headers={"X-API-Key": exports["CARTWISE_DEMO_READ_KEY"]}, timeout=10)
        assert got.status_code == 200  # the key written to the file works
        time.sleep(3)  # an idle stack: no catalog and no events arrive
        r = redis.Redis.from_url(exports["CARTWISE_REDIS_URL"])
        assert r.hlen("cw:catalog") == 0 and not list(r.scan_iter("cw:item:*"))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert str(Path(".cartwise/demo/demo.env")) in out and "Traceback" not in out


def test_api_workers_serve_from_several_processes(make_settings, tmp_path):
    from api.auth import new_key

    key, entry = new_key("read")
    # A short header deadline, to see that every process got the settings' limits.
    settings = make_settings("cli-api", api_port=free_port(), api_keys=entry,
                             header_timeout_s=1.0)
    env = worker_env(settings)
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen([sys.executable, "-m", "cartwise", "api", "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{settings.api_port}"
        wait_http(base + "/health", proc)
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < 2:
            assert time.monotonic() < deadline, children(proc.pid)
            time.sleep(0.2)
        for _ in range(20):
            got = httpx.get(base + "/v1/items/x/suggestions", headers={"X-API-Key": key},
                            timeout=10)
            assert got.status_code == 200, got.text
        for _ in range(4):  # connections land on either process; each closes slow headers
            with socket.create_connection(("127.0.0.1", settings.api_port), timeout=8) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        stop_worker(proc)
        print((tmp_path / "api.log").read_text()[-3000:])


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
