"""The recharge-card management centre: batches, the card state machine, documents that move
cards (requests, issues, sales, stocktakes, voids), users and roles, the operation log, jobs and
the admin API under `/admin/v1`. See docs/card-centre.md and docs/card-files.md."""
