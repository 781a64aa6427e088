//! The cron scheduler: schedules are data (`jobs/*.toml`), validated at start, synced to the
//! `schedules` table. The scheduler only enqueues. Each tick fires exactly once however many
//! schedulers run: the tick's row in `schedule_ticks` (primary key `(schedule, tick_at)`) and
//! its job commit in one transaction, and a second scheduler's insert of the same tick is a
//! no-op. A tick missed while no scheduler ran fires once on the next start (`catch_up`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::NewJob;

/// What a schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledJob {
    /// Scan the inbox and process new studies (a batch).
    ScanInbox,
    /// Send the digest of the batches since the last digest.
    Digest,
}

impl ScheduledJob {
    pub fn name(self) -> &'static str {
        match self {
            ScheduledJob::ScanInbox => "scan_inbox",
            ScheduledJob::Digest => "digest",
        }
    }
}

/// A schedule file as written (`jobs/NAME.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    name: String,
    /// Five fields (minute hour day month weekday) or six/seven with seconds (and year).
    cron: String,
    #[serde(default = "utc")]
    timezone: String,
    job: ScheduledJob,
    #[serde(default)]
    notify: Vec<String>,
    #[serde(default = "yes")]
    catch_up: bool,
    #[serde(default = "yes")]
    enabled: bool,
}

fn utc() -> String {
    "UTC".into()
}
fn yes() -> bool {
    true
}

/// A validated schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    pub expr: cron::Schedule,
    pub tz: Tz,
    pub job: ScheduledJob,
    pub notify: Vec<String>,
    pub catch_up: bool,
    pub enabled: bool,
}

/// A schedule file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("schedule {file}: {reason}")]
pub struct ScheduleError {
    pub file: String,
    pub reason: String,
}

/// Parses a cron expression; the usual five-field form gets a leading `0` seconds field.
pub fn parse_cron(text: &str) -> Result<cron::Schedule, String> {
    let fields = text.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {}", text.trim()),
        6 | 7 => text.trim().to_string(),
        n => {
            return Err(format!(
                "cron {text:?} has {n} fields; expected 5 (minute hour day month weekday), or 6–7 with seconds first"
            ));
        }
    };
    cron::Schedule::from_str(&full).map_err(|e| format!("cron {text:?}: {e}"))
}

fn valid_email(s: &str) -> bool {
    let mut parts = s.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && s.chars().all(|c| c.is_ascii_graphic())
}

impl Schedule {
    /// Parses and validates one schedule file's text.
    pub fn parse(file: &str, text: &str) -> Result<Schedule, ScheduleError> {
        let err = |reason: String| ScheduleError {
            file: file.into(),
            reason,
        };
        let f: ScheduleFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if f.name.is_empty()
            || !f
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(err(format!(
                "name {:?}: use letters, digits, '-' and '_'",
                f.name
            )));
        }
        let expr = parse_cron(&f.cron).map_err(err)?;
        let tz: Tz = f.timezone.parse().map_err(|_| {
            err(format!(
                "timezone {:?} is not an IANA zone name",
                f.timezone
            ))
        })?;
        if let Some(bad) = f.notify.iter().find(|a| !valid_email(a)) {
            return Err(err(format!("notify: {bad:?} is not an email address")));
        }
        Ok(Schedule {
            name: f.name,
            cron: f.cron,
            expr,
            tz,
            job: f.job,
            notify: f.notify,
            catch_up: f.catch_up,
            enabled: f.enabled,
        })
    }

    /// Ticks after `after` up to and including `until`, oldest first (at most `cap`, the newest).
    pub fn ticks_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        cap: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = std::collections::VecDeque::new();
        for t in self.expr.after(&after.with_timezone(&self.tz)) {
            let t = t.with_timezone(&Utc);
            if t > until {
                break;
            }
            if out.len() == cap {
                out.pop_front();
            }
            out.push_back(t);
        }
        out.into()
    }

    /// The next tick after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.expr
            .after(&now.with_timezone(&self.tz))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Loads every `*.toml` of a folder; names must be unique.
