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
    tune_gc()
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
