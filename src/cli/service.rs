//! Service commands: `run`, `worker`, `scheduler`, `migrate`, `ingest`, `studies`, `jobs`,
//! `rerun`, `models`, `schedules`. Each opens the store (the embedded cluster when there is
//! no `DATABASE_URL`) on its own tokio runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::pipeline::{self, Pipeline, ingest};
use crate::queue::worker::{self, WorkerConfig};
use crate::queue::{self, scheduler};
use crate::segment;
use crate::store::{Db, models, studies};

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(anyhow::anyhow!("cannot start the async runtime: {e}")))
}

pub(super) async fn open(settings: &Settings, connections: u32) -> Result<Db, Failure> {
    Db::open(settings, connections)
        .await
        .map_err(|e| Failure::Other(e.into()))
}

/// Opens the store for a long-running service: waits for a database that is not up yet
/// (`HEPAFLOW_DB_WAIT_MS`); `None` when `stop` came first.
pub(super) async fn open_service(
    settings: &Settings,
    connections: u32,
    stop: &CancellationToken,
) -> Result<Option<Db>, Failure> {
    tokio::select! {
        db = Db::open_waiting(settings, connections) => db.map(Some).map_err(|e| Failure::Other(e.into())),
        _ = stop.cancelled() => Ok(None),
    }
}

pub(super) fn db_err(e: sqlx::Error) -> Failure {
    Failure::Other(anyhow::anyhow!("database: {e}"))
}

/// Cancelled on SIGTERM or SIGINT.
pub(super) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested: finishing running jobs");
        t.cancel();
    });
    token
}

pub(super) fn print_json<T: Serialize>(v: &T) -> CmdResult {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as aligned columns.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        println!("(none)");
    }
    for r in rows {
        line(r);
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}
fn ml(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}
pub(super) fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `gpu,cpu`, `gpu=1,cpu=4`: queue names with optional concurrency.
pub fn parse_queues(spec: &str, default_cpu: usize) -> Result<Vec<(String, usize)>, String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = match part.split_once('=') {
            Some((n, c)) => (
                n.trim(),
                c.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| (1..=256).contains(&c))
                    .ok_or_else(|| {
                        format!("--queues {spec:?}: {c:?} is not a count from 1 to 256")
                    })?,
            ),
            None => (part, if part == "gpu" { 1 } else { default_cpu }),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!("--queues {spec:?}: {name:?} is not a queue name"));
        }
        if out.iter().any(|(q, _)| q == name) {
            return Err(format!("--queues {spec:?}: {name} given twice"));
        }
        out.push((name.to_string(), n));
    }
    if out.is_empty() {
        return Err("--queues: name at least one queue".into());
    }
    Ok(out)
}

fn device(spec: &str) -> Result<tch::Device, Failure> {
    segment::parse_device(spec).map_err(|e| Failure::Other(e.into()))
}

fn load_schedules(settings: &Settings) -> Result<Vec<scheduler::Schedule>, Failure> {
    if !settings.jobs_dir.is_dir() {
        tracing::warn!("no schedules folder; running without schedules");
        return Ok(vec![]);
    }
    scheduler::load_dir(&settings.jobs_dir).map_err(|e| Failure::BadInput(e.into()))
}

// ---------------------------------------------------------------------------------------
// run

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Process what is in the inbox, run all due work, print where the results are, exit.
    #[arg(long)]
    pub once: bool,
    /// Device for the segmentation model.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Jobs of the cpu queue run at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
}

pub fn run(args: RunArgs, settings: &Settings) -> CmdResult {
    let device = device(&args.device)?;
    runtime()?.block_on(async {
        let db = open(settings, 16).await?;
        let result = run_inner(&args, settings, &db, device).await;
        db.close().await;
        result
    })
}

