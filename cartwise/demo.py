"""`cartwise demo`: broker, Redis, a worker, the API and shop traffic in one command.

What the demo feeds the broker is a `TrafficSource` (one class boundary): `SimulatedTraffic`
today; a replay of a real shop log can take its place in `traffic_source` without touching
the rest. `--rate 0` starts an idle stack, for trying `cartwise import` on it.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from cartwise.redisconn import Client, connect
from cartwise.settings import Settings

if TYPE_CHECKING:
    from cartwise.producer import EventProducer

DEMO_DIR = Path(".cartwise/demo")
ENV_FILE = "demo.env"  # exports and keys, for another terminal (`source .cartwise/demo/...`)


class TrafficSource(Protocol):
    """What the demo sends: a catalog, then events until `stop[0]` turns true."""

    def describe(self) -> str:
        """One line for the banner."""
        ...

    def catalog(self) -> Iterable[dict[str, Any]]: ...

    def run(self, producer: EventProducer, stop: list[bool]) -> int:
        """Send events (event time = now) until stopped; returns how many were sent."""
        ...

    def showcase(self) -> tuple[list[str], dict[str, float]]:
        """Item pages the reacting shoppers visit, and every item's price."""
        ...


class SimulatedTraffic:
    """A shop's event generator at a steady rate, with a few invalid and duplicate events.

    `shop` is anything with the interface of cartwise.simulator.Shop (`catalog`, `events()`,
    `prices`, `complements`): the simulated shop by default, or a replay of a real log.
    """

    def __init__(self, rate: float, seed: int = 7, shop: Any = None,
                 label: str = "simulated") -> None:
        from cartwise.simulator import Shop

        self.rate = rate
        self.shop = shop if shop is not None else Shop(seed=seed)
        self.label = label

    def describe(self) -> str:
        return f"{self.rate:g} {self.label} events/s, with a few invalid and duplicate ones"

    def catalog(self) -> Iterable[dict[str, Any]]:
        return self.shop.catalog

    def run(self, producer: EventProducer, stop: list[bool]) -> int:
        return simulate(producer, self.shop, rate=self.rate, seconds=None, stop=stop,
                        catalog=False)

    def showcase(self) -> tuple[list[str], dict[str, float]]:
        return list(self.shop.complements), self.shop.prices


def traffic_source(args: argparse.Namespace) -> TrafficSource | None:
    """The demo's traffic: a real shop's invoices replayed (docs/demo-data.md); None for an
    idle stack (`--rate 0`). The simulator stays for tests and benchmarks."""
    if args.rate <= 0:
        return None
    from cartwise.shop_slice import ReplayTraffic

    return ReplayTraffic(args.rate, seed=args.seed)


def examples(source: TrafficSource | None) -> tuple[str, str, str]:
    """(an item with complements, a shopper, one of the item's complements) for the banner."""
    shop = getattr(source, "shop", None)
    complements = getattr(shop, "complements", None) or {}
    if not complements:
        return "ITEM_ID", "USER_ID", "OTHER_ITEM_ID"
    item = next(iter(complements))
    shoppers = getattr(shop, "shoppers", None) or ["u-00003"]
    return item, shoppers[0], (complements[item] or [item])[0]


def simulate(producer: Any, shop: Any, rate: float, seconds: float | None,
             users: int = 1_000_000, bad_rate: float = 0.005, dup_rate: float = 0.005,
             stop: list[bool] | None = None, catalog: bool = True) -> int:
    """Send the catalog, then live traffic at `rate` events/s (event time = wall time)."""
    if rate <= 0:
        raise ValueError(f"the rate must be above 0 events/s, got {rate:g}")
    if catalog:
        for item in shop.catalog:
            producer.catalog(item)
        producer.flush()
    started = time.time()
    sent = 0
    for ev in shop.events(users, start_ts=started, mean_gap_s=0.0, bad_rate=bad_rate,
                          dup_rate=dup_rate):
        if stop and stop[0]:
            break
        now = time.time()
        if seconds is not None and now - started >= seconds:
            break
        ahead = started + sent / rate - now
        if ahead > 0:
            time.sleep(ahead)
        if isinstance(ev, bytes):
            producer.send_raw(ev)
        else:
            ev["ts"] = time.time()
            producer.send(ev)
        sent += 1
    producer.flush()
    return sent


