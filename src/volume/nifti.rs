//! NIfTI-1 and NIfTI-2 reading (`.nii`, `.nii.gz`) with full header validation, and writing of
//! label masks and CT volumes that carry a source's geometry.
//!
//! The `nifti` crate parses NIfTI-1 headers and writes files; everything it accepts silently
//! but wrongly (a `vox_offset` beyond 352 without an extension flag, a NaN `scl_slope`, a gzip
//! stream whose CRC is wrong) is checked here first. Decoding is bounded: the decompressed size
//! is computed from the header and checked against [`ReadLimits::max_decoded_bytes`] before any
//! voxel is read, so neither an absurd header nor a gzip bomb can exhaust memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use rayon::prelude::*;

use super::{CtVolume, Geometry, LabelVolume, XformFields};

/// Default cap on the decoded size of one file: 2 GiB.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 2 << 30;

/// Most data tolerated after the voxels of a gzip stream (it is decompressed to check the CRC).
const MAX_TRAILING_BYTES: u64 = 64 << 20;

/// Bounds applied while reading an untrusted file.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    /// Largest decompressed file (header, extensions and voxels) and largest in-memory voxel
    /// array (as 32-bit values) that a read may produce.
    pub max_decoded_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES,
        }
    }
}

/// Why a file could not be read. Every message names the file, and the field or the reason.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: corrupt gzip stream: {reason}")]
    Gzip { file: String, reason: String },
    #[error("{file}: truncated: {what}")]
    Truncated { file: String, what: String },
    #[error("{file}: {field} = {value}: {reason}")]
    Field {
        file: String,
        field: String,
        value: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Unsupported { file: String, reason: String },
    #[error("{file}: {what} needs {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        file: String,
        what: String,
        bytes: u128,
        limit: u64,
    },
    #[error("{file}: cannot write: {source}")]
    Write {
        file: String,
        #[source]
        source: io::Error,
    },
}

/// On-disk header flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti1,
    Nifti2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Nifti1 => "nifti1",
            Format::Nifti2 => "nifti2",
        }
    }
}

/// Voxel datatypes that can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DataType {
    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            4 => Self::I16,
            8 => Self::I32,
            16 => Self::F32,
            64 => Self::F64,
            256 => Self::I8,
            512 => Self::U16,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }
    /// numpy's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::U16 => "uint16",
            Self::I32 => "int32",
            Self::U32 => "uint32",
            Self::I64 => "int64",
            Self::U64 => "uint64",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// The header fields that matter, from either header version, with the byte order.
#[derive(Clone, Debug)]
struct Header {
    format: Format,
    dim: [i64; 8],
    datatype: i64,
    pixdim: [f64; 8],
    vox_offset: f64,
    scl_slope: f64,
    scl_inter: f64,
    qform_code: i64,
    sform_code: i64,
    quatern: [f64; 3],
    qoffset: [f64; 3],
    srow: [[f64; 4]; 3],
    xyzt_units: u8,
    magic: [u8; 8],
}

const NIFTI1_HEADER: usize = 348;
const NIFTI2_HEADER: usize = 540;

/// A NIfTI file read into memory and validated: its geometry, datatype, scaling and raw voxels.
#[derive(Debug)]
pub struct NiftiFile {
    format: Format,
    datatype: DataType,
    scl_slope: f64,
    scl_inter: f64,
    geometry: Geometry,
    swap: bool,
    raw: Vec<u8>,
    file: String,
}

/// Summary statistics of the scaled voxel values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueStats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub sum: f64,
}

fn display_name(path: &Path) -> String {
    path.display().to_string()
}

impl NiftiFile {
    /// Reads and validates a `.nii` or `.nii.gz` file (gzip is detected by its magic bytes).
    pub fn open(path: &Path, limits: &ReadLimits) -> Result<Self, NiftiError> {
        let file_name = display_name(path);
        let f = File::open(path).map_err(|source| NiftiError::Io {
            file: file_name.clone(),
            source,
        })?;
        Self::from_reader(BufReader::with_capacity(1 << 20, f), &file_name, limits)
    }

