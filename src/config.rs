//! Settings: embedded defaults, overridden by `HEPAFLOW_*` environment variables and
//! `DATABASE_URL`.

use std::path::PathBuf;
use std::time::Duration;

use crate::volume::ReadLimits;

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Bounds for reading untrusted NIfTI files (`HEPAFLOW_MAX_DECODED_BYTES`).
    pub read_limits: ReadLimits,
    /// The data folder: inbox, artifacts, quarantine, embedded Postgres, mail
    /// (`HEPAFLOW_DATA_DIR`, default `./var`).
    pub data_dir: PathBuf,
    /// An external Postgres server (`DATABASE_URL`); without it hepaflow runs its own cluster
    /// under `<data>/pg`.
    pub database_url: Option<String>,
    /// The schedule files (`HEPAFLOW_JOBS_DIR`, default `./jobs`).
    pub jobs_dir: PathBuf,
    /// The model registered and activated when the registry is empty
    /// (`HEPAFLOW_DEFAULT_MODEL`, default `./models/demo`).
    pub default_model: PathBuf,
    /// How long `worker`, `scheduler` and `serve` wait for a database that is not reachable
    /// yet (starting, restarting) before giving up (`HEPAFLOW_DB_WAIT_MS`, default 60000).
    pub database_wait: Duration,
    /// Job queue timings.
    pub queue: QueueSettings,
    /// An inbox file counts as complete once unchanged for this long, or when a `NAME.done`
    /// marker exists (`HEPAFLOW_INBOX_SETTLE_MS`, default 2000).
    pub inbox_settle: Duration,
    /// Email delivery.
    pub mail: MailSettings,
    /// The dashboard.
    pub web: WebSettings,
}

/// The dashboard (`HEPAFLOW_LISTEN`, `HEPAFLOW_SESSION_IDLE_MIN`, `HEPAFLOW_SECURE_COOKIES`).
#[derive(Clone, Debug)]
pub struct WebSettings {
    /// The address `serve` listens on (default `127.0.0.1:8080`).
    pub listen: String,
    /// A session unused this long ends (default 30 minutes).
    pub idle: Duration,
    /// A session ends this long after login whatever its use (12 hours).
    pub max_age: Duration,
    /// Mark the session cookie `Secure` (default: when `HEPAFLOW_BASE_URL` is https).
    pub secure_cookies: bool,
    /// Failed logins checked per account name and hour; later attempts are refused (100).
    pub login_failures_per_hour: i64,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            listen: "127.0.0.1:8080".into(),
            idle: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(12 * 3600),
            secure_cookies: false,
            login_failures_per_hour: 100,
        }
    }
}

/// Email delivery (`HEPAFLOW_SMTP_URL`, `HEPAFLOW_SMTP_USER`, `HEPAFLOW_SMTP_PASSWORD`,
/// `HEPAFLOW_MAIL_FROM`, `HEPAFLOW_BASE_URL`, `HEPAFLOW_MAIL_ATTACH_REPORTS`,
/// `HEPAFLOW_NOTIFY`).
#[derive(Clone, Debug)]
pub struct MailSettings {
    /// `smtp://host:port` (plain, or `?tls=required` for STARTTLS) or `smtps://host:port`
    /// (TLS); credentials in the URL or from `HEPAFLOW_SMTP_USER`/`_PASSWORD`. Without it,
    /// emails are written as `.eml` files to `<data>/mail/`.
    pub smtp_url: Option<String>,
    pub smtp_user: Option<String>,
    pub smtp_password: Option<String>,
    pub from: String,
    /// The dashboard's address, for the links in emails (default `http://localhost:8080`).
    pub base_url: String,
    /// Attach the self-contained report to study emails (default off: link only).
    pub attach_reports: bool,
    /// Recipients of study emails when the schedule names none (comma-separated,
    /// default `radiology@localhost`; empty for none).
    pub default_recipients: Vec<String>,
}

impl Default for MailSettings {
    fn default() -> Self {
        MailSettings {
            smtp_url: None,
            smtp_user: None,
            smtp_password: None,
            from: "hepaflow <hepaflow@localhost>".into(),
            base_url: "http://localhost:8080".into(),
            attach_reports: false,
            default_recipients: vec!["radiology@localhost".into()],
        }
    }
}

/// Job queue timings (`HEPAFLOW_LEASE_MS`, `HEPAFLOW_POLL_MS`, `HEPAFLOW_RETRY_BASE_MS`,
/// `HEPAFLOW_GRACE_MS`).
#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// How long a claimed job stays owned without a heartbeat (default 60 s); heartbeats
    /// every third of it.
    pub lease: Duration,
    /// Polling fallback when no notification arrives (default 1 s).
    pub poll: Duration,
    /// First retry delay; doubles with each attempt, ±25 % jitter, at most one hour
    /// (default 10 s).
    pub retry_base: Duration,
    /// On SIGTERM, how long running jobs may take to finish before they are released
    /// (default 30 s).
    pub grace: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            retry_base: Duration::from_secs(10),
            grace: Duration::from_secs(30),
        }
    }
}

