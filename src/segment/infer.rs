//! Inference: the network's inputs, dense (fully convolutional) and patch evaluation, and the
//! reassembly of probabilities into a label mask on the study's own grid.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::Classifier;
use crate::lesions;
use crate::volume::{CtVolume, LabelVolume, label, resample};

/// How the input channels are made from the CT; recorded in the model card.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    /// Slice offsets stacked as channels (0 = the slice itself).
    pub slice_offsets: Vec<i64>,
    /// HU window mapped linearly onto [-1, 1] (values outside are clamped).
    pub window_hu: [f32; 2],
    /// HU assumed outside the image (air).
    pub pad_hu: f32,
    /// In-plane pixel sizes (mm) the network works at, [smallest, largest]: a study with finer
    /// pixels is resampled to the smallest, one with coarser pixels to the largest, before the
    /// network; its probabilities are read back on the study's own grid. None: every study's
    /// own pixels (cards written before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_mm: Option<[f32; 2]>,
}

impl Default for InputSpec {
    fn default() -> Self {
        Self {
            slice_offsets: vec![-1, 0, 1],
            window_hu: [-160.0, 240.0],
            pad_hu: -1000.0,
            pixel_mm: None,
        }
    }
}

impl InputSpec {
    #[inline]
    pub fn window(&self, hu: f32) -> f32 {
        let [lo, hi] = self.window_hu;
        ((hu - lo) / (hi - lo) * 2.0 - 1.0).clamp(-1.0, 1.0)
    }

    /// The in-plane pixel sizes (x, y) the network sees a study of grid `g` at: its own
    /// clamped to `pixel_mm`; None when that leaves them as they are.
    pub fn working_pixels(&self, g: &crate::volume::Geometry) -> Option<[f64; 2]> {
        let [lo, hi] = self.pixel_mm?.map(f64::from);
        let s = g.spacing_mm();
        let target = [s[0].clamp(lo, hi), s[1].clamp(lo, hi)];
        resample::in_plane_grid(g, target).map(|_| target)
    }

    /// The study as the network sees it (see `working_pixels`; borrowed when unchanged).
    pub fn working_volume<'a>(&self, ct: &'a CtVolume) -> std::borrow::Cow<'a, CtVolume> {
        match self.working_pixels(ct.geometry()) {
            Some(p) => std::borrow::Cow::Owned(ct.resample_in_plane(p)),
            None => std::borrow::Cow::Borrowed(ct),
        }
    }

    /// A training mask on the grid of `working_volume`.
    pub fn working_labels(&self, mask: LabelVolume) -> LabelVolume {
        match self.working_pixels(mask.geometry()) {
            Some(p) => mask.resample_in_plane(p),
            None => mask,
        }
    }

    /// Why this spec cannot be used, if it cannot.
    pub fn validate(&self, in_channels: i64) -> Result<(), String> {
        if self.slice_offsets.len() as i64 != in_channels {
            return Err(format!(
                "input: {} slice offsets for {in_channels} input channels",
                self.slice_offsets.len()
            ));
        }
        let [lo, hi] = self.window_hu;
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(format!("input: window_hu [{lo}, {hi}] is empty"));
        }
        if let Some([lo, hi]) = self.pixel_mm
            && !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi >= lo)
        {
            return Err(format!(
                "input: pixel_mm [{lo}, {hi}] is not a range of positive sizes"
            ));
        }
        Ok(())
    }
}

