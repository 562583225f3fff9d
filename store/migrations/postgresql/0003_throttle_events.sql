-- Throttles are shared as events, not as state: each node applies every node's AUTH failures,
-- successes and rate-limited sends to its own tables (relay/throttle.py), so the rules stay in one
-- place and a node reads the store once a second, not once per message. Replaces 0001's state tables.
DROP TABLE rate_buckets;
DROP TABLE auth_failures;
DROP TABLE auth_known_good;
CREATE TABLE throttle_events (
    id bigserial PRIMARY KEY,
    node bigint NOT NULL,
    kind text NOT NULL,  -- auth_failed | auth_ok | sent
    key text NOT NULL,  -- the client address (auth), the project (sent)
    username text NOT NULL DEFAULT '',
    per_minute integer NOT NULL DEFAULT 0,
    at double precision NOT NULL
);
CREATE INDEX throttle_events_at ON throttle_events (at);
