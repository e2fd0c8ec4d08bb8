"""`cartwise import` (docs/import.md): mappings and presets, line-numbered rejects, and imports
into the embedded broker that land in a real worker's state, where a re-run changes nothing."""

from __future__ import annotations

import csv
import gzip
import itertools
import time
from pathlib import Path

import orjson
import pytest

from cartwise import datasets
from cartwise.cli import main
from cartwise.harness import snapshot, wait_complete
from cartwise.importing import Importer, MappingError, PresetSpec, Source
from cartwise.redisconn import connect
from cartwise.simulator import Shop
from streams.store import Keys
from streams.topics import ensure_topics

RETAIL = datasets.data_dir() / "online_retail" / "online_retail_2010-12-01_to_2011-10-31.csv.gz"


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def dry(path: Path, spec: PresetSpec, tmp_path: Path, **kw: object):
    from cartwise.settings import Settings

    errs = tmp_path / "stderr.txt"
    with open(errs, "w") as err:
        summary = Importer(Settings(), spec, Source(path), dry_run=True, progress=False,
                           err=err, **kw).run()
    return summary, errs.read_text()


def shop_rows(n_users: int, seed: int = 3) -> list[dict]:
    """Simulated shop events in contract form, without event ids (the import derives them)."""
    out = []
    for ev in Shop(seed=seed).events(n_users, start_ts=1_700_000_000.0, bad_rate=0.0,
                                     dup_rate=0.0):
        if isinstance(ev, bytes) or "items" in ev:
            continue  # multi-line purchases have no one-row CSV form
        out.append(ev)
    return out


# -- mapping and presets (no broker) ----------------------------------------------------------


def test_a_mapping_renames_templates_converts_and_derives_ids(tmp_path):
    path = write_csv(tmp_path / "log.csv", ["who", "what", "sku", "when", "qty", "cost"], [
        ["u1", "pv", "a", "2024-01-01 10:00:00", "", ""],
        ["u1", "buy", "a", "2024-01-01 10:05:00", "2", "9.5"],
    ])
    spec = PresetSpec("events", maps=("user_id=who", "type=what", "item_id=sku", "ts=when",
                                      "quantity=qty", "price=cost", "session_id={who}-s"),
                      types="pv=view,buy=purchase", tz="Europe/Berlin")
    preset = spec.build()
    rows = [r for _, r in Source(path).rows()]
    first, second = (preset.event(r) for r in rows)
    assert first["type"] == "view" and second["type"] == "purchase"
    assert first["ts"] == 1704099600.0  # 10:00 in Berlin is 09:00 UTC
    assert second["quantity"] == 2 and second["price"] == 9.5
    assert first["session_id"] == "u1-s"
    # The derived id is the line's content: the same on every run, different per line.
    assert first["event_id"] == preset.event(rows[0])["event_id"] != second["event_id"]


def test_bad_mappings_refuse_to_start():
    with pytest.raises(MappingError, match="unknown field 'colour'"):
        PresetSpec("events", maps=("colour=c",)).build()
    with pytest.raises(MappingError, match="FIELD=VALUE"):
        PresetSpec("events", consts=("type",)).build()
    with pytest.raises(MappingError, match="not a time zone"):
        PresetSpec("events", tz="Mars/Olympus").build()


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    path = write_csv(tmp_path / "events.csv", ["event_id", "type", "user_id", "item_id", "ts"], [
        ["e1", "view", "u1", "a", "1700000000"],
        ["e2", "view", "u1", "a", "2023-11-14 22:13:20"],  # no zone and no --tz
        ["e3", "teleport", "u1", "a", "1700000002"],
        ["e1", "view", "u1", "a", "1700000000"],  # the same event id again
        ["e4", "view", "", "b", "1700000004"],
    ])
    with open(path, "a") as f:
        f.write("e5,view,u2,c,1700000005,surplus\n\ne6,view,u2,d,1700000006\n")
    rejects = tmp_path / "rejects.jsonl"
    summary, err = dry(path, PresetSpec("events"), tmp_path, rejects=rejects)
    assert (summary.read, summary.sent, summary.duplicates) == (7, 2, 1)
    assert dict(summary.rejected) == {"bad_timestamp": 1, "unknown_type": 1,
                                      "missing_field": 1, "bad_csv": 1}
    assert err.splitlines() == [
        "events.csv:3: bad_timestamp (ts): '2023-11-14 22:13:20' has no UTC offset; give --tz "
        "(e.g. --tz UTC)",
        "events.csv:4: unknown_type (type): type 'teleport' not in ['view', 'add_to_cart', "
        "'remove_from_cart', 'purchase', 'impression', 'click']",
        "events.csv:6: missing_field (user_id): 'user_id' is required",
        "events.csv:7: bad_csv: 6 fields, the header has 5",
    ]
    filed = [orjson.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in filed] == [
        (3, "bad_timestamp"), (4, "unknown_type"), (6, "missing_field"), (7, "bad_csv")]
    assert filed[1]["row"]["type"] == "teleport"


