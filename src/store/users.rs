//! Dashboard accounts, their sessions and failed logins. Passwords are kept only as argon2id
//! hashes; sessions only as the sha256 of their cookie token.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::artifacts::hex;

/// What an account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads studies, reports and digests.
    Clinician,
    /// Also reruns studies, retries jobs and reads the job queue and the audit trail.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "clinician" => Some(Role::Clinician),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Why an account change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(
        "user name {0:?}: use 1 to 63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("user {0:?} already exists")]
    Exists(String),
    #[error("no user {0:?}")]
    Unknown(String),
    #[error("the password must have at least {MIN_PASSWORD} characters")]
    ShortPassword,
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// An argon2id hash (PHC string) of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| UserError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// `n` random bytes from the operating system, as lower-case hex.
pub fn random_hex(n: usize) -> Result<String, getrandom::Error> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b)?;
    Ok(hex(&b))
}

/// The sha256 of a session token, as stored.
pub fn token_digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// An account, without its hash.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub role: String,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub password_at: DateTime<Utc>,
    pub last_login: Option<DateTime<Utc>>,
}

pub async fn add(
    pool: &PgPool,
    username: &str,
    password: &str,
    role: Role,
) -> Result<i64, UserError> {
    if !valid_name(username) {
        return Err(UserError::BadName(username.into()));
    }
    if password.chars().count() < MIN_PASSWORD {
        return Err(UserError::ShortPassword);
    }
    let hash = hash_password(password)?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3)
         ON CONFLICT (username) DO NOTHING RETURNING id",
    )
    .bind(username)
    .bind(&hash)
    .bind(role.as_str())
    .fetch_optional(pool)
    .await?;
    id.ok_or_else(|| UserError::Exists(username.into()))
}

/// Sets a new password and ends the account's sessions.
pub async fn set_password(pool: &PgPool, username: &str, password: &str) -> Result<i64, UserError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(UserError::ShortPassword);
    }
    let hash = hash_password(password)?;
    let mut tx = pool.begin().await?;
    let id: Option<i64> = sqlx::query_scalar(
        "UPDATE users SET password_hash = $2, password_at = now() WHERE username = $1 RETURNING id",
    )
    .bind(username)
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let id = id.ok_or_else(|| UserError::Unknown(username.into()))?;
    end_sessions(&mut tx, id).await?;
    tx.commit().await?;
    Ok(id)
}

async fn end_sessions(conn: &mut sqlx::PgConnection, user: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM web_sessions WHERE user_id = $1")
        .bind(user)
        .execute(conn)
        .await?;
    Ok(())
}

/// Disables or enables an account; disabling ends its sessions.
pub async fn set_disabled(pool: &PgPool, username: &str, disabled: bool) -> Result<i64, UserError> {
    let mut tx = pool.begin().await?;
    let id: Option<i64> =
        sqlx::query_scalar("UPDATE users SET disabled = $2 WHERE username = $1 RETURNING id")
            .bind(username)
            .bind(disabled)
            .fetch_optional(&mut *tx)
            .await?;
    let id = id.ok_or_else(|| UserError::Unknown(username.into()))?;
    if disabled {
        end_sessions(&mut tx, id).await?;
    }
    tx.commit().await?;
    Ok(id)
}

pub async fn list(pool: &PgPool) -> Result<Vec<UserRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.id, u.username, u.role, u.disabled, u.created_at, u.password_at,
                (SELECT max(at) FROM audit_events a WHERE a.user_id = u.id AND a.action = 'login')
                    AS last_login
         FROM users u ORDER BY u.username",
    )
    .fetch_all(pool)
    .await
}

/// What a login attempt found.
pub enum Login {
    Ok {
        user_id: i64,
    },
    /// Unknown name, wrong password or disabled account (not told apart to the client).
    Refused,
    /// Too many failed logins for this account name in the last hour.
    Locked,
}

/// Checks a name and password, counting failures per account name; at most `per_hour`
/// failures an hour are checked, after which every attempt is refused as `Locked`.
pub async fn login(
    pool: &PgPool,
    username: &str,
    password: &str,
    per_hour: i64,
) -> Result<Login, sqlx::Error> {
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM login_failures WHERE username = $1 AND at > now() - interval '1 hour'",
    )
    .bind(username)
    .fetch_one(pool)
    .await?;
    if failures >= per_hour {
        return Ok(Login::Locked);
    }
    let row: Option<(i64, String, bool)> =
        sqlx::query_as("SELECT id, password_hash, disabled FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(pool)
            .await?;
    // An unknown name costs the same hashing work as a known one.
    let hash = match &row {
        Some((_, h, _)) => h.clone(),
        None => dummy_hash().to_string(),
    };
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash))
        .await
        .unwrap_or(false);
    match row {
        Some((id, _, false)) if ok => Ok(Login::Ok { user_id: id }),
        _ => {
            sqlx::query("INSERT INTO login_failures (username) VALUES ($1)")
                .bind(username)
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM login_failures WHERE at < now() - interval '1 day'")
                .execute(pool)
                .await?;
            Ok(Login::Refused)
        }
    }
}

fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not a password of anyone").unwrap_or_default())
}

/// A logged-in session, as each request sees it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Session {
    pub user_id: i64,
    pub username: String,
    pub role: String,
    pub csrf: String,
}

impl Session {
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Clinician)
    }
}

/// Starts a session; returns the cookie token (only its digest is stored).
pub async fn start_session(pool: &PgPool, user_id: i64) -> Result<String, UserError> {
    let token = random_hex(32).map_err(|e| UserError::Hash(e.to_string()))?;
    let csrf = random_hex(32).map_err(|e| UserError::Hash(e.to_string()))?;
    sqlx::query("INSERT INTO web_sessions (token_sha256, user_id, csrf) VALUES ($1, $2, $3)")
        .bind(token_digest(&token))
        .bind(user_id)
        .bind(csrf)
        .execute(pool)
        .await?;
    Ok(token)
}

/// The live session of a token, refreshed; `None` (and the session removed) when it is
/// unknown, idle longer than `idle`, older than `max_age`, or its account is disabled.
pub async fn touch_session(
    pool: &PgPool,
    token: &str,
    idle: std::time::Duration,
    max_age: std::time::Duration,
) -> Result<Option<Session>, sqlx::Error> {
    let digest = token_digest(token);
    let live: Option<Session> = sqlx::query_as(
        "UPDATE web_sessions s SET last_seen = now()
         FROM users u
         WHERE s.token_sha256 = $1 AND u.id = s.user_id AND NOT u.disabled
           AND s.last_seen > now() - make_interval(secs => $2)
           AND s.created_at > now() - make_interval(secs => $3)
         RETURNING s.user_id, u.username, u.role, s.csrf",
    )
    .bind(&digest)
    .bind(idle.as_secs_f64())
    .bind(max_age.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    if live.is_none() {
        end_session(pool, token).await?;
    }
    Ok(live)
}

pub async fn end_session(pool: &PgPool, token: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM web_sessions WHERE token_sha256 = $1")
        .bind(token_digest(token))
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["alice", "dr.smith", "r2-d2", "a_b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Alice", "-x", "a b", "x/../y", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
    }
}
