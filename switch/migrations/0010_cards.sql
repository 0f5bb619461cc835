-- The recharge-card management centre: batches, cards and their history, the documents that
-- move them (requests, issues, sales, stocktakes, voids), users and sessions, the hash-chained
-- operation log, the recharge ledger and background jobs. See docs/card-centre.md.

-- Next 9-digit sequence per serial prefix (issuer + 2-digit year): a batch takes one range.
CREATE TABLE card_serial_counters (
    prefix    text PRIMARY KEY CHECK (prefix ~ '^[0-9]{6}$'),
    next_seq  bigint NOT NULL CHECK (next_seq BETWEEN 0 AND 1000000000)
);

CREATE TABLE card_jobs (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL,
    object_id   text,
    state       text NOT NULL DEFAULT 'queued'
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    done        bigint NOT NULL DEFAULT 0,
    total       bigint NOT NULL DEFAULT 0,
    error       text,
    result      jsonb,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE TABLE card_batches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    face_value     bigint NOT NULL CHECK (face_value > 0),
    quantity       integer NOT NULL CHECK (quantity BETWEEN 1 AND 1000000),
    expiry         date NOT NULL,
    manufacturer   text NOT NULL,
    prefix         text NOT NULL,
    first_seq      bigint NOT NULL,
    status         text NOT NULL DEFAULT 'generating'
                   CHECK (status IN ('generating', 'ordered', 'failed', 'reconciled',
                                     'stocked')),
    ordered_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    print_key_kcv  text,
    file_sha256    text,
    file_purged_at timestamptz,
    reconciliation jsonb,
    generate_job   uuid REFERENCES card_jobs (id)
);

-- The new-card file, in the chunks the HSM produced (encrypted PINs only; erased at stock-in).
CREATE TABLE card_file_chunks (
    batch_id  bigint NOT NULL REFERENCES card_batches (id),
    seq       integer NOT NULL,
    cards     integer NOT NULL,
    body      bytea NOT NULL,
    PRIMARY KEY (batch_id, seq)
);

CREATE TABLE cards (
    serial           text PRIMARY KEY CHECK (serial ~ '^[0-9]{16}$'),
    batch_id         bigint NOT NULL REFERENCES card_batches (id),
    face_value       bigint NOT NULL CHECK (face_value > 0),
    state            text NOT NULL CHECK (state IN ('ordered', 'produced', 'in_stock', 'issued',
                                                     'sold', 'redeemed', 'voided', 'locked',
                                                     'expired')),
    location         text NOT NULL,
    expiry           date NOT NULL,
    tag              bytea NOT NULL CHECK (length(tag) = 32),  -- HMAC under the VVK, not a PIN
    failed_pin_count integer NOT NULL DEFAULT 0 CHECK (failed_pin_count >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cards_batch_state ON cards (batch_id, state);
CREATE INDEX cards_stock ON cards (face_value, batch_id, serial) WHERE state = 'in_stock';
CREATE INDEX cards_location ON cards (location, state) WHERE state IN ('in_stock', 'issued');

CREATE TABLE card_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial      text NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    actor       text NOT NULL,
    reason      text NOT NULL,
    doc_type    text NOT NULL,
    doc_id      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX card_events_serial ON card_events (serial, id);

CREATE TABLE card_users (
    username      text PRIMARY KEY CHECK (username ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    role          text NOT NULL CHECK (role IN ('card_admin', 'hall_manager', 'approver',
                                                'storekeeper', 'cashier', 'auditor')),
    hall          text,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz,
    CHECK ((role IN ('hall_manager', 'cashier')) = (hall IS NOT NULL))
);

CREATE TABLE card_sessions (
    token_hash  bytea PRIMARY KEY,         -- SHA-256 of the bearer token (256-bit random)
    username    text NOT NULL REFERENCES card_users (username),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX card_sessions_expiry ON card_sessions (expires_at);

CREATE TABLE card_requests (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hall          text NOT NULL,
    face_value    bigint NOT NULL CHECK (face_value > 0),
    quantity      integer NOT NULL CHECK (quantity > 0),
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'approved', 'rejected', 'issued')),
    requested_by  text NOT NULL,
    decided_by    text,
    decided_at    timestamptz,
    note          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);

CREATE TABLE card_issues (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  bigint NOT NULL UNIQUE REFERENCES card_requests (id),
    hall        text NOT NULL,
    face_value  bigint NOT NULL,
    quantity    integer NOT NULL,
    ranges      jsonb NOT NULL,
    issued_by   text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE card_sales (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hall        text NOT NULL,
    cashier     text NOT NULL,
    quantity    integer NOT NULL,
    total_face  bigint NOT NULL,
    ranges      jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX card_sales_hall ON card_sales (hall, at);

CREATE TABLE card_stocktakes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    location    text NOT NULL,
    counted     integer NOT NULL,
    expected    integer NOT NULL,
    missing     text[] NOT NULL,
    unexpected  text[] NOT NULL,
    counted_by  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE card_voids (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason        text NOT NULL,
    note          text,
    serials       text[] NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending_approval', 'done', 'rejected')),
    stocktake_id  bigint REFERENCES card_stocktakes (id),
    requested_by  text NOT NULL,
    approved_by   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    done_at       timestamptz,
    CHECK (approved_by IS NULL OR approved_by <> requested_by)
);

-- The recharge ledger: one line per redeemed card (written by the IVR in its transaction).
CREATE TABLE card_recharges (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial      text NOT NULL UNIQUE,
    account_no  text NOT NULL CHECK (account_no ~ '^[0-9]{10}$'),
    amount      bigint NOT NULL CHECK (amount > 0),
    at          timestamptz NOT NULL DEFAULT now(),
    channel     text NOT NULL DEFAULT 'ivr',
    caller      text,
    txn_no      text NOT NULL,
    payment_id  uuid
);
CREATE INDEX card_recharges_at ON card_recharges (at);

-- The operation log: a hash chain; `card_oplog_head` holds the newest link so that deleting
-- the last entries is detected as well.
CREATE TABLE card_oplog (
    seq        bigint PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    objects    jsonb NOT NULL,
    result     jsonb NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);
CREATE TABLE card_oplog_head (
    id    smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    seq   bigint NOT NULL,
    hash  bytea NOT NULL
);
