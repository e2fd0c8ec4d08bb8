"""Interest clusters: shoppers grouped by what categories they spend their attention on.

Each shopper's context becomes a category-preference vector (shares of their touch weight per
catalog category); an online k-means (river's, with centres that forget) groups the vectors as
they come. A cluster is named by its centre's leading categories, so a name means the same
thing in every events partition even though each partition learns its own clustering
(docs/segments.md). Pure logic, no I/O.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from typing import Any

from river import cluster

N_CLUSTERS = 8
# Each new member moves the closest centre this share of the way (river's halflife); small
# enough that one odd shopper does not drag a cluster away.
HALFLIFE = 0.1
LABEL_MIN_SHARE = 0.15  # categories below this share of a centre are left out of its name


def preferences(touches: Iterable[tuple[str, float]],
                catalog: Mapping[str, Mapping[str, Any] | None]) -> dict[str, float]:
    """Shares of touch weight per category over (item, weight) pairs; {} if none is known."""
    by_cat: dict[str, float] = {}
    for item, w in touches:
        cat = (catalog.get(item) or {}).get("category")
        if cat and w > 0:
            by_cat[cat] = by_cat.get(cat, 0.0) + w
    total = sum(by_cat.values())
    return {c: w / total for c, w in by_cat.items()} if total else {}


def label(centre: Mapping[str, float], total: float | None = None) -> str:
    """'coffee+books': the centre's categories with a real share, strongest first.

    `total` is the sum of the centre's positive values, where `centre` holds only some.
    """
    if total is None:
        total = sum(v for v in centre.values() if v > 0)
    if not total:
        return "mixed"
    top = sorted(((v / total, c) for c, v in centre.items() if v > 0), reverse=True)
    named = [c for share, c in top[:3] if share >= LABEL_MIN_SHARE]
    return "+".join(named) if named else "mixed"


class SparseKMeans(cluster.KMeans):
    """Online k-means whose centres forget, at a cost that follows the shopper's vector.

    A member moves its closest centre `halflife` of the way toward it in every category: the
    categories it lacks shrink too. river's KMeans moves only the member's own categories, so
    a centre kept every category any member ever had at full weight; on the realistic shop
    (400 categories) 97% of shoppers were in a cluster named "mixed" after 12,000 events and
    all of them after 24,000. Here a centre is `scale[c]` times its stored values, so the
    shrinking is one multiplication, and with squared norms kept per centre,
    |c - x|^2 = |c|^2 - 2 c.x + |x|^2 needs only the vector's own categories. The label's
    `candidates` are only keys that may be named (`_nameable`); shares do not depend on the
    scale, so shrinking leaves them as they are.
    """

    RESCAN_EVERY = 256  # key moves per centre between exact recounts of norm and candidates
    MIN_SCALE = 1e-12  # below it a centre's stored values are multiplied out (`_rescan`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync()

    def _sync(self) -> None:
        """Recount every centre's squared norm, positive total and label candidates."""
        if not hasattr(self, "scale"):  # new, or pickled before centres forgot
            self.scale: dict[int, float] = dict.fromkeys(self.centers, 1.0)
        self.norms: dict[int, float] = {}
        self.totals: dict[int, float] = {}
        self.candidates: dict[int, set[str]] = {}
        self.scan_total: dict[int, float] = {}
        self.moves: dict[int, int] = {}
        for c in self.centers:
            self._rescan(c)

    def _rescan(self, c: int) -> None:
        """Recount centre `c` in stored values (multiplied out first if its scale is tiny)."""
        centre = self.centers[c]
        if self.scale[c] < self.MIN_SCALE:
            s = self.scale[c]
            for k in list(centre):
                centre[k] *= s
            self.scale[c] = 1.0
        self.norms[c] = sum(v * v for v in centre.values())
        total = sum(v for v in centre.values() if v > 0)
        self.totals[c] = total
        # A category below a third of the naming share cannot be named until the positive
        # total falls to a third of today's (`label` and learning rescan at half) or it is touched.
        floor = LABEL_MIN_SHARE / 3 * total
        self.candidates[c] = {k for k, v in centre.items() if v > 0 and v >= floor}
        self.scan_total[c] = total
        self.moves[c] = 0

    def _nameable(self, c: int, v: float) -> bool:
        """Whether a key now at `v` may be named before it is touched again or `c` rescanned:
        naming needs LABEL_MIN_SHARE of a total that stays above half of the last scan's."""
        return v > 0 and v >= LABEL_MIN_SHARE / 3 * self.scan_total[c]

    def _value(self, c: int, k: str) -> float:
        """Key `k` of centre `c` in stored values."""
        centre = self.centers[c]
        if k not in centre:  # river's centres draw a new key's start value from the seed
            v = centre[k] / self.scale[c]
            centre[k] = v
            self.norms[c] += v * v
            if v > 0:
                self.totals[c] += v
            if self._nameable(c, v):
                self.candidates[c].add(k)
            return v
        return centre[k]

    def predict_one(self, x: Mapping[str, float]) -> int:
        def distance(c: int) -> float:
            s = self.scale[c]
            return s * s * self.norms[c] - 2.0 * s * sum(self._value(c, k) * xk
                                                         for k, xk in x.items())

        return min(self.centers, key=distance)

    def learn_predict_one(self, x: Mapping[str, float]) -> int:
        closest = self.predict_one(x)
        centre, rate = self.centers[closest], self.halflife
        scale = self.scale[closest] * (1.0 - rate)  # every category shrinks
        self.scale[closest] = scale
        step = rate / scale
        norm, total, touched = self.norms[closest], self.totals[closest], self.candidates[closest]
        for k, xk in x.items():
            old = centre[k]
            new = old + step * xk
            centre[k] = new
            norm += new * new - old * old
            total += max(new, 0.0) - max(old, 0.0)
            if self._nameable(closest, new):
                # Only keys that may be named: `label` reads all of them for every shopper.
                touched.add(k)
        self.norms[closest], self.totals[closest] = norm, total
        self.moves[closest] += len(x)
        if (self.moves[closest] > self.RESCAN_EVERY or total < self.scan_total[closest] / 2
                or scale < self.MIN_SCALE):
            self._rescan(closest)
        return closest

    def centre(self, c: int) -> dict[str, float]:
        """Centre `c` as values: its stored values times its scale."""
        s = self.scale[c]
        return {k: v * s for k, v in self.centers[c].items()}

    def label(self, c: int) -> str:
        """`label` of centre `c`, reading only its candidate categories."""
        centre = self.centers[c]
        if self.totals[c] < self.scan_total[c] / 2:
            self._rescan(c)
        total = self.totals[c]
        if not total:
            return "mixed"
        # `label` over the candidates, without sorting them all: only shares that can be
        # named (at most 1 / LABEL_MIN_SHARE of them) are kept. 9% of a worker's time before.
        top = []
        for k in self.candidates[c]:
            v = centre[k]
            if v > 0 and v / total >= LABEL_MIN_SHARE:
                top.append((v / total, k))
        top.sort(reverse=True)
        return "+".join(k for _, k in top[:3]) if top else "mixed"


