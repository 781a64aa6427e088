//! The study pipeline: one job kind per step, registered in [`Pipeline::handle`].
//!
//! ingest (`scan_inbox`, cpu) → `segment` (gpu) → `analyze` (cpu) → `report` (cpu) →
//! `notify` (cpu). Each step commits its results, the run's next step and the next job in
//! one fenced transaction, so a step's results exist exactly once and a failure resumes at
//! the step that failed. A rerun is a new run linked to the previous one.

pub mod ingest;
mod steps;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use sqlx::{PgConnection, PgPool};

use crate::config::Settings;
use crate::queue::worker::{GaveUp, Handler, JobHandle};
use crate::queue::{JobError, NewJob};
use crate::segment::Classifier;
use crate::store::artifacts::ArtifactStore;
use crate::store::{models, runs};

/// The steps of a run, in order.
pub const STEPS: [&str; 4] = ["segment", "analyze", "report", "notify"];

/// The queue of a job kind.
pub fn queue_of(kind: &str) -> &'static str {
    if kind == "segment" { "gpu" } else { "cpu" }
}

/// The job that runs `step` of `run` (unique per run and step).
pub fn step_job(step: &str, run: i64) -> NewJob {
    NewJob::new(queue_of(step), step, json!({ "run_id": run }))
        .unique(format!("{step}:run:{run}"))
        .for_run(run)
}

/// The folders of the data directory.
#[derive(Clone, Debug)]
pub struct Folders {
    pub inbox: PathBuf,
    pub artifacts: PathBuf,
    pub quarantine: PathBuf,
}

impl Folders {
    pub fn new(settings: &Settings) -> Self {
        let d = &settings.data_dir;
        Folders {
            inbox: d.join("inbox"),
            artifacts: d.join("artifacts"),
            quarantine: d.join("quarantine"),
        }
    }
}

/// The loaded model of a worker, kept between jobs.
type Loaded = (i64, Arc<std::sync::Mutex<Classifier>>);

/// The pipeline's job handler and what its steps share.
pub struct Pipeline {
    pub pool: PgPool,
    pub settings: Settings,
    pub folders: Folders,
    pub store: ArtifactStore,
    device: tch::Device,
    model: tokio::sync::Mutex<Option<Loaded>>,
    transport: Result<crate::notify::Transport, String>,
}

impl Pipeline {
    pub fn new(pool: PgPool, settings: Settings, device: tch::Device) -> Self {
        let folders = Folders::new(&settings);
        let store = ArtifactStore::new(&folders.artifacts);
        let transport = crate::notify::Transport::from_settings(&settings.mail, &settings.data_dir)
            .map_err(|e| e.to_string());
        Pipeline {
            pool,
            settings,
            folders,
            store,
            device,
            model: tokio::sync::Mutex::new(None),
            transport,
        }
    }

    /// The mail transport (an invalid mail configuration fails the email jobs with its reason).
    pub fn transport(&self) -> Result<crate::notify::Transport, JobError> {
        self.transport.clone().map_err(JobError::permanent)
    }

    /// The classifier of model `id`, loaded once per worker (and reloaded when the run asks
    /// for another model). Loading checks the weights against the card.
    async fn classifier(
        &self,
        id: i64,
        dir: &str,
    ) -> Result<Arc<std::sync::Mutex<Classifier>>, JobError> {
        let mut slot = self.model.lock().await;
        if let Some((loaded, clf)) = slot.as_ref()
            && *loaded == id
        {
            return Ok(clf.clone());
        }
        let path = self.store.path(dir);
        let device = self.device;
        let clf = tokio::task::spawn_blocking(move || Classifier::load(&path, device, true))
            .await
            .map_err(|e| JobError::transient(format!("model loader: {e}")))?
            .map_err(|e| JobError::permanent(format!("model {id}: {e}")))?;
        let clf = Arc::new(std::sync::Mutex::new(clf));
        *slot = Some((id, clf.clone()));
        Ok(clf)
    }
}

fn run_id(job: &JobHandle) -> Result<i64, JobError> {
    job.job
        .payload
        .get("run_id")
        .and_then(|v| v.as_i64())
        .ok_or_else(|| JobError::permanent("payload has no run_id"))
}

impl Handler for Pipeline {
    async fn handle(&self, job: JobHandle) -> Result<(), JobError> {
        match job.job.kind.as_str() {
            "scan_inbox" => ingest::scan_job(self, &job).await,
            "segment" => steps::segment(self, &job, run_id(&job)?).await,
            "analyze" => steps::analyze(self, &job, run_id(&job)?).await,
            "report" => steps::report(self, &job, run_id(&job)?).await,
            "notify" => steps::notify(self, &job, run_id(&job)?).await,
            "digest" => steps::digest(self, &job).await,
            "send_email" => steps::send_email(self, &job).await,
            "noop" => Ok(()),
            "probe" => steps::probe(&job).await,
            other => Err(JobError::permanent(format!("unknown job kind {other:?}"))),
        }
    }

    async fn gave_up(&self, job: GaveUp) {
        if job.kind == "send_email" {
            let r = sqlx::query(
                "UPDATE emails SET state = 'failed', last_error = coalesce(last_error, $2)
                 WHERE id = (SELECT (payload->>'email_id')::bigint FROM jobs WHERE id = $1)
                   AND state = 'pending'",
            )
            .bind(job.id)
            .bind(&job.error)
            .execute(&self.pool)
            .await;
            if let Err(e) = r {
                tracing::warn!(job = job.id, error = %e, "cannot mark the email failed");
            }
        }
        if let Some(run) = job.run_id {
            let msg = format!("{} step: {}", job.kind, job.error);
            if let Err(e) = runs::failed(&self.pool, run, &msg).await {
                tracing::warn!(run, error = %e, "cannot mark the run failed");
            }
        }
    }
}

