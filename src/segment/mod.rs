//! Segmentation: a VGG16 patch classifier on libtorch that labels every voxel background,
//! liver or tumour. The only module whose API carries libtorch types.
//!
//! - [`net`]: the network (valid convolutions, so patch and dense evaluation agree);
//! - [`infer`]: input channels, dense and patch evaluation, reassembly on the study's grid;
//! - [`train`]: training on LiTS-layout folders;
//! - [`calibrate`]: the tumour thresholds and the false-positive filter, from a model's studies;
//! - this file: the model on disk (`model.safetensors` or TorchScript `model.pt`, plus
//!   `card.json`), loading with checks, and device selection.
//!
//! tch tensors are not `Sync`: a loaded [`Classifier`] stays on the thread that loaded it.

pub mod calibrate;
pub mod infer;
pub mod net;
pub mod train;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor, nn};

pub use infer::{InferOptions, InputSpec, Mode, segment};
pub use net::Architecture;

/// Weights file of a native model.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Weights file of a TorchScript model.
pub const SCRIPT_FILE: &str = "model.pt";
/// The model card.
pub const CARD_FILE: &str = "card.json";

/// What a model is and where it came from (`card.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub architecture: Architecture,
    pub input: InputSpec,
    pub classes: Vec<String>,
    pub weights_file: String,
    pub weights_sha256: String,
    pub created: String,
    pub hepaflow_version: String,
    /// How it was trained (data hashes, settings), when hepaflow trained it.
    #[serde(default)]
    pub training: Option<serde_json::Value>,
    /// Per-epoch training and validation figures.
    #[serde(default)]
    pub validation: Vec<serde_json::Value>,
    /// Tumour probability threshold calibrated on the held-out studies (default 0.5).
    #[serde(default)]
    pub tumour_threshold: Option<f32>,
    /// Peak probability a tumour component needs to be kept, calibrated with the threshold
    /// (default: the threshold itself, i.e. no extra condition).
    #[serde(default)]
    pub tumour_seed_threshold: Option<f32>,
    /// Last step against false positives, fitted on the training studies' own components
    /// (`lesions::FalsePositiveFilter`); none: every component the other steps keep stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub false_positive_filter: Option<crate::lesions::FalsePositiveFilter>,
}

impl ModelCard {
    /// Writes the card as `dir/card.json` (pretty JSON, through a temporary file renamed into
    /// place). Returns that path.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(CARD_FILE);
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), CARD_FILE));
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(self).expect("serialisable"),
        )?;
        crate::fsutil::commit_temp(&tmp, &path)?;
        Ok(path)
    }
}

/// Why a model could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: missing ({what})")]
    Missing { path: String, what: &'static str },
    #[error("{path}: invalid model card: {reason}")]
    Card { path: String, reason: String },
    #[error("{path}: cannot load the weights: {reason}")]
    Weights { path: String, reason: String },
    #[error("{path}: sha256 {actual} does not match the card's weights_sha256 {card}")]
    HashMismatch {
        path: String,
        card: String,
        actual: String,
    },
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },
    #[error("device {0:?}: expected auto, cpu or cuda")]
    Device(String),
    #[error("device cuda was asked for, but CUDA is not available to this build")]
    NoCuda,
}

/// Parses `auto | cpu | cuda` (auto: the first GPU when there is one).
pub fn parse_device(s: &str) -> Result<Device, ModelError> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(ModelError::NoCuda)
            }
        }
        other => Err(ModelError::Device(other.into())),
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A loaded classifier, native or TorchScript.
pub struct Classifier {
    card: ModelCard,
    dir: PathBuf,
    imp: Imp,
    device: Device,
    kind: Kind,
}

enum Imp {
    Native {
        vs: nn::VarStore,
        net: Box<net::Vgg>,
    },
    Script(tch::CModule),
}

