//! The job queue's promises (RELIABILITY.md), with real worker processes, real `kill -9`,
//! `SIGSTOP`, `SIGTERM` and a real PostgreSQL restart.

use std::time::Duration;

use serde_json::json;

use crate::db::{self, Proc, scalar, wait_until};
use crate::support::tempdir;

const KILL: i32 = libc::SIGKILL;

/// Jobs whose probe effects show more than one start or commit.
async fn duplicates(pool: &sqlx::PgPool, phase: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM probe_effects WHERE phase = $1
         GROUP BY job_id HAVING count(*) > 1) d",
    )
    .bind(phase)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_race_runs_each_job_exactly_once() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    db::probes(&pool, "race", 5000, json!({"record_start": true}), 5).await;
    let _workers: Vec<Proc> = (0..8)
        .map(|_| db::worker(&url, data.path(), "race=4", &[]))
        .collect();
    wait_until(Duration::from_secs(120), "5000 jobs done", || async {
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await == 5000
    })
    .await;
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE phase = 'start'"
        )
        .await,
        5000,
        "every job started exactly once"
    );
    assert_eq!(duplicates(&pool, "start").await, 0);
    assert_eq!(duplicates(&pool, "commit").await, 0);
    assert_eq!(
        scalar(&pool, "SELECT max(attempt)::bigint FROM jobs").await,
        1
    );
    let workers = scalar(&pool, "SELECT count(DISTINCT worker) FROM jobs").await;
    assert!(workers >= 4, "work spread over the workers ({workers})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_nothing_and_duplicate_nothing() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    db::probes(
        &pool,
        "crash",
        200,
        json!({"record_start": true, "sleep_ms": 100}),
        25,
    )
    .await;
    let env = [("HEPAFLOW_LEASE_MS", "1000")];
    let mut workers: Vec<Proc> = (0..4)
        .map(|_| db::worker(&url, data.path(), "crash=3", &env))
        .collect();
    let started = std::time::Instant::now();
    let mut kills = 0;
    while kills < 10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Kill a worker that holds jobs, and start a replacement.
        let i = fastrand::usize(..workers.len());
        workers[i].signal(KILL);
        let _ = workers[i].wait_for(Duration::from_secs(5));
        workers[i] = db::worker(&url, data.path(), "crash=3", &env);
        kills += 1;
    }
    wait_until(
        Duration::from_secs(90),
        "200 jobs done after the kills",
        || async { scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await == 200 },
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state <> 'done'").await,
        0
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE phase = 'commit'"
        )
        .await,
        200,
        "one result per job"
    );
    assert_eq!(duplicates(&pool, "commit").await, 0, "no duplicate results");
    let rescued = scalar(&pool, "SELECT count(*) FROM jobs WHERE attempt > 1").await;
    assert!(
        rescued > 0,
        "some jobs were held by killed workers and rescued"
    );
    assert!(
        took < Duration::from_secs(70),
        "done within lease + 1 min: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_cannot_complete_a_job_it_lost() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    db::probes(
        &pool,
        "zombie",
        1,
        json!({"record_start": true, "sleep_ms": 2500}),
        5,
    )
    .await;
    let env = [("HEPAFLOW_LEASE_MS", "1000")];
    let first = db::worker(&url, data.path(), "zombie=1", &env);
    wait_until(Duration::from_secs(30), "first worker claims", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE phase = 'start'",
        )
        .await
            == 1
    })
    .await;
    first.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the lease
    let _second = db::worker(&url, data.path(), "zombie=1", &env);
    wait_until(
        Duration::from_secs(30),
        "second attempt completes",
        || async { scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await == 1 },
    )
    .await;
    first.signal(libc::SIGCONT);
    // The first worker wakes up with its sleep over: its completion must be refused.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let commits: Vec<(i32, String)> =
        sqlx::query_as("SELECT attempt, worker FROM probe_effects WHERE phase = 'commit'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert_eq!(commits[0].0, 2, "the second attempt's result stands");
    assert_eq!(scalar(&pool, "SELECT attempt::bigint FROM jobs").await, 2);
    let (state, errors): (String, serde_json::Value) =
        sqlx::query_as("SELECT state, errors FROM jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "done");
    assert!(errors.to_string().contains("lease expired"), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_commits_or_rolls_back_with_its_transaction() {
    let (_url, pool) = db::fresh().await;
    for i in 0..200 {
        let mut tx = pool.begin().await.unwrap();
        // The state change (a batch) and the job it causes.
        let batch: i64 = sqlx::query_scalar("INSERT INTO batches DEFAULT VALUES RETURNING id")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        hepaflow::queue::enqueue(
            &mut tx,
            &hepaflow::queue::NewJob::new("cpu", "scan_inbox", json!({"batch_id": batch})),
        )
        .await
        .unwrap();
        if i % 2 == 0 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    assert_eq!(scalar(&pool, "SELECT count(*) FROM jobs").await, 100);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM batches").await, 100);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM jobs j JOIN batches b ON b.id = (j.payload->>'batch_id')::bigint"
        )
        .await,
        100,
        "every job belongs to a committed batch"
    );
    // A unique key enqueues once.
    let mut conn = pool.acquire().await.unwrap();
    let job = hepaflow::queue::NewJob::new("cpu", "noop", json!({})).unique("k");
    assert!(
        hepaflow::queue::enqueue(&mut conn, &job)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        hepaflow::queue::enqueue(&mut conn, &job)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ride_out_database_restarts() {
    let (mut cluster, url, pool) = db::own_cluster("restart").await;
    db::probes(&pool, "rs", 200, json!({"sleep_ms": 30}), 25).await;
    pool.close().await;
    let data = tempdir();
    let mut workers: Vec<Proc> = (0..2)
        .map(|_| db::worker(&url, data.path(), "rs=4", &[]))
        .collect();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster = tokio::task::spawn_blocking(move || {
            cluster.restart(&db::fast()).expect("restart");
            cluster
        })
        .await
        .unwrap();
    }
    let pool = hepaflow::store::pool(&url, 4).await.unwrap();
    wait_until(
        Duration::from_secs(90),
        "200 jobs done across restarts",
        || async { scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await == 200 },
    )
    .await;
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE phase = 'commit'"
        )
        .await,
        200
    );
    assert_eq!(duplicates(&pool, "commit").await, 0);
    for w in &mut workers {
        assert!(w.running(), "a worker exited when the database went away");
    }
    pool.close().await;
    drop(workers);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_wait_for_a_database_not_up_yet_but_not_for_a_wrong_one() {
    let (mut cluster, url, pool) = db::own_cluster("late").await;
    db::probes(&pool, "late", 20, json!({}), 5).await;
    pool.close().await;
    cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();

    // The server is down: the worker waits (and says so) instead of exiting.
    let data = tempdir();
    let mut w = db::worker(&url, data.path(), "late=2", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.running(), "a worker exited while the database was down");
    cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(&db::fast()).expect("start");
        cluster
    })
    .await
    .unwrap();
    let pool = hepaflow::store::pool(&url, 2).await.unwrap();
    wait_until(Duration::from_secs(60), "20 jobs done", || async {
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await == 20
    })
    .await;
    assert!(w.running());

    // A database that does not exist is a configuration error: no waiting.
    let wrong = cluster.url("no_such_database");
    let mut bad = Proc(
        db::service(&wrong, data.path(), &[])
            .args(["worker", "--queues", "late", "--device", "cpu"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = bad.wait_for(Duration::from_secs(20));
        (s, bad)
    })
    .await
    .unwrap();
    let (status, mut bad) = status;
    let status = status.expect("a worker with a wrong database name exits at once");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(bad.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("no_such_database") && err.contains("does not exist"),
        "{err}"
    );
    pool.close().await;
    drop(w);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_then_die_and_permanent_errors_fail_at_once() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    db::probes(&pool, "retry", 1, json!({"fail": "transient"}), 3).await;
    db::probes(&pool, "retry", 1, json!({"fail": "permanent"}), 3).await;
    let _w = db::worker(&url, data.path(), "retry=2", &[]);
    wait_until(Duration::from_secs(30), "both jobs finished", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM jobs WHERE state IN ('dead', 'failed')",
        )
        .await
            == 2
    })
    .await;
    let rows: Vec<(String, String, i32, serde_json::Value, Option<String>)> = sqlx::query_as(
        "SELECT payload->>'fail', state, attempt, errors, last_error FROM jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let (_, state, attempt, errors, last) = &rows[0];
    assert_eq!(
        (state.as_str(), *attempt),
        ("dead", 3),
        "transient: max_attempts tries"
    );
    assert_eq!(errors.as_array().unwrap().len(), 3);
    assert!(last.as_deref().unwrap().contains("transient"));
    let (_, state, attempt, errors, _) = &rows[1];
    assert_eq!(
        (state.as_str(), *attempt),
        ("failed", 1),
        "permanent: one try"
    );
    assert_eq!(errors.as_array().unwrap().len(), 1);
    // Retry by hand: a fresh set of attempts.
    let out = db::service(&url, data.path(), &[])
        .args(["jobs", "retry", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(30),
        "retried job dead again",
        || async { scalar(&pool, "SELECT attempt::bigint FROM jobs WHERE id = 1").await == 6 },
    )
    .await;
    // `jobs list` explains the state.
    let out = db::service(&url, data.path(), &[])
        .args(["jobs", "list", "--state", "failed"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failed") && text.contains("permanent"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_claiming_and_finishes_or_releases_running_jobs() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    db::probes(
        &pool,
        "stop",
        6,
        json!({"record_start": true, "sleep_ms": 1500}),
        5,
    )
    .await;
    let mut w = db::worker(
        &url,
        data.path(),
        "stop=2",
        &[("HEPAFLOW_GRACE_MS", "10000")],
    );
    wait_until(Duration::from_secs(30), "two jobs running", || async {
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'running'").await == 2
    })
    .await;
    w.signal(libc::SIGTERM);
    let status = w
        .wait_for(Duration::from_secs(20))
        .expect("worker exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'done'").await,
        2
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'available'").await,
        4
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE phase = 'start'"
        )
        .await,
        2,
        "nothing claimed after SIGTERM"
    );
    // A job longer than the grace period is released, not lost, and its attempt not counted
    // against it.
    sqlx::query(
        "UPDATE jobs SET payload = payload || '{\"sleep_ms\": 20000}' WHERE state = 'available'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut w = db::worker(&url, data.path(), "stop=1", &[("HEPAFLOW_GRACE_MS", "300")]);
    wait_until(Duration::from_secs(30), "a long job running", || async {
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'running'").await == 1
    })
    .await;
    w.signal(libc::SIGTERM);
    let status = w.wait_for(Duration::from_secs(20)).expect("worker exits");
    assert!(status.success());
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'running'").await,
        0
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM jobs WHERE state = 'available'").await,
        4
    );
    let released: String =
        sqlx::query_scalar("SELECT errors::text FROM jobs WHERE errors::text LIKE '%released%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(released.contains("released at shutdown"));
}
