-- The dead letters, found without reading the whole outbox: every metrics scrape counts them
-- (and the pending postings, through outbox_pending), and the outbox only grows.
CREATE INDEX outbox_dead ON outbox (id) WHERE state = 'dead';
