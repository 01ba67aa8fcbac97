-- A task that has to wait gives its worker slot back (docs/scheduling.md, "Waiting gives the
-- slot back"). Between two fetch attempts, or while its origin's Retry-After runs, the image
-- goes back to waiting (enqueued_at NULL) with the time before which it must not be released.
ALTER TABLE images ADD COLUMN not_before timestamptz;
-- Waits for an origin's cooldown spend no attempt (the origin saw no request), so they are
-- bounded by a count of their own, which the image keeps across its deliveries.
ALTER TABLE images ADD COLUMN cooldown_waits smallint NOT NULL DEFAULT 0;

-- The feeder's backlog, by due time: an index range scan finds a request's images due now
-- (never deferred first, in id order, then the deferred ones as they came due) without
-- stepping over those still deferred, however many a request has.
DROP INDEX images_waiting;
CREATE INDEX images_waiting ON images (request_id, (COALESCE(not_before, '-infinity')), id)
    WHERE status = 'Pending' AND enqueued_at IS NULL AND leader_id IS NULL;
-- When the next deferred image comes due, for the feeder's sleep while nothing else waits.
CREATE INDEX images_deferred ON images (not_before)
    WHERE status = 'Pending' AND enqueued_at IS NULL AND not_before IS NOT NULL;
