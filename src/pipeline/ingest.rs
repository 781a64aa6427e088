//! Ingest: find complete files in the inbox (or given paths), hash them, copy them into the
//! artifact store, validate them, pair ground truth, and create one study per distinct
//! content with its first run and `segment` job — in one transaction. A file that is not a
//! valid CT volume goes to `quarantine/` with a `reason.json`. The original files are only
//! ever read.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;

use super::Pipeline;
use crate::fsutil;
use crate::queue::JobError;
use crate::queue::worker::JobHandle;
use crate::store::artifacts::{self, Stored};
use crate::volume::{CtVolume, LabelVolume};

/// What became of one file.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A new study with its first run.
    Study { study: i64, run: i64, truth: bool },
    /// The same content is already a study.
    Duplicate { study: i64 },
    /// Not a usable file; kept in quarantine with the reason.
    Quarantined { reason: String },
    /// A ground-truth mask that was paired with its volume (or attached to its study).
    Truth { study: Option<i64> },
    /// Still being written (no `.done` marker, changed within the settle time).
    NotReady,
    /// Looked at before and unchanged.
    Seen,
    /// Could not be read now (kept in the inbox for the next scan).
    Error { reason: String },
}

/// One file and its outcome. `file` is the name as given, for the admin's eyes only.
#[derive(Clone, Debug, Serialize)]
pub struct Ingested {
    pub file: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

fn nifti_ext(name: &str) -> Option<&'static str> {
    if name.ends_with(".nii.gz") {
        Some(".nii.gz")
    } else if name.ends_with(".nii") {
        Some(".nii")
    } else {
        None
    }
}

/// The volume a ground-truth file belongs to (file stem without extension), by LiTS naming
/// (`segmentation-K` ↔ `volume-K`) or the `NAME_seg` ↔ `NAME` convention.
fn truth_of(stem: &str) -> Option<String> {
    if let Some(k) = stem.strip_prefix("segmentation-") {
        return Some(format!("volume-{k}"));
    }
    stem.strip_suffix("_seg").map(str::to_string)
}

fn stem_of(path: &Path) -> Option<(String, &'static str)> {
    let name = path.file_name()?.to_str()?;
    let ext = nifti_ext(name)?;
    Some((name[..name.len() - ext.len()].to_string(), ext))
}

/// The NIfTI files (`.nii`, `.nii.gz`) under `paths` (folders walked recursively; hidden
/// files skipped).
fn candidates(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                if !hidden {
                    stack.push(e.path());
                }
            }
        } else if stem_of(&p).is_some() {
            // Other files (`.done` markers, notes, previews) are not studies.
            out.push(p);
        }
    }
    out.sort();
    out
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Complete: a `NAME.done` marker exists, or the file has not changed for `settle`.
fn complete(path: &Path, meta: &std::fs::Metadata, settle: Option<Duration>) -> bool {
    let Some(settle) = settle else { return true };
    let mut marker = path.as_os_str().to_owned();
    marker.push(".done");
    if Path::new(&marker).exists() {
        return true;
    }
    meta.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= settle)
}

