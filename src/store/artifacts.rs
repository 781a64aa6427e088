//! The content-addressed artifact store: `<data>/artifacts/ab/abcdef….ext`.
//!
//! A file is written to a temp name in the same folder, hashed while written, fsynced, renamed
//! to its final name and the folder fsynced — all before the row that points to it commits.
//! So no row ever points to a missing or partial file, and a final name only ever holds the
//! complete content its name says. Temp files left by a crash start with `.tmp-` and are
//! removed by [`ArtifactStore::sweep_temps`].

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::fsutil;

/// A file now durable in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub bytes: u64,
    /// Relative to the store's root.
    pub path: String,
}

/// Why a file could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("artifact {path}: content does not match its sha256 {expected} (found {found})")]
    Corrupt {
        path: String,
        expected: String,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The store rooted at a folder.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ArtifactStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of a stored file.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn temp_path(&self) -> Result<PathBuf, ArtifactError> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            fsutil::unique_suffix()
        )))
    }

    /// Copies `src` into the store (the source is only read).
    pub fn put_file(&self, src: &Path, ext: &str) -> Result<Stored, ArtifactError> {
        let tmp = self.temp_path()?;
        let result = (|| {
            let mut input =
                BufReader::with_capacity(1 << 20, File::open(src).map_err(io_err(src))?);
            let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut bytes = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(io_err(src))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                bytes += n as u64;
            }
            drop(out);
            self.commit(&tmp, hex(&hasher.finalize()), bytes, ext)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores the file that `write` produces at the temp path it is given.
    pub fn put_with<E>(
        &self,
        ext: &str,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Result<Stored, ArtifactError>, E> {
        let tmp = match self.temp_path() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = write(&tmp) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let result = (|| {
            let (sha, bytes) = hash_file(&tmp)?;
            self.commit(&tmp, sha, bytes, ext)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(result)
    }

    /// Stores `data`.
    pub fn put_bytes(&self, data: &[u8], ext: &str) -> Result<Stored, ArtifactError> {
        let tmp = self.temp_path()?;
        let result = (|| {
            fs::write(&tmp, data).map_err(io_err(&tmp))?;
            self.commit(&tmp, hex(&Sha256::digest(data)), data.len() as u64, ext)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn commit(
        &self,
        tmp: &Path,
        sha256: String,
        bytes: u64,
        ext: &str,
    ) -> Result<Stored, ArtifactError> {
        let rel = format!("{}/{}{}", &sha256[..2], sha256, ext);
        let dest = self.root.join(&rel);
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if dest.exists() {
            // Same name, same content: already durable.
            let _ = fs::remove_file(tmp);
        } else {
            fsutil::commit_temp(tmp, &dest).map_err(io_err(&dest))?;
        }
        Ok(Stored {
            sha256,
            bytes,
            path: rel,
        })
    }

    /// Re-hashes a stored file and checks it against its name's hash.
    pub fn verify(&self, rel: &str, sha256: &str) -> Result<(), ArtifactError> {
        let (found, _) = hash_file(&self.root.join(rel))?;
        if found != sha256 {
            return Err(ArtifactError::Corrupt {
                path: rel.into(),
                expected: sha256.into(),
                found,
            });
        }
        Ok(())
    }

    /// Reads a stored file whole, refusing it when its content no longer matches `sha256`.
    pub fn read_verified(&self, rel: &str, sha256: &str) -> Result<Vec<u8>, ArtifactError> {
        let path = self.root.join(rel);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let found = hex(&Sha256::digest(&bytes));
        if found != sha256 {
            return Err(ArtifactError::Corrupt {
                path: rel.into(),
                expected: sha256.into(),
                found,
            });
        }
        Ok(bytes)
    }

    /// Removes temp files left by crashed writers (older than `min_age`).
    pub fn sweep_temps(&self, min_age: std::time::Duration) -> usize {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if old && e.file_name().to_string_lossy().starts_with(".tmp-") {
                removed += usize::from(fs::remove_file(e.path()).is_ok());
            }
        }
        removed
    }
}

/// sha256 (hex) and size of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64), ArtifactError> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err(path))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex(&hasher.finalize()), bytes))
}

/// The row for a stored file (one per content; a second insert returns the first row's id).
pub async fn record(
    conn: &mut PgConnection,
    kind: &str,
    stored: &Stored,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO artifacts (sha256, kind, bytes, path) VALUES ($1, $2, $3, $4)
         ON CONFLICT (sha256) DO UPDATE SET sha256 = EXCLUDED.sha256
         RETURNING id",
    )
    .bind(&stored.sha256)
    .bind(kind)
    .bind(stored.bytes as i64)
    .bind(&stored.path)
    .fetch_one(conn)
    .await
}

/// The relative path of an artifact row.
pub async fn path_of(conn: &mut PgConnection, id: i64) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT path FROM artifacts WHERE id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_name_and_verified() {
        let dir = std::env::temp_dir().join(format!("hf-art-{}", std::process::id()));
        let store = ArtifactStore::new(&dir);
        let a = store.put_bytes(b"hello", ".txt").unwrap();
        let b = store.put_bytes(b"hello", ".txt").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(a.path.starts_with("2c/"));
        store.verify(&a.path, &a.sha256).unwrap();
        fs::write(store.path(&a.path), b"jello").unwrap();
        assert!(matches!(
            store.verify(&a.path, &a.sha256),
            Err(ArtifactError::Corrupt { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
