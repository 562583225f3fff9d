"""AUTH back-off and per-project rates, on a hand-driven clock."""

from __future__ import annotations

from relay.throttle import MAX_BACKOFF_SECONDS, MAX_TRACKED_KEYS, AuthThrottle, RateLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, per_ip: int = 3, per_user: int = 5) -> AuthThrottle:
    return AuthThrottle(per_ip=per_ip, per_user=per_user, backoff=60, window=900, clock=clock)


def test_address_is_refused_after_its_limit_and_back_off_doubles() -> None:
    clock = Clock()
    guard = throttle(clock)
    for _ in range(2):
        guard.failed("10.0.0.1", "p")
        assert guard.retry_after("10.0.0.1", "p") == 0
    guard.failed("10.0.0.1", "p")
    assert guard.retry_after("10.0.0.1", "p") == 60
    assert guard.retry_after("10.0.0.2", "other") == 0  # another client, another user: unaffected
    clock.now += 60
    assert guard.retry_after("10.0.0.1", "p") == 0
    guard.failed("10.0.0.1", "p")
    assert guard.retry_after("10.0.0.1", "p") == 120
    clock.now += 120
    guard.failed("10.0.0.1", "p")
    assert guard.retry_after("10.0.0.1", "p") == 240


def test_back_off_is_capped_and_forgotten_after_the_window() -> None:
    clock = Clock()
    guard = throttle(clock, per_ip=1, per_user=1000)
    for _ in range(20):
        guard.failed("10.0.0.1", "p")
    assert guard.retry_after("10.0.0.1", "p") == MAX_BACKOFF_SECONDS
    clock.now += MAX_BACKOFF_SECONDS + 899
    assert guard.retry_after("10.0.0.1", "p") == 0
    guard.failed("10.0.0.1", "p")  # still remembered: the back-off stays at its cap
    assert guard.retry_after("10.0.0.1", "p") == MAX_BACKOFF_SECONDS
    clock.now += MAX_BACKOFF_SECONDS + 901
    guard.failed("10.0.0.1", "p")  # forgotten: counting starts again, first refusal period
    assert guard.retry_after("10.0.0.1", "p") == 60


def test_username_lock_spares_addresses_that_logged_in_as_that_user() -> None:
    clock = Clock()
    guard = throttle(clock, per_ip=1000, per_user=3)
    guard.succeeded("10.0.0.9", "p")  # the app's own server
    for n in range(3):
        guard.failed(f"192.0.2.{n}", "p")  # a distributed guesser
    assert guard.retry_after("192.0.2.77", "p") == 60
    assert guard.retry_after("10.0.0.9", "p") == 0
    assert guard.retry_after("192.0.2.77", "q") == 0


def test_success_clears_the_address_failures() -> None:
    clock = Clock()
    guard = throttle(clock)
    guard.failed("10.0.0.1", "p")
    guard.failed("10.0.0.1", "p")
    guard.succeeded("10.0.0.1", "p")
    assert guard.failed("10.0.0.1", "p") == (1, 3)


def test_tables_stay_bounded_under_spraying() -> None:
    guard = throttle(Clock())
    for n in range(MAX_TRACKED_KEYS + 100):
        guard.failed(f"user-{n}", f"user-{n}")
    assert len(guard._ips) == MAX_TRACKED_KEYS and len(guard._users) == MAX_TRACKED_KEYS


def test_client_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert client_key(("2001:db8:1:2:aaaa::1", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("2001:db8:1:2:bbbb::9", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("::ffff:192.0.2.1", 25, 0, 0)) == "192.0.2.1"
    assert client_key(("192.0.2.1", 25)) == "192.0.2.1"
    assert client_key(None) == "None"


def test_rate_limiter_allows_a_burst_then_refills_evenly() -> None:
    clock = Clock()
    rates = RateLimiter(clock=clock)
    assert [rates.acquire("p", 3) for _ in range(3)] == [0, 0, 0]
    assert rates.acquire("p", 3) == 20  # one message per 20 s at 3/min
    assert rates.retry_after("q", 3) == 0  # per project
    clock.now += 10
    assert rates.retry_after("p", 3) == 10
    clock.now += 10
    assert rates.acquire("p", 3) == 0
    assert rates.acquire("p", 0) == 0  # 0 = unlimited


def test_known_good_addresses_expire_after_a_day() -> None:
    clock = Clock()
    guard = throttle(clock, per_ip=1000, per_user=1)
    guard.succeeded("10.0.0.9", "p")
    clock.now += 3600
    guard.failed("192.0.2.1", "p")
    assert guard.retry_after("10.0.0.9", "p") == 0  # an hour later: still the app's own server
    clock.now += 86_400
    guard.failed("192.0.2.1", "p")
    assert guard.retry_after("10.0.0.9", "p") > 0
