-- The first schema: events partitioned by month, settings, the webhook outbox, the delivery ledger,
-- throttles. Text columns compared by range (`at`) use the C collation: byte order is time order
-- for RFC 3339 UTC strings, whatever the database's default collation.
CREATE SEQUENCE events_id_seq AS bigint;
CREATE TABLE events (
    id bigint NOT NULL DEFAULT nextval('events_id_seq'),
    name text NOT NULL,
    project text NOT NULL,
    contact text NOT NULL,
    recipient text NOT NULL,
    message_id text NOT NULL,
    at text COLLATE "C" NOT NULL,
    campaign text,
    template text,
    template_type text,
    campaign_type text,
    subject text,
    sender text,
    link text,
    ip text,
    user_agent text,
    tracked boolean,
    reason text,
    agent text,
    agent_reason text,
    opens integer,
    clicks integer,
    first boolean,
    implied boolean,
    uid text,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
ALTER SEQUENCE events_id_seq OWNED BY events.id;
-- A unique index on a partitioned table must hold the partition key: (uid, at). A replayed event
-- carries its original `at`; the stores also look a uid up before inserting.
CREATE UNIQUE INDEX events_uid ON events (uid, at);
CREATE INDEX events_project_at ON events (project, at);
CREATE INDEX events_project_contact ON events (project, contact, at);
CREATE INDEX events_message_contact ON events (project, message_id, contact, name);
CREATE INDEX events_project_campaign ON events (project, campaign, at);
CREATE INDEX events_project_template ON events (project, template, at);

CREATE TABLE tracking_settings (
    project text PRIMARY KEY,
    mode text NOT NULL,
    updated_at text NOT NULL
);

CREATE TABLE webhook_outbox (
    id bigserial PRIMARY KEY,
    event_id bigint NOT NULL,
    project text NOT NULL,
    key text NOT NULL,
    created double precision NOT NULL,
    due double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (due);
CREATE INDEX webhook_outbox_event ON webhook_outbox (event_id);

-- state 'sending': claimed by an attempt until expires_at (its lease) or until its owner's session
-- advisory lock is gone (the process died); 'delivered': accepted upstream.
CREATE TABLE deliveries (
    project text NOT NULL,
    message_id text NOT NULL,
    recipient text NOT NULL,
    expires_at bigint NOT NULL,
    state text NOT NULL DEFAULT 'delivered',
    owner bigint,
    PRIMARY KEY (project, message_id, recipient)
);
CREATE INDEX deliveries_expires ON deliveries (expires_at);

-- Shared throttles: a token bucket per project, AUTH failures per client address and username.
CREATE TABLE rate_buckets (
    key text PRIMARY KEY,
    tokens double precision NOT NULL,
    at double precision NOT NULL
);
CREATE TABLE auth_failures (
    kind text NOT NULL,
    key text NOT NULL,
    count integer NOT NULL,
    last double precision NOT NULL,
    blocked_until double precision NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE auth_known_good (
    client text NOT NULL,
    username text NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (client, username)
);
