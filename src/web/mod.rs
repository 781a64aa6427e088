//! The dashboard: `app(ctx) -> Router` (axum), served by `hepaflow serve`.
//!
//! Every route except `/login`, `/healthz` and `/static/*` needs a session (see [`auth`]).
//! Clinicians read studies, reports and digests; admins also rerun studies, retry jobs and
//! read the job queue and the audit trail. Every view, download, rerun and retry is written to
//! the append-only `audit_events` table. Reports and digests are served by database id only:
//! no path from a request ever reaches the file system.

pub mod auth;
mod pages;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store::artifacts::ArtifactStore;

/// What the handlers share.
pub struct Ctx {
    pub pool: PgPool,
    pub settings: Settings,
    pub artifacts: ArtifactStore,
}

impl Ctx {
    pub fn new(pool: PgPool, settings: Settings) -> Arc<Ctx> {
        let artifacts = ArtifactStore::new(crate::pipeline::Folders::new(&settings).artifacts);
        Arc::new(Ctx {
            pool,
            settings,
            artifacts,
        })
    }
}

/// The dashboard's routes.
pub fn app(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/static/style.css", get(style))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/", get(pages::studies))
        .route("/studies", get(pages::studies))
        .route("/studies/{id}", get(pages::study))
        .route("/studies/{id}/report", get(pages::report))
        .route("/studies/{id}/rerun", post(pages::rerun))
        .route("/batches/{id}/digest", get(pages::digest))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{id}/retry", post(pages::retry))
        .route("/audit", get(pages::audit))
        .fallback(|| async { WebError::NotFound })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(ctx)
}

/// Serves `app` on `listener` until `stop` is cancelled.
pub async fn serve(
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app(ctx))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Headers on every response: no sniffing, no framing, no referrer, no caching of patient
/// data, and a content policy that allows no script at all.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::CACHE_CONTROL, "no-store");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    res
}

/// 200 when the database answers, 503 when it does not.
async fn health(axum::extract::State(ctx): axum::extract::State<Arc<Ctx>>) -> Response {
    match sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&ctx.pool)
        .await
    {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!("health check: database: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

const STYLE: &str = include_str!("../../templates/web/style.css");

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

/// What went wrong, as the client sees it: a status and a short message; internals go to the
/// log under a reference the page shows.
#[derive(Debug)]
pub enum WebError {
    NotFound,
    Forbidden(&'static str),
    BadRequest(String),
    Internal(String),
}

impl From<sqlx::Error> for WebError {
    fn from(e: sqlx::Error) -> Self {
        WebError::internal(format!("database: {e}"))
    }
}

impl WebError {
    /// Logs `detail` under a fresh reference and returns an error that shows only that.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let reference = crate::store::users::random_hex(4).unwrap_or_else(|_| "-".into());
        tracing::error!(reference = %reference, "dashboard: {detail}");
        WebError::Internal(reference)
    }
}

#[derive(Template)]
#[template(path = "web/error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, title, message) = match &self {
            WebError::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing here.".to_string(),
            ),
            WebError::Forbidden(why) => (StatusCode::FORBIDDEN, "Not allowed", why.to_string()),
            WebError::BadRequest(why) => (StatusCode::BAD_REQUEST, "Cannot do that", why.clone()),
            WebError::Internal(reference) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                format!("The service could not answer. Reference {reference} in its log."),
            ),
        };
        let page = ErrorPage {
            title,
            message: &message,
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message).into_response(),
        }
    }
}

/// Renders a template, or an internal error.
pub(crate) fn render<T: Template>(page: &T) -> Result<Response, WebError> {
    page.render()
        .map(|h| Html(h).into_response())
        .map_err(WebError::internal)
}