async fn run_inner(args: &RunArgs, settings: &Settings, db: &Db, device: tch::Device) -> CmdResult {
    let p = Arc::new(Pipeline::new(db.pool.clone(), settings.clone(), device));
    std::fs::create_dir_all(&p.folders.inbox)?;
    pipeline::ensure_model(&db.pool, &p.store, settings)
        .await
        .map_err(|e| {
            Failure::Other(anyhow::anyhow!(
                "no model is registered, and the default model (HEPAFLOW_DEFAULT_MODEL) could not be: {e}"
            ))
        })?;
    let schedules = load_schedules(settings)?;
    scheduler::sync(&db.pool, &schedules)
        .await
        .map_err(db_err)?;
    let cfg = WorkerConfig {
        id: worker::worker_id(),
        queues: vec![("gpu".into(), 1), ("cpu".into(), args.concurrency.max(1))],
        timings: settings.queue.clone(),
    };
    if let Err(e) = crate::notify::Transport::from_settings(&settings.mail, &settings.data_dir) {
        return Err(Failure::Other(e.into()));
    }
    let stop = shutdown_on_signals();
    if !args.once {
        // The dashboard too: everything in one process.
        let listener = super::web::bind(&settings.web.listen).await?;
        tracing::info!("dashboard on http://{}/", settings.web.listen);
        let web = tokio::spawn(crate::web::serve(
            crate::web::Ctx::new(db.pool.clone(), settings.clone()),
            listener,
            stop.clone(),
        ));
        let sched = tokio::spawn(scheduler::run(
            db.pool.clone(),
            schedules,
            cfg.id.clone(),
            stop.clone(),
        ));
        worker::run(db.pool.clone(), p.clone(), cfg, stop).await;
        let _ = sched.await;
        if let Ok(Err(e)) = web.await {
            tracing::warn!("dashboard: {e}");
        }
        return Ok(());
    }
    // --once: one manual batch of the inbox, then work until nothing is due.
    let mut conn = db.pool.acquire().await.map_err(db_err)?;
    let batch: i64 = sqlx::query_scalar("INSERT INTO batches DEFAULT VALUES RETURNING id")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    queue::enqueue(
        &mut conn,
        &queue::NewJob::new(
            "cpu",
            "scan_inbox",
            serde_json::json!({"batch_id": batch, "source": "run --once"}),
        ),
    )
    .await
    .map_err(db_err)?;
    drop(conn);
    work_until_idle(db, p.clone(), cfg.clone(), stop.clone()).await;
    if !stop.is_cancelled() {
        // The batch's digest once its studies are through.
        let mut conn = db.pool.acquire().await.map_err(db_err)?;
        queue::enqueue(
            &mut conn,
            &queue::NewJob::new("cpu", "digest", serde_json::json!({"for_batch": batch})),
        )
        .await
        .map_err(db_err)?;
        drop(conn);
        work_until_idle(db, p.clone(), cfg, stop.clone()).await;
    }
    let list = studies::list(&db.pool).await.map_err(db_err)?;
    print_studies(&list);
    println!();
    println!("data folder: {}", settings.data_dir.display());
    println!(
        "  reports (one HTML file per study, and the batch digest): {}",
        settings.data_dir.join("reports").display()
    );
    if settings.mail.smtp_url.is_none() {
        println!(
            "  emails (.eml files): {}",
            settings.data_dir.join("mail").display()
        );
    }
    println!(
        "  artifacts (CT copies, masks): {}",
        p.folders.artifacts.display()
    );
    println!("  quarantine: {}", p.folders.quarantine.display());
    println!("See `hepaflow studies show ID` and `hepaflow jobs list`.");
    let failed = list.iter().filter(|s| s.state == "failed").count();
    if failed > 0 {
        return Err(Failure::Other(anyhow::anyhow!(
            "{failed} studies failed; see `hepaflow jobs list --state dead` and `--state failed`"
        )));
    }
    Ok(())
}

