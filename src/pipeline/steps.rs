//! The steps after ingest. Each reads its inputs, does its work off the async threads, and
//! commits its results with the run's next step and the next job in one fenced transaction.

use std::time::Instant;

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

/// Where a finished report is kept for people: `<data>/reports/NAME` (also an artifact).
fn publish(dir: &std::path::Path, name: &str, html: &[u8]) -> std::io::Result<()> {
    crate::fsutil::write_atomic(&dir.join(name), html)
}

/// The report step: renders the study report (HTML with embedded pictures), stores it, and
/// writes the outbox emails that announce it in the same transaction.
pub async fn report(p: &Pipeline, job: &JobHandle, run: i64) -> Result<(), JobError> {
    let Some(info) = load(p, run).await? else {
        return Ok(());
    };
    let mask_rel = info
        .mask_path
        .clone()
        .ok_or_else(|| JobError::permanent(format!("run {run} has no mask to report")))?;
    let (model_name, model_version, weights): (String, String, String) =
        sqlx::query_as("SELECT name, version, weights_sha256 FROM models WHERE id = $1")
            .bind(info.model_id)
            .fetch_one(&p.pool)
            .await?;
    let (input_sha, notify, timings): (String, Vec<String>, serde_json::Value) = sqlx::query_as(
        "SELECT s.sha256, s.notify, r.timings FROM runs r JOIN studies s ON s.id = r.study_id
         WHERE r.id = $1",
    )
    .bind(run)
    .fetch_one(&p.pool)
    .await?;
    let provenance = crate::report::Provenance {
        model_name,
        model_version,
        weights_sha256: weights,
        code_version: env!("CARGO_PKG_VERSION").to_string(),
        parameters: info.params.to_string(),
        timings: timings.to_string(),
        input_sha256: input_sha,
        run_id: run,
    };
    let stored_metrics: Option<metrics::StudyMetrics> =
        sqlx::query_scalar::<_, serde_json::Value>("SELECT detail FROM metrics WHERE run_id = $1")
            .bind(run)
            .fetch_optional(&p.pool)
            .await?
            .and_then(|v| serde_json::from_value(v).ok());
    let ct_path = p.store.path(&info.ct_path);
    let mask_path = p.store.path(&mask_rel);
    let truth_path = info.truth_path.as_ref().map(|t| p.store.path(t));
    let limits = p.settings.read_limits;
    let store = p.store.clone();
    let study = info.study_id;
    let reports_dir = p.settings.data_dir.join("reports");
    let t = Instant::now();
    let stored = tokio::task::spawn_blocking(move || -> Result<_, JobError> {
        let ct = CtVolume::read(&ct_path, &limits).map_err(nifti_err("CT volume"))?;
        let mask = LabelVolume::read(&mask_path, &limits).map_err(nifti_err("mask"))?;
        let truth = match truth_path {
            Some(tp) => Some(LabelVolume::read(&tp, &limits).map_err(nifti_err("ground truth"))?),
            None => None,
        };
        // The accuracy the analyze step stored (computed again only if it is missing).
        let m = match (&truth, stored_metrics) {
            (Some(_), Some(m)) => Some(m),
            (Some(tr), None) => Some(
                metrics::evaluate(tr, &mask)
                    .map_err(|e| JobError::permanent(format!("ground truth: {e}")))?,
            ),
            (None, _) => None,
        };
        let html = crate::report::render_study(&crate::report::StudyInput {
            study_label: format!("Study {study}"),
            processed: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            ct: &ct,
            mask: &mask,
            truth: truth.as_ref(),
            metrics: m.as_ref(),
            provenance,
            max_figures: 6,
        })
        .map_err(|e| JobError::permanent(format!("report: {e}")))?;
        let stored = store
            .put_bytes(html.as_bytes(), ".html")
            .map_err(|e| JobError::transient(e.to_string()))?;
        publish(
            &reports_dir,
            &format!("study-{study}-run-{run}.html"),
            html.as_bytes(),
        )
        .map_err(|e| JobError::transient(format!("reports folder: {e}")))?;
        Ok(stored)
    })
    .await
    .map_err(blocking_err)??;
    let ms = t.elapsed().as_millis() as u64;
    let recipients = if notify.is_empty() {
        p.settings.mail.default_recipients.clone()
    } else {
        notify
    };
    let mut tx = job.begin().await?;
    let report = artifacts::record(&mut tx, "report", &stored).await?;
    sqlx::query("UPDATE runs SET report_artifact = $2 WHERE id = $1")
        .bind(run)
        .bind(report)
        .execute(&mut *tx)
        .await?;
    let (subject, text, html) = crate::notify::study_message(&p.settings.mail.base_url, study, run);
    for to in &recipients {
        crate::notify::enqueue(
            &mut tx,
            &crate::notify::NewEmail {
                kind: "study",
                recipient: to,
                subject: subject.clone(),
                body_text: text.clone(),
                body_html: html.clone(),
                attachment: Some(report),
                study_id: Some(study),
                run_id: Some(run),
                batch_id: None,
            },
            &p.settings.mail.from,
        )
        .await?;
    }
    runs::advance(&mut tx, run, "notify", "report", ms).await?;
    crate::queue::enqueue(&mut tx, &step_job("notify", run)).await?;
    job.commit(tx).await?;
    tracing::info!(
        run,
        duration_ms = ms,
        emails = recipients.len(),
        "report written"
    );
    Ok(())
}