/// Ingests `paths`. With `settle`, files still being written are left for later.
pub async fn ingest(
    p: &Pipeline,
    paths: &[PathBuf],
    batch: Option<i64>,
    settle: Option<Duration>,
) -> Result<Vec<Ingested>, JobError> {
    let model = super::ensure_model(&p.pool, &p.store, &p.settings)
        .await
        .map_err(|e| JobError::transient(format!("no model to run: {e}")))?;
    let files = candidates(paths);
    let mut out = Vec::new();
    // Volumes first, each with its truth; truths without a volume in this scan afterwards.
    let mut paired_truths = std::collections::HashSet::new();
    let by_stem: std::collections::HashMap<(PathBuf, String), PathBuf> = files
        .iter()
        .filter_map(|f| {
            let (stem, _) = stem_of(f)?;
            Some(((f.parent()?.to_path_buf(), stem), f.clone()))
        })
        .collect();
    for f in &files {
        let name = f.display().to_string();
        let Some((stem, _)) = stem_of(f) else {
            continue;
        };
        if truth_of(&stem).is_some_and(|v| {
            let dir = f.parent().unwrap_or(Path::new("")).to_path_buf();
            by_stem.contains_key(&(dir, v))
        }) {
            continue; // handled with its volume
        }
        if truth_of(&stem).is_some() {
            let outcome = attach_late_truth(p, f, settle).await;
            out.push(Ingested {
                file: name,
                outcome,
            });
            continue;
        }
        let dir = f.parent().unwrap_or(Path::new("")).to_path_buf();
        let truth = [
            format!("segmentation-{}", stem.trim_start_matches("volume-")),
            format!("{stem}_seg"),
        ]
        .into_iter()
        .filter(|t| stem.starts_with("volume-") || !t.starts_with("segmentation-"))
        .find_map(|t| by_stem.get(&(dir.clone(), t)).cloned());
        if let Some(t) = &truth {
            paired_truths.insert(t.clone());
        }
        let (outcome, truth_outcome) =
            ingest_volume(p, f, truth.as_deref(), model, batch, settle).await;
        out.push(Ingested {
            file: name,
            outcome,
        });
        if let (Some(t), Some(o)) = (truth, truth_outcome) {
            out.push(Ingested {
                file: t.display().to_string(),
                outcome: o,
            });
        }
    }
    Ok(out)
}

async fn seen_before(
    p: &Pipeline,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<bool, sqlx::Error> {
    let hit: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM inbox_files WHERE path = $1 AND bytes = $2 AND mtime_ns = $3",
    )
    .bind(path.display().to_string())
    .bind(meta.len() as i64)
    .bind(mtime_ns(meta))
    .fetch_optional(&p.pool)
    .await?;
    Ok(hit.is_some())
}

async fn remember(
    conn: &mut sqlx::PgConnection,
    path: &Path,
    meta: &std::fs::Metadata,
    sha: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inbox_files (path, bytes, mtime_ns, sha256, outcome) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (path) DO UPDATE SET bytes = $2, mtime_ns = $3, sha256 = $4, outcome = $5,
             seen_at = now()",
    )
    .bind(path.display().to_string())
    .bind(meta.len() as i64)
    .bind(mtime_ns(meta))
    .bind(sha)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(())
}

