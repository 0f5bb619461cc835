-- Nodes cache API keys for a while (they are checked on every request). A change to the
-- clients (a key revoked by the CLI, or straight in the database) is announced on this
-- channel when it commits, so that every node listening drops its cached keys at once.
CREATE FUNCTION gridpay_api_clients_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gridpay_api_clients', '');
    RETURN NULL;
END $$;

CREATE TRIGGER api_clients_changed AFTER UPDATE OR DELETE ON api_clients
    FOR EACH STATEMENT EXECUTE FUNCTION gridpay_api_clients_changed();
