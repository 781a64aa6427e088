//! The dashboard's pages: studies, a study, its reports, batch digests, and for admins the
//! job queue, reruns, retries and the audit trail.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::{Admin, CsrfForm, Viewer, check_csrf};
use super::{Ctx, WebError, render};
use crate::pipeline;
use crate::queue;
use crate::store::users::{Role, Session};
use crate::store::{audit, studies};

/// What the page header shows of the viewer.
pub struct Nav {
    pub username: String,
    pub admin: bool,
    pub csrf: String,
}

impl Nav {
    fn of(s: &Session) -> Nav {
        Nav {
            username: s.username.clone(),
            admin: s.role() == Role::Admin,
            csrf: s.csrf.clone(),
        }
    }
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Writes what the viewer did (a view, or an action without details) to the audit trail.
async fn audit_view(
    ctx: &Ctx,
    s: &Session,
    action: &str,
    target: Option<String>,
) -> Result<(), WebError> {
    audit::record(
        &ctx.pool,
        Some(s.user_id),
        &s.username,
        action,
        target.as_deref(),
        json!({}),
    )
    .await?;
    Ok(())
}

struct StudyLine {
    id: i64,
    state: String,
    step: String,
    lesions: String,
    liver_ml: String,
    tumour_ml: String,
    burden: String,
    liver_dice: String,
    tumour_dice: String,
    received: String,
    has_report: bool,
}

#[derive(Template)]
#[template(path = "web/studies.html")]
struct StudiesPage {
    nav: Nav,
    rows: Vec<StudyLine>,
    page: i64,
    pages: i64,
    total: i64,
}

/// Studies per page of the list.
const PAGE: i64 = 100;

#[derive(Deserialize)]
pub struct PageQuery {
    page: Option<i64>,
}

pub async fn studies(
    State(ctx): State<Arc<Ctx>>,
    Viewer(s): Viewer,
    Query(q): Query<PageQuery>,
) -> Result<Response, WebError> {
    let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let (list, total) = studies::page(&ctx.pool, PAGE, (page - 1) * PAGE).await?;
    let rows = list
        .into_iter()
        .map(|r| StudyLine {
            id: r.id,
            has_report: r.has_report,
            state: r.state,
            step: r.step,
            lesions: r.lesion_count.map_or("–".into(), |n| n.to_string()),
            liver_ml: fixed(r.liver_ml, 1),
            tumour_ml: fixed(r.tumour_ml, 1),
            burden: fixed(r.tumour_burden_pct, 1),
            liver_dice: fixed(r.liver_dice, 3),
            tumour_dice: fixed(r.tumour_dice, 3),
            received: when(r.created_at),
        })
        .collect();
    audit_view(&ctx, &s, "view_studies", None).await?;
    render(&StudiesPage {
        nav: Nav::of(&s),
        rows,
        page,
        pages: ((total + PAGE - 1) / PAGE).max(1),
        total,
    })
}

struct RunLine {
    id: i64,
    state: String,
    step: String,
    model: String,
    previous: String,
    started: String,
    finished: String,
    error: String,
    has_report: bool,
}

struct LesionLine {
    number: i32,
    volume_ml: String,
    axial_mm: String,
    max_mm: String,
    mean_hu: String,
    slices: String,
}

#[derive(Template)]
#[template(path = "web/study.html")]
struct StudyPage {
    nav: Nav,
    id: i64,
    state: String,
    step: String,
    model: String,
    grid: String,
    spacing: String,
    liver_ml: String,
    tumour_ml: String,
    burden: String,
    has_truth: bool,
    liver_dice: String,
    tumour_dice: String,
    error: String,
    runs: Vec<RunLine>,
    lesions: Vec<LesionLine>,
    steps: &'static [&'static str],
    latest_report: Option<i64>,
}

