-- The study store and the job queue. See ARCHITECTURE.md ("Data model").

-- Content-addressed files under <data>/artifacts; a row is committed only after its file is
-- durable under its final name, so no row points to a missing or partial file.
CREATE TABLE artifacts (
    id          BIGSERIAL PRIMARY KEY,
    sha256      TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    bytes       BIGINT NOT NULL CHECK (bytes >= 0),
    path        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The model registry: at most one active model.
CREATE TABLE models (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    version        TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    card           JSONB NOT NULL,
    dir            TEXT NOT NULL,
    active         BOOLEAN NOT NULL DEFAULT false,
    registered_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX models_one_active ON models (active) WHERE active;

-- A batch: one scheduled tick or one manual import.
CREATE TABLE batches (
    id          BIGSERIAL PRIMARY KEY,
    schedule    TEXT,
    tick_at     TIMESTAMPTZ,
    notify      TEXT[] NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One study per distinct CT content (sha256 of the file as received).
CREATE TABLE studies (
    id              BIGSERIAL PRIMARY KEY,
    sha256          TEXT NOT NULL UNIQUE,
    ct_artifact     BIGINT NOT NULL REFERENCES artifacts (id),
    truth_artifact  BIGINT REFERENCES artifacts (id),
    -- The name the file had in the inbox. Shown to admins, never logged.
    source_name     TEXT NOT NULL,
    shape           INT[] NOT NULL,
    spacing_mm      DOUBLE PRECISION[] NOT NULL,
    notify          TEXT[] NOT NULL DEFAULT '{}',
    batch_id        BIGINT REFERENCES batches (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Files that could not be ingested, with the reason (also in quarantine/<sha256>.reason.json).
CREATE TABLE quarantine (
    id           BIGSERIAL PRIMARY KEY,
    sha256       TEXT NOT NULL UNIQUE,
    source_name  TEXT NOT NULL,
    reason       TEXT NOT NULL,
    path         TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What the inbox scan has already looked at, so unchanged files are not hashed again.
CREATE TABLE inbox_files (
    path        TEXT PRIMARY KEY,
    bytes       BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    seen_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A run: one study through the pipeline with one model and one set of parameters.
CREATE TABLE runs (
    id                 BIGSERIAL PRIMARY KEY,
    study_id           BIGINT NOT NULL REFERENCES studies (id),
    model_id           BIGINT NOT NULL REFERENCES models (id),
    params             JSONB NOT NULL DEFAULT '{}',
    state              TEXT NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    step               TEXT NOT NULL DEFAULT 'segment',
    previous_run       BIGINT REFERENCES runs (id),
    batch_id           BIGINT REFERENCES batches (id),
    mask_artifact      BIGINT REFERENCES artifacts (id),
    liver_ml           DOUBLE PRECISION,
    tumour_ml          DOUBLE PRECISION,
    tumour_burden_pct  DOUBLE PRECISION,
    lesion_count       INT,
    timings            JSONB NOT NULL DEFAULT '{}',
    error              TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at         TIMESTAMPTZ,
    finished_at        TIMESTAMPTZ
);
CREATE INDEX runs_study ON runs (study_id, id);
CREATE INDEX runs_batch ON runs (batch_id);

-- Results are unique per run: a replayed step cannot duplicate them.
CREATE TABLE lesions (
    run_id                     BIGINT NOT NULL REFERENCES runs (id),
    number                     INT NOT NULL,
    voxels                     BIGINT NOT NULL,
    volume_ml                  DOUBLE PRECISION NOT NULL,
    centroid_mm                DOUBLE PRECISION[] NOT NULL,
    longest_axial_diameter_mm  DOUBLE PRECISION NOT NULL,
    max_diameter_mm            DOUBLE PRECISION NOT NULL,
    mean_hu                    DOUBLE PRECISION,
    slice_first                INT NOT NULL,
    slice_last                 INT NOT NULL,
    PRIMARY KEY (run_id, number)
);

CREATE TABLE metrics (
    run_id        BIGINT PRIMARY KEY REFERENCES runs (id),
    liver_dice    DOUBLE PRECISION,
    tumour_dice   DOUBLE PRECISION,
    lesion_recall DOUBLE PRECISION,
    detail        JSONB NOT NULL
);

-- The job queue.
CREATE TABLE jobs (
    id            BIGSERIAL PRIMARY KEY,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       JSONB NOT NULL DEFAULT '{}',
    state         TEXT NOT NULL DEFAULT 'available'
                  CHECK (state IN ('available', 'running', 'done', 'failed', 'dead', 'cancelled')),
    priority      SMALLINT NOT NULL DEFAULT 0,
    attempt       INT NOT NULL DEFAULT 0,
    max_attempts  INT NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    run_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until   TIMESTAMPTZ,
    worker        TEXT,
    last_error    TEXT,
    errors        JSONB NOT NULL DEFAULT '[]',
    unique_key    TEXT UNIQUE,
    run_id        BIGINT REFERENCES runs (id),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_at    TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ
);
CREATE INDEX jobs_claim ON jobs (queue, priority DESC, run_at, id) WHERE state = 'available';
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_run ON jobs (run_id);
CREATE INDEX jobs_state ON jobs (state, id);

-- Wake idle workers of a queue when a job becomes available (they also poll).
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hepaflow_jobs', NEW.queue);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.state = 'available') EXECUTE FUNCTION jobs_notify();
CREATE TRIGGER jobs_notify_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'available' AND OLD.state <> 'available')
    EXECUTE FUNCTION jobs_notify();

-- What `probe` jobs did (queue self-checks and benchmarks): a `start` row when an attempt
-- begins (autocommitted, so every execution shows) and a `commit` row written with the
-- completion (so only the attempt that finished the job shows).
CREATE TABLE probe_effects (
    job_id    BIGINT NOT NULL,
    attempt   INT NOT NULL,
    worker    TEXT NOT NULL,
    phase     TEXT NOT NULL CHECK (phase IN ('start', 'commit')),
    at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX probe_effects_job ON probe_effects (job_id);

-- Cron schedules (synced from jobs/*.toml) and the ticks that fired: one row per tick, ever.
CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    cron       TEXT NOT NULL,
    timezone   TEXT NOT NULL,
    job        TEXT NOT NULL,
    notify     TEXT[] NOT NULL DEFAULT '{}',
    catch_up   BOOLEAN NOT NULL DEFAULT true,
    enabled    BOOLEAN NOT NULL DEFAULT true,
    last_tick  TIMESTAMPTZ,
    synced_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE schedule_ticks (
    schedule   TEXT NOT NULL REFERENCES schedules (name),
    tick_at    TIMESTAMPTZ NOT NULL,
    fired_by   TEXT NOT NULL,
    job_id     BIGINT REFERENCES jobs (id),
    fired_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick_at)
);
