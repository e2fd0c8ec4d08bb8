"""`cartwise` command line: demo, worker, api, simulate, inspection (docs/operations.md)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import orjson
import redis

from cartwise.settings import Settings


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def cmd_worker(args: argparse.Namespace) -> int:
    from cartwise.worker import run_worker

    run_worker(Settings.from_env(), loglevel=args.loglevel)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_asgi
    from api.auth import KeyConfigError

    settings = Settings.from_env()
    try:
        app = create_asgi(settings)
    except (KeyConfigError, ValueError) as exc:
        print(f"cartwise api: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host or settings.api_host, port=args.port or settings.api_port,
                loop="uvloop", http="httptools", access_log=False, log_level=args.loglevel,
                timeout_graceful_shutdown=5,
                # Longer than the usual 60 s idle timeout of load balancers in front of it.
                timeout_keep_alive=65)
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    from api.auth import new_key

    key, entry = new_key(args.role)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"config entry (append to CARTWISE_API_KEYS, comma-separated): {entry}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cartwise.producer import EventProducer
    from cartwise.simulator import Shop

    settings = Settings.from_env()
    shop = Shop(seed=args.seed)
    with EventProducer(settings.bootstrap, settings.events_topic, settings.catalog_topic) as p:
        simulate(p, shop, rate=args.rate, seconds=args.seconds, users=args.users)
    return 0


def simulate(producer: object, shop: object, rate: float, seconds: float | None,
             users: int = 1_000_000, bad_rate: float = 0.005, dup_rate: float = 0.005,
             stop: list[bool] | None = None) -> int:
    """Send the catalog, then live traffic at `rate` events/s (event time = wall time)."""
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


def respond(base: str, read_key: str, ingest_key: str, shop: object, rate: float,
            stop: list[bool], seed: int = 11) -> int:
    """Simulated shoppers who look at item pages through the API and react to what they are
    shown (cartwise.simulator.Responder): impressions, clicks and carts go back through
    POST /v1/events, so experiments and the re-ranker have feedback. Returns visits made."""
    import urllib.request

    from cartwise.simulator import Responder

    responder = Responder(seed=seed)
    heroes = list(shop.complements)  # type: ignore[attr-defined]
    prices = shop.prices  # type: ignore[attr-defined]

    def call(path: str, key: str, body: object = None) -> dict:
        req = urllib.request.Request(base + path, headers={
            "X-API-Key": key, "Content-Type": "application/json"},
            data=None if body is None else orjson.dumps(body))
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - our own API
            return orjson.loads(resp.read())

    visits = 0
    while not stop[0]:
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
                                                prices[hero])
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


def cmd_show(args: argparse.Namespace) -> int:
    from streams.store import Keys

    settings = Settings.from_env()
    keys = Keys(settings.prefix)
    key = keys.item(args.id) if args.what == "item" else keys.user(args.id)
    raw = _redis(settings).get(key)
    if raw is None:
        print(f"no suggestions yet under {key}", file=sys.stderr)
        return 1
    print(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode())
    return 0


def _worker_stats(r: redis.Redis, settings: Settings) -> list[dict]:
    """Every worker's published stats snapshot (streams/stats.py), by worker key."""
    from streams.store import Keys

    raws = (r.get(key) for key in sorted(r.scan_iter(Keys(settings.prefix).stats_pattern)))
    return [orjson.loads(raw) for raw in raws if raw]


