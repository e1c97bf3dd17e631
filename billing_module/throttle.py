"""Login throttling (issue 12, item 10): failures are counted per user name and per client
address; past ``server.login_max_failures`` within ``server.login_window_seconds`` the key is
locked for ``server.login_backoff_seconds``, doubling with each further failure up to
``server.login_backoff_max_seconds``. A locked key is refused 429 ``too_many_attempts`` with
Retry-After, even with the right password, so guessing gets no faster by waiting less.

The counters live in process memory (bounded cachetools TTL caches): with several worker
processes each has its own, so the limit is per process.
"""
import math
import time

from cachetools import TTLCache

from .errors import TooManyAttempts

_MAX_KEYS = 100_000


class LoginThrottle:
    def __init__(self, server_config):
        self.max_failures = server_config.login_max_failures
        self.backoff = server_config.login_backoff_seconds
        self.backoff_max = server_config.login_backoff_max_seconds
        # an entry outlives its window while it is locked
        self._failures: TTLCache = TTLCache(maxsize=_MAX_KEYS,
                                            ttl=server_config.login_window_seconds + self.backoff_max)

    @staticmethod
    def keys(user: str, address: str):
        return (f"user:{user.lower()}", f"addr:{address}")

    def check(self, keys) -> None:
        """TooManyAttempts while any of the keys is locked."""
        now = time.monotonic()
        wait = max((self._failures.get(k, (0, 0.0))[1] - now for k in keys), default=0.0)
        if wait > 0:
            raise TooManyAttempts("too many failed logins; try again later", math.ceil(wait))

    def failed(self, keys) -> None:
        now = time.monotonic()
        for k in keys:
            count, locked_until = self._failures.get(k, (0, 0.0))
            count += 1
            if count >= self.max_failures:
                lock = min(self.backoff * 2 ** (count - self.max_failures), self.backoff_max)
                locked_until = now + lock
            self._failures[k] = (count, locked_until)

    def succeeded(self, keys) -> None:
        """The user's count starts again; the address keeps its failures until they expire."""
        self._failures.pop(keys[0], None)
