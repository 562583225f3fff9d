-- Delivery feedback (store/postgresql_feedback.py): suppressions, the upstream's ids of accepted
-- copies, erased contacts (hashed), and webhook deliveries given up (dead letters).
CREATE TABLE suppressions (
    project text NOT NULL,
    address text NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL,
    at text NOT NULL,
    PRIMARY KEY (project, address)
);

CREATE TABLE provider_ids (
    provider_id text NOT NULL,
    recipient text NOT NULL,
    project text NOT NULL,
    message_id text NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (provider_id, recipient)
);
CREATE INDEX provider_ids_expires ON provider_ids (expires_at);
CREATE INDEX provider_ids_recipient ON provider_ids (recipient);

-- project '' = erased from every project.
CREATE TABLE forgotten_contacts (
    key text NOT NULL,
    project text NOT NULL,
    at text NOT NULL,
    PRIMARY KEY (key, project)
);

CREATE TABLE webhook_dead_letters (
    id bigserial PRIMARY KEY,
    event_id bigint NOT NULL,
    project text NOT NULL,
    key text NOT NULL,
    created double precision NOT NULL,
    attempts integer NOT NULL,
    last_error text NOT NULL,
    buried double precision NOT NULL
);
CREATE INDEX webhook_dead_letters_project ON webhook_dead_letters (project, id);
