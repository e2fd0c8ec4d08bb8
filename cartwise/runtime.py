"""Process-level tuning shared by the long-running commands (worker, API)."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Collect young garbage less often; leave start-up objects out of collections.

    Both services allocate many short-lived objects per record or request and keep large
    long-lived state (contexts, counts, caches); with the default thresholds the cyclic
    collector rescans that state very often, which shows as throughput loss and tail latency.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
