//! `hepaflow bench queue`: no-op jobs through in-process workers on Postgres (the embedded
//! cluster in the data folder, or `DATABASE_URL`). Throughput from the jobs' own timestamps;
//! claim latency (`claimed_at − created_at`) with idle workers woken by LISTEN/NOTIFY.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::pipeline::Pipeline;
use crate::queue::worker::{self, WorkerConfig};
use crate::store::Db;

#[derive(Debug, Args)]
pub struct QueueBenchArgs {
    /// No-op jobs for the throughput run.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Worker instances (each with its own claim loop and connections).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Jobs each worker runs at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Jobs enqueued one by one (5 ms apart) for the latency run.
    #[arg(long, default_value_t = 400)]
    pub latency_jobs: usize,
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(anyhow::anyhow!("{e}"))
}

pub fn run(args: &QueueBenchArgs, settings: &Settings) -> CmdResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(other)?;
    rt.block_on(async {
        let connections = (args.workers * 2 + 4).min(150) as u32;
        let db = Db::open(settings, connections).await.map_err(other)?;
        let r = bench(args, settings, &db).await;
        db.close().await;
        r
    })
}

async fn bench(args: &QueueBenchArgs, settings: &Settings, db: &Db) -> CmdResult {
    let pool = &db.pool;
    sqlx::query("DELETE FROM jobs WHERE queue = 'bench'")
        .execute(pool)
        .await
        .map_err(other)?;
    let p = Arc::new(Pipeline::new(
        pool.clone(),
        settings.clone(),
        tch::Device::Cpu,
    ));
    let mut timings = settings.queue.clone();
    timings.poll = Duration::from_secs(5); // measure the NOTIFY path, not polling
    let start_workers = |stop: CancellationToken| {
        (0..args.workers)
            .map(|i| {
                let cfg = WorkerConfig {
                    id: format!("bench-{i}"),
                    queues: vec![("bench".into(), args.concurrency.max(1))],
                    timings: timings.clone(),
                };
                tokio::spawn(worker::run(pool.clone(), p.clone(), cfg, stop.clone()))
            })
            .collect::<Vec<_>>()
    };

    // Throughput: a backlog of jobs drained by the workers.
    let payloads = vec![json!({}); args.jobs];
    let mut conn = pool.acquire().await.map_err(other)?;
    for chunk in payloads.chunks(5000) {
        crate::queue::enqueue_many(&mut conn, "bench", "noop", chunk, 1)
            .await
            .map_err(other)?;
    }
    drop(conn);
    let stop = CancellationToken::new();
    let t = Instant::now();
    let handles = start_workers(stop.clone());
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE queue = 'bench' AND state <> 'done'",
        )
        .fetch_one(pool)
        .await
        .map_err(other)?;
        if left == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(other(format!(
                "{left} jobs still not done after 10 minutes"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = t.elapsed().as_secs_f64();
    let span: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(claimed_at))::float8
         FROM jobs WHERE queue = 'bench'",
    )
    .fetch_one(pool)
    .await
    .map_err(other)?;
    let jobs_per_s = args.jobs as f64 / span.max(1e-9);

    // Latency: idle workers, jobs arriving one at a time.
    sqlx::query("DELETE FROM jobs WHERE queue = 'bench'")
        .execute(pool)
        .await
        .map_err(other)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..args.latency_jobs {
        let mut c = pool.acquire().await.map_err(other)?;
        crate::queue::enqueue(
            &mut c,
            &crate::queue::NewJob::new("bench", "noop", json!({})),
        )
        .await
        .map_err(other)?;
        drop(c);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE queue = 'bench' AND state <> 'done'",
        )
        .fetch_one(pool)
        .await
        .map_err(other)?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT extract(epoch FROM claimed_at - created_at) * 1000 AS ms
               FROM jobs WHERE queue = 'bench') l",
    )
    .fetch_one(pool)
    .await
    .map_err(other)?;
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    sqlx::query("DELETE FROM jobs WHERE queue = 'bench'")
        .execute(pool)
        .await
        .map_err(other)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "jobs": args.jobs,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "wall_s": wall,
            "jobs_per_s": jobs_per_s,
            "latency_jobs": args.latency_jobs,
            "claim_latency_p50_ms": p50,
            "claim_latency_p99_ms": p99,
            "embedded": db.embedded(),
        }))?
    );
    Ok(())
}
