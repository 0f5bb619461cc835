-- The Idempotency-Key of each HTTP reversal and the answer it got: the same key again gets that
-- answer byte for byte (a reversal's payment keeps changing: its posting state moves on), and
-- the same key for another payment is refused. Kept like the payments' keys: for good. By
-- payment too: a reversal repeated under another key gets the first one's answer.
CREATE TABLE reversal_keys (
    client_id   uuid NOT NULL,
    key         text NOT NULL,
    payment_id  uuid NOT NULL REFERENCES payments (id),
    response    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, key)
);
CREATE INDEX reversal_keys_payment ON reversal_keys (payment_id, created_at);
