-- One reconciliation and one stock-in at a time per batch. Two stock-ins of the same batch at
-- once both ran and both reported success (one of them with no card moved), and two
-- reconciliations could both pass the batch's status check. A second job of the same kind on
-- the same batch is now refused while the first is queued or running; a node that takes over
-- marks its predecessor's unfinished jobs failed (`interrupted`), which frees the batch.
-- Jobs left unfinished twice over by an older version: all but the newest are marked failed
-- first, so that the index can be built.
UPDATE card_jobs j SET state = 'failed', error = 'interrupted', finished_at = now()
 WHERE j.state IN ('queued', 'running')
   AND j.kind IN ('batch.reconcile', 'batch.stock_in')
   AND EXISTS (SELECT 1 FROM card_jobs k
                WHERE k.kind = j.kind AND k.object_id = j.object_id
                  AND k.state IN ('queued', 'running')
                  AND (k.created_at, k.id) > (j.created_at, j.id));
CREATE UNIQUE INDEX IF NOT EXISTS card_jobs_one_at_a_time ON card_jobs (kind, object_id)
 WHERE state IN ('queued', 'running') AND kind IN ('batch.reconcile', 'batch.stock_in');
