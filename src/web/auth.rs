//! Logins, sessions and CSRF.
//!
//! The session cookie carries a random 256-bit token (the database keeps its sha256),
//! `HttpOnly`, `SameSite=Strict`, `Secure` behind TLS. Every POST carries the session's CSRF
//! token (the login form a token bound to a short-lived cookie). Failed logins are counted per
//! account name: past the hourly limit every attempt is refused without checking the password.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Ctx, WebError, render};
use crate::store::audit;
use crate::store::users::{self, Login, Role, Session};

pub const SESSION_COOKIE: &str = "hepaflow_session";
const LOGIN_COOKIE: &str = "hepaflow_login";

/// The value of cookie `name` in the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn set_cookie(ctx: &Ctx, name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
    let mut c = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
    if let Some(s) = max_age {
        c.push_str(&format!("; Max-Age={s}"));
    }
    if ctx.settings.web.secure_cookies {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).unwrap_or(HeaderValue::from_static(""))
}

/// Equal strings, compared in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A local path to return to after login (`/` for anything else).
fn local_target(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && n.len() <= 512
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_string()
        }
        _ => "/".into(),
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A logged-in user; a request without a live session is sent to the login page.
pub struct Viewer(pub Session);

impl FromRequestParts<Arc<Ctx>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Ctx>) -> Result<Self, Response> {
        let live = match cookie(&parts.headers, SESSION_COOKIE) {
            Some(token) => users::touch_session(
                &ctx.pool,
                token,
                ctx.settings.web.idle,
                ctx.settings.web.max_age,
            )
            .await
            .map_err(|e| WebError::from(e).into_response())?,
            None => None,
        };
        match live {
            Some(s) => Ok(Viewer(s)),
            None => {
                let back = if parts.method == Method::GET {
                    parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "/".into())
                } else {
                    "/".into()
                };
                let to = format!("/login?next={}", percent_encode(&local_target(Some(&back))));
                Err(Redirect::to(&to).into_response())
            }
        }
    }
}

/// A logged-in admin; others get 403.
pub struct Admin(pub Session);

impl FromRequestParts<Arc<Ctx>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Ctx>) -> Result<Self, Response> {
        let Viewer(s) = Viewer::from_request_parts(parts, ctx).await?;
        if s.role() != Role::Admin {
            return Err(WebError::Forbidden("This needs an admin account.").into_response());
        }
        Ok(Admin(s))
    }
}

/// Refuses a POST whose form token is not the session's.
pub fn check_csrf(session: &Session, token: &str) -> Result<(), WebError> {
    if same_token(&session.csrf, token) {
        Ok(())
    } else {
        Err(WebError::Forbidden(
            "The form was stale or did not come from this site; reload the page and try again.",
        ))
    }
}

#[derive(Template)]
#[template(path = "web/login.html")]
struct LoginPage<'a> {
    csrf: &'a str,
    next: &'a str,
    username: &'a str,
    message: Option<&'a str>,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

fn login_form(
    ctx: &Ctx,
    status: StatusCode,
    next: &str,
    username: &str,
    message: Option<&str>,
) -> Result<Response, WebError> {
    let token = users::random_hex(32).map_err(WebError::internal)?;
    let page = LoginPage {
        csrf: &token,
        next,
        username,
        message,
    };
    let mut res = render(&page)?;
    *res.status_mut() = status;
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(ctx, LOGIN_COOKIE, &token, "/login", Some(3600)),
    );
    Ok(res)
}

pub async fn login_page(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<NextQuery>,
) -> Result<Response, WebError> {
    login_form(
        &ctx,
        StatusCode::OK,
        &local_target(q.next.as_deref()),
        "",
        None,
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

pub async fn login(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Result<Response, WebError> {
    let next = local_target(f.next.as_deref());
    let name = f.username.trim().to_lowercase();
    let bound = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if bound.is_empty() || !same_token(bound, &f.csrf) {
        return login_form(
            &ctx,
            StatusCode::FORBIDDEN,
            &next,
            &name,
            Some("The login form expired. Please try again."),
        );
    }
    if name.is_empty() || name.len() > 63 || f.password.len() > 1024 {
        return login_form(
            &ctx,
            StatusCode::UNAUTHORIZED,
            &next,
            "",
            Some("Wrong user name or password."),
        );
    }
    let limit = ctx.settings.web.login_failures_per_hour;
    match users::login(&ctx.pool, &name, &f.password, limit).await? {
        Login::Ok { user_id } => {
            let token = users::start_session(&ctx.pool, user_id)
                .await
                .map_err(WebError::internal)?;
            audit::record(&ctx.pool, Some(user_id), &name, "login", None, json!({})).await?;
            let mut res = Redirect::to(&next).into_response();
            let h = res.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(&ctx, SESSION_COOKIE, &token, "/", None),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(&ctx, LOGIN_COOKIE, "", "/login", Some(0)),
            );
            Ok(res)
        }
        Login::Refused => {
            audit::record(&ctx.pool, None, &name, "login_failed", None, json!({})).await?;
            login_form(
                &ctx,
                StatusCode::UNAUTHORIZED,
                &next,
                &name,
                Some("Wrong user name or password."),
            )
        }
        Login::Locked => {
            audit::record(&ctx.pool, None, &name, "login_locked", None, json!({})).await?;
            login_form(
                &ctx,
                StatusCode::TOO_MANY_REQUESTS,
                &next,
                &name,
                Some(
                    "Too many failed logins for this account. Try again later, or ask an admin to reset the password.",
                ),
            )
        }
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

pub async fn logout(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    Viewer(s): Viewer,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    check_csrf(&s, &f.csrf)?;
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        users::end_session(&ctx.pool, token).await?;
    }
    audit::record(
        &ctx.pool,
        Some(s.user_id),
        &s.username,
        "logout",
        None,
        json!({}),
    )
    .await?;
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&ctx, SESSION_COOKIE, "", "/", Some(0)),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(
            local_target(Some("/studies/3/report?run=4")),
            "/studies/3/report?run=4"
        );
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "evil",
            "/a b",
        ] {
            assert_eq!(local_target(Some(bad)), "/", "{bad}");
        }
        assert_eq!(local_target(None), "/");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; hepaflow_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        assert!(!same_token("", "x"));
    }
}
