//! Training on LiTS-layout folders (`volume-K.nii[.gz]` + `segmentation-K.nii[.gz]`).
//!
//! The classifier is trained on patches, many at a time: a crop of (59 + 2(n − 1)) px holds
//! n × n overlapping patches whose centres lie 2 px apart, and the fully convolutional network
//! classifies all of them in one pass with exactly the result it gives each patch alone.
//! Crops are placed by class-balanced sampling (tumour — a lesion first, then a voxel of it —,
//! liver boundary, liver, background near the liver, anywhere in the body), with intensity
//! augmentation, and the loss weighs tumour
//! up. A held-out split of studies is segmented after every epoch for validation Dice; the best
//! epoch's weights are kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Reduction, Tensor, nn, nn::OptimizerConfig};

use super::calibrate;
use super::infer::{self, InferOptions, InputSpec};
use super::{Architecture, CARD_FILE, Classifier, ModelCard, ModelError, WEIGHTS_FILE};
use crate::metrics;
use crate::volume::phantom::Rng;
use crate::volume::{CtVolume, LabelVolume, NiftiError, ReadLimits, label};

/// (score, a copy of the weights, epoch) of the best epoch so far.
type BestEpoch = (f64, Vec<(String, Tensor)>, usize);

/// Training settings (the CLI's defaults are the documented ones).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub patch: i64,
    pub width: f64,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub batch: usize,
    /// Outputs per crop side (n): each crop trains n × n patches.
    pub crop_outputs: i64,
    pub lr: f64,
    pub seed: u64,
    pub device: Device,
    /// Optional ImageNet VGG16 weights (torchvision names, safetensors) for the convolutions.
    pub init: Option<PathBuf>,
    /// Weight of the tumour class in the loss (background and liver weigh 1).
    pub tumour_weight: f64,
    /// Batch normalisation after each convolution.
    pub batch_norm: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// In-plane pixel size the network works at (recorded in the card's input).
    pub pixel_size: PixelSize,
}

/// The in-plane pixel sizes a model works at (`InputSpec::pixel_mm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PixelSize {
    /// The range of the training studies' pixel sizes: no training study is resampled; in
    /// segmentation, studies outside the range are brought to its nearer end.
    Auto,
    /// Each study's own pixels, whatever they are (no resampling).
    Native,
    /// This many millimetres: training and segmentation resample every study to it.
    Mm(f64),
}

impl std::str::FromStr for PixelSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            _ => match s.parse::<f64>() {
                Ok(mm) if mm.is_finite() && (0.1..=10.0).contains(&mm) => Ok(Self::Mm(mm)),
                _ => Err(format!(
                    "{s:?}: expected auto, native or a pixel size in mm between 0.1 and 10"
                )),
            },
        }
    }
}

impl std::fmt::Display for PixelSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Native => f.write_str("native"),
            Self::Mm(mm) => write!(f, "{mm}"),
        }
    }
}

/// The range of in-plane pixel sizes (x and y) of the grids, widened to whole 0.01 mm.
fn pixel_range(grids: &[&crate::volume::Geometry]) -> [f32; 2] {
    let (lo, hi) = grids
        .iter()
        .flat_map(|g| {
            let s = g.spacing_mm();
            [s[0], s[1]]
        })
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), s| {
            (lo.min(s), hi.max(s))
        });
    [
        ((lo * 100.0).floor() / 100.0) as f32,
        ((hi * 100.0).ceil() / 100.0) as f32,
    ]
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            patch: 59,
            width: 0.125,
            epochs: 22,
            steps_per_epoch: 400,
            batch: 8,
            crop_outputs: 16,
            lr: 1e-3,
            seed: 0,
            device: Device::Cpu,
            init: None,
            tumour_weight: 3.0,
            batch_norm: true,
            progress: true,
            pixel_size: PixelSize::Auto,
        }
    }
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Nifti(#[from] NiftiError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Data(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One study of a LiTS-layout folder.
#[derive(Clone, Debug)]
pub struct StudyFiles {
    pub id: String,
    pub volume: PathBuf,
    pub truth: PathBuf,
}

impl StudyFiles {
    /// Reads the CT and its reference, and checks that they share a grid.
    pub fn read(&self, limits: &ReadLimits) -> Result<(CtVolume, LabelVolume), TrainError> {
        let ct = CtVolume::read(&self.volume, limits)?;
        let truth = LabelVolume::read(&self.truth, limits)?;
        self.check_grid(&ct, &truth)?;
        Ok((ct, truth))
    }

    /// An error naming both files unless the reference lies on the CT's grid.
    fn check_grid(&self, ct: &CtVolume, truth: &LabelVolume) -> Result<(), TrainError> {
        if ct.geometry().same_grid(truth.geometry()) {
            Ok(())
        } else {
            Err(TrainError::Data(format!(
                "{}: not on the grid of {}",
                self.truth.display(),
                self.volume.display()
            )))
        }
    }
}

/// The `volume-K` / `segmentation-K` pairs of a folder, by K.
pub fn lits_pairs(dir: &Path) -> Result<Vec<StudyFiles>, TrainError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| TrainError::Data(format!("{}: cannot list: {e}", dir.display())))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("volume-") else {
            continue;
        };
        let Some(k) = rest
            .strip_suffix(".nii.gz")
            .or_else(|| rest.strip_suffix(".nii"))
        else {
            continue;
        };
        let ext = &rest[k.len()..];
        let truth = dir.join(format!("segmentation-{k}{ext}"));
        if truth.exists() {
            out.push(StudyFiles {
                id: k.to_string(),
                volume: e.path(),
                truth,
            });
        }
    }
    out.sort_by(|a, b| {
        let key = |s: &StudyFiles| (s.id.parse::<u64>().unwrap_or(u64::MAX), s.id.clone());
        key(a).cmp(&key(b))
    });
    Ok(out)
}