/// Inference settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InferOptions {
    pub mode: Mode,
    /// Distance between classified patch centres, in pixels (1, 2, 4, ...).
    pub stride: i64,
    /// Slices per batch in dense mode; patches per batch in patch mode.
    pub batch: i64,
    /// Post-processing: tumour farther than this from liver tissue is dropped (mm).
    pub tumour_margin_mm: f64,
    /// Post-processing: tumour components smaller than this become liver (mL).
    pub min_tumour_ml: f64,
    /// Post-processing: tumour components with more than this share of their voxels where the
    /// liver ends along z (background in the slice above or below) become liver: partial
    /// volume of thick slices at the dome and the tip. 1 keeps them all.
    #[serde(default = "default_end_slice_share")]
    pub max_end_slice_share: f64,
    /// Post-processing: tumour components with more than this share of their surface facing
    /// background become background (`lesions::drop_extrahepatic_tumours`). 1 keeps them all.
    #[serde(default = "default_outside_share")]
    pub max_outside_share: f64,
    /// Use bfloat16 on a GPU.
    pub half_precision: bool,
    /// Mirror images whose probabilities are averaged in.
    pub flips: Flips,
    /// Tumour where its probability reaches this (within liver: p(liver) + p(tumour) ≥
    /// p(background)); None: the model card's calibrated value, else 0.5.
    pub tumour_threshold: Option<f32>,
    /// A tumour component is kept only if its peak probability reaches this (hysteresis: the
    /// extent comes from `tumour_threshold`, the decision from the peak); None: the model
    /// card's calibrated value, else no extra condition.
    pub tumour_seed_threshold: Option<f32>,
    /// A tumour component below the seed threshold stays when its median CT value lies at
    /// least this many standard deviations below liver of its shape elsewhere in the study
    /// (`lesions::contrast_z`); infinite: components below the seed always go.
    #[serde(default = "default_confirm_z")]
    pub tumour_confirm_z: f64,
    /// A tumour component whose peak reaches the seed threshold becomes liver when its median
    /// CT value lies less than this many standard deviations below liver of its shape
    /// elsewhere in the study; 0: no such test.
    #[serde(default = "default_sure_z")]
    pub tumour_sure_z: f64,
    /// Post-processing: each tumour component is redrawn from the CT within this distance of
    /// the network's extent (`lesions::refine_tumour_extents`); 0: the network's extent.
    #[serde(default = "default_refine_mm")]
    pub tumour_refine_mm: f64,
    /// Small dark spots of the liver the network left out become tumour when their peak
    /// score reaches this (`lesions::find_missed_lesions`); infinite: no such search.
    #[serde(default = "default_detect_z")]
    pub tumour_detect_z: f64,
    /// Last step: each tumour component's outline is redrawn as the labelling of least
    /// energy, this being the cost of a unit of outline (`lesions::regularise_tumour_outlines`);
    /// 0: the outline as drawn.
    #[serde(default = "default_smooth")]
    pub tumour_smooth: f64,
    /// Last step: tumour components whose this many nearest exemplars in the model card's
    /// false-positive filter are all false positives become liver; None: the card's number;
    /// 0: no filter.
    #[serde(default)]
    pub fp_neighbours: Option<usize>,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Dense,
            stride: 2,
            batch: 4,
            tumour_margin_mm: 3.0,
            min_tumour_ml: 0.02,
            max_end_slice_share: default_end_slice_share(),
            max_outside_share: default_outside_share(),
            half_precision: true,
            flips: Flips::None,
            tumour_threshold: None,
            tumour_seed_threshold: None,
            tumour_confirm_z: default_confirm_z(),
            tumour_sure_z: default_sure_z(),
            tumour_refine_mm: default_refine_mm(),
            tumour_detect_z: default_detect_z(),
            tumour_smooth: default_smooth(),
            fp_neighbours: None,
        }
    }
}

fn default_end_slice_share() -> f64 {
    0.5
}

fn default_outside_share() -> f64 {
    0.6
}

fn default_confirm_z() -> f64 {
    3.5
}

fn default_sure_z() -> f64 {
    2.0
}

fn default_refine_mm() -> f64 {
    6.0
}

fn default_detect_z() -> f64 {
    5.0
}

fn default_smooth() -> f64 {
    1.0
}

/// Mirror images averaged into the probabilities (test-time augmentation).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Flips {
    /// The slice as it is.
    None,
    /// The slice and its left-right mirror image (2 passes).
    X,
    /// The slice and its three mirror images (4 passes).
    Xy,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fully convolutional over whole slices.
    Dense,
    /// One patch at a time (batched): the reference.
    Patch,
}

/// Class probabilities on a grid of patch centres: `probs[c][(v * nu + u) + k * nu * nv]`
/// for the centre at pixel (x0 + s·u, y0 + s·v) of slice k of the working volume (the study
/// resampled to the model's pixel size); pixel (x, y) of the study lies at working pixel
/// (x·scale[0], y·scale[1]).
pub struct ProbabilityMaps {
    pub stride: usize,
    pub scale: [f32; 2],
    pub x0: usize,
    pub y0: usize,
    pub nu: usize,
    pub nv: usize,
    pub nz: usize,
    /// [background, liver, tumour], each nu × nv × nz.
    pub probs: [Vec<f32>; 3],
}

