//! The append-only audit trail: every view, download, rerun, retry, email, login and account
//! change. The database refuses updates and deletes of these rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;

/// One audited action. `actor` is the user name, or `system` for the service itself.
pub async fn record<'e>(
    db: impl PgExecutor<'e>,
    user_id: Option<i64>,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_events (user_id, actor, action, target, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user_id)
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(detail)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: Value,
}

/// The latest events, newest first.
pub async fn latest<'e>(db: impl PgExecutor<'e>, limit: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, target, detail FROM audit_events ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}
