-- gridpay: each statement alone, outside a transaction
-- The dead letters, found without reading the whole outbox: every metrics scrape counts them
-- (and the pending postings, through outbox_pending), and the outbox only grows. Built
-- CONCURRENTLY: a node upgraded while its peer takes payments must not hold the outbox's
-- writers for as long as the build reads every posting ever made. An interrupted build
-- leaves an invalid index, dropped here before the next try.
DROP INDEX CONCURRENTLY IF EXISTS outbox_dead;
CREATE INDEX CONCURRENTLY outbox_dead ON outbox (id) WHERE state = 'dead';
