//! A real PostgreSQL for the tests: one throwaway cluster per test process (started from the
//! local server binaries through hepaflow's own embedded-cluster code), a fresh database per
//! test, and helpers to run `hepaflow` service processes against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hepaflow::store::embedded::{Cluster, ClusterOptions};
use sqlx::PgPool;

/// Settings that make a throwaway cluster fast (nothing here needs to survive a power cut).
pub fn fast() -> ClusterOptions {
    ClusterOptions {
        settings: vec![
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
        ],
    }
}

/// A folder for a cluster, removed when a later test run finds its owner gone.
pub fn cluster_dir(tag: &str) -> PathBuf {
    let base = std::env::temp_dir();
    for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("hepaflow-it-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        {
            // SAFETY: signal 0 only probes for the process.
            let alive = unsafe { libc::kill(pid, 0) == 0 };
            if !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    base.join(format!("hepaflow-it-{}-{tag}", std::process::id()))
}

fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::start(&cluster_dir("shared"), &fast()).expect("test PostgreSQL cluster starts")
    })
}

/// A cluster of the test's own (to stop and restart), with a migrated database `name`: the
/// cluster, the database's URL and a pool on it.
pub async fn own_cluster(name: &str) -> (Cluster, String, PgPool) {
    let dir = cluster_dir(name);
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&dir, &fast()))
        .await
        .unwrap()
        .expect("cluster");
    hepaflow::store::ensure_database(&cluster, name)
        .await
        .unwrap();
    let url = cluster.url(name);
    let pool = hepaflow::store::pool(&url, 4).await.unwrap();
    hepaflow::store::MIGRATOR.run(&pool).await.unwrap();
    (cluster, url, pool)
}

/// The URL of a new, empty, migrated database in the shared cluster.
pub async fn fresh() -> (String, PgPool) {
    static N: AtomicU32 = AtomicU32::new(0);
    let cluster = shared();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    hepaflow::store::ensure_database(cluster, &name)
        .await
        .expect("create database");
    let url = cluster.url(&name);
    let pool = hepaflow::store::pool(&url, 8).await.expect("connect");
    hepaflow::store::MIGRATOR.run(&pool).await.expect("migrate");
    (url, pool)
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }
    /// Waits for the exit status, at most `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hepaflow` against `url` with short leases and a data folder; more env from `env`.
pub fn service(url: &str, data: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = crate::support::hepaflow();
    c.env("DATABASE_URL", url)
        .env("HEPAFLOW_DATA_DIR", data)
        .env("HEPAFLOW_LEASE_MS", "1500")
        .env("HEPAFLOW_POLL_MS", "100")
        .env("HEPAFLOW_RETRY_BASE_MS", "50")
        .env("HEPAFLOW_GRACE_MS", "5000")
        .env("HEPAFLOW_INBOX_SETTLE_MS", "200")
        .env(
            "HEPAFLOW_DEFAULT_MODEL",
            crate::support::root().join("models/demo"),
        )
        .env("HEPAFLOW_JOBS_DIR", crate::support::root().join("jobs"));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Starts `hepaflow worker` on `queues`.
pub fn worker(url: &str, data: &Path, queues: &str, env: &[(&str, &str)]) -> Proc {
    Proc(
        service(url, data, env)
            .args(["worker", "--queues", queues, "--device", "cpu"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts"),
    )
}

/// Polls `cond` until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

pub async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Inserts `n` probe jobs on `queue` with this payload.
pub async fn probes(
    pool: &PgPool,
    queue: &str,
    n: usize,
    payload: serde_json::Value,
    max_attempts: i32,
) {
    let payloads = vec![payload; n];
    let mut conn = pool.acquire().await.unwrap();
    hepaflow::queue::enqueue_many(&mut conn, queue, "probe", &payloads, max_attempts)
        .await
        .unwrap();
}
