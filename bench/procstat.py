"""CPU time per process from /proc (Linux): what each side of a benchmark spent, and what
the rest of a shared machine took meanwhile (bench/api_latency.py)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_s(pid: int) -> float:
    f = _stat(pid)
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / TICK


def group_pids(pgid: int) -> list[int]:
    """The processes of one process group: `cartwise api --workers N`, supervisor included."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat(int(entry.name))) and int(f[2]) == pgid:
            pids.append(int(entry.name))
    return sorted(pids)


def connections(pids: list[int], port: int) -> dict[int, int]:
    """Established connections on `port` held by each process: how the kernel spread them."""
    owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):  # nothing if the process is gone
            with contextlib.suppress(OSError):  # an fd closed meanwhile
                if (link := os.readlink(fd)).startswith("socket:["):
                    owner[link[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in owner:
                counts[owner[f[9]]] += 1
    return counts


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK  # less idle and iowait


class CpuMeter:
    """CPU seconds per lookup of the API's processes, Redis and the generator over one arm.

    The generator is this process's event-loop thread (`time.thread_time`), so the broker and
    Redis client threads of the harness are not charged to it.
    """

    def __init__(self, redis_pid: int, api_pgid: int | None = None, port: int = 0) -> None:
        self.redis_pid, self.api_pgid, self.port = redis_pid, api_pgid, port
        self.pids: list[int] = []
        self.serving: dict[int, int] = {}

    def start(self) -> None:
        if self.api_pgid is not None:
            self.pids = group_pids(self.api_pgid)
            self.serving = {p: n for p, n in connections(self.pids, self.port).items() if n}
        self.t0 = (time.perf_counter(), {p: cpu_s(p) for p in self.pids},
                   cpu_s(self.redis_pid), time.thread_time(), busy_s())

    def stop(self, lookups: int) -> dict:
        wall0, api0, redis0, gen0, busy0 = self.t0
        wall = time.perf_counter() - wall0
        api = {p: cpu_s(p) - api0[p] for p in self.pids}
        ours = [sum(api.values()), cpu_s(self.redis_pid) - redis0, time.thread_time() - gen0]
        per = 1e6 / max(1, lookups)
        # Cores busy with anything else during the arm (other users of a shared machine).
        row = {"redis_us_per_lookup": ours[1] * per, "generator_us_per_lookup": ours[2] * per,
               "others_cores": round((busy_s() - busy0 - sum(ours)) / wall, 2)}
        if self.api_pgid is not None:
            row["api_us_per_lookup"] = ours[0] * per
            # Cores each serving process used, and the connections it holds: the spread.
            row["api_cores_by_process"] = [round(api[p] / wall, 2) for p in self.serving]
            row["connections_by_process"] = list(self.serving.values())
        return row
