-- Retention and erasure delete the dead letters of the events they delete, by event id.
CREATE INDEX webhook_dead_letters_event ON webhook_dead_letters (event_id);
