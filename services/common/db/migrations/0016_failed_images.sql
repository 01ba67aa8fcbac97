-- A retry finds its request's Failed images through this index instead of stepping over every
-- image of the request: at the size limit (300,000 images) a retry of a request at work with
-- one failed image held the request's row for 0.14 s reading them all, and a worker's record
-- of one of its images waited as long (bench/results/longest-statements.md). Rows enter it only
-- when they fail.
CREATE INDEX images_failed ON images (request_id, id) WHERE status = 'Failed';