def test_json_lines_and_catalogs_are_checked_line_by_line(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([
        '{"event_id": "o1", "type": "purchase", "user_id": "u1", "ts": "2024-01-01T10:00:00Z",'
        ' "items": [{"item_id": "a", "quantity": 2, "price": 3.5}, {"item_id": "b"}]}',
        '{"event_id": "o2", "type": "purchase", "user_id": "u1", "ts": 1704103200,',
        '',
        '["not", "an", "object"]',
        '{"event_id": "o3", "type": "view", "user_id": "u2", "item_id": "a", "ts": 1704103200,'
        ' "quantity": "2"}',
    ]) + "\n")
    summary, err = dry(events, PresetSpec("events"), tmp_path)
    assert summary.sent == 2 and dict(summary.rejected) == {"bad_json": 1, "not_an_object": 1}
    assert [line.split(":")[1] for line in err.splitlines()] == ["2", "4"]
    catalog = write_csv(tmp_path / "catalog.csv", ["item_id", "price", "in_stock"], [
        ["a", "3.5", "yes"], ["b", "-1", "1"], ["c", "2", "maybe"], ["a", "4", "0"]])
    summary, err = dry(catalog, PresetSpec("catalog"), tmp_path)
    assert (summary.sent, summary.duplicates) == (2, 1)  # a repeated item is sent: last wins
    assert dict(summary.rejected) == {"negative_price": 1, "wrong_type": 1}
    assert err.splitlines()[0].startswith("catalog.csv:3: negative_price (price)")
    assert err.splitlines()[1].startswith("catalog.csv:4: wrong_type (in_stock)")


def test_invoice_lines_preset_matches_the_online_retail_loader(tmp_path):
    if not RETAIL.is_file():
        pytest.skip(f"{RETAIL} not found; set CARTWISE_DATA_DIR")
    head = tmp_path / "retail.csv.gz"
    with gzip.open(RETAIL, "rt", newline="") as src, gzip.open(head, "wt", newline="") as dst:
        dst.writelines(itertools.islice(src, 3001))
    spec = PresetSpec("events", "invoice-lines")
    preset = spec.build()
    ours = []
    for _, row in Source(head).rows():
        try:
            ours.append(preset.event(row, preset.sequence(row)))
        except Exception:  # noqa: BLE001 - cancellations; counted by the summary test below
            continue
    firsts: dict[str, dict] = {}
    for e in ours:  # an item again in its invoice: the loader keeps the first line
        firsts.setdefault(e["event_id"], e)
    ours = list(firsts.values())
    theirs = list(itertools.islice(datasets.online_retail(datasets.data_dir()), len(ours)))
    assert len(ours) > 2500
    keys = ("user_id", "order_id", "quantity", "price", "item_id")
    assert [{k: e.get(k) for k in keys} for e in ours] == \
           [{k: e["items"][0].get(k) if k in ("quantity", "price", "item_id") else e.get(k)
             for k in keys} for e in theirs]
    summary, err = dry(head, spec, tmp_path)
    assert summary.sent == len(ours) and not summary.rejected and err == ""
    assert summary.read == summary.sent + summary.duplicates + sum(summary.skipped.values())


# -- into the broker and a worker ------------------------------------------------------------


@pytest.fixture
def env(make_settings, monkeypatch):
    """Settings of a fresh namespace, also as CARTWISE_* variables for the command line."""
    from cartwise.harness import worker_env

    settings = make_settings("import")
    ensure_topics(settings)
    for k, v in worker_env(settings).items():
        if k.startswith("CARTWISE_"):
            monkeypatch.setenv(k, v)
    return settings


