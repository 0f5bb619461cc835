-- The IVR channel's limits that must outlive Redis: wrong-PIN attempts per caller number (ANI)
-- and the blocks they lead to. See docs/ivr.md. (A card's own count is cards.failed_pin_count.)

-- One row per wrong PIN. `attempt` is a SHA-256 of the PIN block (which is ciphertext with
-- 8 random bytes inside: the hash reveals nothing and no PIN block is ever stored). The key
-- (call_id, attempt) makes counting idempotent: a retried input is not counted twice.
CREATE TABLE ivr_pin_failures (
    call_id  text NOT NULL,
    attempt  bytea NOT NULL CHECK (length(attempt) = 32),
    ani      text NOT NULL CHECK (ani ~ '^[0-9]{1,20}$'),
    serial   text NOT NULL CHECK (serial ~ '^[0-9]{16}$'),
    at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, attempt)
);
CREATE INDEX ivr_pin_failures_ani ON ivr_pin_failures (ani, at);

-- A caller number blocked after too many failures in 24 hours, until `blocked_until`.
CREATE TABLE ivr_ani_blocks (
    ani           text PRIMARY KEY CHECK (ani ~ '^[0-9]{1,20}$'),
    failures      integer NOT NULL,
    blocked_at    timestamptz NOT NULL DEFAULT now(),
    blocked_until timestamptz NOT NULL
);