pub async fn study(
    State(ctx): State<Arc<Ctx>>,
    Viewer(s): Viewer,
    Path(id): Path<i64>,
) -> Result<Response, WebError> {
    let Some(sum) = studies::summary(&ctx.pool, id).await? else {
        return Err(WebError::NotFound);
    };
    let runs = studies::runs(&ctx.pool, id).await?;
    let reported: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE study_id = $1 AND report_artifact IS NOT NULL",
    )
    .bind(id)
    .fetch_all(&ctx.pool)
    .await?;
    let lesions = studies::lesions(&ctx.pool, sum.run_id).await?;
    audit_view(&ctx, &s, "view_study", Some(format!("study:{id}"))).await?;
    let page = StudyPage {
        nav: Nav::of(&s),
        id,
        state: sum.state,
        step: sum.step,
        model: sum.model,
        grid: sum
            .shape
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" × "),
        spacing: sum
            .spacing_mm
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" × "),
        liver_ml: fixed(sum.liver_ml, 1),
        tumour_ml: fixed(sum.tumour_ml, 1),
        burden: fixed(sum.tumour_burden_pct, 2),
        has_truth: sum.has_truth,
        liver_dice: fixed(sum.liver_dice, 3),
        tumour_dice: fixed(sum.tumour_dice, 3),
        error: sum.error.unwrap_or_default(),
        latest_report: reported.iter().copied().max(),
        runs: runs
            .into_iter()
            .rev()
            .map(|r| RunLine {
                has_report: reported.contains(&r.id),
                id: r.id,
                state: r.state,
                step: r.step,
                model: r.model,
                previous: r.previous_run.map_or("–".into(), |p| p.to_string()),
                started: when(r.created_at),
                finished: r.finished_at.map_or("–".into(), when),
                error: r.error.unwrap_or_default(),
            })
            .collect(),
        lesions: lesions
            .into_iter()
            .map(|l| LesionLine {
                number: l.number,
                volume_ml: format!("{:.2}", l.volume_ml),
                axial_mm: format!("{:.1}", l.longest_axial_diameter_mm),
                max_mm: format!("{:.1}", l.max_diameter_mm),
                mean_hu: fixed(l.mean_hu, 0),
                slices: format!("{}–{}", l.slice_first, l.slice_last),
            })
            .collect(),
        steps: &pipeline::STEPS,
    };
    render(&page)
}

#[derive(Deserialize)]
pub struct ReportQuery {
    run: Option<i64>,
    download: Option<u8>,
}

/// Reads a stored file by its row, checks its sha256 and serves it as a self-contained page.
async fn stored_page(
    ctx: &Ctx,
    rel: String,
    sha256: String,
    download_name: Option<String>,
) -> Result<Response, WebError> {
    let store = ctx.artifacts.clone();
    let bytes = tokio::task::spawn_blocking(move || store.read_verified(&rel, &sha256))
        .await
        .map_err(WebError::internal)?
        .map_err(WebError::internal)?;
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Reports are self-contained: inline styles and data-URI images, never a script.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    if let Some(name) = download_name {
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(res)
}

pub async fn report(
    State(ctx): State<Arc<Ctx>>,
    Viewer(s): Viewer,
    Path(study): Path<i64>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, WebError> {
    let row: Option<(i64, String, String)> = sqlx::query_as(
        "SELECT r.id, a.path, a.sha256 FROM runs r JOIN artifacts a ON a.id = r.report_artifact
         WHERE r.study_id = $1 AND ($2::bigint IS NULL OR r.id = $2)
         ORDER BY r.id DESC LIMIT 1",
    )
    .bind(study)
    .bind(q.run)
    .fetch_optional(&ctx.pool)
    .await?;
    let Some((run, rel, sha)) = row else {
        return Err(WebError::NotFound);
    };
    let download = q.download.unwrap_or(0) != 0;
    audit_view(
        &ctx,
        &s,
        if download {
            "download_report"
        } else {
            "view_report"
        },
        Some(format!("study:{study}/run:{run}")),
    )
    .await?;
    stored_page(
        &ctx,
        rel,
        sha,
        download.then(|| format!("study-{study}-run-{run}.html")),
    )
    .await
}

pub async fn digest(
    State(ctx): State<Arc<Ctx>>,
    Viewer(s): Viewer,
    Path(batch): Path<i64>,
) -> Result<Response, WebError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT a.path, a.sha256 FROM batches b JOIN artifacts a ON a.id = b.digest_artifact
         WHERE b.id = $1",
    )
    .bind(batch)
    .fetch_optional(&ctx.pool)
    .await?;
    let Some((rel, sha)) = row else {
        return Err(WebError::NotFound);
    };
    audit_view(&ctx, &s, "view_digest", Some(format!("batch:{batch}"))).await?;
    stored_page(&ctx, rel, sha, None).await
}