class InterestClusters:
    """One partition's online k-means over preference vectors."""

    def __init__(self, seed: int = 42) -> None:
        # Centres start near zero: the first shoppers place them, not random noise.
        self.model = SparseKMeans(n_clusters=N_CLUSTERS, halflife=HALFLIFE, mu=0.0,
                                    sigma=0.01, seed=seed)
        self.learned = 0

    def learn(self, prefs: Mapping[str, float]) -> dict[str, Any] | None:
        """Learn one shopper's vector; their cluster and its name, or None without a vector."""
        if not prefs:
            return None
        # river's learn_one and then predict_one, with one search for the closest centre
        c = self.model.learn_predict_one(prefs)
        self.learned += 1
        return {"cluster": self.model.label(c),
                "categories": {k: round(v, 3) for k, v in
                               sorted(prefs.items(), key=lambda kv: -kv[1])[:5]}}

    def to_bytes(self) -> bytes:
        return pickle.dumps((self.model, self.learned))

    @classmethod
    def from_bytes(cls, raw: bytes) -> InterestClusters:
        # Only ever our own checkpoint (cw:state:clusters:{p}), written by this code.
        out = cls()
        model, out.learned = pickle.loads(raw)  # noqa: S301
        if not isinstance(model, SparseKMeans):  # a checkpoint of river's own KMeans
            out.model.centers = model.centers
            out.model._rng = model._rng
            out.model._sync()
        else:
            out.model = model
            if not hasattr(model, "scale"):  # pickled before centres forgot: scale 1
                model._sync()
        return out
