//! A private PostgreSQL cluster started from the local server binaries, for running with no
//! `DATABASE_URL`: `initdb` on first use, unix socket only (no TCP), stopped when the process
//! that started it exits — even by `kill -9`, through a small watchdog. As root the server
//! runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why the embedded cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked in $HEPAFLOW_PG_BIN and /usr/lib/postgresql/*/bin): install PostgreSQL or set DATABASE_URL"
    )]
    NoBinaries,
    #[error("embedded PostgreSQL at {dir}: {reason}")]
    Failed { dir: String, reason: String },
}

fn failed(dir: &Path, reason: impl Into<String>) -> EmbeddedError {
    EmbeddedError::Failed {
        dir: dir.display().to_string(),
        reason: reason.into(),
    }
}

/// Options of a cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `-c name=value` server settings (tests turn fsync off).
    pub settings: Vec<(String, String)>,
}

/// A running cluster. Dropping it stops the server if this handle started it.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    socket_dir: PathBuf,
    bin: PathBuf,
    started_here: bool,
}

/// The role that owns the embedded cluster.
pub const ROLE: &str = "hepaflow";
/// The database hepaflow uses inside it.
pub const DATABASE: &str = "hepaflow";
const PORT: u16 = 5432;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn find_bin() -> Result<PathBuf, EmbeddedError> {
    if let Ok(p) = std::env::var("HEPAFLOW_PG_BIN") {
        let p = PathBuf::from(p);
        if p.join("postgres").exists() {
            return Ok(p);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or(EmbeddedError::NoBinaries)
}

/// Runs a server binary, as the `postgres` user when we are root.
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

/// Whether the `postgres` user can write `dir` (every parent must be traversable).
fn postgres_can_use(dir: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-w"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn short_hash(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(p.as_os_str().as_encoded_bytes());
    h[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// Starts (initialising on first use) the cluster kept in `dir`, or attaches to the one
    /// already running there. Blocking; takes about a second when initialised.
    pub fn start(dir: &Path, opts: &ClusterOptions) -> Result<Cluster, EmbeddedError> {
        let bin = find_bin()?;
        fs::create_dir_all(dir).map_err(|e| failed(dir, format!("cannot create: {e}")))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| failed(dir, format!("cannot resolve: {e}")))?;
        // Where the server's files really live: `dir` itself, unless the postgres user cannot
        // reach it (a checkout under /root); then a folder under /var/tmp, named in `dir`.
        let mut home = dir.clone();
        if is_root() {
            let (uid, gid) = postgres_ids()
                .ok_or_else(|| failed(&dir, "running as root, but there is no postgres user"))?;
            let _ = std::os::unix::fs::chown(&dir, Some(uid), Some(gid));
            if !postgres_can_use(&dir) {
                home = PathBuf::from(format!("/var/tmp/hepaflow-pg-{}", short_hash(&dir)));
                fs::create_dir_all(&home).map_err(|e| failed(&home, e.to_string()))?;
                std::os::unix::fs::chown(&home, Some(uid), Some(gid))
                    .map_err(|e| failed(&home, format!("chown to postgres: {e}")))?;
                let _ = fs::write(
                    dir.join("LOCATION"),
                    format!(
                        "The postgres user cannot reach this folder, so the cluster lives in {}\n",
                        home.display()
                    ),
                );
            }
        }
        let data = home.join("data");
        let mut socket_dir = home.join("run");
        if socket_dir.as_os_str().len() > 90 {
            socket_dir = PathBuf::from(format!("/tmp/hepaflow-{}", short_hash(&home)));
        }
        fs::create_dir_all(&socket_dir).map_err(|e| failed(&socket_dir, e.to_string()))?;
        if is_root()
            && let Some((uid, gid)) = postgres_ids()
        {
            let _ = std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid));
        }
        let mut c = Cluster {
            dir: data,
            socket_dir,
            bin,
            started_here: false,
        };
        if !c.dir.join("PG_VERSION").exists() {
            c.initdb(&home)?;
        }
        if c.ready_pid().is_some() {
            return Ok(c);
        }
        c.launch(&home, opts)?;
        Ok(c)
    }

    fn initdb(&self, home: &Path) -> Result<(), EmbeddedError> {
        let _ = fs::remove_dir_all(&self.dir);
        let out = pg_command(&self.bin, "initdb")
            .arg("-D")
            .arg(&self.dir)
            .args(["-U", ROLE, "-A", "trust", "-E", "UTF8", "--locale=C", "-N"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed(home, format!("initdb: {e}")))?;
        if !out.status.success() {
            return Err(failed(
                home,
                format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    fn launch(&mut self, home: &Path, opts: &ClusterOptions) -> Result<(), EmbeddedError> {
        let log_path = home.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(home, format!("log file: {e}")))?;
        let mut cmd = pg_command(&self.bin, "postgres");
        cmd.arg("-D")
            .arg(&self.dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-p", &PORT.to_string(), "-c", "listen_addresses="])
            .args(["-c", "max_connections=200"]);
        for (k, v) in &opts.settings {
            cmd.args(["-c", &format!("{k}={v}")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| failed(home, e.to_string()))?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(home, format!("postgres: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(pid) = self.ready_pid() {
                self.started_here = true;
                self.watchdog(pid);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut tail = String::new();
                let _ = fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut tail));
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(failed(
                    home,
                    format!(
                        "the server exited ({status}): {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(failed(home, "the server did not become ready within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server when this process dies, however it dies.
    fn watchdog(&self, pg_pid: u32) {
        let me = std::process::id();
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -INT {pg_pid} 2>/dev/null"
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
    }

    /// The postmaster's pid when it runs and accepts connections.
    fn ready_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let pid: u32 = lines.first()?.trim().parse().ok()?;
        let ready = lines.get(7).is_some_and(|s| s.trim() == "ready");
        (ready && alive(pid)).then_some(pid)
    }

    /// The connection URL of a database in this cluster (unix socket).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres:///{database}?host={}&port={PORT}&user={ROLE}",
            self.socket_dir.display()
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Fast shutdown (`SIGINT`), waiting until the server has gone.
    pub fn stop(&mut self) {
        if let Some(pid) = self.ready_pid().or_else(|| self.pid_any()) {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.started_here = false;
    }

    /// Restarts the server (tests of the database going away). Blocking.
    pub fn restart(&mut self, opts: &ClusterOptions) -> Result<(), EmbeddedError> {
        self.stop();
        let home = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        self.launch(&home, opts)
    }

    fn pid_any(&self) -> Option<u32> {
        let text = fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started_here {
            self.stop();
        }
    }
}
