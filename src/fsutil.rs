//! Small file-system helpers shared by every writer: atomic commit of a finished temp file.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A suffix unique within this process, for temp-file names.
pub fn unique_suffix() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Makes a fully written temp file durable and moves it to its final name:
/// fsync the file, rename it over `dest`, fsync the folder. A reader of `dest` sees either
/// nothing (or the previous file) or the complete new file, never a partial one.
pub fn commit_temp(tmp: &Path, dest: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, dest)?;
    if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A temp-file name in `dir`, unique for this process and call.
pub fn temp_in(dir: &Path) -> std::path::PathBuf {
    dir.join(format!(".tmp-{}-{}", std::process::id(), unique_suffix()))
}

/// Writes `bytes` to `dest` atomically (temp file in the same folder, then [`commit_temp`]),
/// creating the folder when needed.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = temp_in(dir);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    commit_temp(&tmp, dest)
}
