//! The worker: claims jobs of its queues, runs them through a [`Handler`], heartbeats their
//! leases, records the outcome, and stops gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AfterFailure, CHANNEL, Claimed, ErrorKind, JobError};
use crate::config::QueueSettings;

/// Runs jobs. Registered in one place (the pipeline) and dispatched on `job.kind`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt. Write results through [`JobHandle::begin`] / [`JobHandle::commit`]
    /// so they commit with the completion; returning `Ok` without committing marks the job
    /// done on its own.
    fn handle(&self, job: JobHandle) -> impl Future<Output = Result<(), JobError>> + Send;

    /// A job will not run again: it failed permanently or ran out of attempts (also when
    /// its last attempt's worker died).
    fn gave_up(&self, job: GaveUp) -> impl Future<Output = ()> + Send {
        let _ = job;
        async {}
    }
}

/// A job that will not run again.
#[derive(Clone, Debug)]
pub struct GaveUp {
    pub id: i64,
    pub kind: String,
    pub run_id: Option<i64>,
    pub error: String,
}

/// One attempt of a job, as given to a handler.
#[derive(Clone)]
pub struct JobHandle {
    pub job: Claimed,
    pub pool: PgPool,
    committed: Arc<AtomicBool>,
}

impl JobHandle {
    /// A transaction that holds this attempt's job row: fails with a `Lost` error when the
    /// lease was taken over.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, JobError> {
        Ok(super::begin_fenced(&self.pool, &self.job).await??)
    }

    /// Marks the job done in `tx` and commits it with everything the handler wrote.
    pub async fn commit(&self, mut tx: Transaction<'static, Postgres>) -> Result<(), JobError> {
        super::complete_in(&mut tx, &self.job).await?;
        tx.commit().await?;
        self.committed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What a worker process does.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Identifies the worker in `jobs.worker` (host, pid, random suffix).
    pub id: String,
    /// Queues and how many of each queue's jobs run at once.
    pub queues: Vec<(String, usize)>,
    pub timings: QueueSettings,
}

/// A worker id: host, process id and a random suffix.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}:{}:{:04x}", std::process::id(), fastrand::u16(..))
}

struct Shared<H> {
    pool: PgPool,
    handler: Arc<H>,
    cfg: WorkerConfig,
    /// Stop claiming.
    shutdown: CancellationToken,
    /// Give running jobs back (grace period over).
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

/// Runs until `shutdown` is cancelled, then lets running jobs finish within the grace period
/// and releases the rest.
pub async fn run<H: Handler>(
    pool: PgPool,
    handler: Arc<H>,
    cfg: WorkerConfig,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        pool,
        handler,
        cfg,
        shutdown,
        hard_stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let wakers: Arc<HashMap<String, Arc<Notify>>> = Arc::new(
        shared
            .cfg
            .queues
            .iter()
            .map(|(q, _)| (q.clone(), Arc::new(Notify::new())))
            .collect(),
    );
    tracing::info!(worker = %shared.cfg.id, queues = ?shared.cfg.queues, "worker started");
    let listener = tokio::spawn(listen(shared.clone(), wakers.clone()));
    let rescuer = tokio::spawn(rescue_loop(shared.clone()));
    let loops: Vec<_> = shared
        .cfg
        .queues
        .iter()
        .map(|(q, n)| tokio::spawn(queue_loop(shared.clone(), q.clone(), *n, wakers[q].clone())))
        .collect();
    shared.shutdown.cancelled().await;
    for l in loops {
        let _ = l.await;
    }
    shared.tracker.close();
    let grace = shared.cfg.timings.grace;
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(worker = %shared.cfg.id, grace_ms = grace.as_millis() as u64, "grace period over: releasing running jobs");
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), shared.tracker.wait()).await;
    }
    listener.abort();
    rescuer.abort();
    tracing::info!(worker = %shared.cfg.id, "worker stopped");
}

async fn listen<H: Handler>(shared: Arc<Shared<H>>, wakers: Arc<HashMap<String, Arc<Notify>>>) {
    let wake_all = || wakers.values().for_each(|w| w.notify_one());
    loop {
        let mut listener = match PgListener::connect_with(&shared.pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "listener: cannot connect; polling meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shared.shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::debug!(error = %e, "listener: LISTEN failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        if let Some(w) = wakers.get(n.payload()) {
                            w.notify_one();
                        }
                    }
                    // The connection dropped; notifications may have been missed.
                    Ok(None) => wake_all(),
                    Err(e) => {
                        tracing::debug!(error = %e, "listener: connection lost");
                        wake_all();
                        break;
                    }
                }
            }
        }
    }
}

