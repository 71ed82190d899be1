"""A token bucket per sender: ``burst`` commands at once, refilled at ``per_minute``.

The clock is the caller's (``now`` in seconds), so the rules are tested without waiting. A sender
over the limit is told once (``Verdict.first``), then ignored until a token is back: answering
every flooded message would be the flood.
"""

from __future__ import annotations

import attrs

#: Senders remembered at most; a full bucket is as good as none, so those go first.
MAX_SENDERS = 10_000


@attrs.frozen
class Verdict:
    allowed: bool
    #: The first refusal since the sender was last allowed (say so once).
    first: bool = False
    #: Seconds until the next command will be taken.
    retry_after: float = 0.0


@attrs.define
class _Bucket:
    tokens: float
    at: float
    refused: bool = False


class RateLimiter:
    def __init__(self, *, burst: int, per_minute: float) -> None:
        if burst < 1 or per_minute <= 0:
            raise ValueError("burst must be at least 1 and per_minute above 0")
        self.burst = burst
        self.rate = per_minute / 60.0
        self._buckets: dict[str, _Bucket] = {}

    def check(self, sender: str, now: float) -> Verdict:
        bucket = self._buckets.get(sender)
        if bucket is None:
            self._forget_full(now)
            bucket = self._buckets[sender] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.refused = False
            return Verdict(True)
        first = not bucket.refused
        bucket.refused = True
        return Verdict(False, first, (1.0 - bucket.tokens) / self.rate)

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < MAX_SENDERS:
            return
        for sender, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * self.rate >= self.burst:
                del self._buckets[sender]
        while len(self._buckets) >= MAX_SENDERS:  # all busy: the oldest goes
            del self._buckets[next(iter(self._buckets))]
