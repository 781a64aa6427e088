//! The durable job queue on Postgres, and the cron scheduler that feeds it.
//!
//! - Claim: `FOR UPDATE SKIP LOCKED`, oldest first within a priority, several at a time.
//! - Lease: a claimed job belongs to its worker until `lease_until`; the worker heartbeats.
//!   A job whose lease expired is made available again (or `dead` when out of attempts) by
//!   [`rescue_expired`], which every worker runs as it polls.
//! - Fence: completion and failure writes name the attempt they belong to; a worker whose
//!   lease was taken (it was paused, partitioned, or presumed dead) writes nothing.
//! - Retry: transient errors come back after `retry_base · 2^(attempt−1)` ±25 % (≤ 1 h) until
//!   `max_attempts`, then `dead`; permanent errors go straight to `failed`.
//! - Unique keys: an enqueue whose key exists is a no-op (a cron tick, a pipeline step).
//! - Wake-up: a trigger NOTIFYs `hepaflow_jobs` with the queue name; workers also poll.

pub mod scheduler;
pub mod worker;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// The notification channel.
pub const CHANNEL: &str = "hepaflow_jobs";

/// A job to insert.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    pub max_attempts: i32,
    pub priority: i16,
    pub unique_key: Option<String>,
    pub run_id: Option<i64>,
    /// Not before this time (default: now).
    pub run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    pub fn new(queue: &str, kind: &str, payload: Value) -> Self {
        NewJob {
            queue: queue.into(),
            kind: kind.into(),
            payload,
            max_attempts: 5,
            priority: 0,
            unique_key: None,
            run_id: None,
            run_at: None,
        }
    }
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    pub fn for_run(mut self, run_id: i64) -> Self {
        self.run_id = Some(run_id);
        self
    }
    pub fn attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
}

/// Inserts a job inside the caller's transaction: it exists if and only if the transaction
/// commits. `None` when a job with the same unique key already exists.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO jobs (queue, kind, payload, max_attempts, priority, unique_key, run_id, run_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now()))
         ON CONFLICT (unique_key) DO NOTHING
         RETURNING id",
    )
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(job.max_attempts)
    .bind(job.priority)
    .bind(&job.unique_key)
    .bind(job.run_id)
    .bind(job.run_at)
    .fetch_optional(conn)
    .await
}

/// Inserts many jobs in one statement (no unique keys); returns how many.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    queue: &str,
    kind: &str,
    payloads: &[Value],
    max_attempts: i32,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO jobs (queue, kind, payload, max_attempts)
         SELECT $1, $2, p, $4 FROM unnest($3::jsonb[]) AS p",
    )
    .bind(queue)
    .bind(kind)
    .bind(payloads)
    .bind(max_attempts.max(1))
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// A job claimed by a worker: valid for one attempt.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_id: Option<i64>,
    pub worker: String,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Claims up to `limit` available jobs of `queue` for `worker`.
pub async fn claim(
    pool: &PgPool,
    queue: &str,
    limit: i64,
    worker: &str,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "WITH next AS (
             SELECT id FROM jobs
             WHERE state = 'available' AND queue = $1 AND run_at <= now()
             ORDER BY priority DESC, run_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j
         SET state = 'running', attempt = j.attempt + 1, worker = $3, claimed_at = now(),
             lease_until = now() + $4 * interval '1 millisecond'
         FROM next WHERE j.id = next.id
         RETURNING j.id, j.queue, j.kind, j.payload, j.attempt, j.max_attempts, j.run_id, j.worker",
    )
    .bind(queue)
    .bind(limit)
    .bind(worker)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

/// Extends a claimed job's lease. `false` when the job is no longer this attempt's (it was
/// rescued, cancelled or finished elsewhere): the worker must stop working on it.
pub async fn heartbeat(pool: &PgPool, job: &Claimed, lease: Duration) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET lease_until = now() + $3 * interval '1 millisecond'
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .bind(millis(lease))
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Why a fenced write was refused: the job no longer belongs to this attempt.
#[derive(Debug, thiserror::Error)]
#[error("job {id} attempt {attempt}: no longer held by this worker (lease lost)")]
pub struct Fenced {
    pub id: i64,
    pub attempt: i32,
}

/// Starts a transaction that holds this attempt's job row locked, or says the attempt lost
/// its lease. Everything written in it commits together with the completion
/// ([`complete_in`]), so a job's results exist exactly once.
pub async fn begin_fenced(
    pool: &PgPool,
    job: &Claimed,
) -> Result<Result<Transaction<'static, Postgres>, Fenced>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND attempt = $2 AND state = 'running' FOR UPDATE",
    )
    .bind(job.id)
    .bind(job.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(match held {
        Some(_) => Ok(tx),
        None => Err(Fenced {
            id: job.id,
            attempt: job.attempt,
        }),
    })
}

/// Marks the job done inside a fenced transaction (the caller commits).
pub async fn complete_in(conn: &mut PgConnection, job: &Claimed) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET state = 'done', finished_at = now(), lease_until = NULL
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks the job done (no other writes). `false` when fenced off.
pub async fn complete(pool: &PgPool, job: &Claimed) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET state = 'done', finished_at = now(), lease_until = NULL
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// How a job attempt failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Might work later (a busy database, a full disk, a lost connection): retried.
    Transient,
    /// Will never work (bad input): not retried.
    Permanent,
    /// This attempt lost its lease; another attempt owns the job now. Nothing is written.
    Lost,
}

/// A job's error.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
}

impl JobError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        JobError {
            kind: ErrorKind::Transient,
            message: message.to_string(),
        }
    }
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        JobError {
            kind: ErrorKind::Permanent,
            message: message.to_string(),
        }
    }
}

