"""Rate limiting, Synapse's way (synapse/api/ratelimiting.py): a leaky bucket per key that holds
up to ``burst_count`` actions and drains at ``per_second``. A refused action is a 429
``M_LIMIT_EXCEEDED`` with ``retry_after_ms``, the time until the bucket has room again.

Only logins are limited (Synapse's ``rc_login``): by client address, by account for successful
logins, and by account for failed attempts. Nothing else here is exposed beyond loopback by
default, and a run's own traffic must never wait on a limiter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

import attrs

from cis_bot.homeserver.errors import MatrixError

LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
# Buckets are swept of drained keys once there are this many, so rotating keys (user names,
# addresses) cannot grow memory without bound.
SWEEP_AT = 10_000


@attrs.frozen
class RatelimitSettings:
    per_second: float
    burst_count: int


@attrs.frozen
class LoginRatelimits:
    """Synapse's ``rc_login`` and its defaults."""

    address: RatelimitSettings = RatelimitSettings(per_second=0.003, burst_count=5)
    account: RatelimitSettings = RatelimitSettings(per_second=0.003, burst_count=5)
    failed_attempts: RatelimitSettings = RatelimitSettings(per_second=0.17, burst_count=3)


class Ratelimiter:
    def __init__(
        self, settings: RatelimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_hz = settings.per_second
        self.burst_count = settings.burst_count
        self.clock = clock
        # key -> (actions counted since time_start, time_start): the bucket was empty then.
        self._actions: dict[Hashable, tuple[int, float]] = {}

    def can_do_action(self, key: Hashable, *, update: bool = True) -> tuple[bool, float]:
        """(allowed, when the next action will be allowed, in clock seconds); an allowed
        action is counted unless ``update`` is false."""
        now = self.clock()
        count, start = self._actions.get(key, (0, now))
        performed = count - (now - start) * self.rate_hz  # what is still in the bucket
        if performed <= 0:
            count, start, performed = 0, now, 0.0  # drained: start a fresh bucket
        allowed = performed <= self.burst_count - 1
        if allowed:
            count += 1
            if update:
                self._record(key, count, start)
        if self.rate_hz <= 0:
            return allowed, math.inf if not allowed else now
        return allowed, max(now, start + (count - self.burst_count + 1) / self.rate_hz)

    def ratelimit(self, key: Hashable, *, update: bool = True) -> None:
        """Count the action, or raise the 429 Synapse raises."""
        allowed, next_at = self.can_do_action(key, update=update)
        if not allowed:
            wait = next_at - self.clock()
            raise MatrixError(
                429,
                LIMIT_EXCEEDED,
                "Too Many Requests",
                retry_after_ms=int(wait * 1000) if math.isfinite(wait) else 2**31 - 1,
            )

    def _record(self, key: Hashable, count: int, start: float) -> None:
        if len(self._actions) >= SWEEP_AT:
            now = self.clock()
            self._actions = {
                k: (n, s) for k, (n, s) in self._actions.items() if n - (now - s) * self.rate_hz > 0
            }
        self._actions[key] = (count, start)


class LoginRatelimiter:
    """The three ``rc_login`` limiters, applied where Synapse's login servlet applies them."""

    def __init__(
        self, settings: LoginRatelimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.address = Ratelimiter(settings.address, clock)
        self.account = Ratelimiter(settings.account, clock)
        self.failed_attempts = Ratelimiter(settings.failed_attempts, clock)