/// Every poll interval: give the jobs of dead workers back.
async fn rescue_loop<H: Handler>(shared: Arc<Shared<H>>) {
    let every = shared
        .cfg
        .timings
        .poll
        .min(shared.cfg.timings.lease / 2)
        .max(Duration::from_millis(50));
    loop {
        match super::rescue_expired(&shared.pool).await {
            Ok(rescued) => {
                for r in rescued {
                    tracing::warn!(job = r.id, state = %r.state, "lease expired: job rescued");
                    if r.state == "dead" {
                        shared
                            .handler
                            .gave_up(GaveUp {
                                id: r.id,
                                kind: r.kind,
                                run_id: r.run_id,
                                error: "lease expired on the last attempt".into(),
                            })
                            .await;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "rescue failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

async fn queue_loop<H: Handler>(
    shared: Arc<Shared<H>>,
    queue: String,
    slots: usize,
    wake: Arc<Notify>,
) {
    let sem = Arc::new(Semaphore::new(slots));
    let mut error_pause = Duration::from_millis(100);
    loop {
        if shared.shutdown.is_cancelled() {
            return;
        }
        let free = sem.available_permits();
        let mut got = 0;
        if free > 0 {
            match super::claim(
                &shared.pool,
                &queue,
                free as i64,
                &shared.cfg.id,
                shared.cfg.timings.lease,
            )
            .await
            {
                Ok(jobs) => {
                    error_pause = Duration::from_millis(100);
                    got = jobs.len();
                    for job in jobs {
                        let Ok(permit) = sem.clone().try_acquire_owned() else {
                            break;
                        };
                        shared
                            .tracker
                            .spawn(run_job(shared.clone(), job, permit, wake.clone()));
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "claim failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(error_pause) => {}
                        _ = shared.shutdown.cancelled() => return,
                    }
                    error_pause = (error_pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        if free > 0 && got == free {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(shared.cfg.timings.poll) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Retries a database write until it succeeds, the attempt is lost, or the lease would have
/// run out anyway (then the job is rescued and runs again: at least once).
async fn persist<T, F, Fut>(
    shared: &Shared<impl Handler>,
    lost: &CancellationToken,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = tokio::time::Instant::now() + shared.cfg.timings.lease;
    let mut pause = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                if lost.is_cancelled() || tokio::time::Instant::now() + pause > deadline {
                    tracing::warn!(error = %e, "giving up on a job write; the lease will expire and the job run again");
                    return None;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn heartbeat_loop(pool: PgPool, job: Claimed, lease: Duration, lost: CancellationToken) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match super::heartbeat(&pool, &job, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    job = job.id,
                    attempt = job.attempt,
                    "lease lost: abandoning the job"
                );
                lost.cancel();
                return;
            }
            Err(e) => tracing::debug!(job = job.id, error = %e, "heartbeat failed; retrying"),
        }
    }
}

async fn run_job<H: Handler>(
    shared: Arc<Shared<H>>,
    job: Claimed,
    permit: OwnedSemaphorePermit,
    wake: Arc<Notify>,
) {
    let lost = CancellationToken::new();
    let lease = shared.cfg.timings.lease;
    let hb = tokio::spawn(heartbeat_loop(
        shared.pool.clone(),
        job.clone(),
        lease,
        lost.clone(),
    ));
    let handle = JobHandle {
        job: job.clone(),
        pool: shared.pool.clone(),
        committed: Arc::new(AtomicBool::new(false)),
    };
    let started = std::time::Instant::now();
    let outcome = tokio::select! {
        r = shared.handler.handle(handle.clone()) => Some(r),
        _ = lost.cancelled() => None,
        _ = shared.hard_stop.cancelled() => {
            let pool = shared.pool.clone();
            let j = job.clone();
            persist(&shared, &lost, || super::release(&pool, &j)).await;
            tracing::info!(job = job.id, "released at shutdown");
            None
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Some(Ok(())) => {
            if !handle.committed.load(Ordering::SeqCst) {
                let pool = shared.pool.clone();
                let j = job.clone();
                if persist(&shared, &lost, || super::complete(&pool, &j)).await == Some(false) {
                    tracing::warn!(
                        job = job.id,
                        "completion fenced off: the lease had been taken"
                    );
                }
            }
            tracing::debug!(job = job.id, kind = %job.kind, duration_ms, "job done");
        }
        Some(Err(e)) if e.kind == ErrorKind::Lost => {
            tracing::warn!(
                job = job.id,
                attempt = job.attempt,
                "attempt lost its lease; nothing written"
            );
        }
        Some(Err(e)) => {
            let pool = shared.pool.clone();
            let j = job.clone();
            let base = shared.cfg.timings.retry_base;
            let after = persist(&shared, &lost, || super::fail(&pool, &j, &e, base)).await;
            // The message may name files; it goes to the job row, not the log.
            tracing::warn!(job = job.id, kind = %job.kind, attempt = job.attempt, after = ?after, error_kind = ?e.kind, "job failed");
            if matches!(after, Some(AfterFailure::Dead | AfterFailure::Failed)) {
                shared
                    .handler
                    .gave_up(GaveUp {
                        id: job.id,
                        kind: job.kind.clone(),
                        run_id: job.run_id,
                        error: e.message.clone(),
                    })
                    .await;
            }
        }
        None => {}
    }
    hb.abort();
    drop(permit);
    wake.notify_one();
}