/// The windowed, padded slices of a volume as one tensor (nz, H + 2h, W + 2h) on `device`,
/// with h = (patch − 1) / 2; pixel (x, y) of slice k sits at [k, y + h, x + h].
pub fn prepare(ct: &CtVolume, spec: &InputSpec, patch: i64) -> Tensor {
    let [nx, ny, nz] = ct.geometry().shape();
    let windowed: Vec<f32> = ct.hu().par_iter().map(|&h| spec.window(h)).collect();
    let h = (patch - 1) / 2;
    Tensor::from_slice(&windowed)
        .view([nz as i64, ny as i64, nx as i64])
        .pad(
            [h, h, h, h],
            "constant",
            Some(spec.window(spec.pad_hu) as f64),
        )
}

/// Channels of slice `k`: the slices at the spec's offsets, clamped at the volume's ends.
pub fn channels(slices: &Tensor, spec: &InputSpec, k: i64) -> Tensor {
    let nz = slices.size()[0];
    let idx: Vec<i64> = spec
        .slice_offsets
        .iter()
        .map(|o| (k + o).clamp(0, nz - 1))
        .collect();
    slices.index_select(0, &Tensor::from_slice(&idx))
}

/// The body's bounding box in x and y over all slices (HU > −500), grown by `margin`,
/// starting at a multiple of 4 (so stride grids up to 4 line up across modes and runs); None
/// when the image holds no body.
fn body_box(ct: &CtVolume, margin: usize) -> Option<([usize; 2], [usize; 2])> {
    let [nx, ny, _] = ct.geometry().shape();
    let (mut lo, mut hi) = ([usize::MAX; 2], [0usize; 2]);
    for (i, &h) in ct.hu().iter().enumerate() {
        if h > -500.0 {
            let (x, y) = (i % nx, (i / nx) % ny);
            lo = [lo[0].min(x), lo[1].min(y)];
            hi = [hi[0].max(x), hi[1].max(y)];
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    let lo = [
        (lo[0].saturating_sub(margin)) & !3,
        (lo[1].saturating_sub(margin)) & !3,
    ];
    let hi = [(hi[0] + margin).min(nx - 1), (hi[1] + margin).min(ny - 1)];
    Some((lo, hi))
}

/// Evaluates the classifier on every patch centre of the stride grid inside the body box.
pub fn probabilities(
    net: &Classifier,
    ct: &CtVolume,
    opts: &InferOptions,
    device: Device,
) -> ProbabilityMaps {
    let spec = net.input();
    let native = ct.geometry().spacing_mm();
    let ct = spec.working_volume(ct);
    let ct = ct.as_ref();
    let working = ct.geometry().spacing_mm();
    let scale = [
        (native[0] / working[0]) as f32,
        (native[1] / working[1]) as f32,
    ];
    let [nx, ny, nz] = ct.geometry().shape();
    let s = opts.stride.max(1) as usize;
    let patch = net.arch().patch;
    let h = (patch - 1) / 2;
    let (lo, hi) = body_box(ct, 8).unwrap_or(([0, 0], [nx - 1, ny - 1]));
    let (x0, y0) = (lo[0], lo[1]);
    let nu = (hi[0] - x0) / s + 1;
    let nv = (hi[1] - y0) / s + 1;
    let mut probs = [
        vec![1.0f32; nu * nv * nz],
        vec![0.0f32; nu * nv * nz],
        vec![0.0f32; nu * nv * nz],
    ];
    let slices = prepare(ct, spec, patch).to_device(device);
    let kind = if device.is_cuda() && opts.half_precision {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let plane = nu * nv;
    let hu = ct.hu();
    let mut store = |k: usize, u: usize, v: usize, p: [f32; 3]| {
        let i = k * plane + v * nu + u;
        for c in 0..3 {
            probs[c][i] = p[c];
        }
    };
    tch::no_grad(|| match opts.mode {
        Mode::Dense => {
            // Crop of the padded slices covering centres x0 .. x0 + s(nu − 1) (and y likewise),
            // evaluated at the network's own stride 2 and, for stride 1, at the four shifts.
            let shifts: Vec<(usize, usize)> = if s == 1 {
                vec![(0, 0), (1, 0), (0, 1), (1, 1)]
            } else {
                vec![(0, 0)]
            };
            let span_x = s * (nu - 1) + 1;
            let span_y = s * (nv - 1) + 1;
            let batch = opts.batch.max(1) as usize;
            for k0 in (0..nz).step_by(batch) {
                let ks: Vec<i64> = (k0..(k0 + batch).min(nz)).map(|k| k as i64).collect();
                let input = Tensor::stack(
                    &ks.iter()
                        .map(|&k| channels(&slices, spec, k))
                        .collect::<Vec<_>>(),
                    0,
                );
                for &(dx, dy) in &shifts {
                    // Centres x0 + dx + 2u: the padded window starts at x0 + dx.
                    let w = (span_x - dx) as i64 + 2 * h;
                    let hh = (span_y - dy) as i64 + 2 * h;
                    let crop = input
                        .narrow(
                            3,
                            (x0 + dx) as i64,
                            w.min(input.size()[3] - (x0 + dx) as i64),
                        )
                        .narrow(
                            2,
                            (y0 + dy) as i64,
                            hh.min(input.size()[2] - (y0 + dy) as i64),
                        );
                    let p = class_probabilities(net, &crop, kind, opts.flips)
                        .to_device(Device::Cpu)
                        .contiguous();
                    let [b, _, oh, ow] = p.size()[..] else {
                        unreachable!("4D output")
                    };
                    let data: Vec<f32> =
                        Vec::<f32>::try_from(p.view([-1])).expect("f32 probabilities");
                    let (oh, ow) = (oh as usize, ow as usize);
                    for bi in 0..b as usize {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                // Output (ox, oy) is centred at x0 + dx + 2 ox.
                                let px = dx + 2 * ox;
                                let py = dy + 2 * oy;
                                if px % s != 0 || py % s != 0 {
                                    continue;
                                }
                                let (u, v) = (px / s, py / s);
                                if u >= nu || v >= nv {
                                    continue;
                                }
                                let k = ks[bi] as usize;
                                // Air cannot be liver: as in patch mode, only body centres count.
                                if hu[(x0 + px) + nx * ((y0 + py) + ny * k)] <= -500.0 {
                                    continue;
                                }
                                let at = |c: usize| data[((bi * 3 + c) * oh + oy) * ow + ox];
                                store(k, u, v, [at(0), at(1), at(2)]);
                            }
                        }
                    }
                }
            }
        }
        Mode::Patch => {
            // Patch centres inside the body, batched.
            let mut centres = Vec::new();
            for k in 0..nz {
                for v in 0..nv {
                    for u in 0..nu {
                        let (x, y) = (x0 + s * u, y0 + s * v);
                        if hu[x + nx * (y + ny * k)] > -500.0 {
                            centres.push((k, u, v));
                        }
                    }
                }
            }
            let batch = (opts.batch.max(1) * 64) as usize;
            let mut current_k = usize::MAX;
            let mut chans = Tensor::new();
            for chunk in centres.chunks(batch) {
                let mut patches = Vec::with_capacity(chunk.len());
                for &(k, u, v) in chunk {
                    if k != current_k {
                        chans = channels(&slices, spec, k as i64);
                        current_k = k;
                    }
                    let (x, y) = ((x0 + s * u) as i64, (y0 + s * v) as i64);
                    // The patch centred at (x, y) starts at padded (x, y).
                    patches.push(chans.narrow(2, x, patch).narrow(1, y, patch));
                }
                let input = Tensor::stack(&patches, 0);
                let p = class_probabilities(net, &input, kind, opts.flips)
                    .to_device(Device::Cpu)
                    .contiguous();
                let data: Vec<f32> = Vec::<f32>::try_from(p.view([-1])).expect("f32 probabilities");
                for (i, &(k, u, v)) in chunk.iter().enumerate() {
                    store(k, u, v, [data[3 * i], data[3 * i + 1], data[3 * i + 2]]);
                }
            }
        }
    });
    ProbabilityMaps {
        stride: s,
        scale,
        x0,
        y0,
        nu,
        nv,
        nz,
        probs,
    }
}

/// Class probabilities (N, 3, H', W') for inputs (N, C, H, W): the network's softmax, averaged
/// with those of the mirrored inputs (mirrored back) that `flips` asks for.
fn class_probabilities(net: &Classifier, x: &Tensor, kind: Kind, flips: Flips) -> Tensor {
    let probs = |x: &Tensor| {
        net.forward(&x.to_kind(kind))
            .to_kind(Kind::Float)
            .softmax(1, Kind::Float)
    };
    let dims: &[&[i64]] = match flips {
        Flips::None => return probs(x),
        Flips::X => &[&[3]],
        Flips::Xy => &[&[3], &[2], &[2, 3]],
    };
    // Outputs start at the first column and follow every 2 px; mirrored, they land on each
    // other only if (W − patch) is even. A last odd column or row feeds no output: drop it.
    let patch = net.arch().patch;
    let [_, _, h, w] = x.size()[..] else {
        unreachable!("4D input")
    };
    let x =
        x.narrow(3, 0, w - (w - patch).rem_euclid(2))
            .narrow(2, 0, h - (h - patch).rem_euclid(2));
    let mut sum = probs(&x);
    for d in dims {
        sum += probs(&x.flip(*d)).flip(*d);
    }
    sum / (dims.len() + 1) as f64
}

impl ProbabilityMaps {
    /// Class `c`'s probability in slice `k`, blended bilinearly between the grid nodes
    /// (u0, v0)–(u1, v1) with weights `tx`, `ty` of the second ones (see `lerp_cell`).
    #[inline]
    fn blend(&self, c: usize, k: usize, (u0, u1, tx): Cell, (v0, v1, ty): Cell) -> f32 {
        let base = k * self.nu * self.nv;
        let at = |u: usize, v: usize| self.probs[c][base + v * self.nu + u];
        let a = at(u0, v0) * (1.0 - tx) + at(u1, v0) * tx;
        let b = at(u0, v1) * (1.0 - tx) + at(u1, v1) * tx;
        a * (1.0 - ty) + b * ty
    }

    /// The grid cell around study column `x` (`AXIS` 0) or row `y` (1); None outside the grid.
    #[inline]
    fn cell<const AXIS: usize>(&self, p: usize) -> Option<Cell> {
        let (origin, n) = if AXIS == 0 {
            (self.x0, self.nu)
        } else {
            (self.y0, self.nv)
        };
        lerp_cell(p as f32 * self.scale[AXIS], origin, self.stride as f32, n)
    }
}

/// Two neighbouring grid nodes and the weight of the second.
type Cell = (usize, usize, f32);

/// Bilinear interpolation of the probability maps to every voxel, argmax into labels
/// (outside the evaluated box: background).
///
/// A voxel is liver structure when p(liver) + p(tumour) ≥ p(background), and tumour within it
/// when p(tumour) ≥ `tumour_threshold`.
pub fn reassemble(maps: &ProbabilityMaps, shape: [usize; 3], tumour_threshold: f32) -> Vec<u8> {
    let [nx, ny, nz] = shape;
    let mut labels = vec![0u8; nx * ny * nz];
    labels
        .par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(k, out)| {
            for y in 0..ny {
                let Some(cy) = maps.cell::<1>(y) else {
                    continue;
                };
                for x in 0..nx {
                    let Some(cx) = maps.cell::<0>(x) else {
                        continue;
                    };
                    let p = |c: usize| maps.blend(c, k, cx, cy);
                    let (p0, p1, p2) = (p(0), p(1), p(2));
                    out[x + nx * y] = if p1 + p2 < p0 {
                        0
                    } else if p2 >= tumour_threshold {
                        2
                    } else {
                        1
                    };
                }
            }
        });
    labels
}

