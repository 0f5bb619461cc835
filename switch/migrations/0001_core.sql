-- gridpay core schema: the lease, API clients, keys, the ledger, idempotency, the outbox.

-- One active node at a time: whoever holds the lease with the current epoch.
CREATE TABLE node_lease (
    id          smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    holder      text,
    epoch       bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    expires_at  timestamptz NOT NULL DEFAULT 'epoch',
    handover_to text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO node_lease (id) VALUES (1);

-- Raises SQLSTATE GP001 unless p_epoch is the current lease epoch. Takes a share lock on the
-- lease row, so that a takeover (which updates it) waits for in-flight fenced writes and every
-- write after the takeover sees the new epoch.
CREATE FUNCTION gridpay_fence(p_epoch bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM node_lease WHERE id = 1 AND epoch = p_epoch FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fenced: epoch % is not the current lease epoch', p_epoch
            USING ERRCODE = 'GP001';
    END IF;
END $$;

CREATE TABLE api_clients (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    channel     text NOT NULL CHECK (channel IN ('internet', 'counter', 'ivr', 'partner')),
    key_prefix  text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,          -- SHA-256 of the key: keys are 256-bit random
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Keys exist outside the HSM only as key blocks under the LMK.
CREATE TABLE key_blocks (
    name        text PRIMARY KEY,
    key_block   text NOT NULL,
    kcv         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The switch's mirror of the marketing system's accounts (validation, stale inquiries).
CREATE TABLE account_mirror (
    account_no      char(10) PRIMARY KEY,
    name            text NOT NULL,
    status          text NOT NULL,
    arrears         bigint,
    prepaid_balance bigint,
    bills           jsonb,
    refreshed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE mirror_sync (
    id          smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    last_after  text,
    completed_at timestamptz
);
INSERT INTO mirror_sync (id) VALUES (1);

-- The fence against duplicates: one row per idempotency scope, whatever the channel
-- ('http:<client>:<key>', 'iso:<inst>:<stan>:<dt>', 'card:<serial>'). A payment can only be
-- inserted together with its key, in the same transaction.
CREATE TABLE dedup_keys (
    key          text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('payment', 'reversal_marker', 'recharge')),
    request_hash bytea NOT NULL,
    payment_id   uuid,
    status_code  integer,
    response     bytea,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Each node takes receipt numbers in blocks of 1000 (one round trip per block).
CREATE SEQUENCE receipt_seq INCREMENT BY 1000;

CREATE TABLE payments (
    id             uuid PRIMARY KEY,
    receipt_no     text NOT NULL UNIQUE CHECK (length(receipt_no) <= 20),
    dedup_key      text NOT NULL UNIQUE REFERENCES dedup_keys (key),
    channel        text NOT NULL CHECK (channel IN ('internet', 'counter', 'partner', 'ivr',
                                                    'bank', 'post')),
    client_id      uuid,
    institution_id text,
    method         text NOT NULL,
    account_no     char(10) NOT NULL CHECK (account_no ~ '^[0-9]{10}$'),
    amount         bigint NOT NULL CHECK (amount > 0),
    business_date  date NOT NULL,
    reference      text,
    approval_code  text,
    stan           text,
    transmitted    text,
    rrn            text,
    terminal_id    text,
    card_serial    text UNIQUE,
    caller         text,
    created_at     timestamptz NOT NULL,
    reversed_at    timestamptz,
    epoch          bigint NOT NULL
);
CREATE INDEX payments_inst_date ON payments (institution_id, business_date);
CREATE INDEX payments_date ON payments (business_date);

CREATE TABLE reversals (
    payment_id     uuid PRIMARY KEY REFERENCES payments (id),
    business_date  date NOT NULL,
    channel        text NOT NULL,
    institution_id text,
    stan           text,
    transmitted    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    epoch          bigint NOT NULL
);
CREATE INDEX reversals_inst_date ON reversals (institution_id, business_date);

-- Store-and-forward to the marketing system: every credit and reversal, exactly once there
-- (posting_id is its idempotency key). A reversal waits for its original.
CREATE TABLE outbox (
    id                  bigserial PRIMARY KEY,
    posting_id          text NOT NULL UNIQUE,
    kind                text NOT NULL CHECK (kind IN ('payment', 'card_recharge', 'reversal')),
    payment_id          uuid NOT NULL REFERENCES payments (id),
    account_no          char(10) NOT NULL,
    amount              bigint NOT NULL CHECK (amount > 0),
    original_posting_id text,
    channel             text NOT NULL,
    occurred_at         timestamptz NOT NULL,
    state               text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    arrears_after       bigint,
    prepaid_after       bigint,
    sent_at             timestamptz,
    retried_at          timestamptz,             -- an operator put a dead letter back
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE state = 'pending';
CREATE UNIQUE INDEX outbox_one_reversal ON outbox (original_posting_id) WHERE kind = 'reversal';

-- Cut-overs performed (the business date itself is a function of the clock and the cut-over
-- time, so that every node computes the same date without coordination).
CREATE TABLE cutovers (
    business_date date PRIMARY KEY,
    closed_at     timestamptz NOT NULL DEFAULT now(),
    node_id       text NOT NULL,
    epoch         bigint NOT NULL
);
