//! `hepaflow bench`: in-process timings of the imaging core, for the benchmark scripts
//! (`scripts/bench-*`), which compare them with reference tools side by side. Prints JSON.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;

use super::imaging::bad_input;
use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::lesions::{Components, Connectivity};
use crate::metrics::surface;
use crate::volume::{CtVolume, LabelVolume, NiftiFile};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
    /// Timed repetitions (the median is reported).
    #[arg(long, global = true, default_value_t = 5)]
    pub repeat: usize,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Read a NIfTI file into a float32 CT volume.
    Read { file: PathBuf },
    /// 3D connected components (with the full label volume) of a mask's structure.
    Label {
        mask: PathBuf,
        /// `liver` (label ≥ 1), `tumour` (label 2), or `hu>VALUE` on a CT file.
        #[arg(long, default_value = "tumour")]
        structure: String,
        #[arg(long, default_value_t = 26)]
        connectivity: u32,
    },
    /// Dense against patch inference with one model: probability difference and timings.
    Modes {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 4)]
        stride: i64,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Reassembly and post-processing of one study's probabilities (what calibration repeats
    /// for every threshold pair), with and without the search for missed lesions.
    Postprocess {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Rendering a full study report (HTML + every picture) from a CT and a mask.
    Report {
        #[arg(long)]
        ct: PathBuf,
        #[arg(long)]
        mask: PathBuf,
        /// Ground truth, for the accuracy section.
        #[arg(long)]
        truth: Option<PathBuf>,
    },
    /// No-op jobs through in-process workers on Postgres: jobs/s and claim latency.
    Queue(super::bench_queue::QueueBenchArgs),
    /// Pooled surface distances (ASSD, MSSD, HD95) of one structure.
    Surface {
        #[arg(long)]
        truth: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        #[arg(long, default_value = "liver")]
        structure: String,
    },
}

fn timed<T>(repeat: usize, mut f: impl FnMut() -> T) -> (Vec<f64>, T) {
    let mut times = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = f();
        times.push(t.elapsed().as_secs_f64());
        last = Some(out);
    }
    (times, last.expect("at least one run"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn structure_pred(name: &str) -> anyhow::Result<fn(u8) -> bool> {
    match name {
        "liver" => Ok(|v| v >= 1),
        "tumour" => Ok(|v| v == 2),
        other => anyhow::bail!("unknown structure {other:?}: expected liver or tumour"),
    }
}

pub fn bench(args: BenchArgs, settings: &Settings) -> CmdResult {
    let limits = &settings.read_limits;
    let threads = rayon::current_num_threads();
    if let BenchCommand::Modes {
        model,
        input,
        stride,
        device,
    } = &args.what
    {
        return modes(model, input, *stride, device, settings);
    }
    if let BenchCommand::Postprocess {
        model,
        input,
        device,
    } = &args.what
    {
        return postprocess(model, input, device, args.repeat, settings);
    }
    if let BenchCommand::Queue(a) = &args.what {
        return super::bench_queue::run(a, settings);
    }
    if let BenchCommand::Report { ct, mask, truth } = &args.what {
        let ct = CtVolume::read(ct, limits).map_err(bad_input)?;
        let mask = LabelVolume::read(mask, limits).map_err(bad_input)?;
        let truth = match truth {
            Some(t) => Some(LabelVolume::read(t, limits).map_err(bad_input)?),
            None => None,
        };
        let prov = crate::report::Provenance {
            model_name: "bench".into(),
            model_version: "0".into(),
            weights_sha256: String::new(),
            code_version: env!("CARGO_PKG_VERSION").into(),
            parameters: "{}".into(),
            timings: "{}".into(),
            input_sha256: String::new(),
            run_id: 0,
        };
        // The accuracy metrics come computed (the analyze step stores them; the report
        // step reads them), as in the pipeline.
        let m = truth
            .as_ref()
            .and_then(|t| crate::metrics::evaluate(t, &mask).ok());
        let (times, html) = timed(args.repeat, || {
            crate::report::render_study(&crate::report::StudyInput {
                study_label: "Study 0".into(),
                processed: "bench".into(),
                ct: &ct,
                mask: &mask,
                truth: truth.as_ref(),
                metrics: m.as_ref(),
                provenance: prov.clone(),
                max_figures: 6,
            })
        });
        let html = html.map_err(|e| Failure::Other(e.into()))?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "shape": ct.geometry().shape(),
                "threads": threads,
                "seconds": times,
                "median_s": median(times.clone()),
                "html_bytes": html.len(),
            }))?
        );
        return Ok(());
    }
    let out = match args.what {
        BenchCommand::Modes { .. }
        | BenchCommand::Postprocess { .. }
        | BenchCommand::Queue(_)
        | BenchCommand::Report { .. } => {
            unreachable!("handled above")
        }
        BenchCommand::Read { file } => {
            NiftiFile::open(&file, limits).map_err(bad_input)?; // warm the page cache
            let (times, ct) = timed(args.repeat, || CtVolume::read(&file, limits));
            let ct = ct.map_err(bad_input)?;
            json!({"stage": "read", "threads": threads, "median_s": median(times.clone()),
                   "runs_s": times, "shape": ct.geometry().shape()})
        }
        BenchCommand::Label {
            mask,
            structure,
            connectivity,
        } => {
            let conn = Connectivity::from_neighbours(connectivity)
                .ok_or_else(|| anyhow::anyhow!("connectivity must be 6, 18 or 26"))?;
            let (values, shape) = if let Some(t) = structure.strip_prefix("hu>") {
                let t: f32 = t.parse()?;
                let ct = CtVolume::read(&mask, limits).map_err(bad_input)?;
                let v: Vec<u8> = ct.hu().iter().map(|&h| u8::from(h > t)).collect();
                (v, ct.geometry().shape())
            } else {
                let pred = structure_pred(&structure)?;
                let m = LabelVolume::read(&mask, limits).map_err(bad_input)?;
                let shape = m.geometry().shape();
                (
                    m.labels().iter().map(|&v| u8::from(pred(v))).collect(),
                    shape,
                )
            };
            // Timed like cc3d: labelling plus the full label volume.
            let (times, (comps, volume)) = timed(args.repeat, || {
                let c = Components::label(&values, shape, |v| v != 0, conn);
                let volume = c.label_volume();
                (c, volume)
            });
            drop(volume);
            let (count, sizes) = (comps.count(), comps.sizes());
            json!({"stage": "label", "threads": threads, "median_s": median(times.clone()),
                   "runs_s": times, "components": count, "sizes": &sizes[1..]})
        }
        BenchCommand::Surface {
            truth,
            pred,
            structure,
        } => {
            let is_in = structure_pred(&structure)?;
            let t = LabelVolume::read(&truth, limits).map_err(bad_input)?;
            let p = LabelVolume::read(&pred, limits).map_err(bad_input)?;
            let g = t.geometry();
            let (times, stats) = timed(args.repeat, || {
                surface::surface_distances(t.labels(), p.labels(), g.shape(), g.spacing_mm(), is_in)
                    .and_then(surface::stats)
            });
            let s = stats.ok_or_else(|| anyhow::anyhow!("a mask is empty"))?;
            json!({"stage": "surface", "threads": threads, "median_s": median(times.clone()),
                   "runs_s": times, "assd": s.assd, "mssd": s.mssd, "hd95": s.hd95, "rmsd": s.rmsd})
        }
    };
    println!("{out}");
    Ok(())
}