/// The interpolated probability of class `c` at voxel (x, y, k), as `reassemble` computes it
/// (0 outside the evaluated box).
fn probability_at(maps: &ProbabilityMaps, c: usize, x: usize, y: usize, k: usize) -> f32 {
    match (maps.cell::<0>(x), maps.cell::<1>(y)) {
        (Some(cx), Some(cy)) => maps.blend(c, k, cx, cy),
        _ => 0.0,
    }
}

/// The CT's say on each tumour component (26-connected), whose median CT value is compared
/// with those of copies of its shape in lesion-free liver of the same study
/// ([`lesions::contrast_z`]): a component whose peak tumour probability stays below `seed`
/// stays only when it lies at least `confirm_z` standard deviations below them (infinite: no
/// such component stays); one whose peak reaches `seed` stays unless it lies less than
/// `sure_z` below them (0: always stays) — the network is sure of it, but a lesion the CT does
/// not show at all is not one. A component with no room for copies is judged by its peak
/// alone. Returns the number of components turned into liver.
pub fn confirm_tumours(
    maps: &ProbabilityMaps,
    ct: &CtVolume,
    mask: &mut LabelVolume,
    seed: f32,
    confirm_z: f64,
    sure_z: f64,
) -> usize {
    let evidence = TumourEvidence::gather(maps, ct, mask, &[seed], confirm_z, sure_z);
    let drop = evidence.verdict(seed);
    evidence.apply(mask, &drop)
}