impl From<Fenced> for JobError {
    fn from(e: Fenced) -> Self {
        JobError {
            kind: ErrorKind::Lost,
            message: e.to_string(),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::transient(format!("database: {e}"))
    }
}

/// The delay before retry number `attempt` (1-based): `base · 2^(attempt−1)`, ±25 % jitter,
/// at most one hour.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exp = (attempt.max(1) - 1).min(30) as u32;
    let raw = base.as_secs_f64() * f64::from(2u32.saturating_pow(exp).max(1));
    let capped = raw.min(3600.0);
    Duration::from_secs_f64(capped * (0.75 + 0.5 * fastrand::f64()))
}

/// What became of a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterFailure {
    /// Will run again later.
    Retry,
    /// Out of attempts.
    Dead,
    /// Permanent error.
    Failed,
    /// The attempt had lost its lease: nothing written.
    Fenced,
}

/// Records a failed attempt: retry later, `dead`, or `failed`.
pub async fn fail(
    pool: &PgPool,
    job: &Claimed,
    error: &JobError,
    retry_base: Duration,
) -> Result<AfterFailure, sqlx::Error> {
    let delay = backoff(retry_base, job.attempt);
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET
             state = CASE WHEN $3 THEN 'failed'
                          WHEN attempt >= max_attempts THEN 'dead'
                          ELSE 'available' END,
             run_at = CASE WHEN $3 OR attempt >= max_attempts THEN run_at
                           ELSE now() + $4 * interval '1 millisecond' END,
             finished_at = CASE WHEN $3 OR attempt >= max_attempts THEN now() END,
             lease_until = NULL,
             last_error = $5,
             errors = errors || jsonb_build_array(jsonb_build_object(
                 'attempt', attempt, 'at', now(), 'worker', worker, 'error', $5::text))
         WHERE id = $1 AND attempt = $2 AND state = 'running'
         RETURNING state",
    )
    .bind(job.id)
    .bind(job.attempt)
    .bind(error.kind == ErrorKind::Permanent)
    .bind(millis(delay))
    .bind(&error.message)
    .fetch_optional(pool)
    .await?;
    Ok(match state.as_deref() {
        None => AfterFailure::Fenced,
        Some("available") => AfterFailure::Retry,
        Some("dead") => AfterFailure::Dead,
        _ => AfterFailure::Failed,
    })
}

/// Gives a claimed job back without counting the attempt against it (graceful shutdown).
pub async fn release(pool: &PgPool, job: &Claimed) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET state = 'available', lease_until = NULL, run_at = now(),
             max_attempts = max_attempts + 1,
             errors = errors || jsonb_build_array(jsonb_build_object(
                 'attempt', attempt, 'at', now(), 'worker', worker,
                 'error', 'released at shutdown'))
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job.id)
    .bind(job.attempt)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A job given back by [`rescue_expired`].
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Rescued {
    pub id: i64,
    pub kind: String,
    pub run_id: Option<i64>,
    /// `available`, or `dead` when that was its last attempt.
    pub state: String,
}

/// Jobs whose lease expired (their worker died or stalled) become available again, or
/// `dead` when that was their last attempt.
pub async fn rescue_expired(pool: &PgPool) -> Result<Vec<Rescued>, sqlx::Error> {
    sqlx::query_as(
        "WITH expired AS (
             SELECT id FROM jobs WHERE state = 'running' AND lease_until < now()
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'available' END,
             finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
             run_at = now(),
             last_error = 'lease expired: worker ' || coalesce(j.worker, '?') || ' stopped heartbeating',
             errors = j.errors || jsonb_build_array(jsonb_build_object(
                 'attempt', j.attempt, 'at', now(), 'worker', j.worker,
                 'error', 'lease expired')),
             lease_until = NULL
         FROM expired WHERE j.id = expired.id
         RETURNING j.id, j.kind, j.run_id, j.state",
    )
    .fetch_all(pool)
    .await
}

/// A job as listed by `hepaflow jobs`.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_id: Option<i64>,
    pub worker: Option<String>,
    pub run_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub unique_key: Option<String>,
    pub payload: Value,
    pub errors: Value,
}

const JOB_COLUMNS: &str = "id, queue, kind, state, attempt, max_attempts, run_id, worker, run_at,
     lease_until, created_at, finished_at, last_error, unique_key, payload, errors";

/// Jobs, newest first, optionally of one state and queue.
pub async fn list(
    pool: &PgPool,
    state: Option<&str>,
    queue: Option<&str>,
    limit: i64,
) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2)
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(state)
    .bind(queue)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Counts of jobs per state.
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
        .fetch_all(pool)
        .await
}

/// Makes a `failed`, `dead` or `cancelled` job available again with a fresh set of attempts.
pub async fn retry(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE jobs SET state = 'available', run_at = now(), finished_at = NULL,
             max_attempts = attempt + max_attempts,
             lease_until = NULL
         WHERE id = $1 AND state IN ('failed', 'dead', 'cancelled')
         RETURNING state",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Cancels an available or running job (a running one stops at its next heartbeat).
pub async fn cancel(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_until = NULL,
             last_error = coalesce(last_error, 'cancelled by an admin')
         WHERE id = $1 AND state IN ('available', 'running')
         RETURNING state",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Whether any job is available now or running (for `run --once`).
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE state = 'running'
            OR (state = 'available' AND run_at <= now() + interval '2 seconds')",
    )
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let base = Duration::from_secs(10);
        for attempt in 1..=5 {
            let d = backoff(base, attempt).as_secs_f64();
            let nominal = 10.0 * 2f64.powi(attempt - 1);
            assert!(d >= 0.75 * nominal && d <= 1.25 * nominal, "{attempt}: {d}");
        }
        assert!(backoff(base, 40).as_secs_f64() <= 3600.0 * 1.25);
    }
}
