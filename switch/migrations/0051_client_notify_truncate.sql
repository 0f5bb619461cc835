-- A TRUNCATE of the clients is announced too (0050 covered UPDATE and DELETE): nodes drop
-- their cached keys at once instead of trusting them for their cache's lifetime.
CREATE TRIGGER api_clients_truncated AFTER TRUNCATE ON api_clients
    FOR EACH STATEMENT EXECUTE FUNCTION gridpay_api_clients_changed();