/// What [`confirm_tumours`] weighs, for one mask and any of several seed thresholds: the tumour
/// components, each one's peak probability and, where one of the seeds asks for it, its CT
/// contrast. A component's contrast does not depend on the seed, so calibration gathers it
/// once per tumour threshold and judges every seed from it.
pub struct TumourEvidence {
    comps: lesions::Components,
    peak: Vec<f32>,
    z: Vec<Option<f64>>,
    confirm_z: f64,
    sure_z: f64,
}

impl TumourEvidence {
    /// The evidence on `mask`'s tumour components that the verdicts for `seeds` need.
    pub fn gather(
        maps: &ProbabilityMaps,
        ct: &CtVolume,
        mask: &LabelVolume,
        seeds: &[f32],
        confirm_z: f64,
        sure_z: f64,
    ) -> Self {
        let ny = mask.geometry().shape()[1];
        let comps = lesions::tumour_components(mask);
        // Peaks are only compared with the seeds: a run stops once it reaches the highest.
        let top = seeds.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut peak = vec![0.0f32; comps.count() + 1];
        for (r, l) in comps.runs() {
            let (y, k) = (r.row as usize % ny, r.row as usize / ny);
            let p = &mut peak[l as usize];
            for x in r.start as usize..r.end as usize {
                if *p >= top {
                    break;
                }
                *p = p.max(probability_at(maps, 2, x, y, k));
            }
        }
        let asked = |l: u32| {
            seeds.iter().any(|&seed| {
                let n = if peak[l as usize] < seed {
                    Some(confirm_z)
                } else {
                    (sure_z > 0.0).then_some(sure_z)
                };
                n.is_some_and(|n| n.is_finite())
            })
        };
        let z = lesions::contrast_z(mask, ct, &comps, |l| l > 0 && asked(l));
        TumourEvidence {
            comps,
            peak,
            z,
            confirm_z,
            sure_z,
        }
    }

