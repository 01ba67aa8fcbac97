-- Crash-proofing: where each image's task is on the stream, and the finished-event outbox.

-- The stream entry of the image's latest task and when it was published: the reconciler
-- republishes a Pending image whose entry is gone (Redis lost it, or it was never published).
ALTER TABLE images ADD COLUMN stream_entry_id text;
ALTER TABLE images ADD COLUMN enqueued_at timestamptz;
CREATE INDEX images_pending ON images (enqueued_at NULLS FIRST, id) WHERE status = 'Pending';

-- Each finish of a request (a retry of its failed images finishes it again) is a generation;
-- request.finished is published once per generation, with a deterministic event id.
ALTER TABLE requests ADD COLUMN finish_generation integer NOT NULL DEFAULT 0;
-- Set once request.finished of the current generation is on the events stream (the outbox).
ALTER TABLE requests ADD COLUMN finished_event_at timestamptz;
CREATE INDEX requests_open ON requests (updated_at) WHERE status IN ('Pending', 'Processing');
CREATE INDEX requests_event_unpublished ON requests (completed_at)
    WHERE status IN ('Completed', 'Failed') AND finished_event_at IS NULL;