def cmd_stats(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    snaps = _worker_stats(_redis(settings), settings)
    if not snaps:
        print("no worker has published stats yet", file=sys.stderr)
        return 1
    for snap in snaps:
        print(orjson.dumps(snap, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    """Exit 0 when every partition's lag is within --max-lag, 1 past it, 2 when unreachable."""
    from kafka.errors import KafkaError

    from cartwise.lag import collect, format_table

    settings = Settings.from_env()
    try:
        rows = collect(settings)
        stats = _worker_stats(_redis(settings), settings)
    except (KafkaError, redis.RedisError, TimeoutError, OSError) as exc:
        print(f"cartwise lag: cannot read the broker or Redis: {exc}", file=sys.stderr)
        return 2
    worst = max((row.lag for row in rows), default=0)
    if args.json:
        print(orjson.dumps({"partitions": [row.as_dict() for row in rows], "max_lag": worst,
                            "freshness_s": {s["worker_id"]: s["freshness_s"] for s in stats}},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_table(rows))
        for snap in stats:
            f = snap["freshness_s"]
            parts = [f"{kind} p50/p99 {_ms(f[kind]['recent_p50'])}/{_ms(f[kind]['recent_p99'])}"
                     for kind in ("user", "item")]
            print(f"freshness ({snap['worker_id']}, last events): " + "; ".join(parts))
    if args.max_lag is not None and worst > args.max_lag:
        print(f"lag {worst} > --max-lag {args.max_lag}", file=sys.stderr)
        return 1
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Exit 0 once the state is cleared for an exact replay; 1 when refused; 2 unreachable."""
    from kafka.errors import KafkaError

    from cartwise.rebuild import RebuildRefused, rebuild

    settings = Settings.from_env()
    try:
        report = rebuild(settings, force=args.force)
    except RebuildRefused as exc:
        print(f"cartwise rebuild: refused: {exc}", file=sys.stderr)
        return 1
    except (KafkaError, redis.RedisError, TimeoutError, OSError) as exc:
        print(f"cartwise rebuild: cannot read the broker or Redis: {exc}", file=sys.stderr)
        return 2
    print(f"cartwise rebuild: {report.summary()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from api.auth import new_key
    from cartwise.embedded import EmbeddedStack, free_port
    from cartwise.harness import start_api, start_worker, stop_worker, wait_http
    from cartwise.producer import EventProducer
    from cartwise.simulator import Shop
    from streams.topics import ensure_topics

    workdir = Path(".cartwise/demo").resolve()
    if args.broker == "kafka":
        from cartwise.kafka_broker import java_available

        reason = java_available()
        if reason:
            print(f"cartwise demo --broker kafka: {reason}; install Java 17+ and Maven, or run "
                  "the demo on the embedded Tansu broker (the default)", file=sys.stderr)
            return 2
        # A fresh log each run, as Tansu's in-memory one is: Redis starts empty too.
        shutil.rmtree(workdir / "kafka", ignore_errors=True)
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
    settings = Settings.from_env(broker=stack.broker, redis_url=stack.redis_url,
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
    stop = [False]

    def on_signal(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"""
  broker                   {stack.broker}   ({name}, Kafka protocol)
  redis                    {stack.redis_url}
  worker log               {workdir / 'worker.log'}
  API                      {base}   (docs: {base}/docs, log: {workdir / 'api.log'})
  traffic                  {args.rate:g} simulated events/s, with a few invalid and duplicate ones,
                           and {args.respond_rate:g} item-page visits/s by shoppers who react
                           to the suggestions (impressions, clicks, carts)

Where to look:
  demo storefront          {base}/demo/   (browse, add to cart, watch the suggestions)
  API, with the demo's keys (read / ingest / admin):
    curl -H 'X-API-Key: {read_key}' {base}/v1/items/pho-000/suggestions
    curl -H 'X-API-Key: {read_key}' '{base}/v1/users/u-00003/suggestions?placement=cart'
    ingest key {ingest_key}
    admin key  {admin_key}
  shopper intelligence (admin key):
    curl -H 'X-API-Key: {admin_key}' {base}/v1/users/u-00003/profile
    curl -H 'X-API-Key: {admin_key}' {base}/v1/audiences/cof-001
    curl -H 'X-API-Key: {admin_key}' '{base}/v1/replenishment/due?within=30d'
    curl -X PUT -H 'X-API-Key: {admin_key}' -H 'Content-Type: application/json' \\
         -d '{{"block": ["aud-001"], "frequency_cap": 3}}' {base}/v1/rules
  experiments (admin key; the demo page sends impressions and clicks):
    curl -X PUT -H 'X-API-Key: {admin_key}' -H 'Content-Type: application/json' \\
         -d '{{"variants": [{{"name": "plain", "settings": {{"ranking": "plain"}}}},
                           {{"name": "learned", "settings": {{"ranking": "auto"}}}}]}}' \\
         {base}/v1/experiments/demo
    {base}/experiments/   (the report with a plot; paste the admin key)
    curl -H 'X-API-Key: {admin_key}' {base}/v1/reranker
  from another terminal:
    export CARTWISE_BROKER={stack.broker} CARTWISE_REDIS_URL={stack.redis_url}
    .venv/bin/cartwise show item pho-000    # the stored lists of an item
    .venv/bin/cartwise stats                # counters, dead letters, freshness

Ctrl-C stops everything.
""", flush=True)


    def traffic() -> None:
        try:
            with EventProducer(settings.bootstrap, settings.events_topic,
                               settings.catalog_topic) as producer:
                simulate(producer, Shop(seed=args.seed), rate=args.rate, seconds=None, stop=stop)
        finally:
            if not stop[0]:
                print("traffic simulator stopped unexpectedly", file=sys.stderr, flush=True)
                stop[0] = True

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    # Shoppers who react to suggestions (price-sensitive, cartwise.simulator.Responder), so
    # an experiment's report and the re-ranker have feedback to show (docs/experiments.md).
    shop = Shop(seed=args.seed)
    responders = threading.Thread(
        target=respond, args=(base, read_key, ingest_key, shop, args.respond_rate, stop),
        daemon=True)
    responders.start()
    r = _redis(settings)
    try:
        while not stop[0]:
            for _ in range(50):
                if stop[0] or worker.poll() is not None or api.poll() is not None:
                    break
                time.sleep(0.1)
            for name, proc in (("worker", worker), ("api", api)):
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see {workdir / name}.log")
                    return 1
            _print_status(r, settings)
    finally:
        print("\nstopping ...", flush=True)
        stop[0] = True
        stop_worker(api)
        stop_worker(worker)
        thread.join(5)
        responders.join(5)
        stack.stop()
    return 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _print_status(r: redis.Redis, settings: Settings) -> None:
    from streams.store import Keys

    keys = Keys(settings.prefix)
    counters: dict[str, int] = {}
    fresh = None
    for snap in _worker_stats(r, settings):
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import orjson

    from cartwise.evaluate import DEFAULT_MODELS, evaluate, load, make_models, table

    try:
        if args.sample < 1:
            raise ValueError(f"--sample takes a whole number >= 1; got {args.sample}")
        events, kinds = load(args.dataset, Path(args.events) if args.events else None)
        if args.targets:
            kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
            bad = [k for k in kinds if k not in ("view", "cart", "purchase")]
            if bad:
                raise ValueError(f"--targets takes view, cart, purchase; got {bad}")
        if args.limit:
            events = events[: args.limit]
        models = make_models(args.models.split(",") if args.models else DEFAULT_MODELS,
                             args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"cartwise evaluate: {err}", file=sys.stderr)
        return 2
    print(f"replaying {len(events)} events, targets {', '.join(kinds)}, "
          f"models {', '.join(m.name for m in models)}", file=sys.stderr)
    result = evaluate(events, kinds, models, args.report_from,
                      progress=lambda n: print(f"  {n} events", file=sys.stderr, flush=True),
                      sample=args.sample)
    result["source"] = args.dataset or Path(args.events).name
    print(table(result))
    if args.out:
        Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cartwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run broker, Redis, worker and simulated traffic")
    p.add_argument("--rate", type=float, default=50.0, help="simulated events per second")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--port", type=int, default=8000, help="API port (a free one if taken)")
    p.add_argument("--respond-rate", type=float, default=5.0,
                   help="item-page visits per second by shoppers who react to suggestions")
    p.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                   help="tansu: the embedded broker (Python only, the default); kafka: Apache "
                        "Kafka from Maven Central jars (needs Java 17+ and, once, Maven)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("worker", help="run one stream worker (settings from CARTWISE_*)")
    p.add_argument("--loglevel", default="WARNING")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("api", help="serve the HTTP API (settings from CARTWISE_*)")
    p.add_argument("--host", default=None, help="default: CARTWISE_API_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: CARTWISE_API_PORT or 8000")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=cmd_api)
    p = sub.add_parser("api-key", help="make an API key and the hashed entry for the config")
    p.add_argument("role", choices=["read", "ingest", "admin"])
    p.set_defaults(func=cmd_api_key)
    p = sub.add_parser("simulate", help="send simulated shop traffic to the broker")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("show", help="print the suggestions stored for an item or a shopper")
    p.add_argument("what", choices=["item", "user"])
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("lag", help="consumer lag per topic and partition, and freshness")
    p.add_argument("--max-lag", type=int, default=None,
                   help="exit 1 when any partition lags by more records than this")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lag)
    p = sub.add_parser("evaluate", help="prequential replay of a real log against baselines "
                       "(docs/quality.md)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="taobao, online_retail, diginetica or yoochoose "
                     "(read from CARTWISE_DATA_DIR, default ../shared/data)")
    src.add_argument("--events", help="a JSON-lines file of contract events (docs/events.md)")
    p.add_argument("--targets", help="comma-separated target kinds: view, cart, purchase "
                   "(default: the dataset's; cart,purchase for --events)")
    p.add_argument("--models", help="comma-separated (default: all)")
    p.add_argument("--report-from", type=float, default=0.3,
                   help="share of events (in time order) used for tuning, not reported")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N events")
    p.add_argument("--sample", type=int, default=1, metavar="N",
                   help="ask for suggestions at 1 in N targets, learn every event "
                   "(docs/quality-protocol.md, \"Sampled targets\")")
    p.add_argument("--set", action="append", default=[], metavar="NAME=NUMBER",
                   help="change one ModelConfig setting of the cartwise model (repeatable)")
    p.add_argument("--out", help="write the full result as JSON here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("rebuild", help="after Redis lost its data: clear the derived state so "
                       "stopped workers replay the events topic from the start "
                       "(docs/operations.md)")
    p.add_argument("--force", action="store_true",
                   help="go on although a worker published stats in the last seconds")
    p.set_defaults(func=cmd_rebuild)
    p = sub.add_parser("stats", help="print worker counters and freshness")
    p.set_defaults(func=cmd_stats)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
