-- imgpipe schema v1. Postgres is the source of truth; Redis streams only deliver work.

CREATE TABLE requests (
    id              uuid PRIMARY KEY,
    status          text NOT NULL DEFAULT 'Pending'
                    CHECK (status IN ('Pending', 'Processing', 'Completed', 'Failed')),
    options         jsonb NOT NULL DEFAULT '{}',
    webhook_url     text,
    owner           text NOT NULL DEFAULT '',
    idempotency_key text,
    content_hash    bytea,
    products_total  integer NOT NULL DEFAULT 0,
    images_total    integer NOT NULL DEFAULT 0,
    images_done     integer NOT NULL DEFAULT 0,
    images_failed   integer NOT NULL DEFAULT 0,
    bytes_in        bigint NOT NULL DEFAULT 0,
    bytes_out       bigint NOT NULL DEFAULT 0,
    output_csv_key  text,
    -- Set once every ImageTask of the request is on the stream; NULL means "publish again".
    published_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    CONSTRAINT counters_in_range CHECK (images_done + images_failed <= images_total),
    UNIQUE (owner, idempotency_key)
);

CREATE INDEX requests_unpublished ON requests (created_at) WHERE published_at IS NULL;

CREATE TABLE products (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id     uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    row_number     integer NOT NULL,
    serial_number  text NOT NULL,
    product_name   text NOT NULL,
    UNIQUE (request_id, row_number)
);

CREATE TABLE images (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id     bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    request_id     uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    position       integer NOT NULL,
    input_url      text NOT NULL,
    status         text NOT NULL DEFAULT 'Pending' CHECK (status IN ('Pending', 'Done', 'Failed')),
    error_code     text,
    error_message  text,
    attempts       integer NOT NULL DEFAULT 0,
    output_key     text,
    kept_source    boolean NOT NULL DEFAULT false,
    bytes_in       integer,
    bytes_out      integer,
    width          integer,
    height         integer,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, position)
);

CREATE INDEX images_by_request ON images (request_id, id);

CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      uuid NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    event_id        text NOT NULL,
    attempt         integer NOT NULL,
    status_code     integer,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz
);

CREATE INDEX webhook_deliveries_by_request ON webhook_deliveries (request_id, id);
