-- Request lifecycle (docs/lifecycle.md): list, cancel, delete, retention.

-- Cancelled is a final status like Completed and Failed.
ALTER TABLE requests DROP CONSTRAINT requests_status_check;
ALTER TABLE requests ADD CONSTRAINT requests_status_check
    CHECK (status IN ('Pending', 'Processing', 'Completed', 'Failed', 'Cancelled'));

-- Set when a delete starts: the request is gone for its owner from then on, and a delete that
-- was interrupted (a crash between the objects and the rows) is finished by the next one.
ALTER TABLE requests ADD COLUMN deleting_at timestamptz;

-- GET /requests: one owner's requests, newest first, by keyset on (created_at, id).
CREATE INDEX requests_by_owner ON requests (owner, created_at DESC, id DESC);

-- The retention janitor: final requests by age, and deletes left half done.
CREATE INDEX requests_final ON requests (completed_at)
    WHERE status IN ('Completed', 'Failed', 'Cancelled');
CREATE INDEX requests_deleting ON requests (deleting_at) WHERE deleting_at IS NOT NULL;

-- The finished-event outbox (0002) covers Cancelled too: request.cancelled is its event.
DROP INDEX requests_event_unpublished;
CREATE INDEX requests_event_unpublished ON requests (completed_at)
    WHERE status IN ('Completed', 'Failed', 'Cancelled') AND finished_event_at IS NULL;
