-- Quarry's catalog and job records. Idempotent: run by every producer command.
CREATE TABLE IF NOT EXISTS styles (
    id                   bigint PRIMARY KEY,
    gender               text,
    master_category      text,
    sub_category         text,
    article_type         text,
    base_colour          text,
    season               text,
    year                 integer,
    usage                text,
    product_display_name text
);

CREATE TABLE IF NOT EXISTS images (
    id         bigint PRIMARY KEY,
    raw_key    text,
    size_bytes bigint NOT NULL,
    width      integer,
    height     integer,
    checksum   text NOT NULL,            -- sha256 of the file's bytes, hex
    status     text NOT NULL CHECK (status IN ('stored', 'bad')),
    error      text,
    store_id   text,                     -- the raw bucket's marker when it was stored
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS jobs (
    id          uuid PRIMARY KEY,
    query       text NOT NULL,
    spec        jsonb NOT NULL,           -- the normalised job spec the tasks carry
    state       text NOT NULL DEFAULT 'enqueuing'
                CHECK (state IN ('enqueuing', 'enqueued', 'enqueue_failed')),
    error       text,
    total       bigint NOT NULL DEFAULT 0, -- items = selected ids x variants
    chunks      integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueued_at timestamptz
);

CREATE TABLE IF NOT EXISTS job_chunks (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    image_ids   bigint[] NOT NULL,
    PRIMARY KEY (job_id, chunk_index)
);

-- One row per output item (image x variant), written by the stage that finishes it.
CREATE TABLE IF NOT EXISTS job_items (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    image_id   bigint NOT NULL,
    variant    integer NOT NULL,
    status     text NOT NULL CHECK (status IN ('uploaded', 'done', 'failed')),
    output_uri text,
    error      text,
    label      text,
    score      real,
    top_k      jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, image_id, variant)
);

CREATE OR REPLACE VIEW predictions AS
    SELECT job_id, image_id, variant, label, score, top_k
    FROM job_items
    WHERE label IS NOT NULL;
