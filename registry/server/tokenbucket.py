"""Flood control for one connection: a token bucket."""

from __future__ import annotations


class TokenBucket:
    """Refilled at ``rate`` tokens a second up to ``burst``, and charged one token per frame:
    a sender may send ``burst`` frames back to back, then ``rate`` a second. Times are the
    caller's clock (event-loop time), so the bucket needs no clock of its own."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = now

    def take(self, now: float) -> bool:
        """Charge one token at time ``now``; False if the bucket was empty (the frame is one
        too many). An empty bucket stays charged: a sender that keeps flooding stays refused."""
        tokens = self._tokens + (now - self._last) * self._rate
        self._tokens = (tokens if tokens < self._burst else self._burst) - 1.0
        self._last = now
        return self._tokens >= 0.0
