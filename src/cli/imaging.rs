//! Imaging tools that need no database: `inspect`, `phantom`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::lesions::{self, LesionReport};
use crate::metrics::{self, StructureMetrics};
use crate::volume::nifti::{write_ct_i16, write_labels};
use crate::volume::phantom::{self, PhantomSpec};
use crate::volume::preview;
use crate::volume::{CtVolume, LabelVolume, NiftiError, NiftiFile};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A `.nii` or `.nii.gz` file.
    pub file: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What `inspect --json` prints (field names are part of the CLI contract).
#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub format: &'static str,
    pub shape: [usize; 3],
    pub spacing_mm: [f64; 3],
    pub affine: [[f64; 4]; 4],
    pub datatype: &'static str,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub sum: f64,
}

pub(crate) fn bad_input(e: NiftiError) -> Failure {
    Failure::BadInput(e.into())
}

pub fn inspect(args: InspectArgs, settings: &Settings) -> CmdResult {
    let f = NiftiFile::open(&args.file, &settings.read_limits).map_err(bad_input)?;
    let stats = f.stats();
    let g = f.geometry();
    let (scl_slope, scl_inter) = f.scaling();
    let report = InspectReport {
        format: f.format().name(),
        shape: g.shape(),
        spacing_mm: g.spacing_mm(),
        affine: *g.affine(),
        datatype: f.datatype().name(),
        scl_slope,
        scl_inter,
        min: stats.min,
        max: stats.max,
        mean: stats.mean,
        sum: stats.sum,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report;
        println!("format      {}", r.format);
        println!(
            "shape       {} x {} x {}",
            r.shape[0], r.shape[1], r.shape[2]
        );
        println!(
            "spacing     {:.4} x {:.4} x {:.4} mm",
            r.spacing_mm[0], r.spacing_mm[1], r.spacing_mm[2]
        );
        println!("datatype    {}", r.datatype);
        println!("scaling     value x {} + {}", r.scl_slope, r.scl_inter);
        for (i, row) in r.affine.iter().enumerate() {
            let label = if i == 0 { "affine" } else { "" };
            println!(
                "{label:<11} [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
                row[0], row[1], row[2], row[3]
            );
        }
        println!(
            "values      min {:.4}  max {:.4}  mean {:.4}  sum {:.6e}",
            r.min, r.max, r.mean, r.sum
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// Folder to write `volume-K.nii.gz` and `segmentation-K.nii.gz` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of studies.
    #[arg(long, default_value_t = 4)]
    pub count: u64,
    /// Seed of the series: the same seed gives the same studies.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Voxels along x, y and z, as XxYxZ.
    #[arg(long, default_value = "256x256x64", value_parser = parse_shape)]
    pub shape: [usize; 3],
    /// Spacing in mm as A,B,C (x, y, slice); chosen per study when absent.
    #[arg(long, value_parser = parse_spacing)]
    pub spacing: Option<[f64; 3]>,
    /// Index of the first study (K starts here).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Also write `preview-K.png`: the slice with the largest tumour (else liver) area, with
    /// the ground-truth contours.
    #[arg(long)]
    pub preview: bool,
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let err = || format!("{s:?}: expected XxYxZ with three positive integers, e.g. 256x256x48");
    if parts.len() != 3 {
        return Err(err());
    }
    let mut out = [0usize; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p.trim().parse().map_err(|_| err())?;
        if *o == 0 || *o > 4096 {
            return Err(err());
        }
    }
    Ok(out)
}

fn parse_spacing(s: &str) -> Result<[f64; 3], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let err = || format!("{s:?}: expected A,B,C with three positive millimetre values");
    if parts.len() != 3 {
        return Err(err());
    }
    let mut out = [0f64; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p.trim().parse().map_err(|_| err())?;
        if !(o.is_finite() && *o > 0.0 && *o < 100.0) {
            return Err(err());
        }
    }
    Ok(out)
}

pub fn phantom(args: PhantomArgs) -> CmdResult {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    let spec = PhantomSpec {
        shape: args.shape,
        spacing_mm: args.spacing,
        seed: args.seed,
    };
    for k in args.first..args.first + args.count {
        let t = Instant::now();
        let p = phantom::generate(&spec, k).map_err(|e| anyhow::anyhow!("phantom {k}: {e}"))?;
        write_ct_i16(&args.out.join(format!("volume-{k}.nii.gz")), &p.ct)?;
        write_labels(&args.out.join(format!("segmentation-{k}.nii.gz")), &p.truth)?;
        if args.preview {
            let slice = preview::overview_slice(&p.truth);
            preview::slice_with_contours(&p.ct, Some(&p.truth), slice)
                .write_png(&args.out.join(format!("preview-{k}.png")))
                .context("cannot write the preview image")?;
        }
        let s = p.ct.geometry().spacing_mm();
        tracing::info!(
            study = k,
            lesions = p.lesions.len(),
            spacing_mm = format!("{:.3},{:.3},{:.2}", s[0], s[1], s[2]),
            noise_hu = format!("{:.1}", p.noise_hu),
            duration_ms = t.elapsed().as_millis() as u64,
            "phantom written"
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// CT volume.
    #[arg(long)]
    pub ct: PathBuf,
    /// Label mask whose contours are drawn (liver green, tumour red).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Axial slice; default: the largest tumour (else liver) cross-section of the mask.
    #[arg(long)]
    pub slice: Option<usize>,
    /// PNG to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn preview(args: PreviewArgs, settings: &Settings) -> CmdResult {
    let limits = &settings.read_limits;
    let ct = CtVolume::read(&args.ct, limits).map_err(bad_input)?;
    let mask = read_companion(args.mask.as_deref(), ct.geometry(), "CT", |p| {
        LabelVolume::read(p, limits).map(|m| (m.geometry().clone(), m))
    })?;
    let nz = ct.geometry().shape()[2];
    let k = args
        .slice
        .or_else(|| mask.as_ref().map(preview::overview_slice))
        .unwrap_or(nz / 2);
    if k >= nz {
        return Err(Failure::Other(anyhow::anyhow!(
            "--slice {k}: the volume has {nz} slices"
        )));
    }
    preview::slice_with_contours(&ct, mask.as_ref(), k)
        .write_png(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct LesionsArgs {
    /// Label mask (0 background, 1 liver, 2 tumour).
    #[arg(long)]
    pub mask: PathBuf,
    /// The CT the mask belongs to, for mean HU (same grid).
    #[arg(long)]
    pub ct: Option<PathBuf>,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Fails with exit code 3 unless `other` lies on `reference`'s grid.
fn same_grid(
    reference: &crate::volume::Geometry,
    other: &crate::volume::Geometry,
    other_path: &std::path::Path,
    what: &str,
) -> CmdResult {
    if reference.same_grid(other) {
        return Ok(());
    }
    Err(Failure::BadInput(anyhow::anyhow!(
        "{}: shape {:?} or affine differs from the {what}'s (shape {:?}): not the same voxel grid",
        other_path.display(),
        other.shape(),
        reference.shape()
    )))
}

/// Reads an optional second volume that must lie on `reference`'s grid.
fn read_companion<T>(
    path: Option<&std::path::Path>,
    reference: &crate::volume::Geometry,
    what: &str,
    read: impl FnOnce(&std::path::Path) -> Result<(crate::volume::Geometry, T), NiftiError>,
) -> Result<Option<T>, Failure> {
    let Some(p) = path else { return Ok(None) };
    let (g, v) = read(p).map_err(bad_input)?;
    same_grid(reference, &g, p, what)?;
    Ok(Some(v))
}

pub fn lesions(args: LesionsArgs, settings: &Settings) -> CmdResult {
    let limits = &settings.read_limits;
    let mask = LabelVolume::read(&args.mask, limits).map_err(bad_input)?;
    let ct = read_companion(args.ct.as_deref(), mask.geometry(), "mask", |p| {
        CtVolume::read(p, limits).map(|c| (c.geometry().clone(), c))
    })?;
    let report = lesions::analyze(&mask, ct.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_lesions(&report);
    }
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
}

fn print_lesions(r: &LesionReport) {
    println!("liver volume      {:.1} mL", r.liver_ml);
    println!("tumour volume     {:.2} mL", r.tumour_ml);
    println!("tumour burden     {} %", opt(r.tumour_burden_pct, 2));
    println!("lesions           {}", r.lesions.len());
    if r.lesions.is_empty() {
        return;
    }
    println!(
        "{:>3} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9}  centroid (mm)",
        "id", "voxels", "volume mL", "axial mm", "max mm", "mean HU", "slices"
    );
    for l in &r.lesions {
        println!(
            "{:>3} {:>9} {:>10.3} {:>9.1} {:>9.1} {:>8} {:>4}-{:<4}  ({:.1}, {:.1}, {:.1})",
            l.id,
            l.voxels,
            l.volume_ml,
            l.longest_axial_diameter_mm,
            l.max_diameter_mm,
            opt(l.mean_hu, 1),
            l.slice_range[0],
            l.slice_range[1],
            l.centroid_mm[0],
            l.centroid_mm[1],
            l.centroid_mm[2]
        );
    }
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Ground-truth label mask.
    #[arg(long)]
    pub truth: PathBuf,
    /// Predicted label mask (same grid).
    #[arg(long)]
    pub pred: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn metrics(args: MetricsArgs, settings: &Settings) -> CmdResult {
    let limits = &settings.read_limits;
    let truth = LabelVolume::read(&args.truth, limits).map_err(bad_input)?;
    let pred = LabelVolume::read(&args.pred, limits).map_err(bad_input)?;
    same_grid(truth.geometry(), pred.geometry(), &args.pred, "truth")?;
    let m = metrics::evaluate(&truth, &pred)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let row = |name: &str, s: &StructureMetrics| {
        println!(
            "{name:<7} dice {:.4}  jaccard {:.4}  voe {:.4}  rvd {}  assd {} mm  mssd {} mm  hd95 {} mm  rmsd {} mm  truth {:.2} mL  pred {:.2} mL{}",
            s.dice,
            s.jaccard,
            s.voe,
            opt(s.rvd, 4),
            opt(s.assd_mm, 3),
            opt(s.mssd_mm, 3),
            opt(s.hd95_mm, 3),
            opt(s.rmsd_mm, 3),
            s.truth_ml,
            s.pred_ml,
            s.surface_note
                .map(|n| format!("  (surface metrics: {n})"))
                .unwrap_or_default()
        );
    };
    row("liver", &m.liver);
    row("tumour", &m.tumour);
    let d = &m.detection;
    println!(
        "lesions reference {}  predicted {}  tp {}  fp {}  fn {}  precision {}  recall {}  f1 {}",
        d.reference_lesions,
        d.predicted_lesions,
        d.tp,
        d.fp,
        d.fn_,
        opt(d.precision, 3),
        opt(d.recall, 3),
        opt(d.f1, 3)
    );
    for (name, c) in [
        ("small <10 mm", d.by_size.small),
        ("medium 10-20 mm", d.by_size.medium),
        ("large >20 mm", d.by_size.large),
    ] {
        println!("  {name:<16} detected {}  missed {}", c.tp, c.fn_);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_spacings_parse() {
        assert_eq!(parse_shape("256x256x48"), Ok([256, 256, 48]));
        assert!(parse_shape("256x256").is_err());
        assert!(parse_shape("0x1x1").is_err());
        assert_eq!(parse_spacing("0.7,0.7,2.5"), Ok([0.7, 0.7, 2.5]));
        assert!(parse_spacing("0.7,-1,2").is_err());
        assert!(parse_spacing("NaN,1,1").is_err());
    }
}