    /// Reads and validates a NIfTI file from any buffered byte stream; `file` names it in
    /// errors.
    pub fn from_reader<R: BufRead>(
        mut reader: R,
        file: &str,
        limits: &ReadLimits,
    ) -> Result<Self, NiftiError> {
        let file_name = file.to_string();
        let io_err = |source| NiftiError::Io {
            file: file_name.clone(),
            source,
        };
        let is_gzip = {
            let head = reader.fill_buf().map_err(io_err)?;
            head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
        };
        if is_gzip {
            let mut gz = MultiGzDecoder::new(reader);
            let mut out = Self::read_stream(&mut gz, &file_name, limits)?;
            // Read to the end of the stream, so that the CRC and length trailer are checked.
            // Nothing should follow the voxels; a little slack is tolerated, a bomb is not.
            let mut sink = [0u8; 1 << 16];
            let mut trailing: u64 = 0;
            loop {
                match gz.read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => {
                        trailing += n as u64;
                        if trailing > limits.max_decoded_bytes.min(MAX_TRAILING_BYTES) {
                            return Err(NiftiError::TooLarge {
                                file: file_name,
                                what: "data after the voxels in the gzip stream".into(),
                                bytes: u128::from(trailing),
                                limit: limits.max_decoded_bytes.min(MAX_TRAILING_BYTES),
                            });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(gzip_error(&file_name, e)),
                }
            }
            out.file = file_name;
            Ok(out)
        } else {
            Self::read_stream(&mut reader, &file_name, limits)
        }
    }

    /// Parses, validates and reads the voxels from a decompressed stream.
    fn read_stream<R: Read>(
        r: &mut R,
        file: &str,
        limits: &ReadLimits,
    ) -> Result<Self, NiftiError> {
        let mut hdr = [0u8; NIFTI2_HEADER];
        let got = read_full(r, &mut hdr[..4]).map_err(|e| stream_error(file, e))?;
        if got < 4 {
            return Err(NiftiError::Truncated {
                file: file.into(),
                what: format!("{got} bytes, too short for a NIfTI header"),
            });
        }
        let le = i32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let be = i32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let (format, big_endian, len) = match (le, be) {
            (348, _) => (Format::Nifti1, false, NIFTI1_HEADER),
            (_, 348) => (Format::Nifti1, true, NIFTI1_HEADER),
            (540, _) => (Format::Nifti2, false, NIFTI2_HEADER),
            (_, 540) => (Format::Nifti2, true, NIFTI2_HEADER),
            _ => {
                return Err(field(
                    file,
                    "sizeof_hdr",
                    le,
                    "not a NIfTI file (expected 348 for NIfTI-1 or 540 for NIfTI-2)",
                ));
            }
        };
        let got = read_full(r, &mut hdr[4..len]).map_err(|e| stream_error(file, e))?;
        if got < len - 4 {
            return Err(NiftiError::Truncated {
                file: file.into(),
                what: format!("header has {} of {len} bytes", got + 4),
            });
        }
        let h = match format {
            Format::Nifti1 => parse_nifti1(&hdr[..len], big_endian, file)?,
            Format::Nifti2 => parse_nifti2(&hdr[..len], big_endian),
        };
        let (datatype, geometry, n_vox) = validate(&h, file, limits)?;

        // Skip extensions up to vox_offset (bounded: vox_offset was checked against the limit).
        let skip = h.vox_offset as u64 - len as u64;
        let skipped = io::copy(&mut r.by_ref().take(skip), &mut io::sink())
            .map_err(|e| stream_error(file, e))?;
        if skipped < skip {
            return Err(NiftiError::Truncated {
                file: file.into(),
                what: format!(
                    "file ends at byte {} before vox_offset = {}",
                    len as u64 + skipped,
                    h.vox_offset
                ),
            });
        }
        let n_bytes = n_vox * datatype.size();
        let mut raw = allocate(n_bytes, 0u8, file, "voxel data")?;
        let got = read_full(r, &mut raw).map_err(|e| stream_error(file, e))?;
        if got < n_bytes {
            return Err(NiftiError::Truncated {
                file: file.into(),
                what: format!(
                    "voxel data has {got} of {n_bytes} bytes (dim = {:?}, {})",
                    &h.dim[1..=h.dim[0] as usize],
                    datatype.name()
                ),
            });
        }
        let (scl_slope, scl_inter) = scaling(&h, file)?;
        Ok(Self {
            format,
            datatype,
            scl_slope,
            scl_inter,
            geometry,
            swap: big_endian != cfg!(target_endian = "big"),
            raw,
            file: file.into(),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }
    pub fn datatype(&self) -> DataType {
        self.datatype
    }
    /// Effective scaling: (1, 0) when the header's slope is 0 or not finite.
    pub fn scaling(&self) -> (f64, f64) {
        (self.scl_slope, self.scl_inter)
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// min, max, mean and sum of the scaled values (NaN voxels of float data are skipped
    /// for min/max and poison mean/sum, as numpy does).
    pub fn stats(&self) -> ValueStats {
        const CHUNK: usize = 1 << 16;
        let (min, max, sum) = self
            .scaled_f64_chunks(CHUNK)
            .map(|vals| {
                let mut mn = f64::INFINITY;
                let mut mx = f64::NEG_INFINITY;
                let mut s = 0.0;
                for &v in &vals {
                    mn = mn.min(v);
                    mx = mx.max(v);
                    s += v;
                }
                (mn, mx, s)
            })
            .reduce(
                || (f64::INFINITY, f64::NEG_INFINITY, 0.0),
                |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 + b.2),
            );
        let n = self.geometry.len() as f64;
        ValueStats {
            min,
            max,
            mean: sum / n,
            sum,
        }
    }

    fn scaled_f64_chunks(&self, chunk: usize) -> impl ParallelIterator<Item = Vec<f64>> + '_ {
        let size = self.datatype.size();
        let (dt, swap, m, b) = (self.datatype, self.swap, self.scl_slope, self.scl_inter);
        self.raw.par_chunks(chunk * size).map(move |bytes| {
            let mut out = vec![0.0f64; bytes.len() / size];
            decode_chunk(bytes, dt, swap, &mut out, |v| v * m + b);
            out
        })
    }

    /// The scaled values as a CT volume (f32, Hounsfield units for CT).
    pub fn into_ct(self) -> Result<CtVolume, NiftiError> {
        let mut hu = allocate(self.geometry.len(), 0.0f32, &self.file, "float32 voxels")?;
        let size = self.datatype.size();
        let (dt, swap, m, b) = (self.datatype, self.swap, self.scl_slope, self.scl_inter);
        const CHUNK: usize = 1 << 16;
        self.raw
            .par_chunks(CHUNK * size)
            .zip(hu.par_chunks_mut(CHUNK))
            .for_each(|(bytes, out)| decode_chunk(bytes, dt, swap, out, |v| (v * m + b) as f32));
        Ok(CtVolume::new(self.geometry, hu).expect("length matches the geometry"))
    }

    /// The scaled values as a LiTS label mask: every value must be 0, 1 or 2.
    pub fn into_labels(self) -> Result<LabelVolume, NiftiError> {
        let n = self.geometry.len();
        let size = self.datatype.size();
        let (dt, swap, m, b) = (self.datatype, self.swap, self.scl_slope, self.scl_inter);
        let mut labels = vec![0u8; n];
        const CHUNK: usize = 1 << 16;
        let bad = self
            .raw
            .par_chunks(CHUNK * size)
            .zip(labels.par_chunks_mut(CHUNK))
            .enumerate()
            .filter_map(|(c, (bytes, out))| {
                let mut vals = vec![0.0f64; out.len()];
                decode_chunk(bytes, dt, swap, &mut vals, |v| v * m + b);
                for (i, (&v, o)) in vals.iter().zip(out.iter_mut()).enumerate() {
                    if v == 0.0 || v == 1.0 || v == 2.0 {
                        *o = v as u8;
                    } else {
                        return Some((c * CHUNK + i, v));
                    }
                }
                None
            })
            .min_by_key(|(i, _)| *i);
        if let Some((i, v)) = bad {
            let [nx, ny, _] = self.geometry.shape();
            return Err(NiftiError::Field {
                file: self.file,
                field: format!("voxel ({}, {}, {})", i % nx, (i / nx) % ny, i / (nx * ny)),
                value: v.to_string(),
                reason: "a label mask may only hold 0 (background), 1 (liver) and 2 (tumour)"
                    .into(),
            });
        }
        Ok(LabelVolume::new(self.geometry, labels).expect("length matches the geometry"))
    }
}

/// A vector of `n` copies of `fill`, or an error naming the file when memory runs out (instead
/// of aborting the process).
fn allocate<T: Clone>(n: usize, fill: T, file: &str, what: &str) -> Result<Vec<T>, NiftiError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| NiftiError::Io {
        file: file.into(),
        source: io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("out of memory for {n} values of {what}"),
        ),
    })?;
    v.resize(n, fill);
    Ok(v)
}

