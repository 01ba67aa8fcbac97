-- Webhook delivery: each row of webhook_deliveries is one attempt to deliver one event, and the
-- rows in state 'scheduled' are the delivery queue (several status replicas share it).

-- What is sent, stored once per attempt: a retry sends the very same id and body bytes.
ALTER TABLE webhook_deliveries ADD COLUMN url text NOT NULL DEFAULT '';
ALTER TABLE webhook_deliveries ADD COLUMN event_type text NOT NULL DEFAULT '';
-- The exact JSON text that is signed (text, not jsonb, which would reformat it).
ALTER TABLE webhook_deliveries ADD COLUMN payload text NOT NULL DEFAULT '';
ALTER TABLE webhook_deliveries ADD COLUMN state text NOT NULL DEFAULT 'scheduled'
    CHECK (state IN ('scheduled', 'succeeded', 'failed', 'abandoned'));
ALTER TABLE webhook_deliveries ADD COLUMN attempted_at timestamptz;
-- Set while a replica is sending the attempt; a replica that dies mid-send lets it lapse, and
-- the attempt is picked up again.
ALTER TABLE webhook_deliveries ADD COLUMN leased_until timestamptz;

-- One row per attempt of an event: scheduling is idempotent (an event read twice, a retry
-- recorded twice, two redeliveries at once).
ALTER TABLE webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_event_attempt UNIQUE (event_id, attempt);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'scheduled';

-- The defaults only filled rows that existed before; every new attempt says what it sends.
ALTER TABLE webhook_deliveries ALTER COLUMN url DROP DEFAULT;
ALTER TABLE webhook_deliveries ALTER COLUMN event_type DROP DEFAULT;
ALTER TABLE webhook_deliveries ALTER COLUMN payload DROP DEFAULT;
