//! The VGG16 patch classifier, written so that it runs both on single patches and fully
//! convolutionally on whole slices with identical results.
//!
//! Topology: VGG16's 13 3×3 convolutions in 5 blocks (2, 2, 3, 3, 3), each block followed by
//! max-pooling, then the classifier head: fully connected layers (as 1×1 convolutions, so the
//! same weights serve dense evaluation) with ReLU and dropout 0.5, and 3 classes.
//! Changes from the ImageNet VGG16, so that patch and dense evaluation agree exactly:
//! - convolutions are unpadded ("valid"): an output never sees padding inside the patch;
//! - block 1 pools 3×3 with stride 2 and blocks 2–5 pool 2×2 with stride 1, so the receptive
//!   field is 59 px (odd: a patch has a centre voxel) and outputs come every 2 px;
//! - a patch larger than 59 px is averaged over its (P − 59)/2 + 1 positions before the head,
//!   which in dense mode is an average pool with stride 1;
//! - the head is narrower (VGG's 4096 scaled by the width multiplier);
//! - optionally (the default for new models) batch normalisation after every convolution, as
//!   torchvision's `vgg16_bn`: at inference it is a fixed per-channel affine map, so dense and
//!   patch evaluation still agree exactly.

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

/// Receptive field of the convolutional trunk, in pixels.
pub const RECEPTIVE_FIELD: i64 = 59;
/// Distance between neighbouring dense outputs, in pixels.
pub const OUTPUT_STRIDE: i64 = 2;
/// Half the receptive field: the padding that puts a patch centre on every pixel.
pub const HALF_FIELD: i64 = RECEPTIVE_FIELD / 2;

/// The shape of a network, recorded in the model card.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Architecture {
    pub name: String,
    /// Channels of the five blocks (ImageNet VGG16: 64, 128, 256, 512, 512).
    pub widths: [i64; 5],
    /// Width of the two hidden fully connected layers (ImageNet VGG16: 4096).
    pub fc: i64,
    pub in_channels: i64,
    pub classes: i64,
    /// Patch side in pixels (59 + 2k).
    pub patch: i64,
    pub receptive_field: i64,
    pub output_stride: i64,
    pub dropout: f64,
    /// Batch normalisation after each convolution (cards written before it existed: none).
    #[serde(default)]
    pub batch_norm: bool,
}

impl Architecture {
    /// VGG16 widths scaled by `width` (1.0 = the real widths), for `patch`-pixel patches.
    pub fn vgg16(width: f64, patch: i64) -> Result<Self, String> {
        if !(width.is_finite() && width > 0.0 && width <= 1.0) {
            return Err(format!("width {width}: must be in (0, 1]"));
        }
        if patch < RECEPTIVE_FIELD || (patch - RECEPTIVE_FIELD) % 2 != 0 {
            return Err(format!(
                "patch {patch}: must be {RECEPTIVE_FIELD} + an even number of pixels"
            ));
        }
        let w = |c: f64| ((c * width).round() as i64).max(4);
        Ok(Self {
            name: "vgg16-valid".into(),
            widths: [w(64.0), w(128.0), w(256.0), w(512.0), w(512.0)],
            fc: w(4096.0 / 8.0),
            in_channels: 3,
            classes: 3,
            patch,
            receptive_field: RECEPTIVE_FIELD,
            output_stride: OUTPUT_STRIDE,
            dropout: 0.5,
            batch_norm: true,
        })
    }

    /// Positions averaged by the head: 1 for a 59-px patch.
    pub fn head_window(&self) -> i64 {
        (self.patch - RECEPTIVE_FIELD) / 2 + 1
    }

    /// Checks a card's architecture before building it.
    pub fn validate(&self) -> Result<(), String> {
        if self.name != "vgg16-valid" {
            return Err(format!("architecture {:?} is not vgg16-valid", self.name));
        }
        if self.receptive_field != RECEPTIVE_FIELD || self.output_stride != OUTPUT_STRIDE {
            return Err("receptive field or output stride differ from vgg16-valid".into());
        }
        if self
            .widths
            .iter()
            .chain([self.fc, self.in_channels].iter())
            .any(|&w| !(1..=8192).contains(&w))
            || self.classes != 3
        {
            return Err("widths, channels or classes out of range".into());
        }
        Self::vgg16(1.0, self.patch).map(|_| ())
    }
}

/// The network's layers.
#[derive(Debug)]
pub struct Vgg {
    blocks: Vec<Vec<(nn::Conv2D, Option<nn::BatchNorm>)>>,
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
    fc3: nn::Conv2D,
    arch: Architecture,
}