    /// Which components go (by label; index 0 unused) with seed threshold `seed`, one of the
    /// seeds the evidence was gathered for: a weak one stays only where the CT confirms it
    /// (none with an infinite `confirm_z`), a sure one goes only where the CT refutes it (none
    /// with `sure_z` 0).
    pub fn verdict(&self, seed: f32) -> Vec<bool> {
        let (confirm_z, sure_z) = (self.confirm_z, self.sure_z);
        let z = |l: usize, n: f64| if n.is_finite() { self.z[l] } else { None };
        (0..=self.comps.count())
            .map(|l| {
                if l == 0 {
                    false
                } else if self.peak[l] < seed {
                    !z(l, confirm_z).is_some_and(|z| z >= confirm_z)
                } else {
                    sure_z > 0.0 && z(l, sure_z).is_some_and(|z| z < sure_z)
                }
            })
            .collect()
    }

    /// Turns the components `drop` marks into liver; returns how many.
    pub fn apply(&self, mask: &mut LabelVolume, drop: &[bool]) -> usize {
        self.comps
            .fill(mask.labels_mut(), |l| drop[l as usize], label::LIVER);
        drop.iter().filter(|&&d| d).count()
    }
}

/// The two grid nodes around working-volume position `p` (pixels) of a grid starting at
/// `origin` with spacing `s` and `n` nodes, and the weight of the second; None outside the
/// grid.
fn lerp_cell(p: f32, origin: usize, s: f32, n: usize) -> Option<Cell> {
    let f = (p - origin as f32) / s;
    if f < 0.0 || f > (n - 1) as f32 + 1e-4 {
        return None;
    }
    let i0 = (f.floor() as usize).min(n.saturating_sub(2));
    Some((i0, (i0 + 1).min(n - 1), (f - i0 as f32).min(1.0)))
}

/// Segments a CT volume: probabilities, reassembly, post-processing.
pub fn segment(
    net: &Classifier,
    ct: &CtVolume,
    opts: &InferOptions,
    device: Device,
) -> LabelVolume {
    let maps = probabilities(net, ct, opts, device);
    let t = opts
        .tumour_threshold
        .unwrap_or_else(|| net.tumour_threshold());
    let seed = opts
        .tumour_seed_threshold
        .unwrap_or_else(|| net.tumour_seed_threshold());
    mask_from(&maps, ct, opts, t, seed, net.false_positive_filter(opts))
}

