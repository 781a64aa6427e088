//! The dashboard: the `Router` driven directly (sessions, roles, CSRF, login limits, idle
//! logout, reports by id, audit), the `serve` process, and Chromium through the login form.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use hepaflow::config::Settings;
use hepaflow::store::users::{self, Role};
use http_body_util::BodyExt;
use sqlx::PgPool;
use tower::ServiceExt;

use crate::db::{self, Proc, scalar};
use crate::support::{free_port, stderr, tempdir};

/// A browser-like client of the router: keeps cookies, does not follow redirects.
struct Client {
    app: Router,
    cookies: HashMap<String, String>,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn header(&self, name: header::HeaderName) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
    /// The value of hidden input `name` in the page.
    fn field(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker).unwrap_or_else(|| {
            panic!("no field {name} in:\n{}", self.body);
        }) + marker.len();
        self.body[start..].split('"').next().unwrap().to_string()
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    fn new(ctx: Arc<hepaflow::web::Ctx>) -> Client {
        Client {
            app: hepaflow::web::app(ctx),
            cookies: HashMap::new(),
        }
    }

    async fn send(&mut self, method: &str, uri: &str, form: Option<&[(&str, &str)]>) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header(header::COOKIE, c.join("; "));
        }
        let body = match form {
            Some(f) => {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                let s: Vec<String> = f.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
                Body::from(s.join("&"))
            }
            None => Body::empty(),
        };
        let res = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        for v in res.headers().get_all(header::SET_COOKIE) {
            let v = v.to_str().unwrap();
            let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            if val.is_empty() || attrs.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), val.to_string());
            }
        }
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&mut self, uri: &str) -> Reply {
        self.send("GET", uri, None).await
    }

    async fn post(&mut self, uri: &str, form: &[(&str, &str)]) -> Reply {
        self.send("POST", uri, Some(form)).await
    }

    async fn login(&mut self, name: &str, password: &str) -> Reply {
        let page = self.get("/login").await;
        assert_eq!(page.status, StatusCode::OK);
        let csrf = page.field("csrf");
        self.post(
            "/login",
            &[
                ("username", name),
                ("password", password),
                ("csrf", &csrf),
                ("next", "/studies"),
            ],
        )
        .await
    }

    /// The session's CSRF token, from a page that has the logout form.
    async fn csrf(&mut self) -> String {
        self.get("/studies").await.field("csrf")
    }
}

fn settings(url: &str, data: &Path) -> Settings {
    let url = url.to_string();
    let data = data.display().to_string();
    Settings::from_lookup(|k| match k {
        "DATABASE_URL" => Some(url.clone()),
        "HEPAFLOW_DATA_DIR" => Some(data.clone()),
        _ => None,
    })
    .unwrap()
}

const ADMIN_PW: &str = "admin password 1";
const CLIN_PW: &str = "clinician password 1";

async fn accounts(pool: &PgPool) {
    users::add(pool, "ada", ADMIN_PW, Role::Admin)
        .await
        .unwrap();
    users::add(pool, "cleo", CLIN_PW, Role::Clinician)
        .await
        .unwrap();
}