impl Vgg {
    pub fn new(p: &nn::Path, arch: &Architecture) -> Self {
        let cfg = nn::ConvConfig {
            padding: 0,
            ..Default::default()
        };
        let counts = [2, 2, 3, 3, 3];
        let mut c_in = arch.in_channels;
        let mut blocks = Vec::new();
        for (b, (&n, &w)) in counts.iter().zip(arch.widths.iter()).enumerate() {
            let mut convs = Vec::new();
            for i in 0..n {
                let block = p / format!("block{}", b + 1);
                let conv = nn::conv2d(&block / format!("conv{}", i + 1), c_in, w, 3, cfg);
                let bn = arch.batch_norm.then(|| {
                    nn::batch_norm2d(&block / format!("bn{}", i + 1), w, Default::default())
                });
                convs.push((conv, bn));
                c_in = w;
            }
            blocks.push(convs);
        }
        let one = nn::ConvConfig::default();
        Vgg {
            blocks,
            fc1: nn::conv2d(p / "fc1", c_in, arch.fc, 1, one),
            fc2: nn::conv2d(p / "fc2", arch.fc, arch.fc, 1, one),
            fc3: nn::conv2d(p / "fc3", arch.fc, arch.classes, 1, one),
            arch: arch.clone(),
        }
    }

    /// Logits (N, 3, H', W') for inputs (N, C, H, W): one output per `patch`-pixel window,
    /// every 2 pixels. A `patch`-sized input gives one output.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (b, convs) in self.blocks.iter().enumerate() {
            for (c, bn) in convs {
                x = x.apply(c);
                if let Some(bn) = bn {
                    x = x.apply_t(bn, train);
                }
                x = x.relu();
            }
            x = if b == 0 {
                x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
            } else if train {
                x.max_pool2d([2, 2], [1, 1], [0, 0], [1, 1], false)
            } else {
                max_pool_2x2_stride_1(&x)
            };
        }
        let m = self.arch.head_window();
        if m > 1 {
            x = x.avg_pool2d([m, m], [1, 1], [0, 0], false, true, None);
        }
        let d = self.arch.dropout;
        x.apply(&self.fc1)
            .relu()
            .dropout(d, train)
            .apply(&self.fc2)
            .relu()
            .dropout(d, train)
            .apply(&self.fc3)
    }
}

/// The 2 × 2 max-pooling with stride 1 of `x` (N, C, H, W) as two element-wise maxima of
/// shifted views: the same values as `max_pool2d` (a maximum is exact), without the indices
/// libtorch's CPU kernel computes for a backward pass: a whole forward pass on the CPU takes
/// about two thirds of the time (docs/benchmarks.md). For evaluation; training keeps
/// `max_pool2d`, whose gradient goes to one input where several hold the maximum.
///
/// The views are slices relative to the ends (all but the last, all but the first), so a
/// traced TorchScript model keeps working for inputs of any size.
fn max_pool_2x2_stride_1(x: &Tensor) -> Tensor {
    let across = x.slice(3, 0, -1, 1).maximum(&x.slice(3, 1, None, 1));
    across
        .slice(2, 0, -1, 1)
        .maximum(&across.slice(2, 1, None, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn patch_gives_one_output_and_slices_one_per_two_pixels() {
        let vs = nn::VarStore::new(Device::Cpu);
        let arch = Architecture::vgg16(0.0625, 63).unwrap();
        let net = Vgg::new(&vs.root(), &arch);
        let y = net.forward_t(
            &Tensor::zeros([2, 3, 63, 63], (Kind::Float, Device::Cpu)),
            false,
        );
        assert_eq!(y.size(), [2, 3, 1, 1]);
        // A padded slice of 40 × 30 pixels gives 20 × 15 outputs.
        let pad = arch.patch - 1;
        let y = net.forward_t(
            &Tensor::zeros([1, 3, 30 + pad, 40 + pad], (Kind::Float, Device::Cpu)),
            false,
        );
        assert_eq!(y.size(), [1, 3, 15, 20]);
    }

    #[test]
    fn the_evaluation_pooling_is_max_pool2d() {
        tch::manual_seed(3);
        let x = Tensor::randn([2, 5, 9, 7], (Kind::Float, Device::Cpu));
        // Ties too: a ReLU's zeros and repeated values.
        let x = Tensor::cat(&[x.relu(), x.round()], 1);
        let want = x.max_pool2d([2, 2], [1, 1], [0, 0], [1, 1], false);
        let got = max_pool_2x2_stride_1(&x);
        assert_eq!(got.size(), [2, 10, 8, 6]);
        assert!(got.equal(&want));
    }

    #[test]
    fn bad_architectures_are_refused() {
        assert!(Architecture::vgg16(0.5, 60).is_err());
        assert!(Architecture::vgg16(0.0, 59).is_err());
        assert!(Architecture::vgg16(1.0, 59).unwrap().validate().is_ok());
    }
}