/// The notify step: the run's emails are in the outbox (each delivered by its own
/// `send_email` job); the run is complete.
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

/// Delivers one outbox email.
pub async fn send_email(p: &Pipeline, job: &JobHandle) -> Result<(), JobError> {
    let id = job
        .job
        .payload
        .get("email_id")
        .and_then(|v| v.as_i64())
        .ok_or_else(|| JobError::permanent("payload has no email_id"))?;
    let Some(email) = crate::notify::get(&p.pool, id).await? else {
        return Err(JobError::permanent(format!("email {id} does not exist")));
    };
    if email.state == "sent" {
        return Ok(());
    }
    if email.state == "failed" {
        // Retried by hand.
        sqlx::query("UPDATE emails SET state = 'pending' WHERE id = $1")
            .bind(id)
            .execute(&p.pool)
            .await?;
    }
    let transport = p.transport()?;
    let attachment = match (p.settings.mail.attach_reports, email.attachment) {
        (true, Some(a)) => {
            let rel = {
                let mut c = p.pool.acquire().await?;
                artifacts::path_of(&mut c, a).await?
            };
            let bytes = tokio::fs::read(p.store.path(&rel))
                .await
                .map_err(|e| JobError::transient(format!("report file: {e}")))?;
            Some((
                format!("hepaflow-report-study-{}.html", email.study_id.unwrap_or(0)),
                bytes,
            ))
        }
        _ => None,
    };
    let sent = match crate::notify::build(&email, &p.settings.mail.from, attachment) {
        Ok(msg) => crate::notify::deliver(&transport, &email, msg).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(()) => {
            let mut tx = job.begin().await?;
            sqlx::query(
                "UPDATE emails SET state = 'sent', sent_at = now(), attempts = attempts + 1,
                     last_error = NULL WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            crate::store::audit::record(
                &mut *tx,
                None,
                "system",
                "email_sent",
                Some(&format!("email:{id}")),
                serde_json::json!({ "kind": email.kind, "recipient": email.recipient }),
            )
            .await?;
            job.commit(tx).await?;
            tracing::info!(email = id, "email sent");
            Ok(())
        }
        Err(e) => {
            crate::notify::record_failure(&p.pool, id, &e.message, e.permanent).await?;
            Err(if e.permanent {
                JobError::permanent(e.message)
            } else {
                JobError::transient(e.message)
            })
        }
    }
}

/// The digest: one page per finished batch that has none yet (its studies, failures and
/// accuracy), stored and announced to the digest's recipients.
pub async fn digest(p: &Pipeline, job: &JobHandle) -> Result<(), JobError> {
    let own_batch = job.job.payload.get("batch_id").and_then(|b| b.as_i64());
    let only = job.job.payload.get("for_batch").and_then(|b| b.as_i64());
    let recipients: Vec<String> = match own_batch {
        Some(b) => sqlx::query_scalar("SELECT notify FROM batches WHERE id = $1")
            .bind(b)
            .fetch_optional(&p.pool)
            .await?
            .unwrap_or_default(),
        None => vec![],
    };
    let recipients = if recipients.is_empty() {
        p.settings.mail.default_recipients.clone()
    } else {
        recipients
    };
    // Batches whose runs have all finished and that have no digest yet.
    let batches: Vec<i64> = sqlx::query_scalar(
        "SELECT b.id FROM batches b
         WHERE b.digest_artifact IS NULL AND ($1::bigint IS NULL OR b.id = $1)
           AND EXISTS (SELECT 1 FROM runs r WHERE r.batch_id = b.id)
           AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.batch_id = b.id
                           AND r.state IN ('pending', 'running'))
         ORDER BY b.id",
    )
    .bind(only)
    .fetch_all(&p.pool)
    .await?;
    for batch in batches {
        type Row = (
            i64,
            i64,
            String,
            Option<i32>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<serde_json::Value>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT r.study_id, r.id, r.state, r.lesion_count, r.liver_ml, r.tumour_ml,
                    x.liver_dice, x.tumour_dice, x.detail, r.error
             FROM runs r LEFT JOIN metrics x ON x.run_id = r.id
             WHERE r.batch_id = $1 ORDER BY r.study_id",
        )
        .bind(batch)
        .fetch_all(&p.pool)
        .await?;
        let quarantined: Vec<(String, String)> =
            sqlx::query_as("SELECT sha256, reason FROM quarantine WHERE batch_id = $1 ORDER BY id")
                .bind(batch)
                .fetch_all(&p.pool)
                .await?;
        let studies: Vec<crate::report::digest::DigestStudy> = rows
            .iter()
            .map(|r| crate::report::digest::DigestStudy {
                study: r.0,
                run: r.1,
                state: r.2.clone(),
                lesions: r.3,
                liver_ml: r.4,
                tumour_ml: r.5,
                liver_dice: r.6,
                tumour_dice: r.7,
                truth_liver_ml: r
                    .8
                    .as_ref()
                    .and_then(|d| d.pointer("/liver/truth_ml")?.as_f64()),
                truth_tumour_ml: r
                    .8
                    .as_ref()
                    .and_then(|d| d.pointer("/tumour/truth_ml")?.as_f64()),
                link: format!("study-{}-run-{}.html", r.0, r.1),
            })
            .collect();
        let mut failures: Vec<crate::report::digest::DigestFailure> = rows
            .iter()
            .filter(|r| r.2 == "failed")
            .map(|r| crate::report::digest::DigestFailure {
                what: format!("study {} (run {})", r.0, r.1),
                reason: r.9.clone().unwrap_or_default(),
            })
            .collect();
        failures.extend(quarantined.into_iter().map(|(sha, reason)| {
            crate::report::digest::DigestFailure {
                what: format!("file {} (quarantined)", &sha[..12]),
                reason,
            }
        }));
        let input = crate::report::digest::DigestInput {
            title: format!("hepaflow digest: batch {batch}"),
            generated: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            studies,
            failures,
        };
        let html = crate::report::digest::render(&input)
            .map_err(|e| JobError::permanent(format!("digest: {e}")))?;
        let stored = p
            .store
            .put_bytes(html.as_bytes(), ".html")
            .map_err(|e| JobError::transient(e.to_string()))?;
        publish(
            &p.settings.data_dir.join("reports"),
            &format!("digest-batch-{batch}.html"),
            html.as_bytes(),
        )
        .map_err(|e| JobError::transient(format!("reports folder: {e}")))?;
        let failed = input.failures.len();
        let mut tx = p.pool.begin().await?;
        let art = artifacts::record(&mut tx, "digest", &stored).await?;
        sqlx::query("UPDATE batches SET digest_artifact = $2 WHERE id = $1")
            .bind(batch)
            .bind(art)
            .execute(&mut *tx)
            .await?;
        let (subject, text, body) =
            crate::notify::digest_message(&p.settings.mail.base_url, batch, rows.len(), failed);
        for to in &recipients {
            crate::notify::enqueue(
                &mut tx,
                &crate::notify::NewEmail {
                    kind: "digest",
                    recipient: to,
                    subject: subject.clone(),
                    body_text: text.clone(),
                    body_html: body.clone(),
                    attachment: Some(art),
                    study_id: None,
                    run_id: None,
                    batch_id: Some(batch),
                },
                &p.settings.mail.from,
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(batch, studies = rows.len(), "digest written");
    }
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
