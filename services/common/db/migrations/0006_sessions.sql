-- Sign-ins of the web page (services/common/sessions.py). Only the SHA-256 of a session id is
-- stored, so a copy of this table signs nobody in. key_hash is the SHA-256 of the API key the
-- session was made with: a session ends with its key when that key leaves IMGPIPE_API_KEYS.
CREATE TABLE sessions (
    id_hash    bytea PRIMARY KEY,
    owner      text NOT NULL,
    key_hash   bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);
