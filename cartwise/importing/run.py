"""`cartwise import`: read a file, map and validate each line, send what is new (docs/import.md).

Every line ends up counted in exactly one place of the summary: sent, skipped by the preset
(with why), a duplicate within the file, already imported by an earlier run, or rejected
(with its line number and reason, on stderr and in the rejects file when one is given).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

import orjson

from cartwise.contract import (
    MAX_EVENT_BYTES,
    ContractError,
    check_not_future,
    event_to_dict,
    prepare_catalog,
    validate_event,
)
from cartwise.importing.mapping import CatalogPreset, Preset, PresetSpec, Skip
from cartwise.importing.reader import BadLine, Source
from cartwise.importing.sender import BatchSender, Ledger, event_digest
from cartwise.redisconn import connect
from cartwise.settings import Settings

SHOWN_REJECTS = 10  # rejected lines printed one by one; the rest are counted (and filed)
FLUSH_EVERY = 20_000  # records between acknowledgements (and ledger writes)


@dataclass
class Summary:
    kind: str
    read: int = 0
    sent: int = 0
    duplicates: int = 0  # the same event id twice in this file (catalog: the same item)
    already: int = 0  # imported by an earlier run (the ledger)
    skipped: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    ends: dict[int, int] = field(default_factory=dict)  # last offset sent per partition

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def reject(self, line: int, reason: str) -> None:
        self.rejected[reason] += 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < 5:
            lines.append(line)

    def lines(self, dry_run: bool = False) -> list[str]:
        what = "events" if self.kind == "events" else "catalog items"
        out = [f"read      {self.read:>10,} lines",
               f"checked   {self.sent:>10,} {what} (valid; --dry-run sent nothing)" if dry_run
               else f"sent      {self.sent:>10,} {what}"]
        if self.kind == "events":
            out.append(f"duplicate {self.duplicates:>10,} (an event id already in this file)")
            out.append(f"already   {self.already:>10,} (imported by an earlier run)")
        else:
            out.append(f"repeated  {self.duplicates:>10,} (an item id again; the last wins)")
        for reason, n in sorted(self.skipped.items()):
            out.append(f"skipped   {n:>10,} ({reason}, by the preset)")
        total = sum(self.rejected.values())
        out.append(f"rejected  {total:>10,}")
        for reason, n in self.rejected.most_common():
            lines = ", ".join(map(str, self.examples.get(reason, [])))
            out.append(f"  {reason:<22} {n:>8,}  (lines {lines}{', ...' if n > 5 else ''})")
        out.append(f"seconds   {self.seconds:>10.1f}   ({self.rate:,.0f} {what}/s)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "read": self.read, "sent": self.sent,
                "duplicates": self.duplicates, "already": self.already,
                "skipped": dict(self.skipped), "rejected": dict(self.rejected),
                "seconds": round(self.seconds, 3), "per_second": round(self.rate),
                # the last offset sent to each partition, to wait for a worker to apply them
                "last_offsets": {str(p): o for p, o in sorted(self.ends.items())}}


def wire(kind: str, record: dict[str, Any], now: float) -> tuple[bytes, str, bytes]:
    """(dedup digest, key, canonical wire value) of one record; raises ContractError.

    The producer library's rules, except that a missing `ts` is an error: history without
    a time cannot be placed (the library would stamp it now).
    """
    if kind == "events":
        valid = check_not_future(validate_event(record), now)
        value = orjson.dumps(event_to_dict(valid))
        if len(value) > MAX_EVENT_BYTES:
            raise ContractError("oversized", None, f"{len(value)} bytes > {MAX_EVENT_BYTES}")
        return event_digest(valid.user_id, valid.event_id), valid.user_id, value
    item, value = prepare_catalog(record)
    return item.item_id.encode(), item.item_id, value


class _Progress:
    """Progress with an ETA on stderr: a rich bar on a terminal, else a line every 10 s (so
    logs stay readable); nothing with --no-progress."""

    EVERY_S = 10.0

    def __init__(self, source: Source, enabled: bool, err: IO[str]) -> None:
        self.source = source
        self.err = err
        self.enabled = enabled
        self.bar: Any = None
        self.started = self.last = time.perf_counter()
        if not enabled or not err.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
        except ImportError:  # rich missing: plain lines then
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TextColumn("{task.fields[lines]:,} lines"), TimeRemainingColumn(),
                            console=Console(file=err), transient=False)
        self.task = self.bar.add_task(f"importing {source.path.name}", total=source.size,
                                      lines=0)
        self.bar.start()

    def update(self, lines: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.source.position(), lines=lines)
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.EVERY_S:
            return
        self.last = now
        share = self.source.position() / max(self.source.size, 1)
        left = (now - self.started) * (1 - share) / share if share > 0 else 0.0
        print(f"  {lines:,} lines ({share:.0%} of {self.source.path.name}), about "
              f"{left:.0f} s left", file=self.err, flush=True)

    def close(self, lines: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.source.size, lines=lines)
            self.bar.stop()


Outcome = tuple  # ("ok", digest, key, value) | ("skip", reason) | ("bad", reason, field, detail)
Chunk = list[tuple[int, dict[str, Any] | BadLine, int]]  # (line number, row, sequence)

_preset: Preset | None = None  # this import process's, from _start


def prepare_chunk(preset: Preset, chunk: Chunk, now: float
                  ) -> list[Outcome]:
    """Map and check a run of lines (in a helper process when --jobs > 1): the costly part."""
    kind = "catalog" if isinstance(preset, CatalogPreset) else "events"
    out: list[Outcome] = []
    for _, row, seq in chunk:
        if isinstance(row, BadLine):
            out.append(("bad", row.reason, None, row.detail))
            continue
        try:
            out.append(("ok", *wire(kind, preset.event(row, seq), now)))
        except Skip as skip:
            out.append(("skip", skip.reason))
        except ContractError as exc:
            out.append(("bad", exc.reason, exc.field, exc.detail))
    return out


def _start(spec: PresetSpec) -> None:
    global _preset
    # Ctrl-C is the parent's to handle (it stops the pool), not a traceback per helper.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _preset = spec.build()


def _prepare_here(chunk: Chunk, now: float) -> list[Outcome]:
    assert _preset is not None
    return prepare_chunk(_preset, chunk, now)


class Importer:
    def __init__(self, settings: Settings, spec: PresetSpec, source: Source,
                 rejects: Path | None = None, dry_run: bool = False, batch: int = 5_000,
                 progress: bool = True, jobs: int = 1, err: IO[str] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.preset = spec.build()  # raises MappingError before anything starts
        self.kind = spec.kind
        self.source = source
        self.rejects_path = rejects
        self.dry_run = dry_run
        self.batch = batch
        self.progress = progress
        self.jobs = jobs
        self.err = err or sys.stderr
        self.summary = Summary(self.kind)
        self._seen: set[bytes] = set()
        self._rejects: IO[bytes] | None = None

    def run(self) -> Summary:
        return asyncio.run(self._run())

    async def _run(self) -> Summary:
        started = time.perf_counter()
        ledger = sender = pool = None
        if self.jobs > 1:
            # Forked (spawn would re-run `python -m cartwise` in each), all at once by the
            # first task, before this process has threads or connections to inherit.
            pool = ProcessPoolExecutor(self.jobs, mp_context=get_context("fork"),
                                       initializer=_start, initargs=(self.spec,))
            pool.submit(int).result()
        if not self.dry_run:
            topic = self.settings.events_topic if self.kind == "events" \
                else self.settings.catalog_topic
            if self.kind == "events":
                r = connect(self.settings)
                r.ping()  # fail before anything is sent, not halfway
                ledger = Ledger(r, f"{self.settings.prefix}import:events")
            sender = BatchSender(self.settings.bootstrap, topic)
            await sender.start()
        bar = _Progress(self.source, self.progress, self.err)
        out = _Out(ledger, sender)
        try:
            if self.rejects_path is not None:
                self._rejects = open(self.rejects_path, "wb")  # noqa: SIM115 - closed below
            in_flight: deque[tuple[Chunk, Future | list[Outcome]]] = deque()
            chunk: Chunk = []
            for n, row in self.source.rows():
                self.summary.read += 1
                # Bad lines go along, so that every report comes in file order.
                chunk.append((n, row, 0 if isinstance(row, BadLine) else
                              self.preset.sequence(row)))
                if len(chunk) >= self.batch:
                    in_flight.append((chunk, self._submit(pool, chunk)))
                    chunk = []
                    while len(in_flight) > 2 * self.jobs - 1:
                        await self._take(*in_flight.popleft(), out)
                    bar.update(self.summary.read)
                    await asyncio.sleep(0)  # where Ctrl-C (a cancel) gets in
            if chunk:
                in_flight.append((chunk, self._submit(pool, chunk)))
            while in_flight:
                await self._take(*in_flight.popleft(), out)
            await out.ack()
        except asyncio.CancelledError:  # Ctrl-C: keep what the broker took, for the re-run
            with contextlib.suppress(Exception):
                await asyncio.wait_for(out.ack(), 15)
            raise
        finally:
            self.summary.seconds = time.perf_counter() - started
            bar.close(self.summary.read)
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            if sender is not None:
                await sender.stop()
            if self._rejects is not None:
                self._rejects.close()
        if sender is not None:
            self.summary.ends = dict(sender.ends)
        return self.summary

    def _submit(self, pool: ProcessPoolExecutor | None, chunk: Chunk
                ) -> Future | list[Outcome]:
        if pool is None:
            return prepare_chunk(self.preset, chunk, time.time())
        return pool.submit(_prepare_here, chunk, time.time())

    async def _take(self, chunk: Chunk, done: Future | list[Outcome], out: _Out) -> None:
        """Count a checked chunk's lines in file order and send its new records."""
        outcomes = done if isinstance(done, list) else await asyncio.wrap_future(done)
        pending: list[tuple[bytes, str, bytes]] = []
        for (n, row, _), o in zip(chunk, outcomes, strict=True):
            if o[0] == "ok":
                digest = o[1]
                if digest in self._seen:
                    self.summary.duplicates += 1
                    if self.kind == "events":
                        continue
                self._seen.add(digest)
                pending.append(o[1:])
            elif o[0] == "skip":
                self.summary.skipped[o[1]] += 1
            else:
                self._reject(n, o[1], o[2], o[3], row.text if isinstance(row, BadLine) else row)
        await out.send(pending, self.summary)

    def _reject(self, n: int, reason: str, field_: str | None, detail: str,
                row: dict[str, Any] | str) -> None:
        self.summary.reject(n, reason)
        where = f" ({field_})" if field_ else ""
        total = sum(self.summary.rejected.values())
        if total <= SHOWN_REJECTS:
            print(f"{self.source.path.name}:{n}: {reason}{where}: {detail}", file=self.err)
        elif total == SHOWN_REJECTS + 1:
            more = f"; all in {self.rejects_path}" if self.rejects_path else \
                "; --rejects FILE keeps them all"
            print(f"{self.source.path.name}: more rejected lines are counted in the "
                  f"summary{more}", file=self.err)
        if self._rejects is not None:
            self._rejects.write(orjson.dumps({"line": n, "reason": reason, "field": field_,
                                              "detail": detail, "row": row}) + b"\n")


class _Out:
    """Sends new records and, once the broker has them, writes them to the ledger."""

    def __init__(self, ledger: Ledger | None, sender: BatchSender | None) -> None:
        self.ledger = ledger
        self.sender = sender
        self.unacked: list[bytes] = []

    async def send(self, pending: list[tuple[bytes, str, bytes]], summary: Summary) -> None:
        if not pending:
            return
        if self.ledger is not None:
            known = self.ledger.known([d for d, _, _ in pending])
            fresh = [p for p, k in zip(pending, known, strict=True) if not k]
            summary.already += len(pending) - len(fresh)
            pending = fresh
        if self.sender is not None:
            for digest, key, value in pending:
                await self.sender.send(key, value)
                self.unacked.append(digest)
        summary.sent += len(pending)
        if len(self.unacked) >= FLUSH_EVERY:
            await self.ack()

    async def ack(self) -> None:
        """Wait for the broker, then remember what it took: never the other way round."""
        if self.sender is not None:
            await self.sender.flush()
        if self.ledger is not None and self.unacked:
            self.ledger.add(self.unacked)
        self.unacked = []
