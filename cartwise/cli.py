"""`cartwise` command line: demo, worker, api, import, simulate, inspection (docs/operations.md).

Expected failures (no Redis, no broker, a bad argument or file) end with one line saying what
and what to do, and a non-zero exit (2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import orjson
import redis

from cartwise.redisconn import Client, connect
from cartwise.settings import Settings

# A cluster client that finds no node raises this, which is no RedisError.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


class CliError(Exception):
    """An expected failure: printed as one line (with a hint), exit code 2."""


def _redis(settings: Settings) -> Client:
    return connect(settings)


def load_settings(**overrides: object) -> Settings:
    """Settings from CARTWISE_*; a bad value is one line (CliError), not a traceback."""
    try:
        return Settings.from_env(**overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"bad setting: {exc} (check the CARTWISE_* environment variables)") \
            from None


def cmd_worker(args: argparse.Namespace) -> int:
    from cartwise.worker import run_worker
    from streams.app import stream_config

    settings = load_settings()
    try:
        stream_config(settings)
    except ValueError as exc:
        raise CliError(f"bad setting: {exc}") from None
    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from api import server
    from api.app import create_asgi
    from api.auth import KeyConfigError

    settings = load_settings()
    if args.workers < 1:
        raise CliError(f"--workers must be 1 or more, got {args.workers}")
    if args.workers > 1 and settings.metrics_port:
        raise CliError("--workers above 1 needs CARTWISE_METRICS_PORT=0: the processes cannot "
                       "share one metrics port (or run one process per container)")
    try:
        app = create_asgi(settings)  # checks the keys and settings before anything listens
    except (KeyConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if args.workers == 1:
        server.serve(app, settings, args.host, args.port, args.loglevel)
        return 0
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = server.config("cartwise.cli:worker_app", settings, args.host, args.port,
                           args.loglevel)
    # Each process builds its own app (and protocol limits) from the same CARTWISE_* env.
    config.factory, config.workers = True, args.workers
    config.http = "api.server:GuardedHttpTools"
    sock = config.bind_socket()
    # Older uvicorn releases take the server's run as `target`; newer ones build it themselves.
    older = "target" in inspect.signature(Multiprocess).parameters
    extra = {"target": uvicorn.Server(config).run} if older else {}
    Multiprocess(config, sockets=[sock], **extra).run()
    return 0


def worker_app() -> Any:
    """The app of one `cartwise api --workers N` process, limits as `api.server` sets them.

    uvicorn starts the processes fresh (spawn), so they get the connection limits here, from
    the same settings, instead of through a class built in the parent.
    """
    from api import server
    from api.app import create_asgi

    settings = Settings.from_env()
    limits = server.protocol_for(settings)
    for name in ("header_timeout_s", "body_timeout_s", "max_connections"):
        setattr(server.GuardedHttpTools, name, getattr(limits, name))
    return create_asgi(settings)


def cmd_api_key(args: argparse.Namespace) -> int:
    from api.auth import new_key

    key, entry = new_key(args.role)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"config entry (append to CARTWISE_API_KEYS, comma-separated): {entry}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cartwise.demo import simulate
    from cartwise.producer import EventProducer
    from cartwise.simulator import Shop

    if args.rate <= 0:
        raise CliError(f"--rate must be above 0 events/s, got {args.rate:g}")
    settings = load_settings()
    shop = Shop(seed=args.seed)
    with EventProducer(settings.bootstrap, settings.events_topic, settings.catalog_topic) as p:
        simulate(p, shop, rate=args.rate, seconds=args.seconds, users=args.users)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from streams.store import Keys

    settings = load_settings()
    keys = Keys(settings.prefix)
    key = keys.item(args.id) if args.what == "item" else keys.user(args.id)
    raw = _redis(settings).get(key)
    if raw is None:
        print(f"no suggestions yet under {key}", file=sys.stderr)
        return 1
    print(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode())
    return 0


def worker_stats(r: Client, settings: Settings) -> list[dict]:
    """Every worker's published stats snapshot (streams/stats.py), by worker key."""
    from streams.store import Keys

    raws = (r.get(key) for key in sorted(r.scan_iter(Keys(settings.prefix).stats_pattern)))
    return [orjson.loads(raw) for raw in raws if raw]


