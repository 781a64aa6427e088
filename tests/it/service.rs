//! The service end to end against a real PostgreSQL: ingest, the pipeline through real
//! worker processes, reruns, the admin commands, the scheduler across processes, and
//! artifacts under `kill -9`.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use serde_json::Value;

use crate::db::{self, Proc, scalar, wait_until};
use crate::support::{hepaflow, stderr, tempdir};

pub fn phantoms(dir: &Path, count: u32, seed: u32, shape: &str) {
    let out = hepaflow()
        .args(["phantom", "--out"])
        .arg(dir)
        .args([
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
            "--shape",
            shape,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn sha(path: &Path) -> String {
    hepaflow::store::artifacts::hash_file(path).unwrap().0
}

fn ok_json(cmd: &mut std::process::Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_flow_from_inbox_to_results() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let inbox = data.path().join("inbox");
    // About 2 mm pixels: small and fast, and close to the pixels the demo model learned from
    // (1.27–1.79 mm; coarser studies are resampled to 1.8 mm, at some cost in detail).
    phantoms(&inbox, 2, 41, "192x192x20");
    // A file that is not a CT volume, and a ground truth on the wrong grid.
    std::fs::write(inbox.join("scan-x.nii.gz"), b"\x1f\x8b\x08\x00garbage").unwrap();
    let before: Vec<String> = ["volume-0.nii.gz", "volume-1.nii.gz", "scan-x.nii.gz"]
        .iter()
        .map(|f| sha(&inbox.join(f)))
        .collect();

    // `run --once`: scan, segment, analyze, report, notify; then exit.
    let out = db::service(&url, data.path(), &[])
        .args(["run", "--once", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("STUDY") && text.contains("done"), "{text}");

    // The originals are untouched.
    let after: Vec<String> = ["volume-0.nii.gz", "volume-1.nii.gz", "scan-x.nii.gz"]
        .iter()
        .map(|f| sha(&inbox.join(f)))
        .collect();
    assert_eq!(before, after);

    let list = ok_json(db::service(&url, data.path(), &[]).args(["studies", "list", "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for s in list {
        assert_eq!(s["state"], "done", "{s}");
        assert!(s["liver_ml"].as_f64().unwrap() > 300.0, "{s}");
        assert!(s["tumour_ml"].as_f64().is_some());
        assert!(s["lesion_count"].as_i64().is_some());
        assert_eq!(s["has_truth"], true);
        assert!(s["liver_dice"].as_f64().unwrap() > 0.5, "{s}");
    }

    // The bad file is quarantined with its reason, beside a copy.
    let q = ok_json(db::service(&url, data.path(), &[]).args([
        "studies",
        "list",
        "--quarantined",
        "--json",
    ]));
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(
        q[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not a usable CT volume")
    );
    let sha_bad = q[0]["sha256"].as_str().unwrap();
    let reason: Value = serde_json::from_slice(
        &std::fs::read(
            data.path()
                .join(format!("quarantine/{sha_bad}.reason.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        reason["reason"].as_str().unwrap().contains("gzip")
            || reason["reason"].as_str().unwrap().contains("scan-x"),
        "{reason}"
    );

    // Results in the database match the imaging tool on the stored mask.
    let (run, mask): (i64, String) = sqlx::query_as(
        "SELECT r.id, a.path FROM runs r JOIN artifacts a ON a.id = r.mask_artifact
         WHERE r.study_id = 2 ORDER BY r.id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let cli = ok_json(
        hepaflow()
            .args(["lesions", "--json", "--mask"])
            .arg(data.path().join("artifacts").join(&mask)),
    );
    let show =
        ok_json(db::service(&url, data.path(), &[]).args(["studies", "show", "2", "--json"]));
    assert_eq!(show["study"]["run_id"], run);
    assert_eq!(
        show["lesions"].as_array().unwrap().len(),
        cli["lesions"].as_array().unwrap().len()
    );
    assert!(
        (show["study"]["liver_ml"].as_f64().unwrap() - cli["liver_ml"].as_f64().unwrap()).abs()
            < 1e-6
    );
    assert!(
        show["metrics"]["tumour"]["dice"].is_number(),
        "{}",
        show["metrics"]
    );

    // The same content again is one study; an unchanged file is not read again.
    std::fs::copy(inbox.join("volume-0.nii.gz"), inbox.join("copy.nii.gz")).unwrap();
    let out = ok_json(
        db::service(&url, data.path(), &[])
            .args(["ingest", "--json"])
            .arg(&inbox),
    );
    let outcomes: Vec<&str> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.contains(&"duplicate"), "{outcomes:?}");
    assert!(!outcomes.contains(&"study"), "{outcomes:?}");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM studies").await, 2);

    // A rerun from analyze: a new run linked to the old one, reusing its mask.
    let out = db::service(&url, data.path(), &[])
        .args(["rerun", "--study", "2", "--from", "analyze"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = db::service(&url, data.path(), &[])
        .args(["run", "--once", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let runs: Vec<(i64, Option<i64>, String, Option<i32>)> = sqlx::query_as(
        "SELECT id, previous_run, state, lesion_count FROM runs WHERE study_id = 2 ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].1, Some(runs[0].0));
    assert_eq!(runs[1].2, "done");
    assert_eq!(runs[1].3, runs[0].3);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(DISTINCT mask_artifact) FROM runs WHERE study_id = 2"
        )
        .await,
        1
    );
    // Results are unique per run.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM (SELECT run_id FROM metrics GROUP BY run_id HAVING count(*) > 1) d"
        )
        .await,
        0
    );

    // Refusals say why.
    let out = db::service(&url, data.path(), &[])
        .args([
            "rerun", "--study", "2", "--from", "report", "--model", "demo",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--from segment"), "{}", stderr(&out));
    let out = db::service(&url, data.path(), &[])
        .args(["rerun", "--study", "99"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("no study 99"), "{}", stderr(&out));
    let broken = tempdir();
    std::fs::write(broken.path().join("card.json"), "{\"name\": 1}").unwrap();
    let out = db::service(&url, data.path(), &[])
        .args(["models", "register"])
        .arg(broken.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("card.json"), "{}", stderr(&out));
    let list = ok_json(db::service(&url, data.path(), &[]).args(["models", "list", "--json"]));
    assert_eq!(list[0]["name"], "demo");
    assert_eq!(list[0]["active"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_marks_its_run_failed_and_resumes_there() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let inbox = data.path().join("inbox");
    phantoms(&inbox, 1, 77, "96x96x12");
    let out = db::service(&url, data.path(), &[])
        .args(["ingest"])
        .arg(&inbox)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The stored CT disappears (a broken disk): segment fails transiently, then dies.
    let ct: String =
        sqlx::query_scalar("SELECT a.path FROM studies s JOIN artifacts a ON a.id = s.ct_artifact")
            .fetch_one(&pool)
            .await
            .unwrap();
    let ct_path = data.path().join("artifacts").join(&ct);
    let saved = std::fs::read(&ct_path).unwrap();
    std::fs::remove_file(&ct_path).unwrap();
    sqlx::query("UPDATE jobs SET max_attempts = 2 WHERE kind = 'segment'")
        .execute(&pool)
        .await
        .unwrap();
    let _w = db::worker(&url, data.path(), "gpu,cpu", &[]);
    wait_until(Duration::from_secs(60), "the run fails", || async {
        scalar(&pool, "SELECT count(*) FROM runs WHERE state = 'failed'").await == 1
    })
    .await;
    let (state, error): (String, String) =
        sqlx::query_as("SELECT state, last_error FROM jobs WHERE kind = 'segment'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "failed", "a missing file is a permanent error");
    assert!(error.contains("CT volume"), "{error}");
    // Put the file back and retry the job: the run resumes at segment and finishes.
    std::fs::write(&ct_path, saved).unwrap();
    sqlx::query("UPDATE runs SET state = 'running', error = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let id = scalar(&pool, "SELECT id FROM jobs WHERE kind = 'segment'").await;
    let out = db::service(&url, data.path(), &[])
        .args(["jobs", "retry", &id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(Duration::from_secs(60), "the run is done", || async {
        scalar(&pool, "SELECT count(*) FROM runs WHERE state = 'done'").await == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_fire_every_tick_exactly_once() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let jobs = tempdir();
    std::fs::write(
        jobs.path().join("every.toml"),
        "name = \"every\"\ncron = \"* * * * * *\"\njob = \"scan_inbox\"\n",
    )
    .unwrap();
    let jobs_dir = jobs.path().display().to_string();
    let env = [("HEPAFLOW_JOBS_DIR", jobs_dir.as_str())];
    let start = |_: usize| {
        Proc(
            db::service(&url, data.path(), &env)
                .arg("scheduler")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut nodes: Vec<Proc> = (0..3).map(start).collect();
    wait_until(Duration::from_secs(30), "12 ticks", || async {
        scalar(&pool, "SELECT count(*) FROM schedule_ticks").await >= 12
    })
    .await;
    nodes[0].signal(libc::SIGKILL);
    wait_until(Duration::from_secs(40), "32 ticks", || async {
        scalar(&pool, "SELECT count(*) FROM schedule_ticks").await >= 32
    })
    .await;
    for n in &nodes[1..] {
        n.signal(libc::SIGTERM);
    }
    for n in &mut nodes[1..] {
        assert!(
            n.wait_for(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
    }
    let ticks: Vec<(DateTime<Utc>, Option<i64>)> =
        sqlx::query_as("SELECT tick_at, job_id FROM schedule_ticks ORDER BY tick_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    // 30 consecutive ticks in the middle: none missed, each with its own batch and job.
    let window = &ticks[1..31];
    for w in window.windows(2) {
        assert_eq!(
            (w[1].0 - w[0].0).num_seconds(),
            1,
            "a tick was missed: {w:?}"
        );
    }
    assert!(window.iter().all(|(_, j)| j.is_some()));
    let n = ticks.len() as i64;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM batches").await, n);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM jobs WHERE unique_key LIKE 'cron:every:%'"
        )
        .await,
        n
    );
    let firers = scalar(&pool, "SELECT count(DISTINCT fired_by) FROM schedule_ticks").await;
    assert!(firers >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_tick_runs_once_after_downtime() {
    use hepaflow::queue::scheduler::{self, Schedule};
    let (_url, pool) = db::fresh().await;
    let hourly = Schedule::parse(
        "h.toml",
        "name = \"h\"\ncron = \"0 * * * *\"\njob = \"scan_inbox\"\n",
    )
    .unwrap();
    let lazy = Schedule::parse(
        "l.toml",
        "name = \"l\"\ncron = \"0 * * * *\"\njob = \"digest\"\ncatch_up = false\n",
    )
    .unwrap();
    scheduler::sync(&pool, &[hourly.clone(), lazy.clone()])
        .await
        .unwrap();
    // Down for ten hours; "now" is pinned to half past the hour, so that no tick of this
    // hour is still live (a run in an hour's first minute would rightly fire that one too).
    let now = Utc::now()
        .duration_trunc(chrono::TimeDelta::hours(1))
        .unwrap()
        + chrono::TimeDelta::minutes(30);
    sqlx::query("UPDATE schedules SET last_tick = $1")
        .bind(now - chrono::TimeDelta::hours(10))
        .execute(&pool)
        .await
        .unwrap();
    let fired = scheduler::fire_due(&pool, &hourly, now, "a").await.unwrap();
    assert_eq!(fired.len(), 1, "one catch-up tick, not ten: {fired:?}");
    assert!(now - fired[0] < chrono::TimeDelta::hours(1));
    assert!(
        scheduler::fire_due(&pool, &hourly, now, "b")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        scheduler::fire_due(&pool, &lazy, now, "a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM jobs").await, 1);
    // A bad schedule file stops the service with the file and the reason (exit code 3).
    let jobs = tempdir();
    std::fs::write(
        jobs.path().join("bad.toml"),
        "name = \"x\"\ncron = \"61 * * * *\"\njob = \"digest\"\n",
    )
    .unwrap();
    let out = hepaflow()
        .env("HEPAFLOW_JOBS_DIR", jobs.path())
        .args(["schedules", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bad.toml") && stderr(&out).contains("cron"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ingests_leave_no_partial_artifacts() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let src = tempdir();
    phantoms(src.path(), 4, 900, "160x160x40");
    for round in 0..8 {
        let mut p = Proc(
            db::service(&url, data.path(), &[])
                .arg("ingest")
                .arg(src.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(150 + 90 * round)).await;
        p.signal(libc::SIGKILL);
        let _ = p.wait_for(Duration::from_secs(5));
    }
    let out = db::service(&url, data.path(), &[])
        .arg("ingest")
        .arg(src.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(scalar(&pool, "SELECT count(*) FROM studies").await, 4);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM studies WHERE truth_artifact IS NOT NULL"
        )
        .await,
        4
    );
    // Every file under a final name holds exactly the content its name says.
    let root = data.path().join("artifacts");
    let mut checked = 0;
    for shard in std::fs::read_dir(&root).unwrap().flatten() {
        let name = shard.file_name().to_string_lossy().into_owned();
        if name.len() != 2 {
            continue; // tmp/, models/
        }
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let fname = f.file_name().to_string_lossy().into_owned();
            let want = fname.split('.').next().unwrap().to_string();
            assert_eq!(sha(&f.path()), want, "{fname} is partial or wrong");
            checked += 1;
        }
    }
    assert!(checked >= 8);
    // Every row points to a complete file.
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT sha256, path FROM artifacts")
        .fetch_all(&pool)
        .await
        .unwrap();
    let store = hepaflow::store::artifacts::ArtifactStore::new(&root);
    for (s, p) in rows {
        store.verify(&p, &s).unwrap();
    }
}
