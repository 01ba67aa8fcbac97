-- The webhook signing secret of each owner is derived from IMGPIPE_WEBHOOK_SECRET, the owner's
-- name and a generation number (services/status/webhook_secrets.py): only the generation is
-- stored, never a secret. An owner without a row is at generation 1.
CREATE TABLE webhook_secrets (
    owner          text PRIMARY KEY CHECK (owner <> ''),
    generation     integer NOT NULL CHECK (generation >= 1),
    -- Until then the generation before this one still signs too (the rotation's grace period).
    previous_until timestamptz,
    rotated_at     timestamptz NOT NULL DEFAULT now()
);
