-- The fence takes a key-share lock on the lease row instead of a share lock, and the epoch
-- becomes a key column (a unique index), so that:
--   * a takeover, which changes the epoch, is a key update: it still waits for every fenced
--     write in flight, and a fenced write after it sees the new epoch and is refused;
--   * a renewal (and a release or a handover request), which leaves the epoch alone, no
--     longer waits for the fenced writes in flight. With a share lock it did: a fenced
--     transaction that ran longer than a renewal's timeout (a card job's, commits slowed by
--     load) made the renewals fail, and after a ttl of them the active node stopped acting
--     as active (HTTP answered 503 standby meanwhile) though nobody else had taken over.
--     Meanwhile every fenced write that started queued behind the waiting renewal.
-- A key-share lock held on the row when a renewal writes a new version of it is carried to
-- the new version, so a takeover after a renewal still waits for it (tests/test_fence.py).
CREATE UNIQUE INDEX node_lease_epoch ON node_lease (epoch);

CREATE OR REPLACE FUNCTION gridpay_fence(p_epoch bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM node_lease WHERE id = 1 AND epoch = p_epoch FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fenced: epoch % is not the current lease epoch', p_epoch
            USING ERRCODE = 'GP001';
    END IF;
END $$;
