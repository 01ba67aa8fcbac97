-- Fair scheduling (docs/scheduling.md): Postgres holds the backlog and the task stream carries
-- only a bounded window. An image is released when its task is put on the stream, which is
-- when images.enqueued_at is set (0002); a Pending image with enqueued_at NULL is waiting.

-- The feeder finds each open request's next waiting images through this index (a retry puts
-- failed images back here by clearing enqueued_at).
CREATE INDEX images_waiting ON images (request_id, id)
    WHERE status = 'Pending' AND enqueued_at IS NULL;
-- The window: released and not yet final. Small by construction, so counting it is cheap.
CREATE INDEX images_released ON images (id)
    WHERE status = 'Pending' AND enqueued_at IS NOT NULL;

-- When the request's first task was released: its own images/s and ETA are measured from
-- then, not from its acceptance (time spent waiting for its turn is not its rate).
ALTER TABLE requests ADD COLUMN started_at timestamptz;
-- The trace of the upload (or the latest retry), for the tasks the feeder releases later, so
-- the workers' log lines still carry the caller's trace id.
ALTER TABLE requests ADD COLUMN traceparent text;
