-- A payment's first reversal answer, found by payment: a reversal repeated under another key
-- gets that same answer (the contract's "repeated: the same answer"), not the payment as it is
-- by then. The table is young and small when this runs (it came with 0070).
CREATE INDEX reversal_keys_payment ON reversal_keys (payment_id, created_at);
