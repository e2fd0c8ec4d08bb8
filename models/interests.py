"""Interest clusters: shoppers grouped by what categories they spend their attention on.

Each shopper's context becomes a category-preference vector (shares of their touch weight per
catalog category); an online k-means (river) groups the vectors as they come. A cluster is
named by its centre's leading categories, so a name means the same thing in every events
partition even though each partition learns its own clustering (docs/segments.md). Pure
logic, no I/O.
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


def label(centre: Mapping[str, float]) -> str:
    """'coffee+books': the centre's categories with a real share, strongest first."""
    total = sum(v for v in centre.values() if v > 0)
    if not total:
        return "mixed"
    top = sorted(((v / total, c) for c, v in centre.items() if v > 0), reverse=True)
    named = [c for share, c in top[:3] if share >= LABEL_MIN_SHARE]
    return "+".join(named) if named else "mixed"


class InterestClusters:
    """One partition's online k-means over preference vectors."""

    def __init__(self, seed: int = 42) -> None:
        # Centres start near zero: the first shoppers place them, not random noise.
        self.model = cluster.KMeans(n_clusters=N_CLUSTERS, halflife=HALFLIFE, mu=0.0,
                                    sigma=0.01, seed=seed)
        self.learned = 0

    def learn(self, prefs: Mapping[str, float]) -> dict[str, Any] | None:
        """Learn one shopper's vector; their cluster and its name, or None without a vector."""
        if not prefs:
            return None
        self.model.learn_one(dict(prefs))
        self.learned += 1
        c = self.model.predict_one(dict(prefs))
        centre = self.model.centers[c]
        return {"cluster": label({k: centre.get(k, 0.0) for k in centre}),
                "categories": {k: round(v, 3) for k, v in
                               sorted(prefs.items(), key=lambda kv: -kv[1])[:5]}}

    def to_bytes(self) -> bytes:
        return pickle.dumps((self.model, self.learned))

    @classmethod
    def from_bytes(cls, raw: bytes) -> InterestClusters:
        # Only ever our own checkpoint (cw:state:clusters:{p}), written by this code.
        out = cls()
        out.model, out.learned = pickle.loads(raw)  # noqa: S301
        return out
