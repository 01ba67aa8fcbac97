-- While ingest publishes a request's tasks it holds a lease on it: the republish loop and the
-- reconciler leave the request alone until the lease lapses (ingest died mid-publish).
ALTER TABLE requests ADD COLUMN publish_lease_until timestamptz;
