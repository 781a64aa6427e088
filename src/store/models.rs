//! The model registry.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::artifacts::ArtifactStore;
use crate::segment::{self, CARD_FILE, ModelCard};

/// A registered model.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: i64,
    pub name: String,
    pub version: String,
    pub weights_sha256: String,
    /// Folder (relative to the artifact store) holding the card and the weights.
    pub dir: String,
    pub active: bool,
    pub registered_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, version, weights_sha256, dir, active, registered_at";

/// Why a model could not be registered or activated.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Model(#[from] segment::ModelError),
    #[error("model {0:?} is already registered with other weights")]
    NameTaken(String),
    #[error("no model named {0:?} (see hepaflow models list)")]
    Unknown(String),
    #[error("copying the model into the artifact store: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

pub async fn list(pool: &PgPool) -> Result<Vec<ModelRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM models ORDER BY id"))
        .fetch_all(pool)
        .await
}

pub async fn active(pool: &PgPool) -> Result<Option<ModelRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE active"))
        .fetch_optional(pool)
        .await
}

pub async fn by_name(pool: &PgPool, name: &str) -> Result<Option<ModelRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await
}

pub async fn by_id(pool: &PgPool, id: i64) -> Result<ModelRow, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE id = $1"))
        .bind(id)
        .fetch_one(pool)
        .await
}

/// Registers the model in `dir` (its card must match its weights): the card and weights are
/// copied into `<artifacts>/models/<weights sha256>/`. The first model becomes active.
/// Registering the same model twice is a no-op.
pub async fn register(
    pool: &PgPool,
    store: &ArtifactStore,
    dir: &Path,
) -> Result<ModelRow, RegistryError> {
    let card_path = dir.join(CARD_FILE);
    let card: ModelCard = {
        let text =
            std::fs::read_to_string(&card_path).map_err(|e| segment::ModelError::Missing {
                path: card_path.display().to_string(),
                what: if e.kind() == std::io::ErrorKind::NotFound {
                    "model card"
                } else {
                    "unreadable model card"
                },
            })?;
        serde_json::from_str(&text).map_err(|e| segment::ModelError::Card {
            path: card_path.display().to_string(),
            reason: e.to_string(),
        })?
    };
    let weights = dir.join(&card.weights_file);
    let sha = segment::sha256_file(&weights).map_err(|_| segment::ModelError::Missing {
        path: weights.display().to_string(),
        what: "weights file named by the card",
    })?;
    if sha != card.weights_sha256 {
        return Err(segment::ModelError::HashMismatch {
            path: weights.display().to_string(),
            card: card.weights_sha256,
            actual: sha,
        }
        .into());
    }
    if let Some(existing) = by_name(pool, &card.name).await? {
        if existing.weights_sha256 == sha {
            return Ok(existing);
        }
        return Err(RegistryError::NameTaken(card.name));
    }
    let rel = format!("models/{sha}");
    let target = store.path(&rel);
    std::fs::create_dir_all(&target)?;
    for f in [CARD_FILE, card.weights_file.as_str()] {
        let tmp = target.join(format!(".tmp-{f}"));
        std::fs::copy(dir.join(f), &tmp)?;
        crate::fsutil::commit_temp(&tmp, &target.join(f))?;
    }
    let card_json = serde_json::to_value(&card).map_err(std::io::Error::other)?;
    let mut tx = pool.begin().await?;
    let none_active: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM models WHERE active)")
            .fetch_one(&mut *tx)
            .await?;
    let row: ModelRow = sqlx::query_as(&format!(
        "INSERT INTO models (name, version, weights_sha256, card, dir, active)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(&card.name)
    .bind(&card.version)
    .bind(&sha)
    .bind(card_json)
    .bind(&rel)
    .bind(none_active)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Makes `name` the active model.
pub async fn activate(pool: &PgPool, name: &str) -> Result<ModelRow, RegistryError> {
    let mut tx = pool.begin().await?;
    let Some(id): Option<i64> = sqlx::query_scalar("SELECT id FROM models WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Err(RegistryError::Unknown(name.into()));
    };
    sqlx::query("UPDATE models SET active = false WHERE active AND id <> $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE models SET active = true WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(by_id(pool, id).await?)
}
