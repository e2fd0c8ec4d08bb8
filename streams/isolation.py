"""Telling the records' faults from the infrastructure's, and finding the record a failing
checkpoint is stuck on: its own module because it is the stage's last resort, read apart from
the normal path."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.store import Ops, StateLost

if TYPE_CHECKING:
    from streams.stage import Record, Stage

log = logging.getLogger("cartwise.stage")

# Exit code of a worker whose checkpoint fails even without any record (state_lost is 3).
EXIT_CHECKPOINT_STUCK = 4


class Outage(RuntimeError):
    """A dependency failed (not the records): retried until it works again."""


def is_outage(exc: BaseException) -> bool:
    """An error of the infrastructure (retried until it ends), not of the records."""
    if isinstance(exc, Outage | RedisConnectionError | RedisTimeoutError | BusyLoadingError |
                  ReadOnlyError | OutOfMemoryError | OSError | asyncio.TimeoutError |
                  TimeoutError):
        return True
    return bool(getattr(exc, "retriable", False))  # aiokafka's retriable broker errors


class CheckpointIsolation:
    """Stage's checkpoint of last resort (mixed into streams.stage.Stage)."""

    async def _isolate_checkpoint(self: Stage, p: int) -> None:
        """Checkpoint the records since the last checkpoint in ever smaller runs.

        A run whose checkpoint fails is halved, one that goes through is written and the next
        run is twice as long. A record that fails alone (say, it adds to a corrupt counter)
        goes to the dead-letter topic as `checkpoint_failed` and the partition goes on without
        it; if a checkpoint without it fails too, no record is at fault: stop the worker.
        Called with the partition's lock held. Known limit: a stage 1 record's evidence was
        already sent to stage 2 when its checkpoint failed, and stays counted there.
        """
        self.stats.inc(f"{self.name}.checkpoint_isolations")
        log.warning("%s partition %d: checkpoint keeps failing; looking for the record at fault",
                    self.name, p)
        t0, letters, tries = time.monotonic(), 0, 0
        pending = self.since[p]
        n = max(1, len(pending) // 2)  # all of them just failed
        try:
            while pending:
                n = min(n, len(pending))
                self.since[p] = pending[:n]
                st = await self._catch_up(p)
                if st is None or st.applied < pending[n - 1][2]:  # revoked, or a gap
                    return
                if st.applied > st.offset:
                    tries += 1
                    try:
                        ok, _ = await self._write(p, st)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.parts.pop(p, None)
                        if is_outage(exc):
                            await asyncio.sleep(0.5)
                        elif n > 1:
                            n //= 2
                        else:
                            await self._blame(p, pending[0], st.offset, exc)
                            letters += 1
                        continue
                    if not ok:  # another worker moved it: reload and redo on top
                        self.parts.pop(p, None)
                        continue
                    self._covered(p, st)
                pending = pending[n:]
                n *= 2
        finally:
            since = self.since[p]
            since.extend(r for r in pending[n:] if not since or r[2] > since[-1][2])
            log.warning("%s partition %d: checkpoint written in %d tries over %.2fs, %d "
                        "records dead-lettered", self.name, p, tries, time.monotonic() - t0,
                        letters)

    async def _blame(self: Stage, p: int, r: Record, offset: int, exc: Exception) -> None:
        """Record `r`'s checkpoint failed alone: dead-letter it, unless a checkpoint without
        it fails too (then stop the worker: no record is at fault)."""
        if r[2] in self.poisoned[p] or not await self._can_checkpoint(p, offset):
            await self.fatal(RuntimeError(
                f"{self.name} partition {p}: a checkpoint fails even without any record "
                f"({type(exc).__name__}: {exc}); check Redis (the state keys' types, ACLs, "
                f"scripting) and restart the worker"),
                f"{self.name}.checkpoint_stuck", EXIT_CHECKPOINT_STUCK)
        await self.dead_letter(p, r, "checkpoint_failed", f"{type(exc).__name__}: {exc}")
        self.poisoned[p].add(r[2])

    async def _can_checkpoint(self: Stage, p: int, offset: int) -> bool:
        """Whether a checkpoint that changes nothing goes through (then a record is at fault)."""
        try:
            await self.store.checkpoint(self.name, p, offset, offset, Ops())
        except StateLost as exc:
            await self.fatal(exc)
        except Exception as exc:
            return is_outage(exc)
        return True
