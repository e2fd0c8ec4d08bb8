"""`cartwise worker`: one Faust worker running all stages (docs/operations.md)."""

from __future__ import annotations

import gc

import faust

from cartwise.settings import Settings
from streams.app import create_app
from streams.topics import ensure_topics


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    ensure_topics(settings)
    app = create_app(settings)
    # The worker allocates many short-lived objects per record (Faust events, tuples, dicts)
    # and keeps large long-lived state; the default thresholds make the cyclic collector
    # rescan that state very often. Collect young objects less often, and leave everything
    # created during start-up out of collections altogether.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
