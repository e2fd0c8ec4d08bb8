"""`cartwise worker`: one Faust worker running all stages (docs/operations.md)."""

from __future__ import annotations

import faust

from cartwise.runtime import tune_gc
from cartwise.settings import Settings
from streams.app import create_app
from streams.topics import ensure_topics


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    ensure_topics(settings)
    app = create_app(settings)
    if settings.metrics_port:
        from streams.metrics import serve

        serve(app.cartwise["stats"], settings.metrics_port)
    tune_gc()
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