/// Reassembly and post-processing of computed probabilities; `filter`: a false-positive
/// filter and its neighbours.
pub fn mask_from(
    maps: &ProbabilityMaps,
    ct: &CtVolume,
    opts: &InferOptions,
    tumour_threshold: f32,
    tumour_seed_threshold: f32,
    filter: Option<(&lesions::FalsePositiveFilter, usize)>,
) -> LabelVolume {
    let mut mask = candidates(maps, ct, opts, tumour_threshold, tumour_seed_threshold);
    if let Some((f, k)) = filter {
        lesions::drop_false_positives(&mut mask, ct, f, k);
    }
    // Last, each remaining lesion's outline is redrawn as the one of least energy.
    if lesions::regularise_tumour_outlines(&mut mask, ct, opts.tumour_smooth) > 0 {
        lesions::drop_fat_tumours(&mut mask, ct);
        lesions::drop_small_tumours(&mut mask, opts.min_tumour_ml);
    }
    mask
}

/// Reassembly and every post-processing step before the false-positive filter: the tumour
/// components the filter judges (and its exemplars are made of).
pub fn candidates(
    maps: &ProbabilityMaps,
    ct: &CtVolume,
    opts: &InferOptions,
    tumour_threshold: f32,
    tumour_seed_threshold: f32,
) -> LabelVolume {
    let mut mask = thresholded(maps, ct, opts, tumour_threshold);
    confirm_tumours(
        maps,
        ct,
        &mut mask,
        tumour_seed_threshold,
        opts.tumour_confirm_z,
        opts.tumour_sure_z,
    );
    after_confirmation(mask, ct, opts)
}

/// The first steps of [`candidates`], which the seed threshold does not enter: reassembly
/// at `tumour_threshold`, the largest liver, tumour near it.
pub fn thresholded(
    maps: &ProbabilityMaps,
    ct: &CtVolume,
    opts: &InferOptions,
    tumour_threshold: f32,
) -> LabelVolume {
    let labels = reassemble(maps, ct.geometry().shape(), tumour_threshold);
    let mut mask = LabelVolume::new(ct.geometry().clone(), labels).expect("labels match the grid");
    lesions::keep_largest_liver(&mut mask);
    lesions::drop_tumour_outside_liver(&mut mask, opts.tumour_margin_mm);
    mask
}

/// The steps of [`candidates`] after the CT's say on each component ([`confirm_tumours`]):
/// they depend on the mask alone, not on the probabilities.
pub fn after_confirmation(
    mut mask: LabelVolume,
    ct: &CtVolume,
    opts: &InferOptions,
) -> LabelVolume {
    lesions::drop_end_slice_tumours(&mut mask, opts.max_end_slice_share);
    lesions::find_missed_lesions(&mut mask, ct, opts.tumour_detect_z);
    lesions::refine_tumour_extents(&mut mask, ct, opts.tumour_refine_mm);
    lesions::drop_fat_tumours(&mut mask, ct);
    lesions::drop_body_wall_tumours(&mut mask, ct);
    lesions::drop_extrahepatic_tumours(&mut mask, opts.max_outside_share);
    lesions::drop_small_tumours(&mut mask, opts.min_tumour_ml);
    mask
}