def test_an_import_lands_in_the_workers_state_and_a_rerun_changes_nothing(
        env, workers, tmp_path, capsys):
    rows = shop_rows(60)
    catalog = Shop(seed=3).catalog
    write_csv(tmp_path / "catalog.csv", ["sku", "title", "category", "price", "stock"],
              [[c["item_id"], c["name"], c["category"], c["price"], 0 if i == 0 else 5]
               for i, c in enumerate(catalog)])
    assert main(["import", "catalog", str(tmp_path / "catalog.csv"), "--map", "item_id=sku",
                 "--map", "name=title", "--map", "in_stock=stock", "--no-progress"]) == 0
    path = write_csv(tmp_path / "history.csv", ["shopper", "type", "item_id", "ts", "session"],
                     [[e["user_id"], e["type"], e["item_id"], e["ts"], e.get("session_id", "")]
                      for e in rows])
    args = ["import", "events", str(path), "--map", "user_id=shopper", "--map",
            "session_id=session", "--no-progress", "--jobs", "1", "--json"]
    assert main(args) == 0
    first = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["sent"] == len(rows) and first["already"] == 0 and not first["rejected"]

    # The worker applies exactly what was sent: every shopper of the file has a context.
    worker = workers(env)
    r = connect(env)
    keys = Keys(env.prefix)
    ends = {int(p): end for p, end in first["last_offsets"].items()}
    assert sum(e + 1 for e in ends.values()) == len(rows)
    wait_complete(env, ends, procs=[worker])
    state = snapshot(env)
    assert set(state["contexts"]) == {e["user_id"] for e in rows}
    assert state["items"], "no item lists after the import"
    first_item = orjson.loads(r.hget(keys.catalog, catalog[0]["item_id"]))
    assert first_item["in_stock"] is False and first_item["name"] == catalog[0]["name"]

    # A re-run sends nothing, and the state stays exactly as it was.
    assert main(args) == 0
    again = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert again["sent"] == 0 and again["already"] == len(rows)
    time.sleep(2 * env.refresh_interval_s + 0.5)
    assert snapshot(env) == state


def test_an_interrupted_import_resumes_without_duplicates(env, tmp_path, capsys):
    """Half a file, then the whole: the second run sends only the second half."""
    rows = [[f"e{i}", "view", f"u{i % 7}", f"i{i % 13}", 1_700_000_000 + i] for i in range(400)]
    header = ["event_id", "type", "user_id", "item_id", "ts"]
    half = write_csv(tmp_path / "half.csv", header, rows[:150])
    whole = write_csv(tmp_path / "whole.csv", header, rows)
    assert main(["import", "events", str(half), "--no-progress", "--json"]) == 0
    assert main(["import", "events", str(whole), "--no-progress", "--json", "--batch", "64"]) == 0
    out = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [(o["sent"], o["already"]) for o in out] == [(150, 0), (250, 150)]


def test_ctrl_c_keeps_what_the_broker_took_and_the_rerun_sends_the_rest(env, tmp_path):
    """Interrupted once its ledger has entries, the same command sends exactly the rest: the
    topic ends up with every event once."""
    import os
    import signal
    import subprocess
    import sys

    n = 60_000
    path = write_csv(tmp_path / "big.csv", ["event_id", "type", "user_id", "item_id", "ts"],
                     [[f"e{i}", "view", f"u{i % 997}", f"i{i % 301}", 1_700_000_000 + i]
                      for i in range(n)])
    cmd = [sys.executable, "-m", "cartwise", "import", "events", str(path), "--json",
           "--no-progress", "--jobs", "1"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    r = connect(env)
    ledger = f"{env.prefix}import:events"
    while proc.poll() is None and not r.scard(ledger):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130), err  # 0: it was done before the signal arrived
    taken = r.scard(ledger)
    print(f"interrupted with exit code {proc.returncode} after {taken} of {n} events")
    rerun = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = orjson.loads(rerun.stdout)
    assert summary["already"] == taken and summary["sent"] == n - taken
    # Every event is in the topic exactly once (offsets count from 0 per partition).
    assert sum(o + 1 for o in summary["last_offsets"].values()) == n or summary["sent"] == 0
