-- A task that waits too long for a connection to a busy origin gives its worker slot back
-- (docs/scheduling.md, "Waiting for a connection"). Such waits spend no attempt (the origin
-- saw no request), so they are bounded by a count of their own, kept across deliveries: past
-- it, the image's task waits in its slot for as long as the connection takes.
ALTER TABLE images ADD COLUMN busy_waits smallint NOT NULL DEFAULT 0;
