"""Baselines for the prequential replay, written from their published descriptions.

- Most popular (recent): decayed interaction counts (one day half-life).
- Association rules (AR) and sequential rules (SR): Ludewig & Jannach, "Evaluation of
  session-based recommendation algorithms" (2018): pair counts within sessions; SR counts only
  j after i, weighted 1 / (steps between them), at most 10 steps back. Both score from the
  session's last item.
- Session-kNN (SKNN) and vector-multiplication SKNN (V-SKNN): Jannach & Ludewig, "When
  recurrent neural networks meet the neighborhood for session-based recommendation" (2017),
  and the 2018 paper above. The neighbours of the current session are the `k` most similar of
  the `sample` most recent past sessions sharing an item with it; an item scores the summed
  similarity of the neighbours containing it. SKNN: cosine of binary vectors. V-SKNN: the
  current session's items weigh linearly more the later they came, a dot product with the
  neighbour's binary vector.

Every model learns event by event and answers `recommend(user, k)` from what it has learned so
far: the interface the replay (models/evaluation.py) drives. Pure logic, no I/O.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from typing import Protocol

from cartwise.contract import Event


class Model(Protocol):
    name: str

    def learn(self, event: Event) -> None: ...

    def recommend(self, user: str, k: int) -> list[str]: ...


SESSION_GAP_S = 30 * 60.0


class Sessions:
    """The shopper's current session (its items in order), as every session baseline sees it:
    the event's session_id, else a new session after 30 minutes of silence."""

    def __init__(self) -> None:
        self.current: dict[str, tuple[str, float]] = {}  # user -> (session key, last ts)
        self.items: dict[str, list[str]] = {}  # session key -> items, in order, repeats kept
        self._n = 0

    def touch(self, event: Event) -> tuple[str, list[str]]:
        """The event's session key and that session's items before this event."""
        cur = self.current.get(event.user_id)
        if event.session_id is not None:
            key = f"{event.user_id}/{event.session_id}"
        elif cur is None or event.ts - cur[1] > SESSION_GAP_S:
            self._n += 1
            key = f"{event.user_id}/~{self._n}"
        else:
            key = cur[0]
        self.current[event.user_id] = (key, event.ts)
        return key, self.items.setdefault(key, [])

    def of(self, user: str) -> list[str]:
        cur = self.current.get(user)
        return self.items.get(cur[0], []) if cur else []


class MostPopular:
    """Forward-decayed counts: a stored count only grows, so the stored order is the decayed
    order and a short top list can be kept exactly."""

    name = "most_popular"

    def __init__(self, half_life_s: float = 86400.0, keep: int = 200) -> None:
        self.half_life_s, self.keep = half_life_s, keep
        self.counts: dict[str, float] = {}
        self.landmark: float | None = None
        self.top: list[str] = []

    def learn(self, event: Event) -> None:
        if self.landmark is None:
            self.landmark = event.ts
        g = 2.0 ** ((event.ts - self.landmark) / self.half_life_s)
        if g > 1e200:  # rebase: scale everything down, order unchanged
            for item in self.counts:
                self.counts[item] /= g
            self.landmark, g = event.ts, 1.0
        for line in event.lines:
            c = self.counts[line.item_id] = self.counts.get(line.item_id, 0.0) + g
            top = self.top
            if line.item_id in top or len(top) < self.keep or c > self.counts[top[-1]]:
                if line.item_id not in top:
                    top.append(line.item_id)
                top.sort(key=lambda i: (-self.counts[i], i))
                del top[self.keep:]

    def recommend(self, user: str, k: int) -> list[str]:
        return self.top[:k]


def _top(scores: dict[str, float], k: int) -> list[str]:
    return [i for i, _ in heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))]


class _LastItemRules:
    """Rules i -> j counted within sessions; a shopper is scored from their session's last item."""

    def __init__(self) -> None:
        self.sessions = Sessions()
        self.rules: dict[str, dict[str, float]] = defaultdict(dict)

    def _add(self, i: str, j: str, w: float) -> None:
        self.rules[i][j] = self.rules[i].get(j, 0.0) + w

    def recommend(self, user: str, k: int) -> list[str]:
        items = self.sessions.of(user)
        return _top(self.rules.get(items[-1], {}), k) if items else []