pub fn load_dir(dir: &Path) -> Result<Vec<Schedule>, ScheduleError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ScheduleError {
            file: dir.display().to_string(),
            reason: format!("cannot read the schedules folder: {e}"),
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out: Vec<Schedule> = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(&f).map_err(|e| ScheduleError {
            file: name.clone(),
            reason: e.to_string(),
        })?;
        let s = Schedule::parse(&name, &text)?;
        if out.iter().any(|o| o.name == s.name) {
            return Err(ScheduleError {
                file: name,
                reason: format!("schedule name {:?} is used twice", s.name),
            });
        }
        out.push(s);
    }
    Ok(out)
}

/// Writes the schedules to the database: new ones start from now (no back-fill), changed
/// ones keep their last tick, ones whose file is gone are disabled.
pub async fn sync(pool: &PgPool, schedules: &[Schedule]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for s in schedules {
        sqlx::query(
            "INSERT INTO schedules (name, cron, timezone, job, notify, catch_up, enabled, last_tick)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now())
             ON CONFLICT (name) DO UPDATE SET cron = $2, timezone = $3, job = $4, notify = $5,
                 catch_up = $6, enabled = $7, synced_at = now()",
        )
        .bind(&s.name)
        .bind(&s.cron)
        .bind(s.tz.name())
        .bind(s.job.name())
        .bind(&s.notify)
        .bind(s.catch_up)
        .bind(s.enabled)
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<String> = schedules.iter().map(|s| s.name.clone()).collect();
    sqlx::query("UPDATE schedules SET enabled = false WHERE NOT (name = ANY($1))")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Ticks due within this window fire one by one; older missed ticks collapse into one.
const LIVE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Fires the due ticks of one schedule; returns the ticks this call fired.
pub async fn fire_due(
    pool: &PgPool,
    s: &Schedule,
    now: DateTime<Utc>,
    scheduler_id: &str,
) -> Result<Vec<DateTime<Utc>>, sqlx::Error> {
    let last: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT last_tick FROM schedules WHERE name = $1 AND enabled")
            .bind(&s.name)
            .fetch_optional(pool)
            .await?
            .flatten();
    let Some(last) = last else {
        return Ok(vec![]);
    };
    let due = s.ticks_between(last, now, 10_000);
    let (old, live): (Vec<&DateTime<Utc>>, Vec<&DateTime<Utc>>) =
        due.iter().partition(|t| now - **t > LIVE_WINDOW);
    let mut fire: Vec<DateTime<Utc>> = Vec::new();
    if s.catch_up
        && let Some(t) = old.last()
    {
        fire.push(**t);
    }
    fire.extend(live.into_iter().copied());
    let mut fired = Vec::new();
    for t in fire {
        if fire_tick(pool, s, t, scheduler_id, "cron").await?.is_some() {
            fired.push(t);
        }
    }
    if let Some(newest) = due.last() {
        sqlx::query("UPDATE schedules SET last_tick = GREATEST(last_tick, $2) WHERE name = $1")
            .bind(&s.name)
            .bind(newest)
            .execute(pool)
            .await?;
    }
    Ok(fired)
}

/// Fires one tick: its row, its batch and its job in one transaction. `None` when the tick
/// had already fired (another scheduler).
pub async fn fire_tick(
    pool: &PgPool,
    s: &Schedule,
    tick: DateTime<Utc>,
    scheduler_id: &str,
    source: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO schedule_ticks (schedule, tick_at, fired_by) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(&s.name)
    .bind(tick)
    .bind(scheduler_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(None);
    }
    let batch: i64 = sqlx::query_scalar(
        "INSERT INTO batches (schedule, tick_at, notify) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(&s.name)
    .bind(tick)
    .bind(&s.notify)
    .fetch_one(&mut *tx)
    .await?;
    let payload = serde_json::json!({
        "batch_id": batch, "schedule": s.name, "tick": tick, "source": source,
    });
    let job = NewJob::new("cpu", s.job.name(), payload).unique(format!(
        "{source}:{}:{}",
        s.name,
        tick.to_rfc3339()
    ));
    let job_id = super::enqueue(&mut tx, &job).await?;
    sqlx::query("UPDATE schedule_ticks SET job_id = $3 WHERE schedule = $1 AND tick_at = $2")
        .bind(&s.name)
        .bind(tick)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(schedule = %s.name, tick = %tick, batch, "tick fired");
    Ok(job_id)
}

/// Fires every schedule's due ticks until `shutdown`.
pub async fn run(
    pool: PgPool,
    schedules: Vec<Schedule>,
    scheduler_id: String,
    shutdown: CancellationToken,
) {
    tracing::info!(scheduler = %scheduler_id, schedules = schedules.len(), "scheduler started");
    let mut pause = Duration::from_millis(200);
    loop {
        let now = Utc::now();
        let mut ok = true;
        for s in schedules.iter().filter(|s| s.enabled) {
            if let Err(e) = fire_due(&pool, s, now, &scheduler_id).await {
                tracing::warn!(schedule = %s.name, error = %e, "cannot fire ticks; retrying");
                ok = false;
            }
        }
        let wait = if ok {
            pause = Duration::from_millis(200);
            let next = schedules
                .iter()
                .filter(|s| s.enabled)
                .filter_map(|s| s.next_after(Utc::now()))
                .min();
            next.and_then(|n| (n - Utc::now()).to_std().ok())
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5))
                + Duration::from_millis(5)
        } else {
            pause = (pause * 2).min(Duration::from_secs(5));
            pause
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!(scheduler = %scheduler_id, "scheduler stopped");
}

/// Fires a schedule now, outside its cron times (`hepaflow schedules trigger`).
pub async fn trigger(pool: &PgPool, s: &Schedule, who: &str) -> Result<Option<i64>, sqlx::Error> {
    fire_tick(pool, s, Utc::now(), who, "manual").await
}

/// A schedule as stored.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ScheduleRow {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub job: String,
    pub notify: Vec<String>,
    pub catch_up: bool,
    pub enabled: bool,
    pub last_tick: Option<DateTime<Utc>>,
    pub ticks_fired: i64,
}

pub async fn list(pool: &PgPool) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.name, s.cron, s.timezone, s.job, s.notify, s.catch_up, s.enabled, s.last_tick,
                (SELECT count(*) FROM schedule_ticks t WHERE t.schedule = s.name) AS ticks_fired
         FROM schedules s ORDER BY s.name",
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(text: &str) -> Result<Schedule, ScheduleError> {
        Schedule::parse("test.toml", text)
    }

    #[test]
    fn five_fields_mean_minutes_and_zones_apply() {
        let s = sched(
            "name = \"nightly\"\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Zurich\"\njob = \"scan_inbox\"\n",
        )
        .unwrap();
        let from = DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        // 02:00 in Zurich (UTC+1 in November) is 01:00 UTC.
        assert_eq!(
            s.next_after(from).unwrap().to_rfc3339(),
            "2026-11-28T01:00:00+00:00"
        );
        let until = from + chrono::TimeDelta::days(3);
        assert_eq!(s.ticks_between(from, until, 100).len(), 3);
        assert_eq!(s.ticks_between(from, until, 2).len(), 2);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let cases = [
            (
                "name = \"a\"\ncron = \"0 2 * *\"\njob = \"scan_inbox\"",
                "4 fields",
            ),
            (
                "name = \"a\"\ncron = \"0 25 * * *\"\njob = \"scan_inbox\"",
                "cron",
            ),
            (
                "name = \"a\"\ncron = \"0 2 * * *\"\ntimezone = \"Mars/Olympus\"\njob = \"scan_inbox\"",
                "timezone",
            ),
            (
                "name = \"a\"\ncron = \"0 2 * * *\"\njob = \"reboot\"",
                "unknown variant",
            ),
            (
                "name = \"a\"\ncron = \"0 2 * * *\"\njob = \"digest\"\nnotify = [\"nobody\"]",
                "notify",
            ),
            (
                "name = \"a b\"\ncron = \"0 2 * * *\"\njob = \"digest\"",
                "name",
            ),
            (
                "name = \"a\"\ncron = \"0 2 * * *\"\njob = \"digest\"\ncolour = 1",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = sched(text).unwrap_err().to_string();
            assert!(e.contains("test.toml") && e.contains(want), "{text}: {e}");
        }
    }
}