/// Runs a worker until no job is due (or `stop`), with a spinner of the queue's counts.
async fn work_until_idle(db: &Db, p: Arc<Pipeline>, cfg: WorkerConfig, stop: CancellationToken) {
    let idle = CancellationToken::new();
    let watcher = {
        let pool = db.pool.clone();
        let idle = idle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let mut quiet = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = stop.cancelled() => break,
                }
                let counts = queue::counts(&pool).await.unwrap_or_default();
                let msg: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
                bar.set_message(format!("jobs: {}", msg.join(", ")));
                bar.tick();
                match queue::pending(&pool).await {
                    Ok(0) => quiet += 1,
                    _ => quiet = 0,
                }
                if quiet >= 2 {
                    break;
                }
            }
            bar.finish_and_clear();
            idle.cancel();
        })
    };
    let both = CancellationToken::new();
    {
        let both = both.clone();
        let (idle, stop) = (idle.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! { _ = idle.cancelled() => {}, _ = stop.cancelled() => {} }
            both.cancel();
        });
    }
    worker::run(db.pool.clone(), p, cfg, both).await;
    let _ = watcher.await;
}

// ---------------------------------------------------------------------------------------
// worker, scheduler, migrate

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to work, with optional concurrency: `gpu,cpu`, `cpu=4`.
    #[arg(long, default_value = "gpu,cpu")]
    pub queues: String,
    /// Concurrency of queues given without `=N` (the gpu queue defaults to 1).
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn worker(args: WorkerArgs, settings: &Settings) -> CmdResult {
    let queues = parse_queues(&args.queues, args.concurrency.max(1))
        .map_err(|e| Failure::Other(anyhow::anyhow!(e)))?;
    let device = device(&args.device)?;
    runtime()?.block_on(async {
        let total: usize = queues.iter().map(|(_, n)| n).sum();
        let stop = shutdown_on_signals();
        let Some(db) = open_service(settings, (total as u32 * 2 + 4).min(100), &stop).await? else {
            return Ok(());
        };
        let p = Arc::new(Pipeline::new(db.pool.clone(), settings.clone(), device));
        let cfg = WorkerConfig {
            id: worker::worker_id(),
            queues,
            timings: settings.queue.clone(),
        };
        worker::run(db.pool.clone(), p, cfg, stop).await;
        db.close().await;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {}

pub fn scheduler(_args: SchedulerArgs, settings: &Settings) -> CmdResult {
    let schedules = load_schedules(settings)?;
    runtime()?.block_on(async {
        let stop = shutdown_on_signals();
        let Some(db) = open_service(settings, 4, &stop).await? else {
            return Ok(());
        };
        scheduler::sync(&db.pool, &schedules)
            .await
            .map_err(db_err)?;
        scheduler::run(db.pool.clone(), schedules, worker::worker_id(), stop).await;
        db.close().await;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct MigrateArgs {}

pub fn migrate(_args: MigrateArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&db.pool)
            .await
            .map_err(db_err)?;
        println!("database schema up to date ({applied} migrations applied)");
        db.close().await;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// ingest

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Files or folders (walked recursively) of NIfTI studies, with ground truth beside them.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn ingest_cmd(args: IngestArgs, settings: &Settings) -> CmdResult {
    for p in &args.paths {
        if !p.exists() {
            return Err(Failure::BadInput(anyhow::anyhow!(
                "{}: no such file or folder",
                p.display()
            )));
        }
    }
    runtime()?.block_on(async {
        let db = open(settings, 4).await?;
        let p = Pipeline::new(db.pool.clone(), settings.clone(), tch::Device::Cpu);
        let batch: i64 = sqlx::query_scalar("INSERT INTO batches DEFAULT VALUES RETURNING id")
            .fetch_one(&db.pool)
            .await
            .map_err(db_err)?;
        let out = ingest::ingest(&p, &args.paths, Some(batch), None)
            .await
            .map_err(|e| Failure::Other(anyhow::anyhow!("{e}")))?;
        db.close().await;
        if args.json {
            return print_json(&out);
        }
        let rows = out
            .iter()
            .map(|i| {
                let (what, detail) = match &i.outcome {
                    ingest::Outcome::Study { study, run, truth } => (
                        "study".to_string(),
                        format!(
                            "study {study}, run {run}{}",
                            if *truth { ", with ground truth" } else { "" }
                        ),
                    ),
                    ingest::Outcome::Duplicate { study } => {
                        ("duplicate".into(), format!("same content as study {study}"))
                    }
                    ingest::Outcome::Quarantined { reason } => {
                        ("quarantined".into(), reason.clone())
                    }
                    ingest::Outcome::Truth { study } => ("truth".into(), opt(*study)),
                    ingest::Outcome::NotReady => ("not ready".into(), String::new()),
                    ingest::Outcome::Seen => {
                        ("seen".into(), "unchanged since the last scan".into())
                    }
                    ingest::Outcome::Error { reason } => ("error".into(), reason.clone()),
                };
                vec![i.file.clone(), what, detail]
            })
            .collect();
        table(&["FILE", "OUTCOME", "DETAIL"], rows);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// studies

#[derive(Debug, Args)]
pub struct StudiesArgs {
    #[command(subcommand)]
    pub command: StudiesCommand,
}

#[derive(Debug, Subcommand)]
pub enum StudiesCommand {
    /// Every study with its latest run's state and results.
    List {
        #[arg(long)]
        json: bool,
        /// List the quarantined files instead.
        #[arg(long)]
        quarantined: bool,
    },
    /// One study: its runs, lesions and metrics.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

fn print_studies(list: &[studies::StudySummary]) {
    let rows = list
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.state.clone(),
                s.step.clone(),
                s.run_id.to_string(),
                opt(s.lesion_count),
                ml(s.liver_ml),
                ml(s.tumour_ml),
                s.liver_dice.map_or("-".into(), |d| format!("{d:.3}")),
                s.tumour_dice.map_or("-".into(), |d| format!("{d:.3}")),
                when(s.created_at),
            ]
        })
        .collect();
    table(
        &[
            "STUDY",
            "STATE",
            "STEP",
            "RUN",
            "LESIONS",
            "LIVER_ML",
            "TUMOUR_ML",
            "LIVER_DICE",
            "TUMOUR_DICE",
            "RECEIVED",
        ],
        rows,
    );
}

pub fn studies_cmd(args: StudiesArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let r = studies_inner(args, &db).await;
        db.close().await;
        r
    })
}

async fn studies_inner(args: StudiesArgs, db: &Db) -> CmdResult {
    match args.command {
        StudiesCommand::List {
            json,
            quarantined: true,
        } => {
            let q = studies::quarantined(&db.pool).await.map_err(db_err)?;
            if json {
                return print_json(&q);
            }
            table(
                &["ID", "SHA256", "REASON", "RECEIVED"],
                q.iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.sha256[..12].to_string(),
                            r.reason.clone(),
                            when(r.created_at),
                        ]
                    })
                    .collect(),
            );
        }
        StudiesCommand::List { json, .. } => {
            let list = studies::list(&db.pool).await.map_err(db_err)?;
            if json {
                return print_json(&list);
            }
            print_studies(&list);
        }
        StudiesCommand::Show { id, json } => {
            let Some(s) = studies::summary(&db.pool, id).await.map_err(db_err)? else {
                return Err(Failure::Other(anyhow::anyhow!("no study {id}")));
            };
            let runs = studies::runs(&db.pool, id).await.map_err(db_err)?;
            let lesions = studies::lesions(&db.pool, s.run_id).await.map_err(db_err)?;
            let metrics = studies::metrics(&db.pool, s.run_id).await.map_err(db_err)?;
            if json {
                return print_json(&serde_json::json!({
                    "study": s, "runs": runs, "lesions": lesions, "metrics": metrics,
                }));
            }
            println!(
                "study {}: {} (step {}), shape {:?}, spacing {:?} mm, ground truth: {}",
                s.id,
                s.state,
                s.step,
                s.shape,
                s.spacing_mm,
                if s.has_truth { "yes" } else { "no" }
            );
            println!(
                "latest run {} with model {}: liver {} mL, tumour {} mL, burden {} %, {} lesions",
                s.run_id,
                s.model,
                ml(s.liver_ml),
                ml(s.tumour_ml),
                s.tumour_burden_pct
                    .map_or("-".into(), |b| format!("{b:.2}")),
                opt(s.lesion_count)
            );
            if let Some(e) = &s.error {
                println!("error: {e}");
            }
            println!();
            table(
                &[
                    "RUN",
                    "STATE",
                    "STEP",
                    "MODEL",
                    "PREVIOUS",
                    "TIMINGS_MS",
                    "CREATED",
                ],
                runs.iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.state.clone(),
                            r.step.clone(),
                            r.model.clone(),
                            opt(r.previous_run),
                            r.timings.to_string(),
                            when(r.created_at),
                        ]
                    })
                    .collect(),
            );
            println!();
            table(
                &[
                    "LESION",
                    "VOLUME_ML",
                    "LONGEST_AXIAL_MM",
                    "MAX_3D_MM",
                    "MEAN_HU",
                    "SLICES",
                ],
                lesions
                    .iter()
                    .map(|l| {
                        vec![
                            l.number.to_string(),
                            format!("{:.2}", l.volume_ml),
                            format!("{:.1}", l.longest_axial_diameter_mm),
                            format!("{:.1}", l.max_diameter_mm),
                            l.mean_hu.map_or("-".into(), |h| format!("{h:.0}")),
                            format!("{}-{}", l.slice_first, l.slice_last),
                        ]
                    })
                    .collect(),
            );
            if let (Some(m), Some(ld), Some(td)) = (&metrics, s.liver_dice, s.tumour_dice) {
                println!();
                println!(
                    "accuracy against ground truth: liver Dice {ld:.4}, tumour Dice {td:.4}, lesion recall {}",
                    m.pointer("/detection/recall")
                        .and_then(|r| r.as_f64())
                        .map_or("n/a".into(), |r| format!("{r:.2}"))
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// jobs

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs, newest first.
    List {
        /// Only this state: available, running, done, failed, dead, cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job with its payload and every failed attempt.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Runs a failed, dead or cancelled job again.
    Retry { id: i64 },
    /// Cancels an available or running job.
    Cancel { id: i64 },
}

pub fn jobs_cmd(args: JobsArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let r = jobs_inner(args, &db).await;
        db.close().await;
        r
    })
}

async fn jobs_inner(args: JobsArgs, db: &Db) -> CmdResult {
    match args.command {
        JobsCommand::List {
            state,
            queue: q,
            limit,
            json,
        } => {
            let rows = queue::list(&db.pool, state.as_deref(), q.as_deref(), limit.max(1))
                .await
                .map_err(db_err)?;
            if json {
                return print_json(&rows);
            }
            let counts = queue::counts(&db.pool).await.map_err(db_err)?;
            table(
                &[
                    "JOB",
                    "QUEUE",
                    "KIND",
                    "STATE",
                    "ATTEMPT",
                    "RUN",
                    "WORKER",
                    "RUN_AT",
                    "LAST_ERROR",
                ],
                rows.iter()
                    .map(|j| {
                        vec![
                            j.id.to_string(),
                            j.queue.clone(),
                            j.kind.clone(),
                            j.state.clone(),
                            format!("{}/{}", j.attempt, j.max_attempts),
                            opt(j.run_id),
                            j.worker.clone().unwrap_or_else(|| "-".into()),
                            when(j.run_at),
                            j.last_error
                                .clone()
                                .map_or("-".into(), |e| e.chars().take(80).collect()),
                        ]
                    })
                    .collect(),
            );
            let c: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
            println!(
                "\nall jobs: {}",
                if c.is_empty() {
                    "none".into()
                } else {
                    c.join(", ")
                }
            );
        }
        JobsCommand::Show { id, json } => {
            let Some(j) = queue::get(&db.pool, id).await.map_err(db_err)? else {
                return Err(Failure::Other(anyhow::anyhow!("no job {id}")));
            };
            if json {
                return print_json(&j);
            }
            println!(
                "job {} ({} on queue {}): {}",
                j.id, j.kind, j.queue, j.state
            );
            println!(
                "attempt {}/{}, run {}, worker {}",
                j.attempt,
                j.max_attempts,
                opt(j.run_id),
                j.worker.clone().unwrap_or_else(|| "-".into())
            );
            println!(
                "created {}, run at {}, finished {}",
                when(j.created_at),
                when(j.run_at),
                j.finished_at.map_or("-".into(), when)
            );
            println!("payload: {}", j.payload);
            if let Some(k) = &j.unique_key {
                println!("unique key: {k}");
            }
            if let Some(errors) = j.errors.as_array().filter(|e| !e.is_empty()) {
                println!("attempts that did not finish:");
                for e in errors {
                    println!(
                        "  attempt {} at {} on {}: {}",
                        e["attempt"],
                        e["at"].as_str().unwrap_or("?"),
                        e["worker"].as_str().unwrap_or("?"),
                        e["error"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        JobsCommand::Retry { id } => match queue::retry(&db.pool, id).await.map_err(db_err)? {
            Some(_) => println!("job {id} will run again"),
            None => {
                return Err(Failure::Other(anyhow::anyhow!(
                    "job {id}: no such job, or it is not failed, dead or cancelled"
                )));
            }
        },
        JobsCommand::Cancel { id } => match queue::cancel(&db.pool, id).await.map_err(db_err)? {
            Some(_) => {
                sqlx::query("UPDATE runs SET state = 'cancelled', finished_at = now() WHERE id = (SELECT run_id FROM jobs WHERE id = $1) AND state IN ('pending', 'running')")
                    .bind(id)
                    .execute(&db.pool)
                    .await
                    .map_err(db_err)?;
                println!("job {id} cancelled")
            }
            None => {
                return Err(Failure::Other(anyhow::anyhow!(
                    "job {id}: no such job, or it is no longer available or running"
                )));
            }
        },
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// rerun, models, schedules

#[derive(Debug, Args)]
pub struct RerunArgs {
    #[arg(long)]
    pub study: i64,
    /// First step of the new run: segment, analyze, report, notify.
    #[arg(long, default_value = "segment")]
    pub from: String,
    /// A registered model other than the previous run's (needs --from segment).
    #[arg(long)]
    pub model: Option<String>,
}

pub fn rerun(args: RerunArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let r = pipeline::rerun(&db.pool, args.study, &args.from, args.model.as_deref()).await;
        db.close().await;
        let run = r.map_err(|e| Failure::Other(e.into()))?;
        println!(
            "run {run} of study {} queued from step {}",
            args.study, args.from
        );
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Registered models; the active one is marked.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Registers a model folder (card.json + weights); the first model becomes active.
    Register { dir: PathBuf },
    /// Makes a registered model the one new runs use.
    Activate { name: String },
}

pub fn models_cmd(args: ModelsArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let store =
            crate::store::artifacts::ArtifactStore::new(settings.data_dir.join("artifacts"));
        let r: CmdResult = async {
            match args.command {
                ModelsCommand::List { json } => {
                    let list = models::list(&db.pool).await.map_err(db_err)?;
                    if json {
                        return print_json(&list);
                    }
                    table(
                        &["ACTIVE", "NAME", "VERSION", "WEIGHTS_SHA256", "REGISTERED"],
                        list.iter()
                            .map(|m| {
                                vec![
                                    if m.active { "*".into() } else { String::new() },
                                    m.name.clone(),
                                    m.version.clone(),
                                    m.weights_sha256[..16].to_string(),
                                    when(m.registered_at),
                                ]
                            })
                            .collect(),
                    );
                }
                ModelsCommand::Register { dir } => {
                    let m =
                        models::register(&db.pool, &store, &dir)
                            .await
                            .map_err(|e| match e {
                                models::RegistryError::Model(_) => Failure::BadInput(e.into()),
                                _ => Failure::Other(e.into()),
                            })?;
                    println!(
                        "model {} {} registered{}",
                        m.name,
                        m.version,
                        if m.active { " (active)" } else { "" }
                    );
                }
                ModelsCommand::Activate { name } => {
                    let m = models::activate(&db.pool, &name)
                        .await
                        .map_err(|e| Failure::Other(e.into()))?;
                    println!("model {} is now active", m.name);
                }
            }
            Ok(())
        }
        .await;
        db.close().await;
        r
    })
}

#[derive(Debug, Args)]
pub struct SchedulesArgs {
    #[command(subcommand)]
    pub command: SchedulesCommand,
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// The schedules of jobs/*.toml with their last tick.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Fires a schedule now.
    Trigger { name: String },
}

pub fn schedules_cmd(args: SchedulesArgs, settings: &Settings) -> CmdResult {
    let schedules = load_schedules(settings)?;
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let r: CmdResult = async {
            scheduler::sync(&db.pool, &schedules)
                .await
                .map_err(db_err)?;
            match args.command {
                SchedulesCommand::List { json } => {
                    let list = scheduler::list(&db.pool).await.map_err(db_err)?;
                    if json {
                        return print_json(&list);
                    }
                    table(
                        &[
                            "NAME",
                            "CRON",
                            "TIMEZONE",
                            "JOB",
                            "ENABLED",
                            "LAST_TICK",
                            "TICKS",
                            "NEXT",
                        ],
                        list.iter()
                            .map(|s| {
                                let next = schedules
                                    .iter()
                                    .find(|x| x.name == s.name)
                                    .and_then(|x| x.next_after(chrono::Utc::now()))
                                    .map_or("-".into(), when);
                                vec![
                                    s.name.clone(),
                                    s.cron.clone(),
                                    s.timezone.clone(),
                                    s.job.clone(),
                                    s.enabled.to_string(),
                                    s.last_tick.map_or("-".into(), when),
                                    s.ticks_fired.to_string(),
                                    next,
                                ]
                            })
                            .collect(),
                    );
                }
                SchedulesCommand::Trigger { name } => {
                    let s = schedules.iter().find(|s| s.name == name).ok_or_else(|| {
                        Failure::Other(anyhow::anyhow!(
                            "no schedule {name:?} in {}",
                            settings.jobs_dir.display()
                        ))
                    })?;
                    let job = scheduler::trigger(&db.pool, s, "admin")
                        .await
                        .map_err(db_err)?;
                    println!("schedule {name} fired: job {}", opt(job));
                }
            }
            Ok(())
        }
        .await;
        db.close().await;
        r
    })
}

#[derive(Debug, Args)]
pub struct MailArgs {
    #[command(subcommand)]
    pub command: MailCommand,
}

#[derive(Debug, Subcommand)]
pub enum MailCommand {
    /// The email outbox, newest first.
    List {
        /// Only this state: pending, sent, failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

pub fn mail_cmd(args: MailArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let MailCommand::List { state, limit, json } = args.command;
        let r = crate::notify::list(&db.pool, state.as_deref(), limit.max(1)).await;
        db.close().await;
        let rows = r.map_err(db_err)?;
        if json {
            return print_json(&rows);
        }
        table(
            &[
                "EMAIL",
                "KIND",
                "TO",
                "STATE",
                "ATTEMPTS",
                "STUDY",
                "BATCH",
                "CREATED",
                "LAST_ERROR",
            ],
            rows.iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        e.kind.clone(),
                        e.recipient.clone(),
                        e.state.clone(),
                        e.attempts.to_string(),
                        opt(e.study_id),
                        opt(e.batch_id),
                        when(e.created_at),
                        e.last_error
                            .clone()
                            .map_or("-".into(), |m| m.chars().take(80).collect()),
                    ]
                })
                .collect(),
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_specs_parse() {
        assert_eq!(
            parse_queues("gpu,cpu", 3).unwrap(),
            vec![("gpu".into(), 1), ("cpu".into(), 3)]
        );
        assert_eq!(parse_queues("cpu=8", 2).unwrap(), vec![("cpu".into(), 8)]);
        assert!(parse_queues("cpu=0", 2).is_err());
        assert!(parse_queues("cpu,cpu", 2).is_err());
        assert!(parse_queues("", 2).is_err());
        assert!(parse_queues("a b", 2).is_err());
    }
}