/// Makes sure a model is active: registers and activates the default model (`models/demo`)
/// when the registry is empty. Returns the active model's id.
pub async fn ensure_model(
    pool: &PgPool,
    store: &ArtifactStore,
    settings: &Settings,
) -> Result<i64, models::RegistryError> {
    if let Some(m) = models::active(pool).await? {
        return Ok(m.id);
    }
    let dir = default_model_dir(&settings.default_model);
    let m = models::register(pool, store, &dir).await?;
    let m = models::activate(pool, &m.name).await?;
    tracing::info!(model = %m.name, "registered and activated the default model");
    Ok(m.id)
}

/// The default model folder: as configured, or — for the relative default — next to the
/// checkout the binary was built in (`target/release/hepaflow` → `models/demo`).
fn default_model_dir(configured: &std::path::Path) -> std::path::PathBuf {
    if configured.is_absolute() || configured.join(crate::segment::CARD_FILE).exists() {
        return configured.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .map(|a| a.join(configured))
                .find(|d| d.join(crate::segment::CARD_FILE).exists())
        })
        .unwrap_or_else(|| configured.to_path_buf())
}

/// Creates a run of `study` with `model` and enqueues its first step, in the caller's
/// transaction.
pub async fn start_run(
    conn: &mut PgConnection,
    study: i64,
    model: i64,
    batch: Option<i64>,
    previous: Option<i64>,
    first_step: &str,
) -> Result<i64, sqlx::Error> {
    let run: i64 = sqlx::query_scalar(
        "INSERT INTO runs (study_id, model_id, batch_id, previous_run, step, params)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(study)
    .bind(model)
    .bind(batch)
    .bind(previous)
    .bind(first_step)
    .bind(json!({"mode": "dense", "stride": 2}))
    .fetch_one(&mut *conn)
    .await?;
    crate::queue::enqueue(conn, &step_job(first_step, run)).await?;
    Ok(run)
}

/// Why a rerun was refused.
#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    #[error("no study {0}")]
    NoStudy(i64),
    #[error("--from {0:?}: expected one of segment, analyze, report, notify")]
    BadStep(String),
    #[error(
        "--from {step}: the previous run {run} has no {what} to start from; rerun from an earlier step"
    )]
    Missing {
        step: String,
        run: i64,
        what: &'static str,
    },
    #[error("--model with --from {0}: a new model needs a new segmentation; use --from segment")]
    ModelNeedsSegment(String),
    #[error(transparent)]
    Registry(#[from] models::RegistryError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// A new run of a study, linked to its latest run, starting at `from` (earlier steps'
/// results are carried over from the previous run).
pub async fn rerun(
    pool: &PgPool,
    study: i64,
    from: &str,
    model: Option<&str>,
) -> Result<i64, RerunError> {
    let step_index = STEPS
        .iter()
        .position(|s| *s == from)
        .ok_or_else(|| RerunError::BadStep(from.into()))?;
    if model.is_some() && step_index > 0 {
        return Err(RerunError::ModelNeedsSegment(from.into()));
    }
    let mut tx = pool.begin().await?;
    let prev: Option<(i64, i64, Option<i64>, Option<f64>)> = sqlx::query_as(
        "SELECT id, model_id, mask_artifact, liver_ml FROM runs
         WHERE study_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(study)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((prev_id, prev_model, prev_mask, prev_liver)) = prev else {
        return Err(RerunError::NoStudy(study));
    };
    let model_id = match model {
        Some(name) => {
            models::by_name(pool, name)
                .await?
                .ok_or_else(|| models::RegistryError::Unknown(name.into()))?
                .id
        }
        None => prev_model,
    };
    if step_index >= 1 && prev_mask.is_none() {
        return Err(RerunError::Missing {
            step: from.into(),
            run: prev_id,
            what: "segmentation",
        });
    }
    if step_index >= 2 && prev_liver.is_none() {
        return Err(RerunError::Missing {
            step: from.into(),
            run: prev_id,
            what: "analysis",
        });
    }
    let run = start_run(&mut tx, study, model_id, None, Some(prev_id), from).await?;
    if step_index >= 1 {
        sqlx::query(
            "UPDATE runs n SET mask_artifact = p.mask_artifact, params = p.params
             FROM runs p WHERE n.id = $1 AND p.id = $2",
        )
        .bind(run)
        .bind(prev_id)
        .execute(&mut *tx)
        .await?;
    }
    if step_index >= 2 {
        sqlx::query(
            "UPDATE runs n SET liver_ml = p.liver_ml, tumour_ml = p.tumour_ml,
                 tumour_burden_pct = p.tumour_burden_pct, lesion_count = p.lesion_count
             FROM runs p WHERE n.id = $1 AND p.id = $2",
        )
        .bind(run)
        .bind(prev_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO lesions SELECT $1, number, voxels, volume_ml, centroid_mm,
                 longest_axial_diameter_mm, max_diameter_mm, mean_hu, slice_first, slice_last
             FROM lesions WHERE run_id = $2",
        )
        .bind(run)
        .bind(prev_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO metrics SELECT $1, liver_dice, tumour_dice, lesion_recall, detail
             FROM metrics WHERE run_id = $2",
        )
        .bind(run)
        .bind(prev_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(run)
}
