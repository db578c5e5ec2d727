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

-- Datasets: each is a catalog table of the user's own columns (named like the dataset) whose
-- integer id column names its images; `locations` says where each image's bytes are.
CREATE TABLE IF NOT EXISTS datasets (
    id           smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL UNIQUE,      -- also its catalog table's name
    id_column    text NOT NULL,             -- the catalog's integer id column
    key_column   text,                      -- string keys: the column keeping them (ids assigned)
    image_column text,                      -- the manifest column that located each image
    format       text NOT NULL,             -- kaggle, csv, jsonl, parquet, webdataset, folder
    created_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS source text;  -- what its last ingest read

-- Tar shards holding images as members: packed by Quarry or registered where they are.
CREATE TABLE IF NOT EXISTS shards (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uri     text NOT NULL UNIQUE,          -- s3://bucket/key.tar
    size    bigint NOT NULL,
    etag    text NOT NULL                  -- a read finding another ETag fails its items
);

-- Where an image's bytes are: a member of a shard (offset and length of its data), or an
-- object of its own (`uri`; its ETag is pinned at ingest when known, else at its first read).
CREATE TABLE IF NOT EXISTS locations (
    dataset     smallint NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    id          bigint NOT NULL,
    shard       bigint REFERENCES shards (id),
    byte_offset bigint,
    byte_length bigint,
    uri         text,
    etag        text,
    width       integer,
    height      integer,
    error       text,                      -- why it has no image (found unreadable at ingest)
    PRIMARY KEY (dataset, id),
    CHECK (error IS NOT NULL OR shard IS NOT NULL OR uri IS NOT NULL)
);

-- The job ledger. A job's chunks move pending -> dispatched (with a lease) -> finished; the
-- stages keep each chunk's done/failed bitmaps and counts, and fold them into the job's counts
-- when the chunk finishes. See docs/decisions.md.
CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);

CREATE TABLE IF NOT EXISTS jobs (
    id          uuid PRIMARY KEY,
    query       text NOT NULL,
    spec        jsonb NOT NULL,            -- the normalised job spec the tasks carry
    state       text NOT NULL DEFAULT 'running',  -- jobs_state_check below
    total       bigint NOT NULL DEFAULT 0, -- items = selected ids x variants (grows while recording)
    chunks      integer NOT NULL DEFAULT 0,
    done        bigint NOT NULL DEFAULT 0, -- items of finished chunks
    failed      bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
-- schema 4: a job's selection is recorded while its first chunks already run (quarry/record.py)
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS recorded_at timestamptz;  -- NULL: still recording
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS recorder_pid integer;     -- the recording producer's backend
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS slicing text;             -- how the selection was cut
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS error text;               -- why a failed job failed
UPDATE jobs SET recorded_at = created_at WHERE recorded_at IS NULL;  -- jobs of schema 3: recorded whole
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ('running', 'finished', 'cancelled', 'failed'));