#[cfg(test)]
impl ProbabilityMaps {
    /// Maps of nu × nv × nz nodes every 2 pixels from the study's first pixel, on its own
    /// pixels (tests).
    pub(crate) fn stride_two(nu: usize, nv: usize, nz: usize, probs: [Vec<f32>; 3]) -> Self {
        ProbabilityMaps {
            stride: 2,
            scale: [1.0, 1.0],
            x0: 0,
            y0: 0,
            nu,
            nv,
            nz,
            probs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    /// An axis-aligned grid at the origin.
    fn grid(shape: [usize; 3], spacing: [f64; 3]) -> Geometry {
        let axes = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        Geometry::new(shape, spacing, axes, [0.0; 3]).unwrap()
    }

    /// Stride-2 maps of nu × nv × nz nodes: tumour `p`, liver 1 − p, no background.
    fn maps(nu: usize, nv: usize, nz: usize, p: Vec<f32>) -> ProbabilityMaps {
        let probs = [vec![0.0; p.len()], p.iter().map(|p| 1.0 - p).collect(), p];
        ProbabilityMaps::stride_two(nu, nv, nz, probs)
    }

    #[test]
    fn hysteresis_keeps_lesions_whose_peak_is_confident() {
        // A 12 × 4 × 1 strip: liver, with two tumour components (x 1..=3 and x 7..=9) whose
        // tumour probabilities peak at 0.95 and 0.6; maps on a stride-2 grid.
        let g = grid([12, 4, 1], [1.0, 1.0, 1.0]);
        let tumour = |x: usize| (1..=3).contains(&x) || (7..=9).contains(&x);
        let labels = (0..g.len())
            .map(|i| {
                if tumour(i % 12) {
                    label::TUMOUR
                } else {
                    label::LIVER
                }
            })
            .collect();
        let (nu, nv) = (6, 2);
        let p2: Vec<f32> = (0..nu * nv)
            .map(|i| match i % nu {
                1 => 0.95,
                4 => 0.6,
                _ => 0.1,
            })
            .collect();
        let maps = maps(nu, nv, 1, p2);
        let ct = CtVolume::new(g.clone(), vec![60.0; g.len()]).unwrap();
        let mut strong = LabelVolume::new(g.clone(), labels).unwrap();
        let mut weak = strong.clone();
        assert_eq!(
            confirm_tumours(&maps, &ct, &mut strong, 0.9, f64::INFINITY, 0.0),
            1
        );
        let row: Vec<u8> = strong.labels()[..12].to_vec();
        assert_eq!(row, [1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]);
        // A seed both reach keeps both.
        assert_eq!(
            confirm_tumours(&maps, &ct, &mut weak, 0.5, f64::INFINITY, 0.0),
            0
        );
        assert_eq!(weak.labels().iter().filter(|&&v| v == 2).count(), 24);
    }

    #[test]
    fn the_ct_keeps_a_weak_component_that_is_clearly_darker_and_drops_a_sure_one_it_does_not_show()
    {
        // A 40 × 40 × 4 liver of 60 ± 10 HU with two tumour components whose probability
        // peaks at 0.6 (below the seed of 0.9): one 30 HU darker than the liver, one not.
        let g = grid([40, 40, 4], [1.0, 1.0, 2.0]);
        let at = |i: usize| (i % 40, (i / 40) % 40, i / 1600);
        let dark = |i: usize| {
            let (x, y, z) = at(i);
            (6..10).contains(&x) && (6..10).contains(&y) && (1..3).contains(&z)
        };
        let plain = |i: usize| {
            let (x, y, z) = at(i);
            (26..30).contains(&x) && (26..30).contains(&y) && (1..3).contains(&z)
        };
        let labels = (0..g.len())
            .map(|i| {
                if dark(i) || plain(i) {
                    label::TUMOUR
                } else {
                    label::LIVER
                }
            })
            .collect();
        let mut rng = crate::volume::phantom::Rng::new(3, 0);
        let hu = (0..g.len())
            .map(|i| (if dark(i) { 30.0 } else { 60.0 }) + rng.range(-10.0, 10.0) as f32)
            .collect();
        let ct = CtVolume::new(g.clone(), hu).unwrap();
        let maps = maps(20, 20, 4, vec![0.6; 20 * 20 * 4]);
        let mut mask = LabelVolume::new(g.clone(), labels).unwrap();
        let mut unconfirmed = mask.clone();
        assert_eq!(confirm_tumours(&maps, &ct, &mut mask, 0.9, 3.5, 0.0), 1);
        assert!((0..g.len()).all(|i| (mask.labels()[i] == label::TUMOUR) == dark(i)));
        // Without confirmation both go.
        let mut sure = unconfirmed.clone();
        assert_eq!(
            confirm_tumours(&maps, &ct, &mut unconfirmed, 0.9, f64::INFINITY, 0.0),
            2
        );
        // Both sure of (peak above the seed): the one the CT does not show goes all the same,
        // unless the test is off.
        let mut sure_off = sure.clone();
        assert_eq!(confirm_tumours(&maps, &ct, &mut sure, 0.5, 3.5, 2.0), 1);
        assert!((0..g.len()).all(|i| (sure.labels()[i] == label::TUMOUR) == dark(i)));
        assert_eq!(confirm_tumours(&maps, &ct, &mut sure_off, 0.5, 3.5, 0.0), 0);
    }
}
