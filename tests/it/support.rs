//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `hepaflow` binary built for this test run.
pub fn hepaflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hepaflow"));
    c.env("HEPAFLOW_LOG", "warn");
    c
}

/// The Python interpreter of the test environment (nibabel, numpy, scipy), made by
/// `scripts/setup`. Tests that compare with these references fail, not skip, without it.
pub fn python() -> PathBuf {
    let p = std::env::var_os("HEPAFLOW_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run the suite with scripts/test, which creates the Python environment",
        p.display()
    );
    p
}

/// Runs a Python script of `tests/it/py` with arguments; panics with its stderr on failure.
pub fn run_py(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/it/py").join(script))
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Relative closeness with an absolute floor.
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * (1.0 + a.abs().max(b.abs()))
}

/// Runs a command that must succeed and prints JSON on stdout; returns the JSON.
pub fn json_of(cmd: &mut Command) -> serde_json::Value {
    let o = cmd.output().expect("command starts");
    assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("JSON")
}