CREATE TABLE IF NOT EXISTS job_chunks (
    job_id      uuid NOT NULL,             -- no foreign key: see jobs_delete_ledger below
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
-- schema 4: the image a careful retry is rendering, and the one it was rendering when its worker
-- process was lost (common/liveness.py)
ALTER TABLE job_chunks ADD COLUMN IF NOT EXISTS rendering bigint;
ALTER TABLE job_chunks ADD COLUMN IF NOT EXISTS suspect bigint;
CREATE INDEX IF NOT EXISTS job_chunks_pending ON job_chunks (job_id, chunk_index) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS job_chunks_dispatched ON job_chunks (job_id) WHERE state = 'dispatched';

-- One row per failed item, and per finished item when the job keeps item rows ('all').
CREATE TABLE IF NOT EXISTS job_items (
    job_id     uuid NOT NULL,              -- no foreign key: see jobs_delete_ledger below
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

-- Chunks and items a recording job has committed, a row per batch: insert-only, so nothing is
-- updated under the recording's long-held snapshot; folded into `jobs` when the recording ends.
CREATE TABLE IF NOT EXISTS recorded_batches (
    job_id uuid NOT NULL,
    chunks integer NOT NULL,
    items  bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS recorded_batches_job ON recorded_batches (job_id);

-- Schema 4: job_chunks, job_items and recorded_batches name their job without a foreign key. A
-- selection is recorded under a snapshot held for the whole recording, so every update of the
-- job's row meanwhile (counts) stays as a row version no one can prune; a foreign key checks the
-- job's row for every chunk and item row inserted, walking all of those versions each time. A
-- job's ledger rows are deleted with it by this trigger instead.
ALTER TABLE job_chunks DROP CONSTRAINT IF EXISTS job_chunks_job_id_fkey;
ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_job_id_fkey;
CREATE OR REPLACE FUNCTION quarry_delete_job_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_chunks WHERE job_id = OLD.id;
    DELETE FROM job_items WHERE job_id = OLD.id;
    DELETE FROM recorded_batches WHERE job_id = OLD.id;
    RETURN OLD;
END $$;
DROP TRIGGER IF EXISTS jobs_delete_ledger ON jobs;
CREATE TRIGGER jobs_delete_ledger AFTER DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION quarry_delete_job_ledger();

-- An ingest through the pools is a job whose chunk i registers unit i: a manifest file (or one
-- Parquet row group of it), or one tar shard. `counts` is what registering it did.
CREATE TABLE IF NOT EXISTS ingest_units (
    job_id  uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    unit    integer NOT NULL,
    source  text NOT NULL,                 -- s3:// URI of the manifest file or the tar
    part    integer,                       -- a Parquet row group; NULL: the whole file
    size    bigint NOT NULL,
    etag    text NOT NULL,                 -- the source's when planned: a re-run skips it if unchanged
    companion text,                        -- a tar's metadata table (its NNNNN.parquet), if any
    counts  jsonb,                         -- NULL until registered
    PRIMARY KEY (job_id, unit)
);
CREATE INDEX IF NOT EXISTS ingest_units_source ON ingest_units (source, etag);

-- Liveness (common/liveness.py): each worker process that runs stage tasks says it is alive here
-- every WORKER_HEARTBEAT_S, and keeps a row in `holds` per message it is working on; the
-- dispatcher ends the lease of the chunks a silent holder held.
CREATE TABLE IF NOT EXISTS holders (
    name    text PRIMARY KEY,              -- host:pid:random
    seen_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    holder      text NOT NULL,
    task_id     text NOT NULL,             -- the Celery message being worked on
    job_id      uuid NOT NULL,
    chunk_index integer NOT NULL,
    dispatch    integer NOT NULL,          -- the chunk's dispatch the message belongs to
    PRIMARY KEY (holder, task_id)
);
CREATE INDEX IF NOT EXISTS holds_chunk ON holds (job_id, chunk_index);

-- Each running dispatcher says it is alive here (`producer jobs`, `--wait` read it).
CREATE TABLE IF NOT EXISTS dispatchers (
    name    text PRIMARY KEY,
    seen_at timestamptz NOT NULL
);

-- Schema 6: the locks Quarry's processes take are rows of this table, locked FOR UPDATE, which
-- only a role granted UPDATE on it can take (the query role cannot; advisory locks any role can).
CREATE TABLE IF NOT EXISTS quarry_locks (name text PRIMARY KEY);
INSERT INTO quarry_locks VALUES ('dispatch'), ('roles'), ('embeddings') ON CONFLICT DO NOTHING;

-- Schema 7: a model's outputs computed once (common/outputs.py). Keyed by the sha256 of the
-- model's bytes and of the image bytes it read: a job whose model already ran on an image takes
-- them from here. `inferred`: the images a job's model ran on (the rest came from here), folded
-- from each chunk's inferred_mask (a bit per item slot, so a re-sent message counts once).
CREATE TABLE IF NOT EXISTS model_outputs (
    model     bytea NOT NULL,               -- sha256 of the model file
    image     bytea NOT NULL,               -- sha256 of the bytes the model read
    label     text NOT NULL,
    score     real NOT NULL,
    top_k     jsonb NOT NULL,
    embedding real[],                       -- the model's embedding output, where it has one
    PRIMARY KEY (model, image)
);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS inferred bigint NOT NULL DEFAULT 0;
ALTER TABLE job_chunks ADD COLUMN IF NOT EXISTS inferred_mask bit varying;

-- Schema 7: the embeddings of a dataset under a model name, one table each (embeddings_<id>:
-- id, embedding vector(dimensions), image), where pgvector is installed (common/embeddings.py
-- makes them and the `embeddings` view over them). A model of other bytes under the same name
-- replaces the set: embeddings of two models are not comparable.
CREATE TABLE IF NOT EXISTS embedding_sets (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset    text NOT NULL,
    model      text NOT NULL,              -- the name --model was given (`default`)
    digest     bytea NOT NULL,             -- sha256 of the model file
    dimensions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dataset, model)
);

-- Near-duplicate groups (`producer duplicates`, quarry/duplicates.py): for each dataset and the
-- model whose embeddings grouped them, each image of a group with the group's id (its smallest
-- image id). An image in no group has no row. Readable by user SQL: "one of each group" is
-- `WHERE id NOT IN (SELECT id FROM duplicates WHERE ... AND id <> group_id)`.
CREATE TABLE IF NOT EXISTS duplicates (
    dataset  text NOT NULL,
    model    text NOT NULL,
    group_id bigint NOT NULL,
    id       bigint NOT NULL,
    PRIMARY KEY (dataset, model, id)
);

CREATE OR REPLACE VIEW predictions AS
    SELECT job_id, image_id, variant, label, score, top_k
    FROM job_items
    WHERE label IS NOT NULL;

-- The fashion archive's images as the catalog's queries have always read them.
CREATE OR REPLACE VIEW images AS
    SELECT l.id, CASE WHEN l.error IS NULL THEN 'stored' ELSE 'bad' END AS status,
           l.width, l.height, l.byte_length AS size_bytes, l.error
    FROM locations l JOIN datasets d ON d.id = l.dataset
    WHERE d.name = 'styles';