/// Decodes `bytes` of datatype `dt` into `out`, mapping each value (as f64) through `f`.
fn decode_chunk<T>(bytes: &[u8], dt: DataType, swap: bool, out: &mut [T], f: impl Fn(f64) -> T) {
    macro_rules! go {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                let v = if swap {
                    <$t>::from_ne_bytes({
                        a.reverse();
                        a
                    })
                } else {
                    <$t>::from_ne_bytes(a)
                };
                *o = f(v as f64);
            }
        }};
    }
    match dt {
        DataType::U8 => {
            for (o, &v) in out.iter_mut().zip(bytes) {
                *o = f(v as f64);
            }
        }
        DataType::I8 => {
            for (o, &v) in out.iter_mut().zip(bytes) {
                *o = f(v as i8 as f64);
            }
        }
        DataType::I16 => go!(i16),
        DataType::U16 => go!(u16),
        DataType::I32 => go!(i32),
        DataType::U32 => go!(u32),
        DataType::I64 => go!(i64),
        DataType::U64 => go!(u64),
        DataType::F32 => go!(f32),
        DataType::F64 => go!(f64),
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn gzip_error(file: &str, e: io::Error) -> NiftiError {
    let reason = match e.kind() {
        io::ErrorKind::UnexpectedEof => "the stream ends early (truncated .gz file)".to_string(),
        _ => e.to_string(),
    };
    NiftiError::Gzip {
        file: file.into(),
        reason,
    }
}

/// Errors from the (possibly gzip) stream: decoder errors are gzip errors.
fn stream_error(file: &str, e: io::Error) -> NiftiError {
    match e.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
            gzip_error(file, e)
        }
        _ => NiftiError::Io {
            file: file.into(),
            source: e,
        },
    }
}