#[derive(Deserialize)]
pub struct RerunForm {
    csrf: String,
    from: String,
}

pub async fn rerun(
    State(ctx): State<Arc<Ctx>>,
    Admin(s): Admin,
    Path(study): Path<i64>,
    Form(f): Form<RerunForm>,
) -> Result<Response, WebError> {
    check_csrf(&s, &f.csrf)?;
    let run = match pipeline::rerun(&ctx.pool, study, &f.from, None).await {
        Ok(run) => run,
        Err(pipeline::RerunError::NoStudy(_)) => return Err(WebError::NotFound),
        Err(pipeline::RerunError::Db(e)) => return Err(e.into()),
        Err(e) => return Err(WebError::BadRequest(e.to_string())),
    };
    audit::record(
        &ctx.pool,
        Some(s.user_id),
        &s.username,
        "rerun",
        Some(&format!("study:{study}/run:{run}")),
        json!({ "from": f.from }),
    )
    .await?;
    Ok(Redirect::to(&format!("/studies/{study}")).into_response())
}

struct JobLine {
    id: i64,
    queue: String,
    kind: String,
    state: String,
    attempts: String,
    run: String,
    created: String,
    error: String,
    retryable: bool,
}

#[derive(Template)]
#[template(path = "web/jobs.html")]
struct JobsPage {
    nav: Nav,
    counts: Vec<(String, i64)>,
    filter: String,
    rows: Vec<JobLine>,
}

#[derive(Deserialize)]
pub struct JobsQuery {
    state: Option<String>,
}

const JOB_STATES: [&str; 6] = [
    "available",
    "running",
    "done",
    "failed",
    "dead",
    "cancelled",
];

pub async fn jobs(
    State(ctx): State<Arc<Ctx>>,
    Admin(s): Admin,
    Query(q): Query<JobsQuery>,
) -> Result<Response, WebError> {
    let filter = q
        .state
        .filter(|st| JOB_STATES.contains(&st.as_str()))
        .unwrap_or_default();
    let state = (!filter.is_empty()).then_some(filter.as_str());
    let rows = queue::list(&ctx.pool, state, None, 200).await?;
    let counts = queue::counts(&ctx.pool).await?;
    audit_view(&ctx, &s, "view_jobs", None).await?;
    let rows = rows
        .into_iter()
        .map(|j| JobLine {
            retryable: matches!(j.state.as_str(), "failed" | "dead" | "cancelled"),
            id: j.id,
            queue: j.queue,
            kind: j.kind,
            state: j.state,
            attempts: format!("{}/{}", j.attempt, j.max_attempts),
            run: j.run_id.map_or("–".into(), |r| r.to_string()),
            created: when(j.created_at),
            error: j.last_error.unwrap_or_default(),
        })
        .collect();
    render(&JobsPage {
        nav: Nav::of(&s),
        counts,
        filter,
        rows,
    })
}

pub async fn retry(
    State(ctx): State<Arc<Ctx>>,
    Admin(s): Admin,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    check_csrf(&s, &f.csrf)?;
    if queue::retry(&ctx.pool, id).await?.is_none() {
        return Err(WebError::BadRequest(format!(
            "Job {id} does not exist or is not failed, dead or cancelled."
        )));
    }
    audit_view(&ctx, &s, "retry_job", Some(format!("job:{id}"))).await?;
    Ok(Redirect::to("/jobs").into_response())
}

struct AuditLine {
    at: String,
    actor: String,
    action: String,
    target: String,
}

#[derive(Template)]
#[template(path = "web/audit.html")]
struct AuditPage {
    nav: Nav,
    rows: Vec<AuditLine>,
}

pub async fn audit(State(ctx): State<Arc<Ctx>>, Admin(s): Admin) -> Result<Response, WebError> {
    let rows = audit::latest(&ctx.pool, 500).await?;
    audit_view(&ctx, &s, "view_audit", None).await?;
    render(&AuditPage {
        nav: Nav::of(&s),
        rows: rows
            .into_iter()
            .map(|r| AuditLine {
                at: r.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                actor: r.actor,
                action: r.action,
                target: r.target.unwrap_or_default(),
            })
            .collect(),
    })
}
