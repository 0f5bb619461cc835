-- When a posting's current run of failures began: a posting becomes a dead letter once it has
-- been failing for `forwarder.dead_letter_after_s`, counted from its first failed attempt (or
-- from an operator's retry), not from when it was recorded. Counted from its creation, a
-- reversal held back behind its original, or a posting queued behind a long backlog, died on
-- its first temporary failure. A nullable column without a default: no table rewrite.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS first_failed_at timestamptz;
