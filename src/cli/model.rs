//! Model tools: `train`, `fit-filter`, `segment`, `eval`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::imaging::bad_input;
use super::{CmdResult, Failure};
use crate::config::Settings;
use crate::metrics;
use crate::segment::train::{self, TrainError, TrainOptions};
use crate::segment::{self, Classifier, InferOptions, Mode, ModelError, calibrate};
use crate::volume::{CtVolume, LabelVolume};

fn model_failure(e: ModelError) -> Failure {
    match e {
        ModelError::Device(_) | ModelError::NoCuda => Failure::Other(e.into()),
        _ => Failure::BadInput(e.into()),
    }
}

fn train_failure(e: TrainError) -> Failure {
    match e {
        TrainError::Nifti(e) => bad_input(e),
        TrainError::Model(e) => model_failure(e),
        TrainError::Data(_) => Failure::BadInput(e.into()),
        TrainError::Write { .. } => Failure::Other(e.into()),
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// LiTS-layout folder (volume-K.nii.gz + segmentation-K.nii.gz).
    #[arg(long)]
    pub data: PathBuf,
    /// Folder for model.safetensors and card.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Patch side in pixels (59 + an even number).
    #[arg(long, default_value_t = TrainOptions::default().patch)]
    pub patch: i64,
    /// Width multiplier of the VGG16 layers (1 = the real VGG16 widths).
    #[arg(long, default_value_t = TrainOptions::default().width)]
    pub width: f64,
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    pub epochs: usize,
    /// Optimisation steps per epoch.
    #[arg(long, default_value_t = TrainOptions::default().steps_per_epoch)]
    pub steps: usize,
    /// Crops per step (each crop trains 16 × 16 patches).
    #[arg(long, default_value_t = TrainOptions::default().batch)]
    pub batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    pub lr: f64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight of the tumour class in the loss (background and liver weigh 1).
    #[arg(long, default_value_t = TrainOptions::default().tumour_weight)]
    pub tumour_weight: f64,
    /// The plain VGG16, without batch normalisation after each convolution.
    #[arg(long)]
    pub no_batch_norm: bool,
    /// In-plane pixel sizes the network works at: auto (the range of the training studies';
    /// segmentation brings studies outside it to its nearer end), native (every study's own
    /// pixels), or millimetres (training and segmentation resample every study to it).
    #[arg(long, default_value_t = TrainOptions::default().pixel_size)]
    pub pixel_mm: train::PixelSize,
    /// ImageNet weights (torchvision names, .safetensors: `vgg16_bn`, or `vgg16` with
    /// --no-batch-norm) to start the convolutions from; needs --width 1.
    #[arg(long)]
    pub init: Option<PathBuf>,
}

pub fn train(args: TrainArgs, settings: &Settings) -> CmdResult {
    let device = segment::parse_device(&args.device).map_err(model_failure)?;
    let opts = TrainOptions {
        patch: args.patch,
        width: args.width,
        epochs: args.epochs,
        steps_per_epoch: args.steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        device,
        init: args.init,
        tumour_weight: args.tumour_weight,
        batch_norm: !args.no_batch_norm,
        progress: true,
        pixel_size: args.pixel_mm,
        ..TrainOptions::default()
    };
    let t = Instant::now();
    let card =
        train::train(&args.data, &args.out, &opts, &settings.read_limits).map_err(train_failure)?;
    tracing::info!(duration_s = t.elapsed().as_secs(), "model written");
    println!(
        "model {} written to {} (weights sha256 {})",
        card.name,
        args.out.display(),
        card.weights_sha256
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct FitFilterArgs {
    /// Model folder (card.json + weights); its card.json gets the filter.
    #[arg(long)]
    pub model: PathBuf,
    /// LiTS-layout folder: the model's training studies.
    #[arg(long)]
    pub data: PathBuf,
    /// Also choose the tumour and seed thresholds again and write them into the card: on the
    /// studies the card records as held out from training when the folder holds them (found by
    /// their sha256), else on every study of the folder.
    #[arg(long)]
    pub calibrate: bool,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Fits a model's false-positive filter on a LiTS-layout folder (the step `train` ends with)
/// and writes it into the model's card, with recalibrated thresholds when asked; the weights
/// stay as they are.
pub fn fit_filter(args: FitFilterArgs, settings: &Settings) -> CmdResult {
    let device = segment::parse_device(&args.device).map_err(model_failure)?;
    let clf = Classifier::load(&args.model, device, true).map_err(model_failure)?;
    let studies = train::lits_pairs(&args.data).map_err(|e| Failure::BadInput(e.into()))?;
    let opts = InferOptions::default();
    let scope = if args.calibrate {
        let held = held_out_studies(clf.card(), &studies)?;
        if held.is_empty() {
            calibrate::Scope::All
        } else {
            calibrate::Scope::HeldOut(held)
        }
    } else {
        calibrate::Scope::Fixed(clf.tumour_threshold(), clf.tumour_seed_threshold())
    };
    let (choosing, which) = match &scope {
        calibrate::Scope::HeldOut(ids) => (ids.len(), "held-out"),
        _ => (studies.len(), "of the folder's"),
    };
    let cal = calibrate::calibrate(
        &clf,
        &studies,
        &[],
        &opts,
        &scope,
        &settings.read_limits,
        device,
    )
    .map_err(train_failure)?;
    let filter = cal.filter.map_err(|why| {
        Failure::BadInput(anyhow::anyhow!(
            "{}: no filter can be fitted with tumour threshold {:.2} and seed threshold {:.2}: {why}; the card is unchanged",
            args.data.display(),
            cal.threshold,
            cal.seed
        ))
    })?;
    let (n, lesions) = (
        filter.exemplars.len(),
        filter.exemplars.iter().filter(|e| e.lesion).count(),
    );
    let mut card = clf.card().clone();
    card.false_positive_filter = Some(filter);
    if let Some(dice) = cal.dice_per_case {
        card.tumour_threshold = Some(cal.threshold);
        card.tumour_seed_threshold = Some(cal.seed);
        println!(
            "tumour threshold {:.2}, seed threshold {:.2} (tumour Dice per case {dice:.3} on {choosing} {which} studies)",
            cal.threshold, cal.seed
        );
    }
    let path = card.write_to(&args.model).map_err(|e| {
        anyhow::anyhow!(
            "cannot write {}: {e}",
            args.model.join(segment::CARD_FILE).display()
        )
    })?;
    println!(
        "false-positive filter of {} components ({lesions} lesions, {} false positives) from {} studies written to {}",
        n,
        n - lesions,
        studies.len(),
        path.display()
    );
    Ok(())
}

/// The ids of the studies of `studies` whose volume the card records as held out from training
/// (by sha256).
fn held_out_studies(
    card: &segment::ModelCard,
    studies: &[train::StudyFiles],
) -> Result<Vec<String>, Failure> {
    let held: Vec<&str> = card
        .training
        .as_ref()
        .and_then(|t| t["data"].as_array())
        .into_iter()
        .flatten()
        .filter(|d| d["split"] == "validation")
        .filter_map(|d| d["volume_sha256"].as_str())
        .collect();
    let mut out = Vec::new();
    if held.is_empty() {
        return Ok(out);
    }
    for s in studies {
        let sha = segment::sha256_file(&s.volume)
            .map_err(|e| Failure::BadInput(anyhow::anyhow!("{}: {e}", s.volume.display())))?;
        if held.contains(&sha.as_str()) {
            out.push(s.id.clone());
        }
    }
    Ok(out)
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Inference mode.
    #[arg(long, value_enum, default_value_t = Mode::Dense)]
    pub mode: Mode,
    /// Distance between classified patch centres in pixels.
    #[arg(long, default_value_t = 2)]
    pub stride: i64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Use float32 on a GPU instead of bfloat16.
    #[arg(long)]
    pub fp32: bool,
    /// Mirror images of each slice whose probabilities are averaged in (x: 2 passes, xy: 4).
    #[arg(long, value_enum, default_value_t = InferOptions::default().flips)]
    pub flips: segment::infer::Flips,
    /// Tumour probability threshold (default: the model card's calibrated value).
    #[arg(long)]
    pub tumour_threshold: Option<f32>,
    /// Peak tumour probability a tumour component needs to be kept (default: the model card's
    /// calibrated value, else the tumour threshold).
    #[arg(long)]
    pub tumour_seed_threshold: Option<f32>,
    /// Tumour components smaller than this become liver (mL).
    #[arg(long, default_value_t = InferOptions::default().min_tumour_ml)]
    pub min_tumour_ml: f64,
    /// Tumour farther than this from liver tissue is dropped (mm).
    #[arg(long, default_value_t = InferOptions::default().tumour_margin_mm)]
    pub tumour_margin_mm: f64,
    /// Tumour components with more than this share of their voxels in a slice where the liver
    /// ends (background in the slice above or below) become liver: partial volume at the
    /// dome and the tip of thick slices (1: keep them).
    #[arg(long, default_value_t = InferOptions::default().max_end_slice_share)]
    pub max_end_slice_share: f64,
    /// Tumour components with more than this share of their surface facing background become
    /// background: what the network's liver only reaches into is another organ's (1: keep them).
    #[arg(long, default_value_t = InferOptions::default().max_outside_share)]
    pub max_outside_share: f64,
    /// A tumour component whose peak stays below the seed threshold is kept when its median CT
    /// value lies at least this many standard deviations below liver of its shape elsewhere in
    /// the study (inf: never).
    #[arg(long, default_value_t = InferOptions::default().tumour_confirm_z)]
    pub tumour_confirm_z: f64,
    /// A tumour component whose peak reaches the seed threshold becomes liver when its median
    /// CT value lies less than this many standard deviations below liver of its shape
    /// elsewhere in the study (0: never).
    #[arg(long, default_value_t = InferOptions::default().tumour_sure_z)]
    pub tumour_sure_z: f64,
    /// Each tumour component is redrawn from the CT (halfway between its median and the
    /// surrounding liver's, plus a bright rim) within this distance of the network's extent
    /// (mm; 0: the network's extent).
    #[arg(long, default_value_t = InferOptions::default().tumour_refine_mm)]
    pub tumour_refine_mm: f64,
    /// Small dark spots of the liver that the network left out (0.1–1 mL, at least 4.5 mm
    /// inside the liver or 30 HU darker than it, denser than water) become tumour when the CT
    /// shows them this many standard deviations darker than the liver around them (inf: never).
    #[arg(long, default_value_t = InferOptions::default().tumour_detect_z)]
    pub tumour_detect_z: f64,
    /// Last step: each tumour component's outline is redrawn as the one of least energy (CT
    /// fit, the outline so far, and this cost per unit of outline; 0: the outline as drawn).
    #[arg(long, default_value_t = InferOptions::default().tumour_smooth)]
    pub tumour_smooth: f64,
    /// Last step: a tumour component becomes liver when its this many nearest components of
    /// the model's training studies were all false positives (default: the model card's
    /// number; 0: no filter).
    #[arg(long)]
    pub fp_neighbours: Option<usize>,
}

/// Refuses a value of `flag` outside 0…1.
fn unit_interval<T: Into<f64> + Copy + std::fmt::Display>(flag: &str, v: T) -> Result<(), Failure> {
    if (0.0..=1.0).contains(&v.into()) {
        Ok(())
    } else {
        Err(Failure::Other(anyhow::anyhow!(
            "{flag} {v}: must be between 0 and 1"
        )))
    }
}

impl InferArgs {
    fn options(&self) -> Result<InferOptions, Failure> {
        if !(1..=16).contains(&self.stride) {
            return Err(Failure::Other(anyhow::anyhow!(
                "--stride {}: must be 1 to 16",
                self.stride
            )));
        }
        for (flag, v) in [
            ("--tumour-threshold", self.tumour_threshold),
            ("--tumour-seed-threshold", self.tumour_seed_threshold),
        ] {
            if let Some(v) = v {
                unit_interval(flag, v)?;
            }
        }
        unit_interval("--max-end-slice-share", self.max_end_slice_share)?;
        unit_interval("--max-outside-share", self.max_outside_share)?;
        if self.tumour_confirm_z.is_nan() || self.tumour_confirm_z <= 0.0 {
            return Err(Failure::Other(anyhow::anyhow!(
                "--tumour-confirm-z {}: must be a positive number (inf: never)",
                self.tumour_confirm_z
            )));
        }
        if !(0.0..=100.0).contains(&self.tumour_sure_z) {
            return Err(Failure::Other(anyhow::anyhow!(
                "--tumour-sure-z {}: must be between 0 and 100 (0: no test)",
                self.tumour_sure_z
            )));
        }
        if self.tumour_detect_z.is_nan() || self.tumour_detect_z < 3.0 {
            return Err(Failure::Other(anyhow::anyhow!(
                "--tumour-detect-z {}: must be at least 3 (inf: never)",
                self.tumour_detect_z
            )));
        }
        if let Some(k) = self.fp_neighbours
            && k > 50
        {
            return Err(Failure::Other(anyhow::anyhow!(
                "--fp-neighbours {k}: must be 0 to 50"
            )));
        }
        if !(0.0..=100.0).contains(&self.tumour_smooth) {
            return Err(Failure::Other(anyhow::anyhow!(
                "--tumour-smooth {}: must be between 0 and 100 (0: off)",
                self.tumour_smooth
            )));
        }
        if !(0.0..=50.0).contains(&self.tumour_refine_mm) {
            return Err(Failure::Other(anyhow::anyhow!(
                "--tumour-refine-mm {}: must be between 0 and 50",
                self.tumour_refine_mm
            )));
        }
        Ok(InferOptions {
            mode: self.mode,
            stride: self.stride,
            half_precision: !self.fp32,
            flips: self.flips,
            tumour_threshold: self.tumour_threshold,
            tumour_seed_threshold: self.tumour_seed_threshold,
            min_tumour_ml: self.min_tumour_ml,
            tumour_margin_mm: self.tumour_margin_mm,
            max_end_slice_share: self.max_end_slice_share,
            max_outside_share: self.max_outside_share,
            tumour_confirm_z: self.tumour_confirm_z,
            tumour_sure_z: self.tumour_sure_z,
            tumour_refine_mm: self.tumour_refine_mm,
            tumour_detect_z: self.tumour_detect_z,
            tumour_smooth: self.tumour_smooth,
            fp_neighbours: self.fp_neighbours,
            ..InferOptions::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// Model folder (card.json + weights).
    #[arg(long)]
    pub model: PathBuf,
    /// CT volume (NIfTI).
    #[arg(long)]
    pub input: PathBuf,
    /// Label mask to write (uint8 NIfTI with the input's geometry).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub infer: InferArgs,
}

pub fn segment(args: SegmentArgs, settings: &Settings) -> CmdResult {
    let opts = args.infer.options()?;
    let device = segment::parse_device(&args.infer.device).map_err(model_failure)?;
    let clf = Classifier::load(&args.model, device, opts.half_precision).map_err(model_failure)?;
    let ct = CtVolume::read(&args.input, &settings.read_limits).map_err(bad_input)?;
    let t = Instant::now();
    let mask = clf.segment(&ct, &opts).map_err(model_failure)?;
    mask.write(&args.output)?;
    tracing::info!(duration_ms = t.elapsed().as_millis() as u64, device = ?device, "segmented");
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// LiTS-layout folder.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub infer: InferArgs,
}

pub fn eval(args: EvalArgs, settings: &Settings) -> CmdResult {
    let opts = args.infer.options()?;
    let device = segment::parse_device(&args.infer.device).map_err(model_failure)?;
    let clf = Classifier::load(&args.model, device, opts.half_precision).map_err(model_failure)?;
    let studies = train::lits_pairs(&args.data).map_err(|e| Failure::BadInput(e.into()))?;
    if studies.is_empty() {
        return Err(Failure::BadInput(anyhow::anyhow!(
            "{}: no volume-K/segmentation-K pairs",
            args.data.display()
        )));
    }
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for s in &studies {
        let ct = CtVolume::read(&s.volume, &settings.read_limits).map_err(bad_input)?;
        let truth = LabelVolume::read(&s.truth, &settings.read_limits).map_err(bad_input)?;
        let t = Instant::now();
        let pred = clf.segment(&ct, &opts).map_err(model_failure)?;
        let secs = t.elapsed().as_secs_f64();
        let m = metrics::evaluate(&truth, &pred)
            .map_err(|e| Failure::BadInput(anyhow::anyhow!("{}: {e}", s.truth.display())))?;
        if !args.json {
            println!(
                "study {:>4}  liver Dice {:.4}  tumour Dice {:.4}  lesions {} found of {} (recall {})  {:.1} s",
                s.id,
                m.liver.dice,
                m.tumour.dice,
                m.detection.tp,
                m.detection.reference_lesions,
                m.detection
                    .recall
                    .map_or("n/a".into(), |r| format!("{r:.2}")),
                secs
            );
        }
        rows.push(json!({"study": s.id, "seconds": secs, "metrics": &m}));
        all.push(m);
    }
    let batch = metrics::aggregate(&all);
    // Recall for lesions of 10 mm and more (medium + large).
    let (tp, fn_) = all.iter().fold((0, 0), |(t, f), m| {
        let b = &m.detection.by_size;
        (t + b.medium.tp + b.large.tp, f + b.medium.fn_ + b.large.fn_)
    });
    let recall_10mm = (tp + fn_ > 0).then(|| tp as f64 / (tp + fn_) as f64);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": clf.card().name, "studies": rows, "batch": batch, "recall_ge_10mm": recall_10mm})
            )?
        );
    } else {
        let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.4}"));
        println!(
            "batch of {}: liver Dice per case {} global {}  tumour Dice per case {} global {}  recall >=10 mm {}  burden RMSE {} pp",
            batch.studies,
            f(batch.liver.dice_per_case),
            f(batch.liver.dice_global),
            f(batch.tumour.dice_per_case),
            f(batch.tumour.dice_global),
            f(recall_10mm),
            f(batch.tumour_burden_rmse)
        );
    }
    Ok(())
}