/// A setting that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("setting {name} = {value:?}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl Settings {
    /// Defaults overridden by the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults overridden by `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut s = Settings {
            read_limits: ReadLimits::default(),
            data_dir: PathBuf::from("var"),
            database_url: None,
            jobs_dir: PathBuf::from("jobs"),
            default_model: PathBuf::from("models/demo"),
            database_wait: Duration::from_secs(60),
            queue: QueueSettings::default(),
            inbox_settle: Duration::from_secs(2),
            mail: MailSettings::default(),
            web: WebSettings::default(),
        };
        let nonempty = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = nonempty("HEPAFLOW_DATA_DIR") {
            s.data_dir = PathBuf::from(v);
        }
        s.database_url = nonempty("DATABASE_URL");
        if let Some(v) = nonempty("HEPAFLOW_JOBS_DIR") {
            s.jobs_dir = PathBuf::from(v);
        }
        if let Some(v) = nonempty("HEPAFLOW_DEFAULT_MODEL") {
            s.default_model = PathBuf::from(v);
        }
        let millis = |name: &str, slot: &mut Duration| -> Result<(), ConfigError> {
            if let Some(v) = nonempty(name) {
                let ms: u64 =
                    v.trim()
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| ConfigError {
                            name: name.into(),
                            value: v.clone(),
                            reason: "expected a positive number of milliseconds".into(),
                        })?;
                *slot = Duration::from_millis(ms);
            }
            Ok(())
        };
        millis("HEPAFLOW_LEASE_MS", &mut s.queue.lease)?;
        millis("HEPAFLOW_POLL_MS", &mut s.queue.poll)?;
        millis("HEPAFLOW_RETRY_BASE_MS", &mut s.queue.retry_base)?;
        millis("HEPAFLOW_GRACE_MS", &mut s.queue.grace)?;
        millis("HEPAFLOW_INBOX_SETTLE_MS", &mut s.inbox_settle)?;
        millis("HEPAFLOW_DB_WAIT_MS", &mut s.database_wait)?;
        s.mail.smtp_url = nonempty("HEPAFLOW_SMTP_URL");
        s.mail.smtp_user = nonempty("HEPAFLOW_SMTP_USER");
        s.mail.smtp_password = lookup("HEPAFLOW_SMTP_PASSWORD");
        if let Some(v) = nonempty("HEPAFLOW_MAIL_FROM") {
            s.mail.from = v;
        }
        if let Some(v) = nonempty("HEPAFLOW_BASE_URL") {
            s.mail.base_url = v.trim_end_matches('/').to_string();
        }
        if let Some(v) = nonempty("HEPAFLOW_MAIL_ATTACH_REPORTS") {
            s.mail.attach_reports = flag("HEPAFLOW_MAIL_ATTACH_REPORTS", v)?;
        }
        if let Some(v) = lookup("HEPAFLOW_NOTIFY") {
            s.mail.default_recipients = v
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
        }
        if let Some(v) = nonempty("HEPAFLOW_LISTEN") {
            s.web.listen = v.trim().to_string();
        }
        if let Some(v) = nonempty("HEPAFLOW_SESSION_IDLE_MIN") {
            let min: u64 = v
                .trim()
                .parse()
                .ok()
                .filter(|&n| (1..=24 * 60).contains(&n))
                .ok_or_else(|| ConfigError {
                    name: "HEPAFLOW_SESSION_IDLE_MIN".into(),
                    value: v.clone(),
                    reason: "expected minutes from 1 to 1440".into(),
                })?;
            s.web.idle = Duration::from_secs(min * 60);
        }
        s.web.secure_cookies = s.mail.base_url.starts_with("https://");
        if let Some(v) = nonempty("HEPAFLOW_SECURE_COOKIES") {
            s.web.secure_cookies = flag("HEPAFLOW_SECURE_COOKIES", v)?;
        }
        const MAX: &str = "HEPAFLOW_MAX_DECODED_BYTES";
        if let Some(v) = lookup(MAX) {
            s.read_limits.max_decoded_bytes = parse_bytes(&v).ok_or_else(|| ConfigError {
                name: MAX.into(),
                value: v.clone(),
                reason: "expected a positive byte count such as 2147483648, 512M or 2G".into(),
            })?;
        }
        Ok(s)
    }
}

/// `true`/`false` (also 1/0, yes/no, on/off).
fn flag(name: &str, v: String) -> Result<bool, ConfigError> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError {
            name: name.into(),
            value: v,
            reason: "expected true or false".into(),
        }),
    }
}

/// `123`, `64K`, `512M`, `2G` (binary multiples).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult).filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn bad_value_names_the_setting() {
        let e = Settings::from_lookup(|k| (k == "HEPAFLOW_MAX_DECODED_BYTES").then(|| "x".into()))
            .unwrap_err();
        assert!(e.to_string().contains("HEPAFLOW_MAX_DECODED_BYTES"));
        let e =
            Settings::from_lookup(|k| (k == "HEPAFLOW_LEASE_MS").then(|| "-5".into())).unwrap_err();
        assert!(e.to_string().contains("HEPAFLOW_LEASE_MS"), "{e}");
    }
}