def respond(base: str, read_key: str, ingest_key: str, showcase: tuple[list[str],
            dict[str, float]], rate: float, stop: list[bool], seed: int = 11) -> int:
    """Simulated shoppers who look at item pages through the API and react to what they are
    shown (cartwise.simulator.Responder): impressions, clicks and carts go back through
    POST /v1/events, so experiments and the re-ranker have feedback. Returns visits made."""
    import urllib.request

    from cartwise.simulator import Responder

    responder = Responder(seed=seed)
    heroes, prices = showcase

    def call(path: str, key: str, body: object = None) -> dict:
        req = urllib.request.Request(base + path, headers={
            "X-API-Key": key, "Content-Type": "application/json"},
            data=None if body is None else orjson.dumps(body))
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - our own API
            return orjson.loads(resp.read())

    visits = 0
    while not stop[0] and heroes:
        started = time.monotonic()
        user, hero = f"r-{visits:06d}", heroes[visits % len(heroes)]
        visits += 1
        try:
            answer = call(f"/v1/items/{hero}/suggestions?k=5&user_id={user}", read_key)
            shown = answer["items"]
            if not shown:
                continue
            tags = {"request_id": answer["request_id"]}
            if answer.get("experiment"):
                tags |= {"experiment_id": answer["experiment"]["id"],
                         "variant": answer["experiment"]["variant"]}
            events = [{"type": "impression", "user_id": user, "placement": "product",
                       "items": [{"item_id": e["item_id"]} for e in shown], **tags}]
            clicked, carted = responder.respond([(e["item_id"], e["price"]) for e in shown],
                                                prices.get(hero))
            if clicked:
                events.append({"type": "click", "user_id": user, "item_id": clicked, **tags})
            if carted:
                events.append({"type": "add_to_cart", "user_id": user, "item_id": clicked})
            call("/v1/events", ingest_key, {"events": events})
        except OSError as exc:  # the API restarting or busy: try again on the next visit
            print(f"responding shopper: {exc}", file=sys.stderr, flush=True)
            time.sleep(1.0)
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))
    return visits


