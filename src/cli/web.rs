//! `serve` (the dashboard) and `users` (its accounts).

use std::io::BufRead;

use clap::{Args, Subcommand};

use super::service::{
    db_err, open, open_service, print_json, runtime, shutdown_on_signals, table, when,
};
use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::store::users::{self, Role, UserError};
use crate::store::{Db, audit};
use crate::web;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default `HEPAFLOW_LISTEN`, else 127.0.0.1:8080).
    #[arg(long)]
    pub listen: Option<String>,
}

/// Binds `addr` with a message that names the setting.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, Failure> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Failure::Other(anyhow::anyhow!(
            "cannot listen on {addr} (--listen / HEPAFLOW_LISTEN): {e}"
        ))
    })
}

pub fn serve(args: ServeArgs, settings: &Settings) -> CmdResult {
    let addr = args.listen.unwrap_or_else(|| settings.web.listen.clone());
    runtime()?.block_on(async {
        let stop = shutdown_on_signals();
        let Some(db) = open_service(settings, 8, &stop).await? else {
            return Ok(());
        };
        let result = serve_inner(&db, settings, &addr, stop).await;
        db.close().await;
        result
    })
}

async fn serve_inner(
    db: &Db,
    settings: &Settings,
    addr: &str,
    stop: CancellationToken,
) -> CmdResult {
    let listener = bind(addr).await?;
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db.pool)
        .await
        .map_err(db_err)?;
    if accounts == 0 {
        tracing::warn!(
            "no dashboard account yet: create one with `hepaflow users add NAME --role admin`"
        );
    }
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_string());
    tracing::info!("dashboard on http://{local}/");
    let ctx = web::Ctx::new(db.pool.clone(), settings.clone());
    web::serve(ctx, listener, stop)
        .await
        .map_err(|e| Failure::Other(anyhow::anyhow!("dashboard: {e}")))
}

#[derive(Debug, Args)]
pub struct UsersArgs {
    #[command(subcommand)]
    pub command: UsersCommand,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create an account. Without --password-stdin a strong password is generated and printed
    /// once.
    Add {
        name: String,
        /// clinician (reads reports) or admin (also reruns, retries, reads jobs and audit).
        #[arg(long, default_value = "clinician", value_parser = ["clinician", "admin"])]
        role: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a new password (ends the account's sessions).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Accounts with their role and last login.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable an account (ends its sessions).
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
}

fn password(from_stdin: bool) -> Result<(String, bool), Failure> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure::Other(anyhow::anyhow!("reading the password: {e}")))?;
        Ok((line.trim_end_matches(['\r', '\n']).to_string(), false))
    } else {
        // 20 random bytes as hex: 160 bits.
        let p = users::random_hex(20)
            .map_err(|e| Failure::Other(anyhow::anyhow!("no random source: {e}")))?;
        Ok((p, true))
    }
}

fn user_err(e: UserError) -> Failure {
    match e {
        UserError::Db(e) => db_err(e),
        e => Failure::Other(anyhow::anyhow!("{e}")),
    }
}

pub fn users_cmd(args: UsersArgs, settings: &Settings) -> CmdResult {
    runtime()?.block_on(async {
        let db = open(settings, 2).await?;
        let result = users_inner(args, &db).await;
        db.close().await;
        result
    })
}

async fn users_inner(args: UsersArgs, db: &Db) -> CmdResult {
    let pool = &db.pool;
    let note = |action: &'static str, name: String| async move {
        audit::record(
            pool,
            None,
            "admin-cli",
            action,
            Some(&format!("user:{name}")),
            serde_json::json!({}),
        )
        .await
        .map_err(db_err)
    };
    let disabling = matches!(args.command, UsersCommand::Disable { .. });
    match args.command {
        UsersCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            let role = Role::parse(&role).unwrap_or(Role::Clinician);
            let (pw, generated) = password(password_stdin)?;
            users::add(pool, &name, &pw, role).await.map_err(user_err)?;
            note("user_added", name.clone()).await?;
            if generated {
                println!("user {name} ({}) created; password: {pw}", role.as_str());
                println!("It is shown only now. Change it with `hepaflow users passwd {name}`.");
            } else {
                println!("user {name} ({}) created", role.as_str());
            }
        }
        UsersCommand::Passwd {
            name,
            password_stdin,
        } => {
            let (pw, generated) = password(password_stdin)?;
            users::set_password(pool, &name, &pw)
                .await
                .map_err(user_err)?;
            note("password_changed", name.clone()).await?;
            if generated {
                println!("new password of {name}: {pw}");
            } else {
                println!("password of {name} changed");
            }
        }
        UsersCommand::Disable { name } | UsersCommand::Enable { name } => {
            let (action, word) = if disabling {
                ("user_disabled", "disabled")
            } else {
                ("user_enabled", "enabled")
            };
            users::set_disabled(pool, &name, disabling)
                .await
                .map_err(user_err)?;
            note(action, name.clone()).await?;
            println!("user {name} {word}");
        }
        UsersCommand::List { json } => {
            let rows = users::list(pool).await.map_err(db_err)?;
            if json {
                return print_json(&rows);
            }
            table(
                &["USER", "ROLE", "STATE", "CREATED", "LAST LOGIN"],
                rows.into_iter()
                    .map(|u| {
                        vec![
                            u.username,
                            u.role,
                            if u.disabled { "disabled" } else { "active" }.into(),
                            when(u.created_at),
                            u.last_login.map_or("-".into(), when),
                        ]
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}