async fn store_file(p: &Pipeline, path: &Path) -> Result<Stored, String> {
    let store = p.store.clone();
    let src = path.to_path_buf();
    let ext = stem_of(path).map_or(".bin", |(_, e)| e);
    tokio::task::spawn_blocking(move || store.put_file(&src, ext))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Removes a stored copy that no row points to (a rejected file).
async fn forget_copy(p: &Pipeline, stored: &Stored) {
    let referenced: Option<i64> = sqlx::query_scalar("SELECT id FROM artifacts WHERE sha256 = $1")
        .bind(&stored.sha256)
        .fetch_optional(&p.pool)
        .await
        .unwrap_or(Some(0));
    if referenced.is_none() {
        let _ = std::fs::remove_file(p.store.path(&stored.path));
    }
}

/// Why a file was rejected, kept beside its quarantined copy.
async fn quarantine(
    p: &Pipeline,
    path: &Path,
    meta: &std::fs::Metadata,
    stored: &Stored,
    reason: &str,
    batch: Option<i64>,
) -> Result<(), String> {
    let dir = p.folders.quarantine.clone();
    let ext = stem_of(path).map_or(".bin", |(_, e)| e);
    let dest = dir.join(format!("{}{ext}", stored.sha256));
    let src = p.store.path(&stored.path);
    let note = json!({
        "file": path.display().to_string(),
        "sha256": stored.sha256,
        "bytes": stored.bytes,
        "reason": reason,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    let dest2 = dest.clone();
    let reason_path = dir.join(format!("{}.reason.json", stored.sha256));
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let tmp = fsutil::temp_in(&dir);
        std::fs::copy(&src, &tmp)?;
        fsutil::commit_temp(&tmp, &dest2)?;
        let note = serde_json::to_vec_pretty(&note).unwrap_or_default();
        fsutil::write_atomic(&reason_path, &note)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("quarantine: {e}"))?;
    let mut tx = p.pool.begin().await.map_err(|e| e.to_string())?;
    sqlx::query(
        "INSERT INTO quarantine (sha256, source_name, reason, path, batch_id)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (sha256) DO NOTHING",
    )
    .bind(&stored.sha256)
    .bind(path.display().to_string())
    .bind(reason)
    .bind(dest.display().to_string())
    .bind(batch)
    .execute(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    remember(&mut tx, path, meta, &stored.sha256, "quarantined")
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    forget_copy(p, stored).await;
    tracing::warn!(sha256 = %stored.sha256, "file quarantined");
    Ok(())
}

fn error(reason: impl std::fmt::Display) -> Outcome {
    Outcome::Error {
        reason: reason.to_string(),
    }
}

async fn ingest_volume(
    p: &Pipeline,
    path: &Path,
    truth: Option<&Path>,
    model: i64,
    batch: Option<i64>,
    settle: Option<Duration>,
) -> (Outcome, Option<Outcome>) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return (error(e), None),
    };
    if !complete(path, &meta, settle) {
        return (Outcome::NotReady, None);
    }
    let truth_meta = truth.and_then(|t| std::fs::metadata(t).ok());
    if let (Some(t), Some(m)) = (truth, &truth_meta)
        && !complete(t, m, settle)
    {
        // Wait for the pair, so the study gets its ground truth.
        return (Outcome::NotReady, Some(Outcome::NotReady));
    }
    match seen_before(p, path, &meta).await {
        Ok(true) => return (Outcome::Seen, truth.map(|_| Outcome::Seen)),
        Ok(false) => {}
        Err(e) => return (error(e), None),
    }
    let stored = match store_file(p, path).await {
        Ok(s) => s,
        Err(e) => return (error(e), None),
    };
    let existing: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT id FROM studies WHERE sha256 = $1")
            .bind(&stored.sha256)
            .fetch_optional(&p.pool)
            .await;
    match existing {
        Ok(Some(study)) => {
            if let Ok(mut c) = p.pool.acquire().await {
                let _ = remember(&mut c, path, &meta, &stored.sha256, "duplicate").await;
            }
            return (
                Outcome::Duplicate { study },
                truth.map(|_| Outcome::Truth { study: Some(study) }),
            );
        }
        Ok(None) => {}
        Err(e) => return (error(e), None),
    }
    // Validate the stored copy (immutable), not the inbox file.
    let limits = p.settings.read_limits;
    let ct_path = p.store.path(&stored.path);
    let geometry = tokio::task::spawn_blocking(move || {
        CtVolume::read(&ct_path, &limits).map(|ct| ct.geometry().clone())
    })
    .await;
    let geometry = match geometry {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            let reason = format!("not a usable CT volume: {e}");
            return match quarantine(p, path, &meta, &stored, &reason, batch).await {
                Ok(()) => (Outcome::Quarantined { reason }, None),
                Err(q) => (error(q), None),
            };
        }
        Err(e) => return (error(e), None),
    };
    // Ground truth: stored and checked against the volume's grid; a bad one is quarantined
    // and the study goes on without it.
    let mut truth_stored = None;
    let mut truth_outcome = None;
    if let (Some(t), Some(tm)) = (truth, &truth_meta) {
        match store_file(p, t).await {
            Ok(ts) => {
                let limits = p.settings.read_limits;
                let tp = p.store.path(&ts.path);
                let shape = geometry.shape();
                let check = tokio::task::spawn_blocking(move || {
                    LabelVolume::read(&tp, &limits).map(|m| m.geometry().shape())
                })
                .await;
                let problem = match check {
                    Ok(Ok(s)) if s == shape => None,
                    Ok(Ok(s)) => Some(format!(
                        "ground truth shape {s:?} does not match its volume's {shape:?}"
                    )),
                    Ok(Err(e)) => Some(format!("not a usable label mask: {e}")),
                    Err(e) => Some(e.to_string()),
                };
                match problem {
                    None => truth_stored = Some((ts, tm.clone())),
                    Some(reason) => {
                        let _ = quarantine(p, t, tm, &ts, &reason, batch).await;
                        truth_outcome = Some(Outcome::Quarantined { reason });
                    }
                }
            }
            Err(e) => truth_outcome = Some(error(e)),
        }
    }
    let result: Result<Option<(i64, i64)>, sqlx::Error> = async {
        let mut tx = p.pool.begin().await?;
        let ct = artifacts::record(&mut tx, "ct", &stored).await?;
        let gt = match &truth_stored {
            Some((ts, _)) => Some(artifacts::record(&mut tx, "truth", ts).await?),
            None => None,
        };
        let notify: Vec<String> = match batch {
            Some(b) => sqlx::query_scalar("SELECT notify FROM batches WHERE id = $1")
                .bind(b)
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or_default(),
            None => vec![],
        };
        let shape: Vec<i32> = geometry.shape().iter().map(|&n| n as i32).collect();
        let spacing: Vec<f64> = geometry.spacing_mm().to_vec();
        let study: Option<i64> = sqlx::query_scalar(
            "INSERT INTO studies (sha256, ct_artifact, truth_artifact, source_name, shape,
                 spacing_mm, notify, batch_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (sha256) DO NOTHING RETURNING id",
        )
        .bind(&stored.sha256)
        .bind(ct)
        .bind(gt)
        .bind(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
        .bind(shape)
        .bind(spacing)
        .bind(notify)
        .bind(batch)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(study) = study else {
            return Ok(None);
        };
        let run = super::start_run(&mut tx, study, model, batch, None, "segment").await?;
        remember(&mut tx, path, &meta, &stored.sha256, "study").await?;
        if let (Some(t), Some((ts, tm))) = (truth, &truth_stored) {
            remember(&mut tx, t, tm, &ts.sha256, "truth").await?;
        }
        tx.commit().await?;
        Ok(Some((study, run)))
    }
    .await;
    match result {
        Ok(Some((study, run))) => {
            tracing::info!(study, run, truth = truth_stored.is_some(), "study ingested");
            let t = truth_outcome.or(truth_stored.map(|_| Outcome::Truth { study: Some(study) }));
            (
                Outcome::Study {
                    study,
                    run,
                    truth: t == Some(Outcome::Truth { study: Some(study) }),
                },
                t,
            )
        }
        // Another ingest took the same content a moment earlier.
        Ok(None) => (
            error("ingested concurrently; will be seen as a duplicate"),
            None,
        ),
        Err(e) => (error(e), None),
    }
}

/// A ground-truth file whose volume is not in this scan: attached to the study of its
/// volume if that study has none yet.
async fn attach_late_truth(p: &Pipeline, path: &Path, settle: Option<Duration>) -> Outcome {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return error(e),
    };
    if !complete(path, &meta, settle) {
        return Outcome::NotReady;
    }
    match seen_before(p, path, &meta).await {
        Ok(true) => return Outcome::Seen,
        Ok(false) => {}
        Err(e) => return error(e),
    }
    let Some((stem, _)) = stem_of(path) else {
        return Outcome::Truth { study: None };
    };
    let volume_stem = truth_of(&stem).unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new(""));
    let volume_paths: Vec<String> = [".nii.gz", ".nii"]
        .iter()
        .map(|e| dir.join(format!("{volume_stem}{e}")).display().to_string())
        .collect();
    let study: Option<(i64, Option<i64>, Vec<i32>)> = sqlx::query_as(
        "SELECT s.id, s.truth_artifact, s.shape FROM inbox_files f JOIN studies s ON s.sha256 = f.sha256
         WHERE f.path = ANY($1) LIMIT 1",
    )
    .bind(&volume_paths)
    .fetch_optional(&p.pool)
    .await
    .unwrap_or(None);
    let Some((study, None, shape)) = study else {
        // No study yet (the volume comes later) or it has its truth: nothing to do now.
        return Outcome::Truth { study: None };
    };
    let ts = match store_file(p, path).await {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let limits = p.settings.read_limits;
    let tp = p.store.path(&ts.path);
    let ok = tokio::task::spawn_blocking(move || {
        LabelVolume::read(&tp, &limits).map(|m| m.geometry().shape())
    })
    .await
    .ok()
    .and_then(|r| r.ok())
    .is_some_and(|s| s.iter().zip(&shape).all(|(a, b)| *a as i32 == *b));
    if !ok {
        let reason = "not a label mask on its volume's grid".to_string();
        let _ = quarantine(p, path, &meta, &ts, &reason, None).await;
        return Outcome::Quarantined { reason };
    }
    let r: Result<(), sqlx::Error> = async {
        let mut tx = p.pool.begin().await?;
        let gt = artifacts::record(&mut tx, "truth", &ts).await?;
        sqlx::query(
            "UPDATE studies SET truth_artifact = $2 WHERE id = $1 AND truth_artifact IS NULL",
        )
        .bind(study)
        .bind(gt)
        .execute(&mut *tx)
        .await?;
        remember(&mut tx, path, &meta, &ts.sha256, "truth").await?;
        tx.commit().await
    }
    .await;
    match r {
        Ok(()) => Outcome::Truth { study: Some(study) },
        Err(e) => error(e),
    }
}

