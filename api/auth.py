"""API keys: roles, hashing at rest, and a token bucket per key.

Keys are 256-bit random strings, so a plain SHA-256 is enough to keep them safe at rest (no
password-style stretching needed) and costs a microsecond per request. Pure logic, no I/O.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

# Each role may do what the roles before it may: an ingest key also reads, admin does all.
ROLES = ("read", "ingest", "admin")


class KeyConfigError(ValueError):
    pass


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key(role: str) -> tuple[str, str]:
    """A fresh key and its config entry ("role:sha256:<hex>")."""
    if role not in ROLES:
        raise KeyConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    key = f"cw_{role}_{secrets.token_urlsafe(32)}"
    return key, f"{role}:{hash_key(key)}"


def allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


class KeyRing:
    """Hashed keys and their roles, parsed from the `api_keys` setting."""

    def __init__(self, spec: str) -> None:
        self.roles: dict[str, str] = {}
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            role, _, digest = entry.partition(":")
            if role not in ROLES:
                raise KeyConfigError(f"api_keys entry {entry[:20]!r}...: unknown role {role!r}")
            algo, _, hexd = digest.partition(":")
            if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef"
                                                          for c in hexd):
                raise KeyConfigError(f"api_keys entry for role {role!r}: expected "
                                     "'role:sha256:<64 hex digits>' (see `cartwise api-key`)")
            self.roles[digest] = role

    def __len__(self) -> int:
        return len(self.roles)

    def role_of(self, key: str) -> tuple[str, str] | None:
        """(role, key hash) for a known key, else None."""
        digest = hash_key(key)
        role = self.roles.get(digest)
        return None if role is None else (role, digest)


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns 0 on success, else seconds until they would be there."""
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass
class RateLimiter:
    """One bucket per `who` (a key, or a key's events); rates per kind of bucket (a role, or
    "events"), bursts of twice the rate and at least `min_burst` (a whole batch must fit).
    In memory: limits are per API process."""

    rates: dict[str, float]
    min_burst: dict[str, float] = field(default_factory=dict)
    max_keys: int = 100_000
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def take(self, who: str, kind: str, now: float, cost: float = 1.0) -> float:
        b = self.buckets.get(who)
        if b is None:
            if len(self.buckets) >= self.max_keys:
                self.buckets.clear()
            rate = self.rates[kind]
            b = self.buckets[who] = TokenBucket(rate, max(2 * rate, self.min_burst.get(kind, 0)))
        return b.take(now, cost)
