-- Dashboard accounts (`inflight users add`) and their sessions, kept by the hash of the cookie.
CREATE TABLE dashboard_users (
    email text PRIMARY KEY,
    password_hash text NOT NULL,
    project text,
    admin boolean NOT NULL DEFAULT false
);
CREATE TABLE dashboard_sessions (
    token_hash text PRIMARY KEY,
    email text NOT NULL,
    csrf text NOT NULL,
    expires double precision NOT NULL
);
CREATE INDEX dashboard_sessions_expires ON dashboard_sessions (expires);
