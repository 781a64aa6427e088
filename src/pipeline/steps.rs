//! The steps after ingest. Each reads its inputs, does its work off the async threads, and
//! commits its results with the run's next step and the next job in one fenced transaction.

use std::time::Instant;

use serde_json::json;

use super::{Pipeline, step_job};
use crate::lesions;
use crate::metrics;
use crate::queue::JobError;
use crate::queue::worker::JobHandle;
use crate::segment::{InferOptions, Mode, ModelError};
use crate::store::{artifacts, runs};
use crate::volume::{CtVolume, LabelVolume, NiftiError};

fn nifti_err(what: &str) -> impl FnOnce(NiftiError) -> JobError + '_ {
    move |e| JobError::permanent(format!("{what}: {e}"))
}

fn blocking_err(e: tokio::task::JoinError) -> JobError {
    JobError::transient(format!("worker thread: {e}"))
}

/// Loads the run, or says why the step has nothing to do.
async fn load(p: &Pipeline, run: i64) -> Result<Option<runs::RunInfo>, JobError> {
    let info = runs::info(&p.pool, run)
        .await?
        .ok_or_else(|| JobError::permanent(format!("run {run} does not exist")))?;
    if info.state == "cancelled" || info.state == "failed" {
        tracing::info!(run, state = %info.state, "run no longer active; step skipped");
        return Ok(None);
    }
    Ok(Some(info))
}

fn options(params: &serde_json::Value) -> InferOptions {
    let mut o = InferOptions::default();
    if params.get("mode").and_then(|m| m.as_str()) == Some("patch") {
        o.mode = Mode::Patch;
    }
    if let Some(s) = params.get("stride").and_then(|s| s.as_i64()) {
        o.stride = s.clamp(1, 16);
    }
    o
}

pub async fn segment(p: &Pipeline, job: &JobHandle, run: i64) -> Result<(), JobError> {
    let Some(info) = load(p, run).await? else {
        return Ok(());
    };
    runs::started(&p.pool, run).await?;
    let clf = p.classifier(info.model_id, &info.model_dir).await?;
    let ct_path = p.store.path(&info.ct_path);
    let limits = p.settings.read_limits;
    let store = p.store.clone();
    let opts = options(&info.params);
    let t = Instant::now();
    let stored = tokio::task::spawn_blocking(move || -> Result<_, JobError> {
        let ct = CtVolume::read(&ct_path, &limits).map_err(nifti_err("CT volume"))?;
        let mask = {
            let clf = clf
                .lock()
                .map_err(|_| JobError::transient("the model thread panicked earlier"))?;
            clf.segment(&ct, &opts).map_err(|e| match e {
                ModelError::Input { .. } => JobError::permanent(e.to_string()),
                _ => JobError::transient(e.to_string()),
            })?
        };
        let stored = store
            .put_with(".nii.gz", |tmp| mask.write(tmp))
            .map_err(|e| JobError::transient(format!("writing the mask: {e}")))?
            .map_err(|e| JobError::transient(e.to_string()))?;
        Ok(stored)
    })
    .await
    .map_err(blocking_err)??;
    let ms = t.elapsed().as_millis() as u64;
    let mut tx = job.begin().await?;
    let mask = artifacts::record(&mut tx, "mask", &stored).await?;
    sqlx::query("UPDATE runs SET mask_artifact = $2 WHERE id = $1")
        .bind(run)
        .bind(mask)
        .execute(&mut *tx)
        .await?;
    runs::advance(&mut tx, run, "analyze", "segment", ms).await?;
    crate::queue::enqueue(&mut tx, &step_job("analyze", run)).await?;
    job.commit(tx).await?;
    tracing::info!(run, duration_ms = ms, "segmented");
    Ok(())
}

