-- Who each tracked copy went to, under the random send id its opaque tokens carry (tracking/tokens.py):
-- the URLs stay short and say nothing, and the tracker reads this row when it records the copy's events.
CREATE TABLE sends (
    project text NOT NULL,
    send_id bytea NOT NULL,
    message_id text NOT NULL,
    contact text NOT NULL,
    recipient text NOT NULL,
    sent_at bigint NOT NULL,
    campaign text,
    template text,
    template_type text,
    campaign_type text,
    PRIMARY KEY (project, send_id)
);
CREATE INDEX sends_project_sent ON sends (project, sent_at);