def write_env(path: Path, exports: dict[str, str]) -> None:
    """The demo's addresses and keys as shell exports, readable by its user only."""
    lines = ["# cartwise demo: `source` this file in another terminal (it changes each run)"]
    lines += [f"export {k}={v}" for k, v in exports.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def cmd_demo(args: argparse.Namespace) -> int:
    from api.auth import new_key
    from cartwise.cli import load_settings
    from cartwise.embedded import EmbeddedStack, free_port
    from cartwise.harness import start_api, start_worker, stop_worker, wait_http
    from streams.topics import ensure_topics

    if args.rate < 0 or args.respond_rate < 0:
        print("cartwise demo: --rate and --respond-rate must be 0 (off) or more",
              file=sys.stderr)
        return 2
    load_settings()  # a bad CARTWISE_* setting stops here, before any server starts
    workdir = DEMO_DIR.resolve()
    if args.broker == "kafka":
        from cartwise.kafka_broker import java_available

        reason = java_available()
        if reason:
            print(f"cartwise demo --broker kafka: {reason}; install Java 17+ and Maven, or run "
                  "the demo on the embedded Tansu broker (the default)", file=sys.stderr)
            return 2
        # A fresh log each run, as Tansu's in-memory one is: Redis starts empty too.
        shutil.rmtree(workdir / "kafka", ignore_errors=True)
    source = traffic_source(args)
    stack = EmbeddedStack(workdir=workdir, broker_kind=args.broker)
    workdir.mkdir(parents=True, exist_ok=True)
    name = {"tansu": "Tansu", "kafka": "Apache Kafka"}[args.broker]
    print(f"cartwise demo: starting {name} broker and redis-server ...", flush=True)
    try:
        stack.start()
    except RuntimeError as exc:  # a broker that does not start says why (its log tail)
        print(f"cartwise demo: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    # Fresh keys every run; the demo page gets the read and ingest ones in clear.
    read_key, read_entry = new_key("read")
    ingest_key, ingest_entry = new_key("ingest")
    admin_key, admin_entry = new_key("admin")
    port = args.port if _port_free(args.port) else free_port()
    settings = load_settings(broker=stack.broker, redis_url=stack.redis_url,
                                 session_timeout_s=10.0, rebalance_timeout_s=10.0,
                                 heartbeat_interval_s=1.0, api_port=port,
                                 api_keys=",".join((read_entry, ingest_entry, admin_entry)),
                                 demo_read_key=read_key, demo_ingest_key=ingest_key,
                                 # a minute, not half an hour: the re-ranker learns while
                                 # you watch
                                 feedback_label_s=60.0)
    ensure_topics(settings)
    worker = start_worker(settings, workdir / "worker.log", "demo")
    api = start_api(settings, workdir / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ready", api)
    except (RuntimeError, TimeoutError) as exc:
        print(f"the API did not start ({exc}); see {workdir / 'api.log'}", file=sys.stderr)
        stop_worker(api, hard=True)
        stop_worker(worker)
        stack.stop()
        return 1
    env_file = DEMO_DIR / ENV_FILE
    write_env(env_file, {"CARTWISE_BROKER": stack.broker, "CARTWISE_REDIS_URL": stack.redis_url,
                         "CARTWISE_API_URL": base, "CARTWISE_DEMO_READ_KEY": read_key,
                         "CARTWISE_DEMO_INGEST_KEY": ingest_key,
                         "CARTWISE_DEMO_ADMIN_KEY": admin_key})
    stop = [False]

    def on_signal(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    respond_rate = args.respond_rate if source is not None else 0.0
    traffic = source.describe() if source is not None else \
        "none (--rate 0: an idle stack; load your own with `cartwise import`)"
    print(_banner(stack.broker, stack.redis_url, name, workdir, base, traffic, respond_rate,
                  read_key, ingest_key, admin_key, env_file, examples(source)), flush=True)
    threads = []
    if source is not None:
        threads.append(threading.Thread(target=_send_traffic, args=(source, settings, stop),
                                        daemon=True))
        if respond_rate > 0:
            # Shoppers who react to suggestions (price-sensitive, cartwise.simulator.Responder),
            # so an experiment's report and the re-ranker have feedback (docs/experiments.md).
            threads.append(threading.Thread(
                target=respond, args=(base, read_key, ingest_key, source.showcase(),
                                      respond_rate, stop), daemon=True))
    for thread in threads:
        thread.start()
    r = connect(settings)
    try:
        while not stop[0]:
            for _ in range(50):
                if stop[0] or worker.poll() is not None or api.poll() is not None:
                    break
                time.sleep(0.1)
            for proc_name, proc in (("worker", worker), ("api", api)):
                if proc.poll() is not None:
                    print(f"{proc_name} exited with {proc.returncode}; see "
                          f"{workdir / proc_name}.log")
                    return 1
            _print_status(r, settings)
    finally:
        print("\nstopping ...", flush=True)
        stop[0] = True
        stop_worker(api)
        stop_worker(worker)
        for thread in threads:
            thread.join(5)
        stack.stop()
    return 0


def _send_traffic(source: TrafficSource, settings: Settings, stop: list[bool]) -> None:
    from cartwise.producer import EventProducer

    try:
        with EventProducer(settings.bootstrap, settings.events_topic,
                           settings.catalog_topic) as producer:
            for item in source.catalog():
                producer.catalog(item)
            producer.flush()
            source.run(producer, stop)
    finally:
        if not stop[0]:
            print("traffic stopped unexpectedly", file=sys.stderr, flush=True)
            stop[0] = True


def _banner(broker: str, redis_url: str, name: str, workdir: Path, base: str, traffic: str,
            respond_rate: float, read_key: str, ingest_key: str, admin_key: str,
            env_file: Path, example: tuple[str, str, str]) -> str:
    item, shopper, other = example
    reacting = (f"and {respond_rate:g} item-page visits/s by shoppers who react\n"
                "                           to the suggestions (impressions, clicks, carts)"
                if respond_rate > 0 else "no reacting shoppers")
    return f"""
  broker                   {broker}   ({name}, Kafka protocol)
  redis                    {redis_url}
  worker log               {workdir / 'worker.log'}
  API                      {base}   (docs: {base}/docs, log: {workdir / 'api.log'})
  traffic                  {traffic},
                           {reacting}
  exports and keys         {env_file}   (source it in another terminal)

Where to look:
  demo storefront          {base}/demo/   (browse, add to cart, watch the suggestions)
  API, with the demo's keys (read / ingest / admin):
    curl -H 'X-API-Key: {read_key}' {base}/v1/items/{item}/suggestions
    curl -H 'X-API-Key: {read_key}' '{base}/v1/users/{shopper}/suggestions?placement=cart'
    ingest key {ingest_key}
    admin key  {admin_key}
  shopper intelligence (admin key):
    curl -H 'X-API-Key: {admin_key}' {base}/v1/users/{shopper}/profile
    curl -H 'X-API-Key: {admin_key}' {base}/v1/audiences/{item}
    curl -H 'X-API-Key: {admin_key}' '{base}/v1/replenishment/due?within=30d'
    curl -X PUT -H 'X-API-Key: {admin_key}' -H 'Content-Type: application/json' \\
         -d '{{"block": ["{other}"], "frequency_cap": 3}}' {base}/v1/rules
  experiments (admin key; the demo page sends impressions and clicks):
    curl -X PUT -H 'X-API-Key: {admin_key}' -H 'Content-Type: application/json' \\
         -d '{{"variants": [{{"name": "plain", "settings": {{"ranking": "plain"}}}},
                           {{"name": "learned", "settings": {{"ranking": "auto"}}}}]}}' \\
         {base}/v1/experiments/demo
    {base}/experiments/   (the report with a plot; paste the admin key)
    curl -H 'X-API-Key: {admin_key}' {base}/v1/reranker
  from another terminal:
    source {env_file}
    .venv/bin/cartwise show item {item}    # the stored lists of an item
    .venv/bin/cartwise stats                # counters, dead letters, freshness
    .venv/bin/cartwise import events FILE   # past orders (docs/import.md)

Ctrl-C stops everything.
"""


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _print_status(r: Client, settings: Settings) -> None:
    from cartwise.cli import worker_stats
    from streams.store import Keys

    keys = Keys(settings.prefix)
    counters: dict[str, int] = {}
    fresh = None
    for snap in worker_stats(r, settings):
        for k, v in snap["counters"].items():
            counters[k] = counters.get(k, 0) + v
        fresh = snap["freshness_s"]["user"]
    applied = sum(v for k, v in counters.items() if k.startswith("applied."))
    dlq = sum(v for k, v in counters.items() if k.startswith("dlq."))
    p99 = (f"{fresh['recent_p50'] * 1000:.0f}/{fresh['recent_p99'] * 1000:.0f} ms"
           if fresh and fresh["recent_p99"] is not None else "-")
    items = sum(1 for _ in r.scan_iter(keys.item("*"), count=1000))
    print(f"{time.strftime('%H:%M:%S')}  applied {applied}  duplicates "
          f"{counters.get('duplicate', 0)}  dead-lettered {dlq}  item lists {items}  "
          f"freshness p50/p99 (last 1000 events) {p99}", flush=True)