class AssociationRules(_LastItemRules):
    name = "association_rules"

    def learn(self, event: Event) -> None:
        _, items = self.sessions.touch(event)
        for line in event.lines:
            j = line.item_id
            if j not in items:
                for i in set(items):
                    self._add(i, j, 1.0)
                    self._add(j, i, 1.0)
            items.append(j)


class SequentialRules(_LastItemRules):
    name = "sequential_rules"

    def __init__(self, steps: int = 10) -> None:
        super().__init__()
        self.steps = steps

    def learn(self, event: Event) -> None:
        _, items = self.sessions.touch(event)
        for line in event.lines:
            j = line.item_id
            for d, i in enumerate(reversed(items[-self.steps:]), 1):
                if i != j:
                    self._add(i, j, 1.0 / d)
            items.append(j)


class SessionKNN:
    name = "sknn"

    def __init__(self, k: int = 100, sample: int = 500, per_item: int = 1000) -> None:
        self.k, self.sample = k, sample
        self.sessions = Sessions()
        self.sets: dict[str, set[str]] = {}
        self.updated: dict[str, float] = {}  # session -> last event time (recency for sampling)
        self.item_sessions: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=per_item))

    def learn(self, event: Event) -> None:
        key, items = self.sessions.touch(event)
        s = self.sets.setdefault(key, set())
        for line in event.lines:
            items.append(line.item_id)
            if line.item_id not in s:
                s.add(line.item_id)
                self.item_sessions[line.item_id].append(key)
        self.updated[key] = event.ts

    def _neighbours(self, user: str) -> list[tuple[float, str]]:
        cur = self.sessions.current.get(user)
        if cur is None:
            return []
        key = cur[0]
        query = self.query(self.sessions.items[key])
        cands: set[str] = set()
        for i in query:
            # The index is in order of arrival: the newest `sample` of each item suffice to
            # find the `sample` most recent sessions of the union.
            recent = self.item_sessions.get(i, ())
            cands.update(list(recent)[-self.sample:] if len(recent) > self.sample else recent)
        cands.discard(key)
        if len(cands) > self.sample:
            cands = set(heapq.nlargest(self.sample, cands, key=lambda s: (self.updated[s], s)))
        sims = [(self.similarity(query, self.sets[n]), n) for n in cands]
        return heapq.nlargest(self.k, sims)

    def query(self, items: list[str]) -> dict[str, float]:
        """The current session as weights per item (SKNN: binary, cosine-normalized)."""
        mine = set(items)
        return dict.fromkeys(mine, 1.0 / math.sqrt(len(mine))) if mine else {}

    def similarity(self, query: dict[str, float], other: set[str]) -> float:
        if len(query) <= len(other):
            dot = sum(w for i, w in query.items() if i in other)
        else:
            dot = sum(query[i] for i in other if i in query)
        return dot / math.sqrt(len(other))

    def recommend(self, user: str, k: int) -> list[str]:
        scores: dict[str, float] = {}
        for sim, n in self._neighbours(user):
            if sim <= 0:
                continue
            for i in self.sets[n]:
                scores[i] = scores.get(i, 0.0) + sim
        return _top(scores, k)


class VectorSessionKNN(SessionKNN):
    name = "v_sknn"

    def query(self, items: list[str]) -> dict[str, float]:
        # Linear position weights, the newest item 1; an item seen twice keeps its later weight.
        n = len(items)
        return {i: (p + 1) / n for p, i in enumerate(items)}

    def similarity(self, query: dict[str, float], other: set[str]) -> float:
        if len(query) <= len(other):
            return sum(w for i, w in query.items() if i in other)
        return sum(query[i] for i in other if i in query)


BASELINES: dict[str, type] = {
    m.name: m for m in (MostPopular, AssociationRules, SequentialRules, SessionKNN,
                        VectorSessionKNN)
}
