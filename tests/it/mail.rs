//! Email delivered to a real SMTP server on loopback (aiosmtpd), parsed back as a mail client
//! would: link-only content, stable Message-IDs, the outage and 5xx cases of RELIABILITY.md.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::db::{self, Proc, scalar, wait_until};
use crate::support::{free_port, python, root, stderr, tempdir};

/// Starts the SMTP server; returns once it listens.
fn smtp_server(port: u16, out: &Path) -> Proc {
    let mut child = Command::new(python())
        .arg(root().join("tests/it/py/smtp_server.py"))
        .arg(port.to_string())
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python starts");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Proc(child)
}

fn received(out: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(out)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    files
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_and_digest_emails_arrive_link_only() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let inbox = data.path().join("inbox");
    crate::service::phantoms(&inbox, 1, 55, "96x96x16");
    // A file name that could carry a patient's name must not travel in mail.
    std::fs::rename(
        inbox.join("volume-0.nii.gz"),
        inbox.join("OHara_Mary.nii.gz"),
    )
    .unwrap();
    std::fs::rename(
        inbox.join("segmentation-0.nii.gz"),
        inbox.join("OHara_Mary_seg.nii.gz"),
    )
    .unwrap();
    let port = free_port();
    let spool = tempdir();
    let _server = smtp_server(port, spool.path());
    let smtp = format!("smtp://127.0.0.1:{port}");
    let env = [
        ("HEPAFLOW_SMTP_URL", smtp.as_str()),
        (
            "HEPAFLOW_NOTIFY",
            "radiology@hospital.example, oncology@hospital.example",
        ),
        ("HEPAFLOW_BASE_URL", "https://hepaflow.hospital.example"),
    ];
    let out = db::service(&url, data.path(), &env)
        .args(["run", "--once", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mails = received(spool.path());
    assert_eq!(mails.len(), 4, "2 study + 2 digest emails: {mails:#?}");
    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM emails ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    for m in &mails {
        assert_eq!(m["content_type"], "multipart/alternative", "{m}");
        let (text, html) = (m["text"].as_str().unwrap(), m["html"].as_str().unwrap());
        assert!(
            text.contains("https://hepaflow.hospital.example/"),
            "{text}"
        );
        assert!(
            html.contains("href=\"https://hepaflow.hospital.example/"),
            "{html}"
        );
        for field in ["subject", "text", "html"] {
            let v = m[field].as_str().unwrap();
            assert!(!v.contains("OHara") && !v.contains("Mary"), "{field}: {v}");
        }
        assert!(
            m["attachments"].as_array().unwrap().is_empty(),
            "link only by default"
        );
        assert!(ids.contains(&m["message_id"].as_str().unwrap().to_string()));
    }
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM emails WHERE state = 'sent'").await,
        4
    );
    // The report and digest files exist where the run said.
    assert!(data.path().join("reports/study-1-run-1.html").exists());
    assert!(data.path().join("reports/digest-batch-1.html").exists());

    // Sites may attach the report.
    let spool2 = tempdir();
    let port2 = free_port();
    let _server2 = smtp_server(port2, spool2.path());
    let smtp2 = format!("smtp://127.0.0.1:{port2}");
    let out = db::service(
        &url,
        data.path(),
        &[
            ("HEPAFLOW_SMTP_URL", smtp2.as_str()),
            ("HEPAFLOW_MAIL_ATTACH_REPORTS", "true"),
        ],
    )
    .args(["rerun", "--study", "1", "--from", "report"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = db::service(
        &url,
        data.path(),
        &[
            ("HEPAFLOW_SMTP_URL", smtp2.as_str()),
            ("HEPAFLOW_MAIL_ATTACH_REPORTS", "true"),
        ],
    )
    .args(["run", "--once", "--device", "cpu"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mails = received(spool2.path());
    let study: Vec<&Value> = mails
        .iter()
        .filter(|m| m["subject"].as_str().unwrap().contains("report ready"))
        .collect();
    assert_eq!(study.len(), 1, "{mails:#?}");
    let att = &study[0]["attachments"][0];
    assert!(att["name"].as_str().unwrap().ends_with(".html"));
    assert!(att["bytes"].as_u64().unwrap() > 10_000);
}

async fn outbox(pool: &sqlx::PgPool, recipients: &[String]) -> Vec<String> {
    let mut tx = pool.begin().await.unwrap();
    for r in recipients {
        hepaflow::notify::enqueue(
            &mut tx,
            &hepaflow::notify::NewEmail {
                kind: "digest",
                recipient: r,
                subject: "hepaflow: test".into(),
                body_text: "text".into(),
                body_html: "<p>html</p>".into(),
                attachment: None,
                study_id: None,
                run_id: None,
                batch_id: None,
            },
            "hepaflow <hepaflow@hospital.example>",
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query_scalar("SELECT message_id FROM emails ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_delays_mail_but_loses_and_doubles_none() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    let recipients: Vec<String> = (0..50).map(|i| format!("r{i}@hospital.example")).collect();
    let ids = outbox(&pool, &recipients).await;
    let port = free_port();
    let smtp = format!("smtp://127.0.0.1:{port}");
    // The server is down: every attempt fails with a connection error.
    let _w = db::worker(
        &url,
        data.path(),
        "cpu=4",
        &[
            ("HEPAFLOW_SMTP_URL", smtp.as_str()),
            ("HEPAFLOW_RETRY_BASE_MS", "200"),
        ],
    );
    wait_until(
        Duration::from_secs(30),
        "failed attempts during the outage",
        || async { scalar(&pool, "SELECT count(*) FROM emails WHERE attempts >= 2").await == 50 },
    )
    .await;
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM emails WHERE state = 'sent'").await,
        0
    );
    let spool = tempdir();
    let _server = smtp_server(port, spool.path());
    wait_until(
        Duration::from_secs(60),
        "50 emails sent after recovery",
        || async { scalar(&pool, "SELECT count(*) FROM emails WHERE state = 'sent'").await == 50 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mails = received(spool.path());
    assert_eq!(mails.len(), 50, "none lost, none twice");
    let mut got: Vec<String> = mails
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    got.dedup();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(
        got, want,
        "each email once, with the Message-ID it had from the start"
    );
    let errors: String = sqlx::query_scalar(
        "SELECT last_error FROM jobs WHERE kind = 'send_email' AND last_error IS NOT NULL LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(errors.contains("SMTP"), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_recipient_fails_once_and_shows() {
    let (url, pool) = db::fresh().await;
    let data = tempdir();
    outbox(
        &pool,
        &[
            "reject@hospital.example".into(),
            "ok@hospital.example".into(),
        ],
    )
    .await;
    let port = free_port();
    let spool = tempdir();
    let _server = smtp_server(port, spool.path());
    let smtp = format!("smtp://127.0.0.1:{port}");
    let env = [("HEPAFLOW_SMTP_URL", smtp.as_str())];
    let _w = db::worker(&url, data.path(), "cpu=2", &env);
    wait_until(Duration::from_secs(30), "both emails settled", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM emails WHERE state <> 'pending'",
        )
        .await
            == 2
    })
    .await;
    let rows: Vec<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT recipient, state, attempts, last_error FROM emails ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("failed", 1), "{rows:?}");
    assert!(rows[0].3.as_deref().unwrap().contains("550"), "{rows:?}");
    assert_eq!(rows[1].1, "sent");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM jobs WHERE kind = 'send_email' AND state = 'failed'"
        )
        .await,
        1
    );
    let out = db::service(&url, data.path(), &env)
        .args(["mail", "list", "--state", "failed", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["recipient"], json!("reject@hospital.example"));
    assert_eq!(received(spool.path()).len(), 1);
}