def cmd_stats(args: argparse.Namespace) -> int:
    settings = load_settings()
    snaps = worker_stats(_redis(settings), settings)
    if not snaps:
        print("no worker has published stats yet", file=sys.stderr)
        return 1
    for snap in snaps:
        if snap.get("stopped"):  # said apart from the JSON (stdout stays JSON documents)
            print(f"worker {snap.get('worker_id', '?')} stopped itself: {snap['stopped']} "
                  "(docs/operations.md, \"A worker stopped itself\")", file=sys.stderr)
        print(orjson.dumps(snap, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    """Exit 0 when every partition's lag is within --max-lag, 1 past it, 2 when unreachable."""
    from kafka.errors import KafkaError

    from cartwise.lag import collect, format_table

    settings = load_settings()
    try:
        rows = collect(settings)
        stats = worker_stats(_redis(settings), settings)
    except (KafkaError, *REDIS_ERRORS, TimeoutError, OSError) as exc:
        print(f"cartwise lag: cannot read the broker or Redis: {exc}", file=sys.stderr)
        return 2
    worst = max((row.lag for row in rows), default=0)
    if args.json:
        print(orjson.dumps({"partitions": [row.as_dict() for row in rows], "max_lag": worst,
                            "freshness_s": {s["worker_id"]: s["freshness_s"] for s in stats},
                            "loop_delay_s": {s["worker_id"]: s.get("loop_delay_s")
                                             for s in stats}},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_table(rows))
        for snap in stats:
            f = snap["freshness_s"]
            parts = [f"{kind} p50/p99 {_ms(f[kind]['recent_p50'])}/{_ms(f[kind]['recent_p99'])}"
                     for kind in ("user", "item")]
            print(f"freshness ({snap['worker_id']}, last events): " + "; ".join(parts))
            loop = snap.get("loop_delay_s")  # absent from a worker older than the metric
            if loop and loop.get("n"):
                print(f"event loop ({snap['worker_id']}, last minute): held p99 "
                      f"{_ms(loop['recent_p99'])}, at most {_ms(loop['recent_max'])}")
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

    settings = load_settings()
    try:
        report = rebuild(settings, force=args.force, alive_s=args.alive_s)
    except RebuildRefused as exc:
        print(f"cartwise rebuild: refused: {exc}", file=sys.stderr)
        return 1
    except (KafkaError, *REDIS_ERRORS, TimeoutError, OSError) as exc:
        print(f"cartwise rebuild: cannot read the broker or Redis: {exc}", file=sys.stderr)
        return 2
    print(f"cartwise rebuild: {report.summary()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cartwise.evaluate import (
        DEFAULT_MODELS,
        EtaProgress,
        evaluate,
        load,
        make_models,
        table,
    )

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
                      progress=EtaProgress(len(events)),
                      sample=args.sample)
    result["source"] = args.dataset or Path(args.events).name
    print(table(result))
    if args.out:
        Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Exit 0 when every line was sent, skipped by the preset or known; 1 when some were
    rejected; 2 when the import could not run (docs/import.md)."""
    from cartwise.importing import Importer, PresetSpec, Source
    from streams.topics import ensure_topics

    if args.batch < 1 or args.jobs < 1:
        raise CliError(f"--batch and --jobs must be 1 or more, got {args.batch} and "
                       f"{args.jobs}")
    spec = PresetSpec(args.kind, getattr(args, "preset", "events"), tuple(args.map),
                      tuple(args.const), getattr(args, "types", None), getattr(args, "tz", None),
                      getattr(args, "ts_format", None))
    source = Source(Path(args.file), args.format, args.encoding, args.delimiter)
    settings = load_settings()
    importer = Importer(settings, spec, source, rejects=Path(args.rejects) if args.rejects
                        else None, dry_run=args.dry_run, batch=args.batch, jobs=args.jobs,
                        progress=not args.no_progress)
    if not args.dry_run:  # after the mapping and the file are known good
        _broker_listens(settings)
        topic = settings.events_topic if args.kind == "events" else settings.catalog_topic
        ensure_topics(settings, timeout=5.0, only={topic})
    try:
        summary = importer.run()
    except KeyboardInterrupt:
        print("\n".join(importer.summary.lines(args.dry_run)), file=sys.stderr)
        resume = "" if args.dry_run else "; the same command resumes (what the broker took " \
            "is skipped)"
        print(f"cartwise import {args.kind}: interrupted{resume}", file=sys.stderr)
        return 130
    if args.json:
        print(orjson.dumps(summary.as_dict()).decode())
    else:
        print("\n".join(summary.lines(args.dry_run)))
    return 1 if summary.rejected else 0


def _broker_listens(settings: Settings) -> None:
    """Fail in a second, not after the Kafka client's half-minute of retries."""
    import socket

    for host in settings.bootstrap:
        name, sep, port = host.rpartition(":")
        try:
            with socket.create_connection((name, int(port)) if sep else (host, 9092), timeout=3):
                return
        except (OSError, ValueError):
            continue
    raise CliError(f"cannot reach the broker at {settings.broker} (nothing answers there); is "
                   "it running? set CARTWISE_BROKER")


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _expected(exc: BaseException) -> str | None:
    """One line for an expected failure (with what to do), or None for a real bug."""
    from cartwise.importing import FileError, MappingError

    if isinstance(exc, CliError | FileError | MappingError):
        return str(exc)
    try:
        settings = Settings.from_env()
        where_redis, where_broker = _redact(settings.redis_url), settings.broker
    except (TypeError, ValueError):
        where_redis, where_broker = "CARTWISE_REDIS_URL", "CARTWISE_BROKER"
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis at {where_redis} refused the password ({exc}); check CARTWISE_REDIS_URL"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (f"cannot reach Redis at {where_redis} ({exc}); is redis-server running? "
                "set CARTWISE_REDIS_URL")
    if isinstance(exc, redis.exceptions.RedisClusterException):
        return (f"cannot use the Redis Cluster at {where_redis} ({exc}); check "
                "CARTWISE_REDIS_URL and CARTWISE_REDIS_CLUSTER")
    from aiokafka.errors import KafkaError as AioKafkaError
    from kafka.errors import KafkaError

    if isinstance(exc, KafkaError | AioKafkaError):
        detail = str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"
        return (f"cannot reach the broker at {where_broker} ({detail}); is it running? set "
                "CARTWISE_BROKER")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"{exc.strerror}: {exc.filename}"
    return None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with where to look, instead of usage text and a line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default when there is one to show (not None, off or empty) and the help text
    does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _command(sub: Any, name: str, text: str, func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text,
                       formatter_class=_Help)
    p.set_defaults(func=func)
    return p


def _import_options(p: argparse.ArgumentParser, fields: str) -> None:
    p.add_argument("file", help="a CSV or JSON-lines file, optionally gzipped (.gz)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help=f"where a field comes from: a column, or a template like "
                   f"{{InvoiceNo}}-{{StockCode}} (repeatable; fields: {fields})")
    p.add_argument("--const", action="append", default=[], metavar="FIELD=VALUE",
                   help="the same value for every line (repeatable), e.g. type=purchase")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="default: from the file name (.csv, .tsv, .jsonl, .ndjson, .json)")
    p.add_argument("--encoding", default="utf-8", help="the file's text encoding")
    p.add_argument("--delimiter", default=None, help="CSV field separator (default: a comma, "
                   "a tab for .tsv)")
    p.add_argument("--rejects", metavar="FILE", default=None,
                   help="write every rejected line here (JSON lines: line, reason, field, "
                   "detail, row)")
    p.add_argument("--dry-run", action="store_true",
                   help="read and check every line, send nothing (no broker or Redis needed)")
    p.add_argument("--batch", type=int, default=5000, help="lines checked and sent together")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that map and check lines (1: all in this one)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from cartwise.demo import cmd_demo
    from cartwise.importing.mapping import CATALOG_FIELDS, EVENT_FIELDS, EVENT_PRESETS

    parser = _Parser(prog="cartwise", description=__doc__.split("\n\n")[0],
                     formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _command(sub, "demo", "run broker, Redis, a worker, the API and a real shop's traffic "
                 "replayed (docs/demo-data.md; Ctrl-C stops it)", cmd_demo)
    p.add_argument("--rate", type=float, default=50.0,
                   help="replayed events per second; 0 runs an idle stack")
    p.add_argument("--seed", type=int, default=7,
                   help="seed of the replay (stock, extra views, invalid and duplicate records)")
    p.add_argument("--port", type=int, default=8000, help="API port (a free one if taken)")
    p.add_argument("--respond-rate", type=float, default=5.0,
                   help="item-page visits per second by shoppers who react to suggestions")
    p.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                   help="tansu: the embedded broker (Python only); kafka: Apache Kafka from "
                   "Maven Central jars (needs Java 17+ and, once, Maven)")
    p = _command(sub, "worker", "run one stream worker (settings from CARTWISE_*)", cmd_worker)
    p.add_argument("--loglevel", default="WARNING", help="Python log level")
    p = _command(sub, "api", "serve the HTTP API (settings from CARTWISE_*)", cmd_api)
    p.add_argument("--host", default=None, help="default: CARTWISE_API_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: CARTWISE_API_PORT or 8000")
    p.add_argument("--workers", type=int, default=1,
                   help="API processes on the one port; rate limits, served-record and "
                   "connection bounds (CARTWISE_RATE_*, CARTWISE_SERVED_RATE, "
                   "CARTWISE_MAX_CONNECTIONS) apply per process, so N processes allow N "
                   "times as much (docs/operations.md)")
    p.add_argument("--loglevel", default="warning", help="uvicorn log level")
    p = _command(sub, "api-key", "make an API key and the hashed entry for the config",
                 cmd_api_key)
    p.add_argument("role", choices=["read", "ingest", "admin"], help="what the key may do")
    p = _command(sub, "import", "load past events or a catalog from a file into the broker "
                 "(docs/import.md)", None)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    q = _command(kinds, "events", "past orders and behaviour (CSV or JSON lines); a re-run "
                 "sends only what was not imported before", cmd_import)
    _import_options(q, ", ".join(f for f in EVENT_FIELDS if f not in ("v", "items")))
    q.add_argument("--preset", choices=tuple(EVENT_PRESETS), default="events",
                   help="events: the event contract's fields (docs/events.md); invoice-lines: "
                   "an invoice-lines export like UCI Online Retail")
    q.add_argument("--types", metavar="NAME=TYPE,...", default=None,
                   help="the file's event type names to the contract's, e.g. "
                   "pv=view,cart=add_to_cart,buy=purchase")
    q.add_argument("--tz", default=None, help="time zone of times without an offset "
                   "(default: UTC for invoice-lines, else such times are rejected)")
    q.add_argument("--ts-format", default=None,
                   help="strptime format of the time column (default: ISO-8601 or epoch s)")
    q = _command(kinds, "catalog", "catalog records (CSV or JSON lines): item id, name, "
                 "category, price, stock", cmd_import)
    _import_options(q, ", ".join(f for f in CATALOG_FIELDS if f != "v"))
    p = _command(sub, "simulate", "send simulated shop traffic to the broker", cmd_simulate)
    p.add_argument("--rate", type=float, default=100.0, help="events per second")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long "
                   "(default: run until stopped)")
    p.add_argument("--users", type=int, default=1_000_000, help="simulated shoppers")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulated shop")
    p = _command(sub, "show", "print the suggestions stored for an item or a shopper",
                 cmd_show)
    p.add_argument("what", choices=["item", "user"], help="an item's lists or a shopper's")
    p.add_argument("id", help="the item or shopper id")
    p = _command(sub, "lag", "consumer lag per topic and partition, and freshness", cmd_lag)
    p.add_argument("--max-lag", type=int, default=None,
                   help="exit 1 when any partition lags by more records than this")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _command(sub, "evaluate", "prequential replay of a real log against baselines "
                 "(docs/quality.md)", cmd_evaluate)
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
    from cartwise.rebuild import ALIVE_S, RETENTION_NEEDED

    p = _command(sub, "rebuild", "after Redis lost its data: clear the derived state so "
                 "stopped workers replay the events topic from the start "
                 f"(docs/operations.md); it needs {RETENTION_NEEDED}", cmd_rebuild)
    p.add_argument("--force", action="store_true",
                   help="go on although a worker published stats in the last --alive-s "
                   "seconds (never when the events topic lost its start)")
    p.add_argument("--alive-s", type=float, default=ALIVE_S, metavar="SECONDS",
                   help="a worker whose stats are this recent is taken as running")
    _command(sub, "stats", "print worker counters and freshness", cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = " ".join(filter(None, ("cartwise", args.command, getattr(args, "kind", None))))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = _expected(exc)
        if line is None:
            raise
        print(f"{name}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