async fn actions(pool: &PgPool) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT actor, action, target FROM audit_events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_roles_and_csrf_guard_every_route() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    accounts(&pool).await;
    let ctx = hepaflow::web::Ctx::new(pool.clone(), settings(&url, data.path()));
    let mut anon = Client::new(ctx.clone());

    // Health and static files need no session; everything else sends to the login page.
    assert_eq!(anon.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(anon.get("/static/style.css").await.status, StatusCode::OK);
    for path in [
        "/",
        "/studies",
        "/studies/1",
        "/studies/1/report",
        "/batches/1/digest",
        "/jobs",
        "/audit",
    ] {
        let r = anon.get(path).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert!(
            r.location().starts_with("/login?next="),
            "{path}: {}",
            r.location()
        );
    }
    for path in ["/studies/1/rerun", "/jobs/1/retry", "/logout"] {
        let r = anon.post(path, &[("csrf", "x"), ("from", "report")]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert!(r.location().starts_with("/login"), "{path}");
    }
    assert_eq!(
        anon.get("/no/such/page").await.status,
        StatusCode::NOT_FOUND
    );

    // The login form is bound to its own cookie.
    let page = anon.get("/login?next=/jobs").await;
    assert!(page.header(header::SET_COOKIE).contains("HttpOnly"));
    assert_eq!(page.field("next"), "/jobs");
    let forged = anon
        .post(
            "/login",
            &[
                ("username", "ada"),
                ("password", ADMIN_PW),
                ("csrf", "0000"),
                ("next", "/"),
            ],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(!anon.cookies.contains_key("hepaflow_session"));
    // An open redirect through `next` is refused.
    assert_eq!(
        anon.get("/login?next=//evil.example/").await.field("next"),
        "/"
    );

    // Wrong password: refused, counted, audited.
    let wrong = anon.login("ada", "not the password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("Wrong user name or password"));
    let unknown = anon.login("nobody", "whatever it is").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM login_failures").await,
        2
    );

    // A clinician logs in: the cookie is HttpOnly and SameSite=Strict (not Secure over http).
    let mut clin = Client::new(ctx.clone());
    let ok = clin.login("cleo", CLIN_PW).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    assert_eq!(ok.location(), "/studies");
    let cookie = ok
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("hepaflow_session="))
        .unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    let token = clin.cookies["hepaflow_session"].clone();
    assert_eq!(token.len(), 64);
    let stored: String = sqlx::query_scalar("SELECT token_sha256 FROM web_sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(stored, token, "only a digest of the token is stored");

    let list = clin.get("/studies").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains("No study yet"));
    let csp = list.header(header::CONTENT_SECURITY_POLICY);
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(list.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert_eq!(list.header(header::X_FRAME_OPTIONS), "DENY");
    assert_eq!(list.header(header::CACHE_CONTROL), "no-store");
    // Clinicians read; admin pages and actions are refused.
    assert!(!list.body.contains("href=\"/jobs\""));
    assert_eq!(clin.get("/jobs").await.status, StatusCode::FORBIDDEN);
    assert_eq!(clin.get("/audit").await.status, StatusCode::FORBIDDEN);
    let csrf = clin.csrf().await;
    let r = clin.post("/jobs/1/retry", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // An admin: a POST without the session's token is refused, with it accepted.
    let mut admin = Client::new(ctx.clone());
    assert_eq!(
        admin.login("ada", ADMIN_PW).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(admin.get("/jobs").await.status, StatusCode::OK);
    let mut conn = pool.acquire().await.unwrap();
    let job = hepaflow::queue::enqueue(
        &mut conn,
        &hepaflow::queue::NewJob::new("cpu", "noop", serde_json::json!({})),
    )
    .await
    .unwrap()
    .unwrap();
    drop(conn);
    sqlx::query("UPDATE jobs SET state = 'dead', last_error = 'it broke' WHERE id = $1")
        .bind(job)
        .execute(&pool)
        .await
        .unwrap();
    let retry = format!("/jobs/{job}/retry");
    let other_csrf = clin.csrf().await;
    assert_eq!(
        admin.post(&retry, &[("csrf", &other_csrf)]).await.status,
        StatusCode::FORBIDDEN,
        "another session's token"
    );
    let csrf = admin.csrf().await;
    let r = admin.post(&retry, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        scalar(
            &pool,
            &format!("SELECT count(*) FROM jobs WHERE id = {job} AND state = 'available'")
        )
        .await,
        1
    );
    let jobs = admin.get("/jobs").await;
    assert!(jobs.body.contains("noop"));

    // Logout ends the session on the server, not only in the browser.
    let r = clin.post("/logout", &[("csrf", &other_csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let mut replay = Client::new(ctx.clone());
    replay.cookies.insert("hepaflow_session".into(), token);
    assert_eq!(replay.get("/studies").await.status, StatusCode::SEE_OTHER);

    // Idle logout: a session unused for longer than the idle time is gone.
    let mut idle = Client::new(ctx.clone());
    idle.login("cleo", CLIN_PW).await;
    assert_eq!(idle.get("/studies").await.status, StatusCode::OK);
    sqlx::query("UPDATE web_sessions SET last_seen = now() - interval '31 minutes'")
        .execute(&pool)
        .await
        .unwrap();
    let r = idle.get("/studies/1").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/login?next=/studies/1");
    let digest = users::token_digest(&idle.cookies["hepaflow_session"]);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM web_sessions WHERE token_sha256 = $1")
        .bind(digest)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the idle session is removed");

    // A new password ends the account's sessions.
    assert_eq!(
        admin.get("/studies").await.status,
        StatusCode::SEE_OTHER,
        "idle too"
    );
    admin.login("ada", ADMIN_PW).await;
    users::set_password(&pool, "ada", "a brand new password")
        .await
        .unwrap();
    assert_eq!(admin.get("/studies").await.status, StatusCode::SEE_OTHER);
    // A disabled account cannot log in.
    users::set_disabled(&pool, "cleo", true).await.unwrap();
    assert_eq!(
        clin.login("cleo", CLIN_PW).await.status,
        StatusCode::UNAUTHORIZED
    );

    // The audit trail has the logins, the failures, the views and the retry, and cannot be
    // rewritten.
    let acts = actions(&pool).await;
    let has = |who: &str, what: &str| acts.iter().any(|(a, b, _)| a == who && b == what);
    assert!(
        has("ada", "login_failed") && has("nobody", "login_failed"),
        "{acts:?}"
    );
    assert!(has("cleo", "login") && has("cleo", "logout") && has("cleo", "view_studies"));
    assert!(acts.iter().any(|(a, b, t)| a == "ada"
        && b == "retry_job"
        && t.as_deref() == Some(&format!("job:{job}"))));
    for sql in [
        "UPDATE audit_events SET actor = 'x'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let e = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_account() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    accounts(&pool).await;
    let ctx = hepaflow::web::Ctx::new(pool.clone(), settings(&url, data.path()));
    let mut c = Client::new(ctx.clone());
    let mut csrf = c.get("/login").await.field("csrf");
    for i in 0..100 {
        let r = c
            .post(
                "/login",
                &[
                    ("username", "ada"),
                    ("password", &format!("guess {i}")),
                    ("csrf", &csrf),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
        // Each answer is a fresh form, as a browser would post it next.
        csrf = r.field("csrf");
    }
    // The 101st attempt is refused even with the right password; other accounts still work.
    let r = c.login("ada", ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.body.contains("Too many failed logins"));
    assert_eq!(c.get("/studies").await.status, StatusCode::SEE_OTHER);
    assert_eq!(
        Client::new(ctx.clone()).login("cleo", CLIN_PW).await.status,
        StatusCode::SEE_OTHER
    );
    // An hour later the account opens again.
    sqlx::query("UPDATE login_failures SET at = at - interval '61 minutes'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(c.login("ada", ADMIN_PW).await.status, StatusCode::SEE_OTHER);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM audit_events WHERE action = 'login_locked'"
        )
        .await,
        1
    );
}

/// A database and data folder where `run --once` has processed one phantom study, and the
/// two accounts.
async fn processed_study(seed: u32) -> (String, PgPool, tempfile::TempDir) {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    crate::service::phantoms(&data.path().join("inbox"), 1, seed, "96x96x16");
    let out = db::service(&url, data.path(), &[])
        .args(["run", "--once", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    accounts(&pool).await;
    (url, pool, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_served_by_id_audited_and_checked() {
    let (url, pool, data) = processed_study(5).await;
    let ctx = hepaflow::web::Ctx::new(pool.clone(), settings(&url, data.path()));
    let mut clin = Client::new(ctx.clone());
    clin.login("cleo", CLIN_PW).await;

    let list = clin.get("/studies").await;
    assert!(
        list.body.contains("href=\"/studies/1\"") && list.body.contains("done"),
        "{}",
        list.body
    );
    assert!(list.body.contains("href=\"/studies/1/report\""));
    assert!(
        list.body.contains("1 study, newest first · page 1 of 1"),
        "{}",
        list.body
    );
    let beyond = clin.get("/studies?page=2").await;
    assert_eq!(beyond.status, StatusCode::OK);
    assert!(!beyond.body.contains("href=\"/studies/1\"") && beyond.body.contains("newer"));
    let study = clin.get("/studies/1").await;
    assert_eq!(study.status, StatusCode::OK);
    assert!(study.body.contains("Lesions") && study.body.contains("Runs"));
    assert!(
        !study.body.contains("id=\"rerun\""),
        "clinicians cannot rerun"
    );

    // The report is the stored file, byte for byte, under a policy that allows no script.
    let report = clin.get("/studies/1/report").await;
    assert_eq!(report.status, StatusCode::OK);
    let file = std::fs::read_to_string(data.path().join("reports/study-1-run-1.html")).unwrap();
    assert_eq!(report.body, file);
    let csp = report.header(header::CONTENT_SECURITY_POLICY);
    assert!(
        csp.starts_with("default-src 'none'") && csp.contains("img-src data:"),
        "{csp}"
    );
    let dl = clin.get("/studies/1/report?run=1&download=1").await;
    assert_eq!(dl.status, StatusCode::OK);
    assert_eq!(
        dl.header(header::CONTENT_DISPOSITION),
        "attachment; filename=\"study-1-run-1.html\""
    );
    assert_eq!(clin.get("/batches/1/digest").await.status, StatusCode::OK);
    // Only ids reach the store; anything else is not found or malformed.
    assert_eq!(
        clin.get("/studies/1/report?run=99").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        clin.get("/studies/2/report").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        clin.get("/batches/7/digest").await.status,
        StatusCode::NOT_FOUND
    );
    for bad in [
        "/studies/..%2F..%2Fetc%2Fpasswd/report",
        "/studies/1%20OR%201=1",
        "/studies/-/report",
    ] {
        let s = clin.get(bad).await.status;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND,
            "{bad}: {s}"
        );
    }

    // A report changed on disk is refused, and the page shows no internals.
    let rel: String = sqlx::query_scalar(
        "SELECT a.path FROM runs r JOIN artifacts a ON a.id = r.report_artifact WHERE r.id = 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let stored = data.path().join("artifacts").join(&rel);
    let original = std::fs::read(&stored).unwrap();
    let mut perms = std::fs::metadata(&stored).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&stored, perms).unwrap();
    std::fs::write(&stored, b"<html>tampered</html>").unwrap();
    let r = clin.get("/studies/1/report").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!r.body.contains("tampered") && !r.body.contains(&rel) && r.body.contains("Reference"));
    std::fs::write(&stored, &original).unwrap();

    // An admin reruns from the report step: a new run linked to the first.
    let mut admin = Client::new(ctx.clone());
    admin.login("ada", ADMIN_PW).await;
    let page = admin.get("/studies/1").await;
    assert!(page.body.contains("id=\"rerun\""));
    let csrf = page.field("csrf");
    let bad = admin
        .post(
            "/studies/1/rerun",
            &[("csrf", &csrf), ("from", "everything")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let r = admin
        .post("/studies/1/rerun", &[("csrf", &csrf), ("from", "report")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/studies/1");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM runs WHERE id = 2 AND previous_run = 1"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM jobs WHERE run_id = 2 AND kind = 'report'"
        )
        .await,
        1
    );
    let audit = admin.get("/audit").await;
    assert_eq!(audit.status, StatusCode::OK);

    let acts = actions(&pool).await;
    let has = |who: &str, what: &str, target: &str| {
        acts.iter()
            .any(|(a, b, t)| a == who && b == what && t.as_deref() == Some(target))
    };
    assert!(has("cleo", "view_study", "study:1"), "{acts:?}");
    assert!(has("cleo", "view_report", "study:1/run:1"));
    assert!(has("cleo", "download_report", "study:1/run:1"));
    assert!(has("cleo", "view_digest", "batch:1"));
    assert!(has("ada", "rerun", "study:1/run:2"));
    // The emails of the run are in the trail too, written by the service.
    let sent = scalar(&pool, "SELECT count(*) FROM emails WHERE state = 'sent'").await;
    assert!(sent >= 2);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM audit_events WHERE action = 'email_sent' AND actor = 'system'"
        )
        .await,
        sent
    );
}

/// A plain HTTP/1.1 GET: the status code and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    ))
}

/// `hepaflow serve` on a free port, once it answers.
fn serve(url: &str, data: &Path) -> (Proc, u16) {
    let port = free_port();
    let p = Proc(
        db::service(url, data, &[])
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..400 {
        if http_get(port, "/healthz").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_users_from_the_command_line() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();

    // Accounts: a generated password is printed once; one from stdin is checked.
    let out = db::service(&url, data.path(), &[])
        .args(["users", "add", "ada", "--role", "admin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let pw = text
        .split("password: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim();
    assert_eq!(pw.len(), 40);
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE username = 'ada'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(users::verify_password(pw, &hash) && hash.starts_with("$argon2id$"));
    let mut add = db::service(&url, data.path(), &[])
        .args(["users", "add", "cleo", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        add.stdin.take().unwrap().write_all(b"short\n").unwrap();
    }
    let out = add.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("at least 12 characters"),
        "{}",
        stderr(&out)
    );
    let out = db::service(&url, data.path(), &[])
        .args(["users", "add", "Bad Name"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("user name"), "{}", stderr(&out));
    let out = db::service(&url, data.path(), &[])
        .args(["users", "add", "x", "--role", "root"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let out = db::service(&url, data.path(), &[])
        .args(["users", "list", "--json"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["role"], "admin");
    assert!(list[0].get("password_hash").is_none());

    // `serve` answers on its address, sends strangers to the login page, stops on SIGTERM.
    let (mut serve, port) = serve(&url, data.path());
    assert_eq!(http_get(port, "/healthz"), Some((200, "ok\n".into())));
    assert_eq!(http_get(port, "/studies").unwrap().0, 303);
    let (code, body) = http_get(port, "/login").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("name=\"password\""));
    serve.signal(libc::SIGTERM);
    let status = serve
        .wait_for(Duration::from_secs(10))
        .expect("serve stops");
    assert!(status.success(), "{status:?}");

    // A taken address is a clear error.
    let _holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = _holder.local_addr().unwrap().to_string();
    let out = db::service(&url, data.path(), &[])
        .args(["serve", "--listen", &taken])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&taken) && err.contains("HEPAFLOW_LISTEN"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_reads_a_report_in_chromium() {
    let (url, pool, data) = processed_study(9).await;
    let (_serve, port) = serve(&url, data.path());
    let shots = tempdir();
    let base = format!("http://127.0.0.1:{port}");
    let seen: serde_json::Value = serde_json::from_str(&crate::support::run_py(
        "browser.py",
        &[
            Path::new(&base),
            Path::new("cleo"),
            Path::new(CLIN_PW),
            shots.path(),
        ],
    ))
    .unwrap();
    assert!(
        seen["login_url"]
            .as_str()
            .unwrap()
            .contains("/login?next=/studies/1/report"),
        "{seen}"
    );
    assert!(
        seen["after_login_url"]
            .as_str()
            .unwrap()
            .ends_with("/studies/1/report?run=1"),
        "{seen}"
    );
    assert!(
        seen["report_title"].as_str().unwrap().contains("Study 1"),
        "{seen}"
    );
    let images = seen["report_images"].as_u64().unwrap();
    assert!(images >= 3, "{seen}");
    assert_eq!(
        seen["report_images_drawn"].as_u64(),
        Some(images),
        "every figure renders under the CSP"
    );
    let rows = seen["studies_rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{seen}");
    assert_eq!(rows[0][0], "Study 1");
    assert!(rows[0][1].as_str().unwrap().contains("done"), "{seen}");
    assert_eq!(seen["header_background"], "rgb(18, 53, 91)");
    assert_eq!(seen["study_heading"], "Study 1");
    assert_eq!(seen["rerun_form"], 0, "a clinician has no rerun form");
    assert!(
        seen["after_logout_url"]
            .as_str()
            .unwrap()
            .ends_with("/login")
    );
    assert!(
        seen["studies_after_logout_url"]
            .as_str()
            .unwrap()
            .contains("/login?next=/studies")
    );
    assert_eq!(
        seen["cookies_js_visible"], "",
        "the session cookie is HttpOnly"
    );
    for shot in ["login.png", "report.png", "studies.png", "study.png"] {
        assert!(
            std::fs::metadata(shots.path().join(shot)).unwrap().len() > 1000,
            "{shot}"
        );
    }
    let views = scalar(
        &pool,
        "SELECT count(*) FROM audit_events WHERE actor = 'cleo' AND action = 'view_report'",
    )
    .await;
    assert_eq!(views, 1);
}
