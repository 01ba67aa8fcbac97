-- No repeated work (issue 19, docs/quality.md "No repeated work").

-- Within a request: the first image of a source URL is its leader; later images of the same
-- URL are its followers (leader_id set at ingest). Only leaders are released to the task
-- stream; the statement that records a leader's outcome gives each follower the same one.
ALTER TABLE images ADD COLUMN leader_id bigint;
CREATE INDEX images_followers ON images (leader_id) WHERE leader_id IS NOT NULL;
-- The feeder's backlog: waiting leaders only (followers wait for their leader, not a turn).
DROP INDEX images_waiting;
CREATE INDEX images_waiting ON images (request_id, id)
    WHERE status = 'Pending' AND enqueued_at IS NULL AND leader_id IS NULL;

-- Across requests of one owner: the output stored for a source (sha256 of its bytes) under
-- options that give the same output (a digest of them, services/worker/dedup.py). A later
-- image with both copies the object under its own request's key. Deleting the request that
-- holds the object deletes its entries.
CREATE TABLE reusable_outputs (
    owner          text NOT NULL,
    source_sha256  bytea NOT NULL,
    options_sha256 bytea NOT NULL,
    request_id     uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    image_id       bigint NOT NULL,
    output_key     text NOT NULL,
    bytes_out      integer NOT NULL,
    width          integer NOT NULL,
    height         integer NOT NULL,
    kept_source    boolean NOT NULL,
    ssim           real,
    quality        smallint,
    note           text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, source_sha256, options_sha256)
);
CREATE INDEX reusable_outputs_by_request ON reusable_outputs (request_id);

-- The image whose stored output this image's is a copy of (another request of the owner);
-- NULL when it was compressed here, or is a follower (leader_id says whose output it has).
ALTER TABLE images ADD COLUMN reused_from bigint;
