//! Runs: what a pipeline step needs to know about its run, and the state changes.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// Everything a step needs about its run.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunInfo {
    pub id: i64,
    pub study_id: i64,
    pub model_id: i64,
    pub state: String,
    pub params: Value,
    pub ct_path: String,
    pub truth_path: Option<String>,
    pub mask_path: Option<String>,
    pub model_dir: String,
}

pub async fn info(pool: &PgPool, run: i64) -> Result<Option<RunInfo>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.study_id, r.model_id, r.state, r.params,
                ct.path AS ct_path, gt.path AS truth_path, mk.path AS mask_path, m.dir AS model_dir
         FROM runs r
         JOIN studies s ON s.id = r.study_id
         JOIN artifacts ct ON ct.id = s.ct_artifact
         LEFT JOIN artifacts gt ON gt.id = s.truth_artifact
         LEFT JOIN artifacts mk ON mk.id = r.mask_artifact
         JOIN models m ON m.id = r.model_id
         WHERE r.id = $1",
    )
    .bind(run)
    .fetch_optional(pool)
    .await
}

/// Marks a run started (first step picked up).
pub async fn started(pool: &PgPool, run: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET state = 'running', started_at = coalesce(started_at, now())
         WHERE id = $1 AND state = 'pending'",
    )
    .bind(run)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves a run to its next step, adding a timing (milliseconds) under `step`.
pub async fn advance(
    conn: &mut PgConnection,
    run: i64,
    next: &str,
    step: &str,
    millis: u64,
) -> Result<(), sqlx::Error> {
    let done = next == "done";
    sqlx::query(
        "UPDATE runs SET step = $2,
             timings = timings || jsonb_build_object($3::text, $4::bigint),
             state = CASE WHEN $5 THEN 'done' ELSE state END,
             finished_at = CASE WHEN $5 THEN now() ELSE finished_at END
         WHERE id = $1",
    )
    .bind(run)
    .bind(next)
    .bind(format!("{step}_ms"))
    .bind(millis as i64)
    .bind(done)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a run failed with the reason of the job that gave up.
pub async fn failed(pool: &PgPool, run: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET state = 'failed', error = $2, finished_at = now()
         WHERE id = $1 AND state IN ('pending', 'running')",
    )
    .bind(run)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
