-- A closed business date is reconciled with the marketing system once that succeeds: until then
-- (the marketing system down at the cut-over, a node restarting across it) the active node
-- tries again, and closes any date it missed.
ALTER TABLE cutovers ADD COLUMN reconciled_at timestamptz;
ALTER TABLE cutovers ADD COLUMN reconciliation jsonb;