struct Study {
    slices: Tensor,
    labels: Vec<u8>,
    shape: [usize; 3],
    spacing: [f64; 3],
    /// The tumour voxels of each lesion (26-connected component), the candidate centres of
    /// category 0: tumour crops pick a lesion first, so small lesions are seen as often as
    /// large ones.
    lesions: Vec<Vec<u32>>,
    /// Candidate crop centres (linear voxel indices) of categories 1–4.
    pools: [Vec<u32>; 4],
}

const CATEGORY_WEIGHTS: [f64; 5] = [0.3, 0.2, 0.15, 0.2, 0.15];

fn subsample(mut v: Vec<u32>, max: usize, rng: &mut Rng) -> Vec<u32> {
    if v.len() > max {
        for i in 0..max {
            let j = i + rng.below(v.len() - i);
            v.swap(i, j);
        }
        v.truncate(max);
    }
    v
}

fn load_study(
    ct: &CtVolume,
    mask: &LabelVolume,
    spec: &InputSpec,
    patch: i64,
    rng: &mut Rng,
) -> Study {
    let [nx, ny, _] = ct.geometry().shape();
    let l = mask.labels();
    let hu = ct.hu();
    let (mut boundary, mut liver, mut near, mut body) = (vec![], vec![], vec![], vec![]);
    let (mut lo, mut hi) = ([usize::MAX; 2], [0usize; 2]);
    for (i, &v) in l.iter().enumerate() {
        if v >= label::LIVER {
            let (x, y) = (i % nx, (i / nx) % ny);
            lo = [lo[0].min(x), lo[1].min(y)];
            hi = [hi[0].max(x), hi[1].max(y)];
        }
    }
    for (i, &v) in l.iter().enumerate() {
        let (x, y) = (i % nx, (i / nx) % ny);
        let edge = [
            (x > 0, 1isize),
            (x + 1 < nx, -1),
            (y > 0, nx as isize),
            (y + 1 < ny, -(nx as isize)),
        ]
        .iter()
        .any(|&(ok, d)| ok && l[(i as isize - d) as usize] != v);
        match v {
            label::TUMOUR => {}
            label::LIVER if edge => boundary.push(i as u32),
            label::LIVER => liver.push(i as u32),
            _ if edge => boundary.push(i as u32),
            _ => {}
        }
        if v == 0 && hu[i] > -500.0 {
            let near_liver = lo[0] != usize::MAX
                && x + 20 >= lo[0]
                && x <= hi[0] + 20
                && y + 20 >= lo[1]
                && y <= hi[1] + 20;
            if near_liver {
                near.push(i as u32);
            } else {
                body.push(i as u32);
            }
        }
    }
    let comps = crate::lesions::Components::label(
        l,
        ct.geometry().shape(),
        |v| v == label::TUMOUR,
        crate::lesions::Connectivity::TwentySix,
    );
    let mut lesions = vec![Vec::new(); comps.count()];
    for (r, c) in comps.runs() {
        let base = r.row * nx as u32;
        lesions[c as usize - 1].extend((r.start..r.end).map(|x| base + x));
    }
    let lesions = lesions
        .into_iter()
        .map(|v| subsample(v, 20_000, rng))
        .collect();
    let pools = [
        subsample(boundary, 50_000, rng),
        subsample(liver, 50_000, rng),
        subsample(near, 50_000, rng),
        subsample(body, 50_000, rng),
    ];
    Study {
        slices: infer::prepare(ct, spec, patch),
        labels: l.to_vec(),
        shape: ct.geometry().shape(),
        spacing: ct.geometry().spacing_mm(),
        pools,
        lesions,
    }
}

