-- Reports and the email outbox.

ALTER TABLE runs ADD COLUMN report_artifact BIGINT REFERENCES artifacts (id);
ALTER TABLE batches ADD COLUMN digest_artifact BIGINT REFERENCES artifacts (id);

-- The outbox: a row is written in the transaction that finishes what it announces; a
-- `send_email` job delivers it. The Message-ID is fixed at creation, so every retry of the
-- same email carries the same one.
CREATE TABLE emails (
    id            BIGSERIAL PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('study', 'digest')),
    recipient     TEXT NOT NULL,
    subject       TEXT NOT NULL,
    body_text     TEXT NOT NULL,
    body_html     TEXT NOT NULL,
    message_id    TEXT NOT NULL UNIQUE,
    -- The report attached when the site turns attachments on.
    attachment    BIGINT REFERENCES artifacts (id),
    study_id      BIGINT REFERENCES studies (id),
    run_id        BIGINT REFERENCES runs (id),
    batch_id      BIGINT REFERENCES batches (id),
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts      INT NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at       TIMESTAMPTZ,
    UNIQUE (kind, recipient, run_id),
    UNIQUE (kind, recipient, batch_id)
);
CREATE INDEX emails_state ON emails (state, id);

-- Which batch a quarantined file arrived in (for the digest).
ALTER TABLE quarantine ADD COLUMN batch_id BIGINT REFERENCES batches (id);
