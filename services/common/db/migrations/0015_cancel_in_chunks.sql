-- A cancel marks its request first, then fails its Pending images a chunk at a time, each
-- chunk its own transaction, and makes the request Cancelled last (docs/lifecycle.md,
-- "Cancel"). While the mark is set and the request is open, the feeder releases none of its
-- images, a retry is refused, and no worker finishes it; a cancel that died half way is
-- finished by the reconciler.
ALTER TABLE requests ADD COLUMN cancel_requested_at timestamptz;

-- The reconciler's search for cancels left half done.
CREATE INDEX requests_cancelling ON requests (updated_at)
    WHERE cancel_requested_at IS NOT NULL AND status IN ('Pending', 'Processing');