/// The `scan_inbox` job: ingests the inbox into the job's batch, waiting a little for files
/// still being written.
pub async fn scan_job(p: &Pipeline, job: &JobHandle) -> Result<(), JobError> {
    let batch = match job.job.payload.get("batch_id").and_then(|b| b.as_i64()) {
        Some(b) => b,
        None => {
            sqlx::query_scalar("INSERT INTO batches DEFAULT VALUES RETURNING id")
                .fetch_one(&p.pool)
                .await?
        }
    };
    std::fs::create_dir_all(&p.folders.inbox)
        .map_err(|e| JobError::transient(format!("inbox folder: {e}")))?;
    let settle = p.settings.inbox_settle;
    let waited_max = settle * 3;
    let started = std::time::Instant::now();
    let mut totals = std::collections::BTreeMap::<&'static str, u64>::new();
    loop {
        let results = ingest(
            p,
            std::slice::from_ref(&p.folders.inbox),
            Some(batch),
            Some(settle),
        )
        .await?;
        let mut not_ready = 0;
        for r in &results {
            let key = match r.outcome {
                Outcome::Study { .. } => "studies",
                Outcome::Duplicate { .. } => "duplicates",
                Outcome::Quarantined { .. } => "quarantined",
                Outcome::Truth { .. } => "truths",
                Outcome::NotReady => {
                    not_ready += 1;
                    continue;
                }
                Outcome::Seen => continue,
                Outcome::Error { .. } => "errors",
            };
            *totals.entry(key).or_default() += 1;
        }
        if not_ready == 0 || started.elapsed() > waited_max {
            totals.insert("not_ready", not_ready);
            break;
        }
        tokio::time::sleep(settle / 2).await;
    }
    tracing::info!(batch, totals = ?totals, "inbox scanned");
    let mut tx = job.begin().await?;
    sqlx::query("UPDATE jobs SET payload = payload || $2 WHERE id = $1")
        .bind(job.job.id)
        .bind(json!({"batch_id": batch, "result": totals}))
        .execute(&mut *tx)
        .await?;
    job.commit(tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_names_pair_with_their_volumes() {
        assert_eq!(truth_of("segmentation-12").as_deref(), Some("volume-12"));
        assert_eq!(truth_of("case7_seg").as_deref(), Some("case7"));
        assert_eq!(truth_of("volume-12"), None);
        assert_eq!(
            stem_of(Path::new("/x/volume-3.nii.gz")),
            Some(("volume-3".into(), ".nii.gz"))
        );
        assert_eq!(stem_of(Path::new("notes.txt")), None);
    }
}