pub async fn analyze(p: &Pipeline, job: &JobHandle, run: i64) -> Result<(), JobError> {
    let Some(info) = load(p, run).await? else {
        return Ok(());
    };
    runs::started(&p.pool, run).await?;
    let mask_rel = info
        .mask_path
        .clone()
        .ok_or_else(|| JobError::permanent(format!("run {run} has no mask to analyze")))?;
    let mask_path = p.store.path(&mask_rel);
    let ct_path = p.store.path(&info.ct_path);
    let truth_path = info.truth_path.as_ref().map(|t| p.store.path(t));
    let limits = p.settings.read_limits;
    let t = Instant::now();
    let (report, study_metrics) = tokio::task::spawn_blocking(move || -> Result<_, JobError> {
        let ct = CtVolume::read(&ct_path, &limits).map_err(nifti_err("CT volume"))?;
        let mask = LabelVolume::read(&mask_path, &limits).map_err(nifti_err("mask"))?;
        let report = lesions::analyze(&mask, Some(&ct));
        let m = match truth_path {
            Some(tp) => {
                let truth = LabelVolume::read(&tp, &limits).map_err(nifti_err("ground truth"))?;
                Some(
                    metrics::evaluate(&truth, &mask)
                        .map_err(|e| JobError::permanent(format!("ground truth: {e}")))?,
                )
            }
            None => None,
        };
        Ok((report, m))
    })
    .await
    .map_err(blocking_err)??;
    let ms = t.elapsed().as_millis() as u64;
    let mut tx = job.begin().await?;
    for l in &report.lesions {
        sqlx::query(
            "INSERT INTO lesions (run_id, number, voxels, volume_ml, centroid_mm,
                 longest_axial_diameter_mm, max_diameter_mm, mean_hu, slice_first, slice_last)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (run_id, number) DO NOTHING",
        )
        .bind(run)
        .bind(l.id as i32)
        .bind(l.voxels as i64)
        .bind(l.volume_ml)
        .bind(l.centroid_mm.to_vec())
        .bind(l.longest_axial_diameter_mm)
        .bind(l.max_diameter_mm)
        .bind(l.mean_hu)
        .bind(l.slice_range[0] as i32)
        .bind(l.slice_range[1] as i32)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(m) = &study_metrics {
        let full = serde_json::to_value(m).map_err(|e| JobError::permanent(e.to_string()))?;
        sqlx::query(
            "INSERT INTO metrics (run_id, liver_dice, tumour_dice, lesion_recall, detail)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(run)
        .bind(m.liver.dice)
        .bind(m.tumour.dice)
        .bind(m.detection.recall)
        .bind(full)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "UPDATE runs SET liver_ml = $2, tumour_ml = $3, tumour_burden_pct = $4, lesion_count = $5
         WHERE id = $1",
    )
    .bind(run)
    .bind(report.liver_ml)
    .bind(report.tumour_ml)
    .bind(report.tumour_burden_pct)
    .bind(report.lesions.len() as i32)
    .execute(&mut *tx)
    .await?;
    runs::advance(&mut tx, run, "report", "analyze", ms).await?;
    crate::queue::enqueue(&mut tx, &step_job("report", run)).await?;
    job.commit(tx).await?;
    tracing::info!(
        run,
        lesions = report.lesions.len(),
        duration_ms = ms,
        "analyzed"
    );
    Ok(())
}

/// The report step. Rendering arrives with the reports module; until then the step records
/// that the run's results are complete and moves on.
pub async fn report(p: &Pipeline, job: &JobHandle, run: i64) -> Result<(), JobError> {
    if load(p, run).await?.is_none() {
        return Ok(());
    }
    let mut tx = job.begin().await?;
    runs::advance(&mut tx, run, "notify", "report", 0).await?;
    crate::queue::enqueue(&mut tx, &step_job("notify", run)).await?;
    job.commit(tx).await?;
    Ok(())
}

/// The notify step: closes the run. Email delivery arrives with the notify module.
pub async fn notify(p: &Pipeline, job: &JobHandle, run: i64) -> Result<(), JobError> {
    if load(p, run).await?.is_none() {
        return Ok(());
    }
    let mut tx = job.begin().await?;
    runs::advance(&mut tx, run, "done", "notify", 0).await?;
    job.commit(tx).await?;
    tracing::info!(run, "run done");
    Ok(())
}

/// The digest of a schedule's batches: counts what the batches since the previous digest
/// hold and records it on the job (rendering and mail arrive with the reports module).
pub async fn digest(p: &Pipeline, job: &JobHandle) -> Result<(), JobError> {
    let summary: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'done'),
                count(*) FILTER (WHERE state = 'failed')
         FROM runs WHERE created_at > now() - interval '1 day'",
    )
    .fetch_one(&p.pool)
    .await?;
    let mut tx = job.begin().await?;
    sqlx::query("UPDATE jobs SET payload = payload || $2 WHERE id = $1")
        .bind(job.job.id)
        .bind(json!({"runs": summary.0, "done": summary.1, "failed": summary.2}))
        .execute(&mut *tx)
        .await?;
    job.commit(tx).await?;
    Ok(())
}

/// A queue self-check job: optionally records that it started, sleeps, fails, and records
/// its completion in `probe_effects` in the same transaction as the completion itself.
/// Payload: `{"record_start": bool, "sleep_ms": N, "fail": "transient"|"permanent"}`.
pub async fn probe(job: &JobHandle) -> Result<(), JobError> {
    let p = &job.job.payload;
    if p.get("record_start").and_then(|v| v.as_bool()) == Some(true) {
        sqlx::query(
            "INSERT INTO probe_effects (job_id, attempt, worker, phase) VALUES ($1, $2, $3, 'start')",
        )
        .bind(job.job.id)
        .bind(job.job.attempt)
        .bind(&job.job.worker)
        .execute(&job.pool)
        .await?;
    }
    if let Some(ms) = p.get("sleep_ms").and_then(|v| v.as_u64()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    match p.get("fail").and_then(|v| v.as_str()) {
        Some("transient") => return Err(JobError::transient("probe: asked to fail (transient)")),
        Some("permanent") => return Err(JobError::permanent("probe: asked to fail (permanent)")),
        _ => {}
    }
    let mut tx = job.begin().await?;
    sqlx::query(
        "INSERT INTO probe_effects (job_id, attempt, worker, phase) VALUES ($1, $2, $3, 'commit')",
    )
    .bind(job.job.id)
    .bind(job.job.attempt)
    .bind(&job.job.worker)
    .execute(&mut *tx)
    .await?;
    job.commit(tx).await?;
    Ok(())
}
