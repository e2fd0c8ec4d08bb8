"""Baselines for the prequential replay, written from their published descriptions.

- Most popular (recent): decayed interaction counts (one day half-life).
- Association rules (AR) and sequential rules (SR): Ludewig & Jannach, "Evaluation of
  session-based recommendation algorithms" (2018). AR counts every pair of positions in a
  session, both ways; SR counts only j after i, weighted 1 / (steps between them), at most 10
  steps back. A repeated item pairs with itself (a -> a), so a repeated click of the item just
  viewed can be predicted, as in the paper's counting. Both score from the session's last item.
- Session-kNN (SKNN) and vector-multiplication SKNN (V-SKNN): Jannach & Ludewig, "When
  recurrent neural networks meet the neighborhood for session-based recommendation" (2017),
  and the 2018 paper above. The neighbours of the current session are the `k` most similar of
  the `sample` most recent past sessions sharing an item with it; an item scores the summed
  similarity of the neighbours containing it. SKNN: cosine of binary vectors. V-SKNN: the
  current session's items weigh linearly more the later they came, a dot product with the
  neighbour's binary vector.
- STAN: Garg et al., "Sequence and time aware neighborhood for session-based recommendations"
  (SIGIR 2019). Session-kNN with three decays: an item of the current session weighs
  exp((p - l) / lambda_spw) by its position p of l; a neighbour's similarity is multiplied by
  exp(-(now - its last event) / lambda_snh); a candidate item of a neighbour scores the
  neighbour's similarity times exp(-|its position - the position of the match| / lambda_inh),
  the match being the current session's most recent item that the neighbour holds.
- VSTAN: Ludewig et al., "Empirical analysis of session-based recommendation algorithms"
  (UMUAI 2021). STAN plus V-SKNN's weighting of each neighbour's items by where the match sits
  in the current session, exp((p_match - l) / lambda_ipw), and IDF weighting of the candidate,
  score * (1 + lambda_idf * log(sessions / sessions holding it)).

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
    """Every earlier position of the session pairs with the new item, counted both ways."""

    name = "association_rules"

    def learn(self, event: Event) -> None:
        _, items = self.sessions.touch(event)
        for line in event.lines:
            j = line.item_id
            for i in items:
                self._add(i, j, 1.0)
                self._add(j, i, 1.0)
            items.append(j)


class SequentialRules(_LastItemRules):
    """j after i, weighted 1 / steps, over the last `steps` positions (repeats included)."""

    name = "sequential_rules"

    def __init__(self, steps: int = 10) -> None:
        super().__init__()
        self.steps = steps

    def learn(self, event: Event) -> None:
        _, items = self.sessions.touch(event)
        for line in event.lines:
            j = line.item_id
            for d, i in enumerate(reversed(items[-self.steps:]), 1):
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
        self.holding: dict[str, int] = defaultdict(int)  # item -> sessions holding it (IDF)
        self.now = 0.0  # the newest event time learned

    def learn(self, event: Event) -> None:
        key, items = self.sessions.touch(event)
        s = self.sets.setdefault(key, set())
        for line in event.lines:
            items.append(line.item_id)
            if line.item_id not in s:
                s.add(line.item_id)
                self.item_sessions[line.item_id].append(key)
                self.holding[line.item_id] += 1
        self.updated[key] = self.now = event.ts

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
        sims = [(self.weight(query, n), n) for n in cands]
        return heapq.nlargest(self.k, sims)

    def query(self, items: list[str]) -> dict[str, float]:
        """The current session as weights per item (SKNN: binary, cosine-normalized)."""
        mine = set(items)
        return dict.fromkeys(mine, 1.0 / math.sqrt(len(mine))) if mine else {}

    def similarity(self, query: dict[str, float], other: set[str]) -> float:
        return _dot(query, other) / math.sqrt(len(other))

    def weight(self, query: dict[str, float], n: str) -> float:
        """How much neighbour session `n` counts (SKNN: its similarity alone)."""
        return self.similarity(query, self.sets[n])

    def recommend(self, user: str, k: int) -> list[str]:
        scores: dict[str, float] = {}
        for sim, n in self._neighbours(user):
            if sim <= 0:
                continue
            for i in self.sets[n]:
                scores[i] = scores.get(i, 0.0) + sim
        return _top(scores, k)


def _dot(query: dict[str, float], other: set[str]) -> float:
    """The weighted query times a neighbour's binary vector."""
    if len(query) <= len(other):
        return sum(w for i, w in query.items() if i in other)
    return sum(query[i] for i in other if i in query)


