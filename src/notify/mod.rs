//! Email: the outbox and its delivery with lettre, over SMTP (STARTTLS or TLS, credentials)
//! or, on the embedded defaults, as `.eml` files in `<data>/mail/`.
//!
//! Emails are link-only by default: the subject and body carry the pseudonymous study number
//! and a link to the dashboard, no patient data. An outbox row is written in the transaction
//! that finishes what it announces, with a `send_email` job; a 4xx reply or a connection
//! error is retried with backoff by the queue, a 5xx reply fails the email at once. Every
//! attempt of one email carries the same Message-ID.

use std::path::{Path, PathBuf};

use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::config::MailSettings;
use crate::fsutil;
use crate::queue::{self, NewJob};

/// How emails leave.
#[derive(Clone)]
pub enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `.eml` files in a folder (the embedded default).
    File(PathBuf),
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("mail setting {name}: {reason}")]
pub struct MailConfigError {
    pub name: &'static str,
    pub reason: String,
}

impl Transport {
    pub fn from_settings(mail: &MailSettings, data_dir: &Path) -> Result<Self, MailConfigError> {
        let Some(url) = &mail.smtp_url else {
            return Ok(Transport::File(data_dir.join("mail")));
        };
        let mut b =
            AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(|e| MailConfigError {
                name: "HEPAFLOW_SMTP_URL",
                reason: e.to_string(),
            })?;
        if let Some(user) = &mail.smtp_user {
            b = b.credentials(Credentials::new(
                user.clone(),
                mail.smtp_password.clone().unwrap_or_default(),
            ));
        }
        Ok(Transport::Smtp(
            b.timeout(Some(std::time::Duration::from_secs(20))).build(),
        ))
    }
}

/// An email to write to the outbox.
pub struct NewEmail<'a> {
    pub kind: &'a str,
    pub recipient: &'a str,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    pub attachment: Option<i64>,
    pub study_id: Option<i64>,
    pub run_id: Option<i64>,
    pub batch_id: Option<i64>,
}

fn domain_of(from: &str) -> String {
    from.rsplit('@')
        .next()
        .map(|d| d.trim_end_matches('>').trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Writes an outbox row and its `send_email` job in the caller's transaction. `None` when
/// that email already exists (a replayed step).
pub async fn enqueue(
    conn: &mut PgConnection,
    email: &NewEmail<'_>,
    from: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let message_id = format!(
        "<hepaflow.{}.{:016x}@{}>",
        email.kind,
        fastrand::u64(..),
        domain_of(from)
    );
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO emails (kind, recipient, subject, body_text, body_html, message_id,
             attachment, study_id, run_id, batch_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(email.kind)
    .bind(email.recipient)
    .bind(&email.subject)
    .bind(&email.body_text)
    .bind(&email.body_html)
    .bind(&message_id)
    .bind(email.attachment)
    .bind(email.study_id)
    .bind(email.run_id)
    .bind(email.batch_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        let job = NewJob::new("cpu", "send_email", serde_json::json!({ "email_id": id }))
            .unique(format!("send_email:{id}"))
            .attempts(8);
        queue::enqueue(conn, &job).await?;
    }
    Ok(id)
}

/// An outbox row.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct EmailRow {
    pub id: i64,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    pub message_id: String,
    pub attachment: Option<i64>,
    pub study_id: Option<i64>,
    pub run_id: Option<i64>,
    pub batch_id: Option<i64>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
}

const COLUMNS: &str = "id, kind, recipient, subject, body_text, body_html, message_id, attachment,
    study_id, run_id, batch_id, state, attempts, last_error, created_at, sent_at";

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<EmailRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM emails WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn list(
    pool: &PgPool,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<EmailRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM emails WHERE ($1::text IS NULL OR state = $1)
         ORDER BY id DESC LIMIT $2"
    ))
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Why a delivery failed.
#[derive(Debug)]
pub struct SendError {
    /// The server refused for good (5xx): retrying cannot help.
    pub permanent: bool,
    pub message: String,
}

/// Builds the MIME message: multipart text + HTML, the stored Message-ID, and the report as
/// an attachment when given.
pub fn build(
    email: &EmailRow,
    from: &str,
    attachment: Option<(String, Vec<u8>)>,
) -> Result<Message, SendError> {
    let bad = |what: &str, e: String| SendError {
        permanent: true,
        message: format!("{what}: {e}"),
    };
    let from: Mailbox = from.parse().map_err(|e| bad("sender", format!("{e}")))?;
    let to: Mailbox = email
        .recipient
        .parse()
        .map_err(|e| bad("recipient", format!("{e}")))?;
    let alt = MultiPart::alternative()
        .singlepart(SinglePart::plain(email.body_text.clone()))
        .singlepart(SinglePart::html(email.body_html.clone()));
    let body = match attachment {
        Some((name, bytes)) => MultiPart::mixed().multipart(alt).singlepart(
            Attachment::new(name).body(bytes, ContentType::parse("text/html").expect("valid")),
        ),
        None => alt,
    };
    Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(email.message_id.clone()))
        .multipart(body)
        .map_err(|e| bad("message", e.to_string()))
}