/// The model (on the device named) and the CT a segmentation benchmark runs on.
fn model_and_study(
    model: &std::path::Path,
    input: &std::path::Path,
    device: &str,
    settings: &Settings,
) -> Result<(crate::segment::Classifier, CtVolume, tch::Device), Failure> {
    use crate::segment::{self, Classifier};
    let device = segment::parse_device(device).map_err(|e| Failure::Other(e.into()))?;
    let clf = Classifier::load(model, device, false).map_err(|e| Failure::BadInput(e.into()))?;
    let ct = CtVolume::read(input, &settings.read_limits).map_err(bad_input)?;
    Ok((clf, ct, device))
}

fn postprocess(
    model: &std::path::Path,
    input: &std::path::Path,
    device: &str,
    repeat: usize,
    settings: &Settings,
) -> CmdResult {
    use crate::segment::{InferOptions, infer};
    let (clf, ct, device) = model_and_study(model, input, device, settings)?;
    let opts = InferOptions::default();
    let maps = infer::probabilities(&clf, &ct, &opts, device);
    let (t, s) = (clf.tumour_threshold(), clf.tumour_seed_threshold());
    let filter = clf.false_positive_filter(&opts);
    let (full, with) = timed(repeat, || infer::mask_from(&maps, &ct, &opts, t, s, filter));
    let no_search = InferOptions {
        tumour_detect_z: f64::INFINITY,
        ..opts.clone()
    };
    let (without, _) = timed(repeat, || {
        infer::mask_from(&maps, &ct, &no_search, t, s, filter)
    });
    let tumour = with.labels().iter().filter(|&&v| v == 2).count();
    let out = json!({"stage": "postprocess", "shape": ct.geometry().shape(),
        "threads": rayon::current_num_threads(), "postprocess_s": median(full),
        "without_search_s": median(without), "tumour_voxels": tumour});
    println!("{out}");
    Ok(())
}

fn modes(
    model: &std::path::Path,
    input: &std::path::Path,
    stride: i64,
    device: &str,
    settings: &Settings,
) -> CmdResult {
    use crate::segment::{InferOptions, Mode, infer};
    let (clf, ct, device) = model_and_study(model, input, device, settings)?;
    let run = |mode| {
        let opts = InferOptions {
            mode,
            stride,
            ..InferOptions::default()
        };
        let t = Instant::now();
        let maps = infer::probabilities(&clf, &ct, &opts, device);
        (t.elapsed().as_secs_f64(), maps)
    };
    let (td, d) = run(Mode::Dense);
    let (tp, p) = run(Mode::Patch);
    let mut max = 0.0f32;
    for c in 0..3 {
        for (a, b) in d.probs[c].iter().zip(&p.probs[c]) {
            max = max.max((a - b).abs());
        }
    }
    let shape = ct.geometry().shape();
    let mask = |m: &infer::ProbabilityMaps| {
        LabelVolume::new(
            ct.geometry().clone(),
            infer::reassemble(m, shape, clf.tumour_threshold()),
        )
        .expect("grid")
    };
    let m = crate::metrics::evaluate(&mask(&d), &mask(&p)).expect("same grid");
    let out = json!({"stage": "modes", "stride": stride, "dense_s": td, "patch_s": tp,
        "max_abs_probability_difference": max, "positions": d.nu * d.nv * d.nz,
        "dice_liver_between_modes": m.liver.dice, "dice_tumour_between_modes": m.tumour.dice});
    println!("{out}");
    Ok(())
}