impl Classifier {
    /// A fresh, randomly initialised native classifier (for training).
    pub fn fresh(arch: &Architecture, input: InputSpec, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let net = net::Vgg::new(&vs.root(), arch);
        let card = ModelCard {
            format: 1,
            name: "untrained".into(),
            version: "0".into(),
            architecture: arch.clone(),
            input,
            classes: vec!["background".into(), "liver".into(), "tumour".into()],
            weights_file: WEIGHTS_FILE.into(),
            weights_sha256: String::new(),
            created: String::new(),
            hepaflow_version: env!("CARGO_PKG_VERSION").into(),
            training: None,
            validation: Vec::new(),
            tumour_threshold: None,
            tumour_seed_threshold: None,
            false_positive_filter: None,
        };
        Classifier {
            card,
            dir: PathBuf::new(),
            imp: Imp::Native {
                vs,
                net: Box::new(net),
            },
            device,
            kind: Kind::Float,
        }
    }

    /// Loads `dir/card.json` and the weights it names, checking the weights' hash.
    pub fn load(dir: &Path, device: Device, half_precision: bool) -> Result<Self, ModelError> {
        let card_path = dir.join(CARD_FILE);
        let text = std::fs::read_to_string(&card_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::Missing {
                path: card_path.display().to_string(),
                what: "the model card",
            },
            _ => ModelError::Card {
                path: card_path.display().to_string(),
                reason: e.to_string(),
            },
        })?;
        let card: ModelCard = serde_json::from_str(&text).map_err(|e| ModelError::Card {
            path: card_path.display().to_string(),
            reason: e.to_string(),
        })?;
        card.architecture
            .validate()
            .map_err(|reason| ModelError::Card {
                path: card_path.display().to_string(),
                reason,
            })?;
        card.input
            .validate(card.architecture.in_channels)
            .map_err(|reason| ModelError::Card {
                path: card_path.display().to_string(),
                reason,
            })?;
        if let Some(f) = &card.false_positive_filter {
            f.validate().map_err(|reason| ModelError::Card {
                path: card_path.display().to_string(),
                reason,
            })?;
        }
        let wpath = dir.join(&card.weights_file);
        let wname = wpath.display().to_string();
        if !wpath.exists() {
            return Err(ModelError::Missing {
                path: wname,
                what: "the weights named by card.json",
            });
        }
        let actual = sha256_file(&wpath).map_err(|e| ModelError::Weights {
            path: wname.clone(),
            reason: e.to_string(),
        })?;
        if !card.weights_sha256.is_empty() && actual != card.weights_sha256 {
            return Err(ModelError::HashMismatch {
                path: wname,
                card: card.weights_sha256.clone(),
                actual,
            });
        }
        let kind = if device.is_cuda() && half_precision {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let imp = if card.weights_file.ends_with(".pt") {
            let mut m =
                tch::CModule::load_on_device(&wpath, device).map_err(|e| ModelError::Weights {
                    path: wname.clone(),
                    reason: first_line(&e.to_string()),
                })?;
            m.set_eval();
            if kind != Kind::Float {
                m.to(device, kind, false);
            }
            Imp::Script(m)
        } else {
            let mut vs = nn::VarStore::new(device);
            let net = net::Vgg::new(&vs.root(), &card.architecture);
            vs.load(&wpath).map_err(|e| ModelError::Weights {
                path: wname.clone(),
                reason: first_line(&e.to_string()),
            })?;
            vs.freeze();
            if kind == Kind::BFloat16 {
                vs.bfloat16();
            }
            Imp::Native {
                vs,
                net: Box::new(net),
            }
        };
        Ok(Classifier {
            card,
            dir: dir.to_path_buf(),
            imp,
            device,
            kind,
        })
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }
    pub fn arch(&self) -> &Architecture {
        &self.card.architecture
    }
    pub fn input(&self) -> &InputSpec {
        &self.card.input
    }
    /// The card's calibrated tumour threshold, else 0.5.
    pub fn tumour_threshold(&self) -> f32 {
        self.card
            .tumour_threshold
            .filter(|t| (0.0..=1.0).contains(t))
            .unwrap_or(0.5)
    }
    /// The card's false-positive filter and the neighbours it is used with (`opts`' choice,
    /// else the card's); None without a filter or with 0 neighbours.
    pub fn false_positive_filter(
        &self,
        opts: &InferOptions,
    ) -> Option<(&crate::lesions::FalsePositiveFilter, usize)> {
        let f = self.card.false_positive_filter.as_ref()?;
        let k = opts.fp_neighbours.unwrap_or(f.neighbours);
        (k > 0).then_some((f, k))
    }
    /// The card's calibrated seed threshold, else the tumour threshold.
    pub fn tumour_seed_threshold(&self) -> f32 {
        self.card
            .tumour_seed_threshold
            .filter(|t| (0.0..=1.0).contains(t))
            .unwrap_or_else(|| self.tumour_threshold())
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Logits (N, 3, H', W') in evaluation mode, for inputs (N, C, H, W) of any float kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.to_device(self.device).to_kind(self.kind);
        match &self.imp {
            Imp::Native { net, .. } => net.forward_t(&x, false),
            Imp::Script(m) => m.forward_ts(&[x]).expect("TorchScript forward"),
        }
    }

