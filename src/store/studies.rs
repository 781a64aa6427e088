//! Studies and what the latest run of each found.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A study as listed by `hepaflow studies list` (CLI.md: `id`, `state`, `lesion_count`,
/// `liver_ml`, `tumour_ml`).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct StudySummary {
    pub id: i64,
    /// The latest run's state: `pending`, `running`, `done`, `failed`, `cancelled`.
    pub state: String,
    /// The step the latest run is at (or `done`).
    pub step: String,
    pub run_id: i64,
    pub model: String,
    pub lesion_count: Option<i32>,
    pub liver_ml: Option<f64>,
    pub tumour_ml: Option<f64>,
    pub tumour_burden_pct: Option<f64>,
    pub has_truth: bool,
    pub liver_dice: Option<f64>,
    pub tumour_dice: Option<f64>,
    pub shape: Vec<i32>,
    pub spacing_mm: Vec<f64>,
    pub created_at: DateTime<Utc>,
    pub error: Option<String>,
    /// Whether any run of the study has a report.
    pub has_report: bool,
}

const SUMMARY: &str = "SELECT s.id, r.state, r.step, r.id AS run_id, m.name AS model,
        r.lesion_count, r.liver_ml, r.tumour_ml, r.tumour_burden_pct,
        s.truth_artifact IS NOT NULL AS has_truth, x.liver_dice, x.tumour_dice,
        s.shape, s.spacing_mm, s.created_at, r.error,
        EXISTS (SELECT 1 FROM runs rr WHERE rr.study_id = s.id AND rr.report_artifact IS NOT NULL)
            AS has_report
    FROM studies s
    JOIN LATERAL (SELECT * FROM runs WHERE runs.study_id = s.id ORDER BY id DESC LIMIT 1) r ON true
    JOIN models m ON m.id = r.model_id
    LEFT JOIN metrics x ON x.run_id = r.id";

pub async fn list(pool: &PgPool) -> Result<Vec<StudySummary>, sqlx::Error> {
    sqlx::query_as(&format!("{SUMMARY} ORDER BY s.id"))
        .fetch_all(pool)
        .await
}

/// One page of studies, newest first, and the number of studies.
pub async fn page(
    pool: &PgPool,
    limit: i64,
    offset: i64,
) -> Result<(Vec<StudySummary>, i64), sqlx::Error> {
    let rows = sqlx::query_as(&format!("{SUMMARY} ORDER BY s.id DESC LIMIT $1 OFFSET $2"))
        .bind(limit)
        .bind(offset)
        .fetch_all(pool)
        .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM studies")
        .fetch_one(pool)
        .await?;
    Ok((rows, total))
}

pub async fn summary(pool: &PgPool, id: i64) -> Result<Option<StudySummary>, sqlx::Error> {
    sqlx::query_as(&format!("{SUMMARY} WHERE s.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// One run of a study, for `studies show`.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub state: String,
    pub step: String,
    pub model: String,
    pub previous_run: Option<i64>,
    pub batch_id: Option<i64>,
    pub params: serde_json::Value,
    pub timings: serde_json::Value,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn runs(pool: &PgPool, study: i64) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.state, r.step, m.name AS model, r.previous_run, r.batch_id, r.params,
                r.timings, r.error, r.created_at, r.finished_at
         FROM runs r JOIN models m ON m.id = r.model_id
         WHERE r.study_id = $1 ORDER BY r.id",
    )
    .bind(study)
    .fetch_all(pool)
    .await
}

/// A lesion row of a run.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct LesionRow {
    pub number: i32,
    pub voxels: i64,
    pub volume_ml: f64,
    pub centroid_mm: Vec<f64>,
    pub longest_axial_diameter_mm: f64,
    pub max_diameter_mm: f64,
    pub mean_hu: Option<f64>,
    pub slice_first: i32,
    pub slice_last: i32,
}

pub async fn lesions(pool: &PgPool, run: i64) -> Result<Vec<LesionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT number, voxels, volume_ml, centroid_mm, longest_axial_diameter_mm,
                max_diameter_mm, mean_hu, slice_first, slice_last
         FROM lesions WHERE run_id = $1 ORDER BY number",
    )
    .bind(run)
    .fetch_all(pool)
    .await
}

pub async fn metrics(pool: &PgPool, run: i64) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar("SELECT detail FROM metrics WHERE run_id = $1")
        .bind(run)
        .fetch_optional(pool)
        .await
}

/// A quarantined file.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct QuarantineRow {
    pub id: i64,
    pub sha256: String,
    pub source_name: String,
    pub reason: String,
    pub path: String,
    pub created_at: DateTime<Utc>,
}

pub async fn quarantined(pool: &PgPool) -> Result<Vec<QuarantineRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, sha256, source_name, reason, path, created_at FROM quarantine ORDER BY id",
    )
    .fetch_all(pool)
    .await
}
