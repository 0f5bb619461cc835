-- A client is one identity whatever key it uses: its payments' idempotency scope, its
-- reversal keys and (for a partner) the payments it may read are keyed by `client_id`, which
-- every key added under the client's name shares. Each key row used to be its own client, so
-- a retry sent with a rotated key was not recognised and paid again, and a partner lost sight
-- of the payments made under its old key. Existing rows keep their own id as their identity.
ALTER TABLE api_clients ADD COLUMN IF NOT EXISTS client_id uuid;
UPDATE api_clients SET client_id = id WHERE client_id IS NULL;
ALTER TABLE api_clients ALTER COLUMN client_id SET NOT NULL;
CREATE INDEX IF NOT EXISTS api_clients_name ON api_clients (name, created_at);
