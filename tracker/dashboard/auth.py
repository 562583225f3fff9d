"""Dashboard sign-in: argon2id passwords, session cookies kept by hash, CSRF tokens, login back-off.

The cookie is a random 256-bit token; the store keeps only its SHA-256, so a copy of the database
signs nobody in. Every form carries the session's CSRF token (and the login form a token bound to a
pre-session cookie), compared in constant time, on top of SameSite=Strict.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from store.model import DashboardUser

SESSION_COOKIE = "inflight_session"
LOGIN_COOKIE = "inflight_login"  # the login form's CSRF token, before there is a session
SESSION_SECONDS = 12 * 3600
PASSWORD_MIN_CHARS = 12
_HASHER = PasswordHasher()
# Verified against when the account does not exist, so the answer takes as long either way.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def password_matches(user: DashboardUser | None, password: str) -> bool:
    try:
        return _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


@dataclass
class LoginBackoff:
    """Failed sign-ins per key (an account, or a client address): after `free_failures`, the next
    attempt waits 2^(n-free) seconds after the n-th failure (at most 15 minutes), so guessing a
    password takes ages while a typo costs nothing. A success clears the count. In memory: a
    restart forgives."""

    clock: Callable[[], float] = time.monotonic
    free_failures: int = 3
    max_wait: float = 900.0
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def retry_after(self, key: str) -> float:
        count, last = self._failures.get(key, (0, 0.0))
        if count < self.free_failures:
            return 0.0
        return max(0.0, last + min(self.max_wait, 2.0 ** (count - self.free_failures)) - self.clock())

    def failed(self, key: str) -> None:
        if len(self._failures) > 100_000:  # bounded: client input decides the keys
            self._failures.clear()
        count, _ = self._failures.get(key, (0, 0.0))
        self._failures[key] = (count + 1, self.clock())

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


def wait_text(seconds: float) -> str:
    return f"{math.ceil(seconds)} s"
