"""Baseline for the throughput benchmark: a Faust agent that does nothing with each event.

Run as a subprocess by bench/throughput.py on the same broker and backlog as the real worker.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faust
import orjson
import redis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--app-id", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--mode", choices=["iterate", "take"], default="iterate",
                    help="iterate: async for over the stream; take: noack_take batches + ack")
    args = ap.parse_args()
    app = faust.App(args.app_id, broker=f"kafka://{args.broker}", value_serializer="raw",
                    web_enabled=False, consumer_auto_offset_reset="earliest",
                    broker_session_timeout=6.0, broker_rebalance_timeout=6.0,
                    broker_heartbeat_interval=1.0,
                    datadir=tempfile.mkdtemp(prefix="cartwise-noop-"))  # not the cwd
    topic = app.topic(args.topic, value_type=bytes, internal=False)
    seen = {"n": 0, "first": 0.0, "cpu": 0.0}

    def count() -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            seen["first"], seen["cpu"] = time.time(), time.process_time()
        elif seen["n"] == args.n:
            redis.Redis.from_url(args.redis_url).set(
                f"bench:{args.app_id}",
                orjson.dumps({"first": seen["first"], "last": time.time(), "n": args.n,
                              "cpu_s": time.process_time() - seen["cpu"]}))

    @app.agent(topic)
    async def noop(stream: faust.StreamT) -> None:
        if args.mode == "iterate":
            async for _ in stream:
                count()
        else:
            async for batch in stream.noack_take(1000, 0.05):
                for event in batch:
                    count()
                    await stream.ack(event)

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