/// Copies ImageNet VGG16 weights (torchvision names: `vgg16`, or `vgg16_bn` for a network with
/// batch normalisation) into the convolutions of a full-width network.
fn init_from_imagenet(
    vs: &mut nn::VarStore,
    path: &Path,
    batch_norm: bool,
) -> Result<usize, TrainError> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| ModelError::Weights {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let features: [usize; 13] = if batch_norm {
        [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    } else {
        [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    };
    let names: Vec<(usize, usize)> = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
        .iter()
        .flat_map(|&(b, n)| (1..=n).map(move |i| (b, i)))
        .collect();
    // (torchvision name, ours) for every tensor to copy.
    let mut pairs = Vec::new();
    for (&(b, i), f) in names.iter().zip(features) {
        for part in ["weight", "bias"] {
            pairs.push((
                format!("features.{f}.{part}"),
                format!("block{b}.conv{i}.{part}"),
            ));
        }
        if batch_norm {
            for (theirs, ours) in [
                ("weight", "weight"),
                ("bias", "bias"),
                ("running_mean", "running_mean"),
                ("running_var", "running_var"),
            ] {
                pairs.push((
                    format!("features.{}.{theirs}", f + 1),
                    format!("block{b}.bn{i}.{ours}"),
                ));
            }
        }
    }
    let variant = if batch_norm { "vgg16_bn" } else { "vgg16" };
    let mut vars = vs.variables();
    let mut copied = 0;
    for (theirs, ours) in &pairs {
        let src = tensors.iter().find(|(n, _)| n == theirs);
        match (src, vars.get_mut(ours)) {
            (Some((_, s)), Some(d)) if s.size() == d.size() => {
                tch::no_grad(|| d.copy_(s));
                copied += 1;
            }
            (Some((_, s)), Some(d)) => {
                return Err(TrainError::Data(format!(
                    "{}: {theirs} has shape {:?}, the network needs {:?} (use --width 1)",
                    path.display(),
                    s.size(),
                    d.size()
                )));
            }
            _ => {
                return Err(TrainError::Data(format!(
                    "{}: {theirs} not found (expected torchvision {variant} names)",
                    path.display()
                )));
            }
        }
    }
    Ok(copied)
}

/// Trains a classifier on a LiTS-layout folder and writes `out/model.safetensors` and
/// `out/card.json`. Returns the card.
pub fn train(
    data: &Path,
    out: &Path,
    opts: &TrainOptions,
    limits: &ReadLimits,
) -> Result<ModelCard, TrainError> {
    let t0 = Instant::now();
    let studies = lits_pairs(data)?;
    if studies.len() < 2 {
        return Err(TrainError::Data(format!(
            "{}: {} volume-K/segmentation-K pairs found; training needs at least 2 (one is held out)",
            data.display(),
            studies.len()
        )));
    }
    let mut arch = Architecture::vgg16(opts.width, opts.patch).map_err(TrainError::Data)?;
    arch.batch_norm = opts.batch_norm;
    if !(opts.tumour_weight.is_finite() && opts.tumour_weight > 0.0) {
        return Err(TrainError::Data(format!(
            "tumour weight {}: must be a positive number",
            opts.tumour_weight
        )));
    }
    let mut rng = Rng::new(opts.seed, 0x7a11);
    // Held-out split (chosen by the seed): one study in four, lesion-bearing studies first,
    // with one lesion-free study among them when there are two or more.
    let mut order: Vec<usize> = (0..studies.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let masks = studies
        .iter()
        .map(|s| LabelVolume::read(&s.truth, limits))
        .collect::<Result<Vec<_>, _>>()?;
    let has_lesion: Vec<bool> = masks
        .iter()
        .map(|m| m.labels().contains(&label::TUMOUR))
        .collect();
    let val_idx = held_out(&order, &has_lesion);
    let spec = InputSpec {
        pixel_mm: match opts.pixel_size {
            PixelSize::Auto => Some(pixel_range(
                &masks
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !val_idx.contains(i))
                    .map(|(_, m)| m.geometry())
                    .collect::<Vec<_>>(),
            )),
            PixelSize::Native => None,
            PixelSize::Mm(mm) => Some([mm as f32; 2]),
        },
        ..InputSpec::default()
    };

    let mut data_record = Vec::new();
    let mut train_set = Vec::new();
    let mut val_set = Vec::new();
    for (i, (s, mask)) in studies.iter().zip(masks).enumerate() {
        let ct = CtVolume::read(&s.volume, limits)?;
        s.check_grid(&ct, &mask)?;
        let hash = |p: &Path| {
            super::sha256_file(p).map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))
        };
        let validation = val_idx.contains(&i);
        data_record.push(json!({
            "study": s.id, "volume_sha256": hash(&s.volume)?, "segmentation_sha256": hash(&s.truth)?,
            "split": if validation { "validation" } else { "training" },
        }));
        if validation {
            val_set.push((s.id.clone(), ct, mask));
        } else {
            let ct = match spec.working_pixels(ct.geometry()) {
                Some(p) => ct.resample_in_plane(p),
                None => ct,
            };
            let mask = spec.working_labels(mask);
            train_set.push(load_study(&ct, &mask, &spec, arch.patch, &mut rng));
        }
    }
    tracing::info!(
        train = train_set.len(),
        validation = val_set.len(),
        pixel_mm = ?spec.pixel_mm,
        "studies loaded"
    );

    tch::manual_seed(opts.seed as i64);
    let mut clf = Classifier::fresh(&arch, spec.clone(), opts.device);
    if let Some(p) = &opts.init {
        let vs = match &mut clf.imp {
            super::Imp::Native { vs, .. } => vs,
            super::Imp::Script(_) => unreachable!("fresh models are native"),
        };
        let n = init_from_imagenet(vs, p, arch.batch_norm)?;
        tracing::info!(
            tensors = n,
            "convolutions initialised from ImageNet weights"
        );
    }
    let mut opt = nn::Adam::default()
        .build(clf.var_store().expect("native"), opts.lr)
        .map_err(|e| TrainError::Data(format!("optimizer: {e}")))?;
    let class_w =
        Tensor::from_slice(&[1.0f32, 1.0, opts.tumour_weight as f32]).to_device(opts.device);
    let n = opts.crop_outputs.max(1);
    let crop = arch.patch + 2 * (n - 1);
    let mut history = Vec::new();
    let mut best: Option<BestEpoch> = None;
    let infer_opts = InferOptions::default();

    for epoch in 1..=opts.epochs {
        // The last third runs at the lower learning rate; the best epoch is chosen among
        // those (validating earlier ones costs a third of an epoch's time and they are never
        // chosen: docs/benchmarks.md).
        let low_lr = epoch * 3 > opts.epochs * 2;
        if low_lr {
            opt.set_lr(opts.lr * 0.3);
        }
        let bar = indicatif::ProgressBar::new(opts.steps_per_epoch as u64);
        if !opts.progress {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} elapsed, {eta} left)",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", opts.epochs));
        let (mut loss_sum, mut correct, mut total) = (0.0, 0i64, 0i64);
        for step in 0..opts.steps_per_epoch {
            let (x, y) = batch(&train_set, &spec, &mut rng, opts.batch, n, crop);
            let x = augment(&x, &mut rng);
            let logits = clf.forward_train(&x);
            let y = y.to_device(opts.device);
            let loss = logits.cross_entropy_loss(&y, Some(&class_w), Reduction::Mean, -100, 0.0);
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            loss_sum += l;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            total += y.numel() as i64;
            bar.set_position(step as u64 + 1);
            bar.set_message(format!(
                "loss {:.4} acc {:.3}",
                loss_sum / (step + 1) as f64,
                correct as f64 / total as f64
            ));
        }
        bar.finish_and_clear();
        let loss = loss_sum / opts.steps_per_epoch as f64;
        let accuracy = correct as f64 / total.max(1) as f64;
        let mut record = json!({"epoch": epoch, "loss": loss, "accuracy": accuracy});
        // Validation: segment the held-out studies (liver and tumour Dice per case).
        let validation = low_lr.then(|| {
            let per_study: Vec<_> = val_set
                .iter()
                .map(|(_, ct, truth)| {
                    let pred = infer::segment(&clf, ct, &infer_opts, opts.device);
                    metrics::evaluate(truth, &pred).expect("same grid")
                })
                .collect();
            let summary = metrics::aggregate(&per_study);
            (
                summary.liver.dice_per_case.unwrap_or(0.0),
                summary.tumour.dice_per_case.unwrap_or(0.0),
            )
        });
        let mut line = format!(
            "epoch {epoch}/{}: loss {loss:.4}  accuracy {accuracy:.3}",
            opts.epochs
        );
        if let Some((dl, dt)) = validation {
            record["validation_dice_liver"] = json!(dl);
            record["validation_dice_tumour"] = json!(dt);
            line += &format!("  validation Dice liver {dl:.3} tumour {dt:.3}");
        }
        record["elapsed_s"] = json!(t0.elapsed().as_secs_f64());
        eprintln!("{line}");
        history.push(record);
        let Some((dl, dt)) = validation else {
            continue;
        };
        let score = dl + dt;
        if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
            let vars = clf
                .var_store()
                .expect("native")
                .variables()
                .into_iter()
                .map(|(k, v)| (k, v.detach().copy()))
                .collect();
            best = Some((score, vars, epoch));
        }
    }
    // Restore the best epoch's weights.
    let (_, vars, best_epoch) =
        best.ok_or_else(|| TrainError::Data("no epoch ran (--epochs 0)".into()))?;
    {
        let mut current = clf.var_store().expect("native").variables();
        tch::no_grad(|| {
            for (k, v) in &vars {
                if let Some(d) = current.get_mut(k) {
                    d.copy_(v);
                }
            }
        });
    }
    // Calibrate the tumour threshold (extent) and the seed threshold (a component's peak) on
    // the held-out studies; the last step against false positives learns from the components
    // this model makes on all its studies.
    let maps: Vec<_> = val_set
        .iter()
        .map(|(_, ct, _)| infer::probabilities(&clf, ct, &infer_opts, opts.device))
        .collect();
    let held: Vec<_> = val_set
        .iter()
        .zip(&maps)
        .map(|((id, ct, truth), m)| (id.as_str(), ct, truth, m))
        .collect();
    let cal = calibrate::calibrate(
        &clf,
        &studies,
        &held,
        &infer_opts,
        &calibrate::Scope::HeldOut(val_set.iter().map(|(id, _, _)| id.clone()).collect()),
        limits,
        opts.device,
    )?;
    let (threshold, seed) = (cal.threshold, cal.seed);
    tracing::info!(
        threshold,
        seed,
        dice = cal.dice_per_case,
        "tumour thresholds calibrated"
    );
    let filter = match cal.filter {
        Ok(f) => {
            tracing::info!(
                exemplars = f.exemplars.len(),
                lesions = f.exemplars.iter().filter(|e| e.lesion).count(),
                "false-positive filter fitted"
            );
            Some(f)
        }
        Err(why) => {
            tracing::warn!(reason = %why, "no false-positive filter");
            None
        }
    };
    std::fs::create_dir_all(out).map_err(|source| TrainError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let weights = out.join(WEIGHTS_FILE);
    let tmp = out.join(format!(".tmp-{}-{}", std::process::id(), WEIGHTS_FILE));
    clf.var_store()
        .expect("native")
        .save(&tmp)
        .map_err(|e| TrainError::Write {
            path: weights.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    crate::fsutil::commit_temp(&tmp, &weights).map_err(|source| TrainError::Write {
        path: weights.display().to_string(),
        source,
    })?;
    let sha = super::sha256_file(&weights).map_err(|source| TrainError::Write {
        path: weights.display().to_string(),
        source,
    })?;
    let card = {
        let c = clf.card_mut();
        c.name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        c.version = super::today();
        c.weights_sha256 = sha;
        c.created = super::today();
        c.training = Some(json!({
            "data": data_record,
            "seed": opts.seed,
            "epochs": opts.epochs,
            "best_epoch": best_epoch,
            "steps_per_epoch": opts.steps_per_epoch,
            "batch_crops": opts.batch,
            "crop_px": crop,
            "patches_per_crop": n * n,
            "learning_rate": opts.lr,
            "lr_schedule": "x0.3 for the last third of the epochs",
            "optimizer": "Adam",
            "loss": "cross-entropy on patch centres",
            "class_weights": [1.0, 1.0, opts.tumour_weight],
            "sampling": {"tumour (per lesion)": CATEGORY_WEIGHTS[0], "boundary": CATEGORY_WEIGHTS[1],
                         "liver": CATEGORY_WEIGHTS[2], "background_near_liver": CATEGORY_WEIGHTS[3],
                         "body": CATEGORY_WEIGHTS[4]},
            "synthetic_lesions": format!("{PAINT_PROBABILITY} of liver and boundary crops: ellipsoids 5–40 mm, 8–50 HU darker, 1 in 6 with an enhancing rim, clipped to the liver"),
            "augmentation": "flips and transposes of the crop (8), HU gain x[0.9, 1.1], offset ±20 HU, Gaussian noise σ 4 HU",
            "init": opts.init.as_ref().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
            "device": format!("{:?}", opts.device),
            "duration_s": t0.elapsed().as_secs_f64(),
        }));
        c.validation = history;
        c.tumour_threshold = Some(threshold);
        c.tumour_seed_threshold = Some(seed);
        c.false_positive_filter = filter;
        c.clone()
    };
    card.write_to(out).map_err(|source| TrainError::Write {
        path: out.join(CARD_FILE).display().to_string(),
        source,
    })?;
    Ok(card)
}

/// The held-out studies: a quarter of them (at least one), taken in `order` — lesion-bearing
/// studies first, so that calibration sees lesions, plus one lesion-free study when two or
/// more are held out, so that it sees false positives too.
fn held_out(order: &[usize], has_lesion: &[bool]) -> Vec<usize> {
    let n_val = (order.len() / 4).max(1);
    let mut out: Vec<usize> = Vec::with_capacity(n_val);
    if n_val >= 2
        && let Some(&free) = order.iter().find(|&&i| !has_lesion[i])
    {
        out.push(free);
    }
    for pass_lesions in [true, false] {
        for &i in order {
            if out.len() < n_val && has_lesion[i] == pass_lesions && !out.contains(&i) {
                out.push(i);
            }
        }
    }
    out
}

/// A batch of crops (B, C, crop, crop) and their patch-centre labels (B, n, n).
fn batch(
    studies: &[Study],
    spec: &InputSpec,
    rng: &mut Rng,
    b: usize,
    n: i64,
    crop: i64,
) -> (Tensor, Tensor) {
    let mut xs = Vec::with_capacity(b);
    let mut ys: Vec<Tensor> = Vec::with_capacity(b);
    for _ in 0..b {
        let s = &studies[rng.below(studies.len())];
        let [nx, ny, _] = s.shape;
        // Category by weight, skipping empty pools.
        let mut pick = rng.unit() * CATEGORY_WEIGHTS.iter().sum::<f64>();
        let mut cat = 0;
        for (c, w) in CATEGORY_WEIGHTS.iter().enumerate() {
            if pick < *w {
                cat = c;
                break;
            }
            pick -= w;
            cat = c;
        }
        let cat = (0..5).map(|d| (cat + d) % 5).find(|&c| match c {
            0 => !s.lesions.is_empty(),
            c => !s.pools[c - 1].is_empty(),
        });
        let pool = match cat {
            Some(0) => Some(&s.lesions[rng.below(s.lesions.len())]),
            Some(c) => Some(&s.pools[c - 1]),
            None => None,
        };
        let from_liver = matches!(cat, Some(1 | 2));
        let centre = pool.map_or(0, |p| p[rng.below(p.len())] as usize);
        let (cx, cy, k) = (centre % nx, (centre / nx) % ny, centre / (nx * ny));
        let max_x0 = (s.slices.size()[2] - crop).max(0);
        let max_y0 = (s.slices.size()[1] - crop).max(0);
        let x0 = (cx as i64 - 2 * rng.below(n as usize) as i64).clamp(0, max_x0);
        let y0 = (cy as i64 - 2 * rng.below(n as usize) as i64).clamp(0, max_y0);
        let ch = infer::channels(&s.slices, spec, k as i64);
        let mut x = ch.narrow(1, y0, crop).narrow(2, x0, crop);
        let mut grid = Vec::with_capacity((n * n) as usize);
        for v in 0..n {
            for u in 0..n {
                let (x, y) = (x0 + 2 * u, y0 + 2 * v);
                let lab = if (x as usize) < nx && (y as usize) < ny {
                    s.labels[x as usize + nx * (y as usize + ny * k)]
                } else {
                    0
                };
                grid.push(i64::from(lab));
            }
        }
        if from_liver && s.labels[centre] == label::LIVER && rng.unit() < PAINT_PROBABILITY {
            let at = Crop { x0, y0, k, n };
            x = paint_lesion(&x, &mut grid, s, spec, &at, [cx, cy], rng);
        }
        // One of the 8 flips and transposes of the square, applied to the crop and its grid
        // alike (patch centres map onto patch centres).
        let mut y = Tensor::from_slice(&grid).view([n, n]);
        let d = rng.below(8);
        if d & 1 != 0 {
            x = x.flip([2]);
            y = y.flip([1]);
        }
        if d & 2 != 0 {
            x = x.flip([1]);
            y = y.flip([0]);
        }
        if d & 4 != 0 {
            x = x.transpose(1, 2);
            y = y.transpose(0, 1);
        }
        xs.push(x.contiguous());
        ys.push(y.contiguous());
    }
    (Tensor::stack(&xs, 0), Tensor::stack(&ys, 0))
}

/// Share of liver and liver-boundary crops that get a synthetic lesion.
const PAINT_PROBABILITY: f64 = 0.5;

/// Where a training crop lies: its padded origin, slice, and outputs per side.
struct Crop {
    x0: i64,
    y0: i64,
    k: usize,
    n: i64,
}

/// Paints a synthetic lesion centred at liver pixel `c` of the crop's slice: a rotated
/// ellipsoid 5–40 mm across (log-uniform), 8–50 HU darker than the tissue it replaces, one in
/// six with an enhancing rim, soft-edged over ~1.5 mm, clipped to the liver in every channel's
/// slice; patch centres inside it become tumour. The tissue's own noise and texture stay.
fn paint_lesion(
    x: &Tensor,
    grid: &mut [i64],
    s: &Study,
    spec: &InputSpec,
    at: &Crop,
    c: [usize; 2],
    rng: &mut Rng,
) -> Tensor {
    let [nx, ny, nz] = s.shape;
    let [sx, sy, sz] = s.spacing;
    let size = x.size();
    let (chans, side) = (size[0] as usize, size[1] as usize);
    let h = (side as i64 - 2 * (at.n - 1) - 1) / 2;
    let r = (rng.range(5f64.ln(), 40f64.ln())).exp() / 2.0;
    let radii = [
        r * rng.range(0.8, 1.2),
        r * rng.range(0.8, 1.2),
        r * rng.range(0.8, 1.2),
    ];
    let mean_r = (radii[0] * radii[1] * radii[2]).cbrt();
    let (sin, cos) = rng.range(0.0, std::f64::consts::PI).sin_cos();
    let z0 = rng.range(-0.5, 0.5) * sz;
    let kind = rng.unit();
    let contrast = if kind < 0.2 {
        rng.range(8.0, 15.0)
    } else {
        rng.range(15.0, 50.0)
    };
    let rim = (kind > 5.0 / 6.0).then(|| (rng.range(25.0, 40.0), rng.range(2.0, 4.0).min(r * 0.4)));
    let per_hu = 2.0 / f64::from(spec.window_hu[1] - spec.window_hu[0]);
    // Depth below the lesion surface in mm (negative outside) at pixel (px, py), z mm from
    // the slice.
    let depth = |px: i64, py: i64, z: f64| {
        let (dx, dy) = (
            (px - c[0] as i64) as f64 * sx,
            (py - c[1] as i64) as f64 * sy,
        );
        let (a, b) = (cos * dx + sin * dy, -sin * dx + cos * dy);
        let q = [a / radii[0], b / radii[1], (z - z0) / radii[2]];
        (1.0 - (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt()) * mean_r
    };
    let liver_at = |px: i64, py: i64, kk: usize| {
        px >= 0
            && py >= 0
            && (px as usize) < nx
            && (py as usize) < ny
            && s.labels[px as usize + nx * (py as usize + ny * kk)] >= label::LIVER
    };
    let mut data: Vec<f32> = Vec::<f32>::try_from(x.contiguous().view([-1])).expect("f32 crop");
    let reach_x = ((radii[0].max(radii[1]) + 2.0) / sx).ceil() as i64;
    let reach_y = ((radii[0].max(radii[1]) + 2.0) / sy).ceil() as i64;
    for (ci, &o) in spec.slice_offsets.iter().enumerate().take(chans) {
        let kk = (at.k as i64 + o).clamp(0, nz as i64 - 1) as usize;
        let z = (kk as f64 - at.k as f64) * sz;
        for py in c[1] as i64 - reach_y..=c[1] as i64 + reach_y {
            let j = py - at.y0 + h;
            if j < 0 || j >= side as i64 {
                continue;
            }
            for px in c[0] as i64 - reach_x..=c[0] as i64 + reach_x {
                let i = px - at.x0 + h;
                if i < 0 || i >= side as i64 || !liver_at(px, py, kk) {
                    continue;
                }
                let d = depth(px, py, z);
                if d < -0.75 {
                    continue;
                }
                let w = (d / 1.5 + 0.5).clamp(0.0, 1.0);
                let delta = match rim {
                    Some((boost, width)) if d < width => boost,
                    _ => -contrast,
                };
                data[ci * side * side + j as usize * side + i as usize] +=
                    (w * delta * per_hu) as f32;
            }
        }
    }
    for v in 0..at.n {
        for u in 0..at.n {
            let (px, py) = (at.x0 + 2 * u, at.y0 + 2 * v);
            if liver_at(px, py, at.k) && depth(px, py, 0.0) >= 0.0 {
                grid[(v * at.n + u) as usize] = i64::from(label::TUMOUR);
            }
        }
    }
    Tensor::from_slice(&data).view([size[0], size[1], size[2]])
}

/// Intensity augmentation in the windowed space (the window spans 400 HU over [-1, 1]).
fn augment(x: &Tensor, rng: &mut Rng) -> Tensor {
    let gain = rng.range(0.9, 1.1);
    let offset = rng.range(-20.0, 20.0) / 200.0;
    let noise = x.randn_like() * (4.0 / 200.0);
    (x * gain + offset + noise).clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

    /// torchvision-named features of a full-width VGG16 (with or without batch norm), random.
    fn torchvision_features(batch_norm: bool) -> Vec<(String, Tensor)> {
        let widths = [
            64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
        ];
        let (convs, step): ([usize; 13], usize) = if batch_norm {
            ([0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40], 1)
        } else {
            ([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], 0)
        };
        let mut c_in = 3;
        let mut out = Vec::new();
        for (f, w) in convs.into_iter().zip(widths) {
            let t = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
            out.push((format!("features.{f}.weight"), t(&[w, c_in, 3, 3])));
            out.push((format!("features.{f}.bias"), t(&[w])));
            if step == 1 {
                for part in ["weight", "bias", "running_mean", "running_var"] {
                    out.push((format!("features.{}.{part}", f + 1), t(&[w])));
                }
            }
            c_in = w;
        }
        out
    }

    #[test]
    fn pixel_size_is_parsed_and_the_range_covers_the_studies() {
        assert_eq!("auto".parse::<PixelSize>(), Ok(PixelSize::Auto));
        assert_eq!("native".parse::<PixelSize>(), Ok(PixelSize::Native));
        assert_eq!("1.25".parse::<PixelSize>(), Ok(PixelSize::Mm(1.25)));
        for bad in ["0", "-1", "NaN", "11", "fine"] {
            let e = bad.parse::<PixelSize>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let g = |s: f64| {
            crate::volume::Geometry::new([4, 4, 4], [s, s, 3.0], IDENTITY, [0.0; 3]).unwrap()
        };
        let grids = [g(1.272), g(1.5), g(1.786)];
        assert_eq!(pixel_range(&grids.iter().collect::<Vec<_>>()), [1.27, 1.79]);
        assert_eq!(pixel_range(&[&g(0.7)]), [0.7, 0.7]);
    }

    #[test]
    fn held_out_studies_show_lesions_and_one_lesion_free_study() {
        // 12 studies, 3 lesion-free: a quarter is held out, one of them lesion-free.
        let has: Vec<bool> = (0..12).map(|i| i % 4 != 1).collect();
        let order: Vec<usize> = (0..12).rev().collect();
        let v = held_out(&order, &has);
        assert_eq!(v, [9, 11, 10]);
        // One held out: a lesion-bearing study even if a lesion-free one comes first.
        assert_eq!(held_out(&[1, 0, 2, 3], &[true, false, true, true]), [0]);
        // No lesions anywhere: still a quarter, in order.
        assert_eq!(held_out(&[3, 2, 1, 0, 4, 5, 6, 7], &[false; 8]), [3, 2]);
    }

    #[test]
    fn painted_lesions_stay_in_the_liver_and_label_their_centres() {
        use crate::volume::Geometry;
        let shape = [40, 40, 3];
        let g = Geometry::new(shape, [1.5, 1.5, 4.0], IDENTITY, [0.0; 3]).unwrap();
        let liver = |i: usize, j: usize| (8..32).contains(&i) && (10..30).contains(&j);
        let (mut hu, mut labels) = (vec![-90.0f32; g.len()], vec![0u8; g.len()]);
        for k in 0..3 {
            for j in 0..40 {
                for i in 0..40 {
                    if liver(i, j) {
                        hu[g.index(i, j, k)] = 60.0;
                        labels[g.index(i, j, k)] = label::LIVER;
                    }
                }
            }
        }
        let ct = CtVolume::new(g.clone(), hu).unwrap();
        let mask = LabelVolume::new(g, labels).unwrap();
        let spec = InputSpec::default();
        let mut rng = Rng::new(3, 1);
        let study = load_study(&ct, &mask, &spec, 59, &mut rng);
        let (n, c) = (4i64, [20usize, 20usize]);
        let at = Crop {
            x0: 14,
            y0: 14,
            k: 1,
            n,
        };
        let crop = 59 + 2 * (n - 1);
        let x = infer::channels(&study.slices, &spec, 1)
            .narrow(1, at.y0, crop)
            .narrow(2, at.x0, crop);
        let before = Vec::<f32>::try_from(x.contiguous().view([-1])).unwrap();
        let (mut painted, mut darker) = (0, 0);
        for _ in 0..20 {
            let mut grid = vec![i64::from(label::LIVER); (n * n) as usize];
            let y = paint_lesion(&x, &mut grid, &study, &spec, &at, c, &mut rng);
            let after = Vec::<f32>::try_from(y.contiguous().view([-1])).unwrap();
            let side = crop as usize;
            for (idx, (a, b)) in after.iter().zip(&before).enumerate() {
                let (i, j) = (idx % side, (idx / side) % side);
                let (px, py) = (i as i64 + at.x0 - 29, j as i64 + at.y0 - 29);
                if a != b {
                    assert!(
                        px >= 0 && py >= 0 && liver(px as usize, py as usize),
                        "{px},{py}"
                    );
                    darker += usize::from(a < b);
                }
            }
            // Grid centres (x0 + 2u, y0 + 2v) are liver pixels here: some become tumour.
            painted += grid
                .iter()
                .filter(|&&v| v == i64::from(label::TUMOUR))
                .count();
        }
        assert!(painted > 0 && darker > 0, "{painted} {darker}");
    }

    #[test]
    fn imagenet_weights_fill_both_variants_and_a_narrow_net_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for batch_norm in [false, true] {
            let tensors = torchvision_features(batch_norm);
            let path = dir.path().join(format!("vgg16-{batch_norm}.safetensors"));
            Tensor::write_safetensors(&tensors, &path).unwrap();
            let mut arch = Architecture::vgg16(1.0, 59).unwrap();
            arch.batch_norm = batch_norm;
            let mut vs = nn::VarStore::new(Device::Cpu);
            let _net = super::super::net::Vgg::new(&vs.root(), &arch);
            let n = init_from_imagenet(&mut vs, &path, batch_norm).unwrap();
            assert_eq!(n, if batch_norm { 13 * 6 } else { 13 * 2 });
            let vars = vs.variables();
            let find = |name: &str| &tensors.iter().find(|(n, _)| n == name).unwrap().1;
            let last = if batch_norm { 40 } else { 28 };
            assert!(vars["block5.conv3.weight"].equal(find(&format!("features.{last}.weight"))));
            if batch_norm {
                assert!(vars["block5.bn3.running_var"].equal(find("features.41.running_var")));
            }
            // The other variant's names are not there: a clear error, not a silent partial copy.
            let err = init_from_imagenet(&mut vs, &path, !batch_norm).unwrap_err();
            assert!(err.to_string().contains("not found"), "{err}");
        }
        // A narrow network cannot take full-width weights.
        let path = dir.path().join("vgg16-true.safetensors");
        let arch = Architecture::vgg16(0.125, 59).unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _net = super::super::net::Vgg::new(&vs.root(), &arch);
        let err = init_from_imagenet(&mut vs, &path, true).unwrap_err();
        assert!(err.to_string().contains("--width 1"), "{err}");
    }
}