/// Delivers one message.
pub async fn deliver(
    transport: &Transport,
    email: &EmailRow,
    msg: Message,
) -> Result<(), SendError> {
    match transport {
        Transport::Smtp(t) => t.send(msg).await.map(|_| ()).map_err(|e| SendError {
            permanent: e.is_permanent(),
            message: format!("SMTP: {e}"),
        }),
        Transport::File(dir) => {
            let dir = dir.clone();
            let name = format!("{:06}-{}.eml", email.id, email.kind);
            let bytes = msg.formatted();
            tokio::task::spawn_blocking(move || fsutil::write_atomic(&dir.join(name), &bytes))
                .await
                .map_err(|e| SendError {
                    permanent: false,
                    message: e.to_string(),
                })?
                .map_err(|e| SendError {
                    permanent: false,
                    message: format!("mail folder: {e}"),
                })
        }
    }
}

/// Records a failed attempt on the outbox row.
pub async fn record_failure(
    pool: &PgPool,
    id: i64,
    error: &str,
    permanent: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE emails SET attempts = attempts + 1, last_error = $2,
             state = CASE WHEN $3 THEN 'failed' ELSE state END
         WHERE id = $1 AND state = 'pending'",
    )
    .bind(id)
    .bind(error)
    .bind(permanent)
    .execute(pool)
    .await?;
    Ok(())
}

/// The study email's subject and bodies (link only).
pub fn study_message(base_url: &str, study: i64, run: i64) -> (String, String, String) {
    let link = format!("{base_url}/studies/{study}/report?run={run}");
    let subject = format!("hepaflow: liver report ready for study {study}");
    let text = format!(
        "A liver and liver-tumour report is ready for study {study}.\n\n\
         Open it on the hospital network: {link}\n\n\
         This message holds no patient data. The report is software output and must be \
         verified by a radiologist.\n"
    );
    let html = format!(
        "<p>A liver and liver-tumour report is ready for study {study}.</p>\
         <p><a href=\"{link}\">Open the report</a> (hospital network).</p>\
         <p>This message holds no patient data. The report is software output and must be \
         verified by a radiologist.</p>"
    );
    (subject, text, html)
}

/// The digest email's subject and bodies (link only).
pub fn digest_message(
    base_url: &str,
    batch: i64,
    studies: usize,
    failed: usize,
) -> (String, String, String) {
    let link = format!("{base_url}/batches/{batch}/digest");
    let subject = format!("hepaflow: digest of batch {batch}");
    let text = format!(
        "Batch {batch}: {studies} studies processed, {failed} failed.\n\nDigest: {link}\n\n\
         This message holds no patient data.\n"
    );
    let html = format!(
        "<p>Batch {batch}: {studies} studies processed, {failed} failed.</p>\
         <p><a href=\"{link}\">Open the digest</a> (hospital network).</p>\
         <p>This message holds no patient data.</p>"
    );
    (subject, text, html)
}
