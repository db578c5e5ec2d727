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

-- The job ledger. A job's chunks move pending -> dispatched (with a lease) -> finished; the
-- stages keep each chunk's done/failed bitmaps and counts, and fold them into the job's counts
-- when the chunk finishes. See docs/decisions.md.
CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);

CREATE TABLE IF NOT EXISTS jobs (
    id          uuid PRIMARY KEY,
    query       text NOT NULL,
    spec        jsonb NOT NULL,            -- the normalised job spec the tasks carry
    state       text NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'finished', 'cancelled')),
    total       bigint NOT NULL DEFAULT 0, -- items = selected ids x variants
    chunks      integer NOT NULL DEFAULT 0,
    done        bigint NOT NULL DEFAULT 0, -- items of finished chunks
    failed      bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);

CREATE TABLE IF NOT EXISTS job_chunks (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    image_ids   bigint[] NOT NULL,
    items       integer NOT NULL,          -- cardinality(image_ids) x variants
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'dispatched', 'finished')),
    dispatches  integer NOT NULL DEFAULT 0,  -- times sent (the message's dispatch number)
    attempts    smallint NOT NULL DEFAULT 0, -- dispatches a worker started (CHUNK_MAX_ATTEMPTS)
    started_by  integer,                   -- the dispatch whose message started it; NULL: not yet
    lease_until timestamptz,               -- dispatched again when no stage touched it by then
    done        integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    done_mask   bit varying,               -- bit s = item slot s (image index x variants + variant)
    failed_mask bit varying,
    last_error  text,
    PRIMARY KEY (job_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS job_chunks_pending ON job_chunks (job_id, chunk_index) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS job_chunks_dispatched ON job_chunks (job_id) WHERE state = 'dispatched';

-- One row per failed item, and per finished item when the job keeps item rows ('all').
CREATE TABLE IF NOT EXISTS job_items (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    image_id   bigint NOT NULL,
    variant    integer NOT NULL,
    status     text NOT NULL CHECK (status IN ('done', 'failed')),
    output_uri text,
    error      text,
    label      text,
    score      real,
    top_k      jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, image_id, variant)
);

-- Each running dispatcher says it is alive here (`producer jobs`, `--wait` read it).
CREATE TABLE IF NOT EXISTS dispatchers (
    name    text PRIMARY KEY,
    seen_at timestamptz NOT NULL
);

CREATE OR REPLACE VIEW predictions AS
    SELECT job_id, image_id, variant, label, score, top_k
    FROM job_items
    WHERE label IS NOT NULL;
