//! A corpus of hostile and corrupt NIfTI files, made here byte by byte (not with the code under
//! test): each must give exit code 3 and a one-line message naming the file and the reason,
//! with no panic and bounded memory.

use std::io::Write;
use std::path::Path;

use crate::support::*;

/// A NIfTI-1 file built field by field (little endian unless `big`).
#[derive(Clone)]
pub struct Raw {
    pub hdr: Vec<u8>,
    pub data: Vec<u8>,
    pub big: bool,
}

impl Raw {
    /// A valid 8×6×4 int16 volume, sform = diag(2, 2, 3), voxel n holds n - 50.
    pub fn valid() -> Self {
        let mut r = Raw {
            hdr: vec![0u8; 352],
            data: Vec::new(),
            big: false,
        };
        r.i32(0, 348);
        r.dims(&[3, 8, 6, 4, 1, 1, 1, 1]);
        r.i16(70, 4); // int16
        r.i16(72, 16);
        for (i, v) in [1.0, 2.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0].iter().enumerate() {
            r.f32(76 + 4 * i, *v);
        }
        r.f32(108, 352.0);
        r.f32(112, 1.0);
        r.hdr[123] = 2; // mm
        r.i16(254, 1); // sform_code
        for (row, vals) in [
            [2.0, 0.0, 0.0, -8.0],
            [0.0, 2.0, 0.0, -6.0],
            [0.0, 0.0, 3.0, 0.0],
        ]
        .iter()
        .enumerate()
        {
            for (c, v) in vals.iter().enumerate() {
                r.f32(280 + 16 * row + 4 * c, *v);
            }
        }
        r.hdr[344..348].copy_from_slice(b"n+1\0");
        r.data = (0..8 * 6 * 4)
            .flat_map(|n: i16| (n - 50).to_le_bytes())
            .collect();
        r
    }
    pub fn i16(&mut self, at: usize, v: i16) -> &mut Self {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.hdr[at..at + 2].copy_from_slice(&b);
        self
    }
    pub fn i32(&mut self, at: usize, v: i32) -> &mut Self {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.hdr[at..at + 4].copy_from_slice(&b);
        self
    }
    pub fn f32(&mut self, at: usize, v: f32) -> &mut Self {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.hdr[at..at + 4].copy_from_slice(&b);
        self
    }
    pub fn dims(&mut self, d: &[i16; 8]) -> &mut Self {
        for (i, v) in d.iter().enumerate() {
            self.i16(40 + 2 * i, *v);
        }
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.hdr.clone();
        b.extend_from_slice(&self.data);
        b
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Runs `inspect` on a file and returns (exit code, stderr, peak RSS in KiB).
fn inspect(path: &Path, env: &[(&str, &str)]) -> (i32, String, i64) {
    inspect_limited(path, env, None)
}

/// `inspect` with an optional address-space limit (bytes) on the child process.
fn inspect_limited(path: &Path, env: &[(&str, &str)], max_as: Option<u64>) -> (i32, String, i64) {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = hepaflow();
    if let Some(limit) = max_as {
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[expect(
        clippy::zombie_processes,
        reason = "reaped with wait4 below, to read its rusage"
    )]
    let child = cmd
        .arg("inspect")
        .arg(path)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut err = String::new();
    use std::io::Read;
    child.stderr.unwrap().read_to_string(&mut err).unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    let st = std::process::ExitStatus::from_raw(status);
    (st.code().unwrap_or(-1), err, usage.ru_maxrss)
}

fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let v = Raw::valid();
    let good = v.bytes();
    let with = |f: &dyn Fn(&mut Raw)| {
        let mut r = v.clone();
        f(&mut r);
        r.bytes()
    };
    let gz = gzip(&good);
    let mut crc = gz.clone();
    let n = crc.len();
    crc[n - 8] ^= 0xff; // CRC32 of the trailer
    let mut deflate = gz.clone();
    for b in deflate[20..40].iter_mut() {
        *b ^= 0x5a;
    }
    let mut bomb = good.clone();
    bomb.resize(good.len() + (300 << 20), 0); // 300 MiB of zeros after the voxels
    vec![
        ("empty.nii", vec![], "truncated"),
        ("short-header.nii", good[..100].to_vec(), "truncated"),
        (
            "short-data.nii",
            good[..good.len() - 100].to_vec(),
            "truncated",
        ),
        ("short.nii.gz", gz[..gz.len() / 2].to_vec(), "gzip"),
        ("bad-crc.nii.gz", crc, "gzip"),
        ("bad-deflate.nii.gz", deflate, "gzip"),
        ("bomb.nii.gz", gzip(&bomb), "data after the voxels"),
        (
            "magic.nii",
            with(&|r| r.hdr[344..348].copy_from_slice(b"abc\0")),
            "magic",
        ),
        (
            "pair.nii",
            with(&|r| r.hdr[344..348].copy_from_slice(b"ni1\0")),
            "hdr/.img",
        ),
        (
            "sizeof.nii",
            with(&|r| {
                r.i32(0, 349);
            }),
            "sizeof_hdr",
        ),
        (
            "garbage.nii",
            (0..2000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "sizeof_hdr",
        ),
        (
            "dim0-zero.nii",
            with(&|r| {
                r.i16(40, 0);
            }),
            "dim[0]",
        ),
        (
            "dim0-nine.nii",
            with(&|r| {
                r.i16(40, 9);
            }),
            "dim[0]",
        ),
        (
            "dim-zero.nii",
            with(&|r| {
                r.i16(44, 0);
            }),
            "dim[2]",
        ),
        (
            "dim-negative.nii",
            with(&|r| {
                r.i16(46, -5);
            }),
            "dim[3]",
        ),
        (
            "dims-huge.nii",
            with(&|r| {
                r.dims(&[3, 32767, 32767, 32767, 1, 1, 1, 1]);
            }),
            "limit",
        ),
        (
            "dims-4d.nii",
            with(&|r| {
                r.dims(&[4, 8, 6, 4, 5, 1, 1, 1]);
            }),
            "dim[4]",
        ),
        (
            "pixdim-nan.nii",
            with(&|r| {
                r.f32(80, f32::NAN);
            }),
            "pixdim[1]",
        ),
        (
            "pixdim-zero.nii",
            with(&|r| {
                r.f32(84, 0.0);
            }),
            "pixdim[2]",
        ),
        (
            "pixdim-negative.nii",
            with(&|r| {
                r.f32(88, -3.0);
            }),
            "pixdim[3]",
        ),
        (
            "pixdim-inf.nii",
            with(&|r| {
                r.f32(80, f32::INFINITY);
            }),
            "pixdim[1]",
        ),
        (
            "vox-offset-zero.nii",
            with(&|r| {
                r.f32(108, 0.0);
            }),
            "vox_offset",
        ),
        (
            "vox-offset-nan.nii",
            with(&|r| {
                r.f32(108, f32::NAN);
            }),
            "vox_offset",
        ),
        (
            "vox-offset-small.nii",
            with(&|r| {
                r.f32(108, 100.0);
            }),
            "vox_offset",
        ),
        (
            "vox-offset-fraction.nii",
            with(&|r| {
                r.f32(108, 352.5);
            }),
            "vox_offset",
        ),
        (
            "vox-offset-huge.nii",
            with(&|r| {
                r.f32(108, 1e12);
            }),
            "limit",
        ),
        (
            "vox-offset-past-end.nii",
            with(&|r| {
                r.f32(108, 4000.0);
            }),
            "truncated",
        ),
        (
            "datatype-complex.nii",
            with(&|r| {
                r.i16(70, 32);
            }),
            "datatype",
        ),
        (
            "datatype-unknown.nii",
            with(&|r| {
                r.i16(70, 999);
            }),
            "datatype",
        ),
        (
            "sform-nan.nii",
            with(&|r| {
                r.f32(292, f32::NAN);
            }),
            "srow",
        ),
        (
            "inter-nan.nii",
            with(&|r| {
                r.f32(112, 2.0);
                r.f32(116, f32::NAN);
            }),
            "scl_inter",
        ),
        (
            "units.nii",
            with(&|r| {
                r.hdr[123] = 5;
            }),
            "xyzt_units",
        ),
    ]
}

#[test]
fn every_hostile_file_is_rejected_with_exit_code_3_and_a_clear_message() {
    let dir = tempdir();
    for (name, bytes, needle) in corpus() {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let (code, err, _) = inspect(&path, &[]);
        assert_eq!(code, 3, "{name}: exit code {code}, stderr: {err}");
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{name}: one line expected: {line}");
        assert!(
            line.contains(name),
            "{name}: message does not name the file: {line}"
        );
        assert!(
            line.contains(needle),
            "{name}: message lacks {needle:?}: {line}"
        );
        assert!(!line.contains("panick"), "{name}: {line}");
    }
}

#[test]
fn memory_stays_bounded_by_the_decode_cap() {
    let dir = tempdir();
    // A header that claims 1.5 GiB of voxels, and a gzip bomb: neither may make the reader
    // allocate more than the cap (here 64 MiB) on top of the process itself.
    let mut big = Raw::valid();
    big.dims(&[3, 1024, 1024, 768, 1, 1, 1, 1]);
    big.i16(70, 2);
    big.i16(72, 8);
    let big_path = dir.path().join("claims-big.nii.gz");
    std::fs::write(&big_path, gzip(&big.bytes())).unwrap();
    let (code, err, _) = inspect(&big_path, &[("HEPAFLOW_MAX_DECODED_BYTES", "64M")]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("limit of 67108864 bytes"), "{err}");

    // 1 GiB of zeros behind a tiny volume, streamed to disk (about 1 MB compressed).
    let bomb_path = dir.path().join("bomb.nii.gz");
    {
        let f = std::fs::File::create(&bomb_path).unwrap();
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::best());
        e.write_all(&Raw::valid().bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap();
    }
    // Under a 1 GiB address-space limit both are refused cleanly (an allocation beyond the
    // limit would abort the process instead of exiting with code 3).
    for p in [&big_path, &bomb_path] {
        let (code, err, rss_kib) =
            inspect_limited(p, &[("HEPAFLOW_MAX_DECODED_BYTES", "64M")], Some(1 << 30));
        assert_eq!(code, 3, "{}: {err}", p.display());
        assert!(
            rss_kib < 256 * 1024,
            "{}: peak RSS {rss_kib} KiB",
            p.display()
        );
    }
    let (code, err, _) = inspect(&bomb_path, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("data after the voxels"), "{err}");
}

#[test]
fn traps_of_the_nifti_crate_are_handled() {
    let dir = tempdir();
    let stats = |bytes: Vec<u8>, name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = hepaflow()
            .args(["inspect", "--json"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    // Values are n - 50 for n in 0..192: min -50, max 141.
    let base = stats(Raw::valid().bytes(), "base.nii");
    assert_eq!(base["min"], -50.0);
    assert_eq!(base["max"], 141.0);

    // vox_offset beyond 352 without an extension flag: the data starts at vox_offset.
    let mut r = Raw::valid();
    r.f32(108, 400.0);
    let mut b = r.hdr.clone();
    b.extend(std::iter::repeat_n(0x7f, 48));
    b.extend(&r.data);
    let j = stats(b, "offset400.nii");
    assert_eq!(j["min"], -50.0);
    assert_eq!(j["max"], 141.0);

    // A NaN scl_slope means no scaling.
    let mut r = Raw::valid();
    r.f32(112, f32::NAN).f32(116, 1000.0);
    let j = stats(r.bytes(), "nan-slope.nii");
    assert_eq!(j["min"], -50.0);
    assert_eq!(j["scl_slope"], 1.0);

    // A real scaling is applied; big-endian headers and data read the same.
    let mut r = rebuild_big();
    r.f32(112, 2.0).f32(116, -1.0);
    let j = stats(gzip(&r.bytes()), "big-scaled.nii.gz");
    assert_eq!(j["min"], -101.0);
    assert_eq!(j["max"], 281.0);
}

/// The valid volume written big endian.
fn rebuild_big() -> Raw {
    let le = Raw::valid();
    let mut r = Raw {
        hdr: vec![0u8; 352],
        data: vec![],
        big: true,
    };
    r.i32(0, 348);
    r.dims(&[3, 8, 6, 4, 1, 1, 1, 1]);
    r.i16(70, 4).i16(72, 16);
    for (i, v) in [1.0, 2.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0].iter().enumerate() {
        r.f32(76 + 4 * i, *v);
    }
    r.f32(108, 352.0);
    r.hdr[123] = 2;
    r.hdr[344..348].copy_from_slice(b"n+1\0");
    r.data = le
        .data
        .chunks(2)
        .flat_map(|c| i16::from_le_bytes([c[0], c[1]]).to_be_bytes())
        .collect();
    r
}

#[test]
fn committed_regression_files_are_rejected() {
    // Inputs found by fuzzing are kept in tests/data/fuzz-regressions; each must fail cleanly.
    let dir = root().join("tests/data/fuzz-regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let (code, err, _) = inspect(&p, &[]);
        assert!(
            code == 0 || code == 3,
            "{}: exit {code}: {err}",
            p.display()
        );
        assert!(!err.contains("panick"), "{}: {err}", p.display());
    }
}