    /// Segments a CT volume into a label mask on its own grid.
    pub fn segment(
        &self,
        ct: &crate::volume::CtVolume,
        opts: &InferOptions,
    ) -> Result<crate::volume::LabelVolume, ModelError> {
        let [nx, ny, _] = ct.geometry().shape();
        let [wx, wy, _] = self
            .input()
            .working_pixels(ct.geometry())
            .and_then(|p| crate::volume::resample::in_plane_grid(ct.geometry(), p))
            .map_or([nx, ny, 0], |(g, _)| g.shape());
        if wx.min(nx) < 8 || wy.min(ny) < 8 {
            return Err(ModelError::Input {
                what: format!(
                    "volume of {nx}x{ny} pixels per slice ({wx}x{wy} at the model's pixel size)"
                ),
                reason: "too small to segment (at least 8x8 pixels per slice)".into(),
            });
        }
        Ok(segment(self, ct, opts, self.device))
    }

    /// Writes this (native) model as TorchScript: `out/model.pt` traced from the network, and
    /// a card naming it. The contract of such a model is in `docs/model.md`. The weights are
    /// frozen (no gradients) from then on: the tracer stores them as constants.
    pub fn export_torchscript(&self, out: &Path) -> Result<ModelCard, ModelError> {
        let Imp::Native { net, vs } = &self.imp else {
            return Err(ModelError::Input {
                what: "export".into(),
                reason: "the model is TorchScript already".into(),
            });
        };
        let werr = |e: String| ModelError::Weights {
            path: out.join(SCRIPT_FILE).display().to_string(),
            reason: e,
        };
        std::fs::create_dir_all(out).map_err(|e| werr(e.to_string()))?;
        for (_, v) in vs.variables() {
            let _ = v.set_requires_grad(false);
        }
        let p = self.arch().patch;
        let example = Tensor::zeros(
            [1, self.arch().in_channels, p + 8, p + 8],
            (Kind::Float, self.device),
        );
        let module = tch::no_grad(|| {
            tch::CModule::create_by_tracing("hepaflow", "forward", &[example], &mut |xs| {
                vec![net.forward_t(&xs[0], false)]
            })
        })
        .map_err(|e| werr(first_line(&e.to_string())))?;
        let path = out.join(SCRIPT_FILE);
        module
            .save(&path)
            .map_err(|e| werr(first_line(&e.to_string())))?;
        let mut card = self.card.clone();
        card.weights_file = SCRIPT_FILE.into();
        card.weights_sha256 = sha256_file(&path).map_err(|e| werr(e.to_string()))?;
        card.write_to(out).map_err(|e| werr(e.to_string()))?;
        Ok(card)
    }

    /// The variables of a native model (None for TorchScript).
    pub(crate) fn var_store(&self) -> Option<&nn::VarStore> {
        match &self.imp {
            Imp::Native { vs, .. } => Some(vs),
            Imp::Script(_) => None,
        }
    }
    /// Logits in training mode (dropout on); native models only.
    pub(crate) fn forward_train(&self, x: &Tensor) -> Tensor {
        match &self.imp {
            Imp::Native { net, .. } => net.forward_t(&x.to_device(self.device), true),
            Imp::Script(m) => m
                .forward_ts(&[x.to_device(self.device)])
                .expect("TorchScript forward"),
        }
    }
    pub(crate) fn card_mut(&mut self) -> &mut ModelCard {
        &mut self.card
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

/// Today's date (UTC) as YYYY-MM-DD.
pub(crate) fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