fn field(file: &str, name: &str, value: impl std::fmt::Display, reason: &str) -> NiftiError {
    NiftiError::Field {
        file: file.into(),
        field: name.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_nifti1(bytes: &[u8], big_endian: bool, file: &str) -> Result<Header, NiftiError> {
    // dim[0] decides the byte order inside the `nifti` crate; a header whose dim[0] is out of
    // range in its own byte order would be misread, so check it against sizeof_hdr first.
    let d0 = if big_endian {
        i16::from_be_bytes([bytes[40], bytes[41]])
    } else {
        i16::from_le_bytes([bytes[40], bytes[41]])
    };
    if !(1..=7).contains(&d0) {
        return Err(field(file, "dim[0]", d0, "must be between 1 and 7"));
    }
    let h = nifti::NiftiHeader::from_reader(bytes).map_err(|e| NiftiError::Unsupported {
        file: file.into(),
        reason: format!("invalid NIfTI-1 header: {e}"),
    })?;
    let mut dim = [0i64; 8];
    for (d, &v) in dim.iter_mut().zip(h.dim.iter()) {
        *d = i64::from(v as i16);
    }
    let mut magic = [0u8; 8];
    magic[..4].copy_from_slice(&h.magic);
    let f = |v: f32| f64::from(v);
    Ok(Header {
        format: Format::Nifti1,
        dim,
        datatype: i64::from(h.datatype),
        pixdim: h.pixdim.map(f),
        vox_offset: f(h.vox_offset),
        scl_slope: f(h.scl_slope),
        scl_inter: f(h.scl_inter),
        qform_code: i64::from(h.qform_code),
        sform_code: i64::from(h.sform_code),
        quatern: [f(h.quatern_b), f(h.quatern_c), f(h.quatern_d)],
        qoffset: [f(h.quatern_x), f(h.quatern_y), f(h.quatern_z)],
        srow: [h.srow_x.map(f), h.srow_y.map(f), h.srow_z.map(f)],
        xyzt_units: h.xyzt_units,
        magic,
    })
}

/// The NIfTI-2 header (540 bytes), which the `nifti` crate does not read.
fn parse_nifti2(b: &[u8], big_endian: bool) -> Header {
    let rd8 = |o: usize| -> [u8; 8] { b[o..o + 8].try_into().expect("8 bytes") };
    let i64_at = |o: usize| {
        if big_endian {
            i64::from_be_bytes(rd8(o))
        } else {
            i64::from_le_bytes(rd8(o))
        }
    };
    let f64_at = |o: usize| {
        if big_endian {
            f64::from_be_bytes(rd8(o))
        } else {
            f64::from_le_bytes(rd8(o))
        }
    };
    let i32_at = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().expect("4 bytes");
        if big_endian {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }
    };
    let i16_at = |o: usize| {
        let a = [b[o], b[o + 1]];
        if big_endian {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    };
    let mut dim = [0i64; 8];
    let mut pixdim = [0f64; 8];
    for i in 0..8 {
        dim[i] = i64_at(16 + 8 * i);
        pixdim[i] = f64_at(104 + 8 * i);
    }
    let row = |o: usize| [f64_at(o), f64_at(o + 8), f64_at(o + 16), f64_at(o + 24)];
    Header {
        format: Format::Nifti2,
        dim,
        datatype: i64::from(i16_at(12)),
        pixdim,
        vox_offset: i64_at(168) as f64,
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        qform_code: i64::from(i32_at(344)),
        sform_code: i64::from(i32_at(348)),
        quatern: [f64_at(352), f64_at(360), f64_at(368)],
        qoffset: [f64_at(376), f64_at(384), f64_at(392)],
        srow: [row(400), row(432), row(464)],
        xyzt_units: i32_at(500) as u8,
        magic: rd8(4),
    }
}

/// Checks every field that decides how the voxels are read; returns the datatype, the
/// geometry and the number of voxels.
fn validate(
    h: &Header,
    file: &str,
    limits: &ReadLimits,
) -> Result<(DataType, Geometry, usize), NiftiError> {
    match h.format {
        Format::Nifti1 => match &h.magic[..4] {
            b"n+1\0" => {}
            b"ni1\0" => {
                return Err(NiftiError::Unsupported {
                    file: file.into(),
                    reason: "magic = \"ni1\": a separate .hdr/.img pair is not supported; \
                             convert it to a single .nii file"
                        .into(),
                });
            }
            m => {
                return Err(field(
                    file,
                    "magic",
                    format!("{m:?}"),
                    "expected \"n+1\\0\"",
                ));
            }
        },
        Format::Nifti2 => {
            if &h.magic != b"n+2\0\r\n\x1a\n" {
                return Err(field(
                    file,
                    "magic",
                    format!("{:?}", h.magic),
                    "expected \"n+2\\0\\r\\n\\x1a\\n\"",
                ));
            }
        }
    }
    let ndim = h.dim[0];
    if !(1..=7).contains(&ndim) {
        return Err(field(file, "dim[0]", ndim, "must be between 1 and 7"));
    }
    let ndim = ndim as usize;
    for i in 1..=ndim {
        if h.dim[i] < 1 {
            return Err(field(
                file,
                &format!("dim[{i}]"),
                h.dim[i],
                "every dimension must be at least 1",
            ));
        }
    }
    for i in 4..=ndim {
        if h.dim[i] != 1 {
            return Err(NiftiError::Unsupported {
                file: file.into(),
                reason: format!(
                    "dim[{i}] = {}: only 3D volumes (or 4D with a single volume) are supported",
                    h.dim[i]
                ),
            });
        }
    }
    let shape = [
        h.dim[1] as u64,
        if ndim >= 2 { h.dim[2] as u64 } else { 1 },
        if ndim >= 3 { h.dim[3] as u64 } else { 1 },
    ];
    let datatype = DataType::from_code(h.datatype).ok_or_else(|| {
        field(
            file,
            "datatype",
            h.datatype,
            "unsupported datatype (readable: uint8, int8, int16, uint16, int32, uint32, int64, \
             uint64, float32, float64)",
        )
    })?;
    // Saturating: NIfTI-2 dims are 64-bit, so the product can exceed even u128.
    let n_vox = u128::from(shape[0])
        .saturating_mul(u128::from(shape[1]))
        .saturating_mul(u128::from(shape[2]));
    let data_bytes = n_vox.saturating_mul(datatype.size() as u128);
    let limit = limits.max_decoded_bytes;
    let as_f32 = n_vox.saturating_mul(4);
    if data_bytes.max(as_f32) > u128::from(limit) {
        return Err(NiftiError::TooLarge {
            file: file.into(),
            what: format!(
                "dim = {:?} ({} voxels of {})",
                &h.dim[1..=ndim],
                n_vox,
                datatype.name()
            ),
            bytes: data_bytes.max(as_f32),
            limit,
        });
    }
    let header_len = match h.format {
        Format::Nifti1 => NIFTI1_HEADER,
        Format::Nifti2 => NIFTI2_HEADER,
    } as f64;
    let vo = h.vox_offset;
    if !vo.is_finite() || vo < header_len + 4.0 || vo.fract() != 0.0 {
        return Err(field(
            file,
            "vox_offset",
            vo,
            &format!(
                "must be a whole number of at least {} (single-file NIfTI)",
                header_len + 4.0
            ),
        ));
    }
    if (vo as u128).saturating_add(data_bytes) > u128::from(limit) {
        return Err(NiftiError::TooLarge {
            file: file.into(),
            what: format!("vox_offset = {vo} plus the voxel data"),
            bytes: (vo as u128).saturating_add(data_bytes),
            limit,
        });
    }
    for i in 1..=3 {
        let p = h.pixdim[i];
        if i <= ndim && !(p.is_finite() && p > 0.0) {
            return Err(field(
                file,
                &format!("pixdim[{i}]"),
                p,
                "voxel spacing must be finite and positive",
            ));
        }
    }
    let mut pixdim = h.pixdim;
    for p in pixdim.iter_mut().take(4).skip(ndim + 1) {
        // Missing dimensions of a 1D/2D image: unit spacing when the header leaves it empty.
        if !(p.is_finite() && *p > 0.0) {
            *p = 1.0;
        }
    }
    if h.sform_code > 0 && h.srow.iter().flatten().any(|v| !v.is_finite()) {
        return Err(field(
            file,
            "srow_x/y/z",
            "non-finite",
            "sform must be finite",
        ));
    }
    if h.sform_code <= 0
        && h.qform_code > 0
        && h.quatern
            .iter()
            .chain(h.qoffset.iter())
            .any(|v| !v.is_finite())
    {
        return Err(field(
            file,
            "quatern/qoffset",
            "non-finite",
            "qform must be finite",
        ));
    }
    let xform = XformFields {
        qform_code: h.qform_code.clamp(0, i16::MAX as i64) as i16,
        sform_code: h.sform_code.clamp(0, i16::MAX as i64) as i16,
        quatern: h.quatern,
        qoffset: h.qoffset,
        srow: h.srow,
        pixdim,
        xyzt_units: h.xyzt_units,
    };
    let shape = shape.map(|v| v as usize);
    let geometry =
        Geometry::from_fields(shape, xform).map_err(|reason| NiftiError::Unsupported {
            file: file.into(),
            reason,
        })?;
    Ok((datatype, geometry, n_vox as usize))
}

/// Effective scaling, as nibabel reads it: a slope of 0 or a non-finite slope means none.
fn scaling(h: &Header, file: &str) -> Result<(f64, f64), NiftiError> {
    if h.scl_slope == 0.0 || !h.scl_slope.is_finite() {
        return Ok((1.0, 0.0));
    }
    if !h.scl_inter.is_finite() {
        return Err(field(
            file,
            "scl_inter",
            h.scl_inter,
            "must be finite when scl_slope is set",
        ));
    }
    Ok((h.scl_slope, h.scl_inter))
}

/// Writes a label mask as uint8 `.nii.gz` (or `.nii`) with its geometry, atomically.
pub fn write_labels(path: &Path, mask: &LabelVolume) -> Result<(), NiftiError> {
    write_array(path, mask.geometry(), mask.labels().to_vec(), 0.0, 2.0)
}

/// Writes a CT volume as int16 `.nii.gz` (values rounded and clamped to int16), atomically.
pub fn write_ct_i16(path: &Path, ct: &CtVolume) -> Result<(), NiftiError> {
    let data: Vec<i16> = ct
        .hu()
        .par_iter()
        .map(|&v| v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16)
        .collect();
    write_array(path, ct.geometry(), data, -1024.0, 3071.0)
}

fn write_array<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    geometry: &Geometry,
    data: Vec<T>,
    cal_min: f32,
    cal_max: f32,
) -> Result<(), NiftiError> {
    use ndarray::ShapeBuilder;
    let file = display_name(path);
    let werr = |source| NiftiError::Write {
        file: file.clone(),
        source,
    };
    let x = geometry.xform();
    let hdr = nifti::NiftiHeader {
        qform_code: x.qform_code,
        sform_code: x.sform_code,
        quatern_b: x.quatern[0] as f32,
        quatern_c: x.quatern[1] as f32,
        quatern_d: x.quatern[2] as f32,
        quatern_x: x.qoffset[0] as f32,
        quatern_y: x.qoffset[1] as f32,
        quatern_z: x.qoffset[2] as f32,
        srow_x: x.srow[0].map(|v| v as f32),
        srow_y: x.srow[1].map(|v| v as f32),
        srow_z: x.srow[2].map(|v| v as f32),
        pixdim: x.pixdim.map(|v| v as f32),
        xyzt_units: x.xyzt_units,
        cal_min,
        cal_max,
        ..Default::default()
    };
    let mut hdr = hdr;
    hdr.set_description_str("hepaflow")
        .map_err(|e| werr(io::Error::other(format!("header description: {e}"))))?;
    let [nx, ny, nz] = geometry.shape();
    let arr = ndarray::Array3::from_shape_vec((nx, ny, nz).f(), data)
        .map_err(|e| werr(io::Error::other(e.to_string())))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let tmp = temp_sibling(path, if gz { "nii.gz" } else { "nii" });
    let result = nifti::writer::WriterOptions::new(&tmp)
        .reference_header(&hdr)
        .write_nifti(&arr)
        .map_err(|e| werr(io::Error::other(e.to_string())))
        .and_then(|()| crate::fsutil::commit_temp(&tmp, path).map_err(werr));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_sibling(path: &Path, ext: &str) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let name = format!(
        ".tmp-{}-{}.{ext}",
        std::process::id(),
        crate::fsutil::unique_suffix()
    );
    match dir {
        Some(d) => d.join(name),
        None => PathBuf::from(name),
    }
}