class VectorSessionKNN(SessionKNN):
    name = "v_sknn"

    def query(self, items: list[str]) -> dict[str, float]:
        # Linear position weights, the newest item 1; an item seen twice keeps its later weight.
        n = len(items)
        return {i: (p + 1) / n for p, i in enumerate(items)}

    def similarity(self, query: dict[str, float], other: set[str]) -> float:
        return _dot(query, other)


class STAN(SessionKNN):
    """Sequence and time aware neighbourhood (Garg et al. 2019).

    `spw`, `inh` are in positions, `snh_days` in days; the defaults are those of the authors'
    published implementation (1.02, 2.05, 5 days), with the k and sample of the other kNNs.
    A neighbour's positions are each item's last position in it.

    >>> from cartwise.contract import validate_event
    >>> m = STAN()
    >>> for n, (s, item) in enumerate([("p", "a"), ("p", "b"), ("u", "a")]):
    ...     m.learn(validate_event({"event_id": str(n), "type": "view", "user_id": s,
    ...                             "item_id": item, "ts": 1.7e9 + n}))
    >>> m.recommend("u", 5)
    ['a', 'b']
    """

    name = "stan"

    def __init__(self, k: int = 100, sample: int = 500, per_item: int = 1000,
                 spw: float = 1.02, snh_days: float = 5.0, inh: float = 2.05) -> None:
        super().__init__(k, sample, per_item)
        self.spw, self.snh_s, self.inh = spw, snh_days * 86400.0, inh

    def query(self, items: list[str]) -> dict[str, float]:
        # exp((p - l) / spw), the newest item 1; an item seen twice keeps its later weight.
        n = len(items)
        return {i: math.exp((p + 1 - n) / self.spw) for p, i in enumerate(items)}

    def similarity(self, query: dict[str, float], other: set[str]) -> float:
        # The paper's s.n / sqrt(l(s) l(n)); l(s) is the same for every neighbour.
        return _dot(query, other) / math.sqrt(len(query) * len(other)) if query else 0.0

    def weight(self, query: dict[str, float], n: str) -> float:
        return self.similarity(query, self.sets[n]) * math.exp(
            -(self.now - self.updated[n]) / self.snh_s)

    def recommend(self, user: str, k: int) -> list[str]:
        return _top(self.scores(user), k)

    def scores(self, user: str) -> dict[str, float]:
        mine = self.sessions.of(user)
        scores: dict[str, float] = {}
        for sim, n in self._neighbours(user):
            if sim <= 0:
                continue
            last = {i: p for p, i in enumerate(self.sessions.items[n])}
            # The match: the current session's most recent item that the neighbour holds.
            back, match = next((b, i) for b, i in enumerate(reversed(mine)) if i in last)
            w = sim * self.neighbour_factor(back)
            for i, p in last.items():
                scores[i] = scores.get(i, 0.0) + w * self.item_factor(i) * math.exp(
                    -abs(p - last[match]) / self.inh)
        return scores

    def neighbour_factor(self, back: int) -> float:
        """Extra weight of a neighbour whose match is `back` steps before the newest item."""
        return 1.0

    def item_factor(self, item: str) -> float:
        """Extra weight of a candidate item (STAN: none)."""
        return 1.0


class VSTAN(STAN):
    """STAN with V-SKNN's match-position weighting and IDF (Ludewig et al. 2021).

    `ipw` is in positions; `idf` weighs log(sessions / sessions holding the item). Defaults as
    the authors' published implementation (1.02, 5).
    """

    name = "vstan"

    def __init__(self, k: int = 100, sample: int = 500, per_item: int = 1000,
                 spw: float = 1.02, snh_days: float = 5.0, inh: float = 2.05,
                 ipw: float = 1.02, idf: float = 5.0) -> None:
        super().__init__(k, sample, per_item, spw, snh_days, inh)
        self.ipw, self.idf = ipw, idf

    def neighbour_factor(self, back: int) -> float:
        return math.exp(-back / self.ipw)

    def item_factor(self, item: str) -> float:
        return 1.0 + self.idf * math.log(len(self.sets) / self.holding[item])


BASELINES: dict[str, type] = {
    m.name: m for m in (MostPopular, AssociationRules, SequentialRules, SessionKNN,
                        VectorSessionKNN, STAN, VSTAN)
}
