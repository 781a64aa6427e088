//! A tumour component and its surroundings, copied out of the volume into a box: what the two
//! steps that redraw a lesion from the CT (`refine`, `regularise`) share — the mask's
//! components as drawn before the step (`Drawn`), and for each (`Surroundings`) the liver
//! around it, which voxels it may take, and which parts of a new extent carry it.

use super::Components;
use super::postprocess::{median, tumour_components};
use crate::lesions::Connectivity;
use crate::volume::edt::squared_distance;
use crate::volume::{CtVolume, LabelVolume, label};

/// The liver a component is compared with: parenchyma (label 1) in its own slices, more than
/// `SHELL_MM.0` and at most `SHELL_MM.1` millimetres from it in-plane.
pub(super) const SHELL_MM: (f64, f64) = (3.0, 7.0);
/// Fewest shell voxels for a reference.
pub(super) const SHELL_MIN_VOXELS: usize = 20;
/// Least contrast (HU) between the shell's and the component's medians for a redrawing.
pub(super) const MIN_CONTRAST_HU: f32 = 5.0;
/// A part of a new extent carries the component when its overlap with it is at least 1/this
/// of the largest part's …
const CARRY_SHARE_DIVISOR: usize = 4;
/// … or at least this volume (mm³): a second lesion the network drew as one with the first.
const CARRY_MIN_MM3: f64 = 300.0;

/// A box of the volume: origin and shape.
pub(super) struct Box3 {
    lo: [usize; 3],
    pub(super) shape: [usize; 3],
}

impl Box3 {
    /// The bounds `lo..=hi` grown by `margin(axis)` voxels, clipped to the volume.
    fn around(
        lo: [usize; 3],
        hi: [usize; 3],
        volume: [usize; 3],
        margin: impl Fn(usize) -> usize,
    ) -> Self {
        let mut b = Box3 {
            lo: [0; 3],
            shape: [0; 3],
        };
        for t in 0..3 {
            let m = margin(t);
            b.lo[t] = lo[t].saturating_sub(m);
            b.shape[t] = (hi[t] + m).min(volume[t] - 1) + 1 - b.lo[t];
        }
        b
    }
    pub(super) fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Calls `f(box index, volume index)` for every voxel of the box, in Fortran order.
    pub(super) fn for_each(&self, volume: [usize; 3], mut f: impl FnMut(usize, usize)) {
        let [bx, by, bz] = self.shape;
        let mut i = 0;
        for z in 0..bz {
            for y in 0..by {
                let g = self.lo[0] + volume[0] * ((self.lo[1] + y) + volume[1] * (self.lo[2] + z));
                for x in 0..bx {
                    f(i, g + x);
                    i += 1;
                }
            }
        }
    }
}

/// A mask's tumour components as drawn before a redrawing step changes any of them: the
/// labels, each voxel's component and each component's bounds, and the grid.
pub(super) struct Drawn {
    count: u32,
    ids: Vec<u32>,
    labels: Vec<u8>,
    boxes: Vec<([usize; 3], [usize; 3])>,
    shape: [usize; 3],
    pub(super) spacing: [f64; 3],
    /// The length of a voxel's diagonal (mm).
    pub(super) diagonal: f64,
    voxel_mm3: f64,
}

impl Drawn {
    /// None when the mask holds no tumour.
    pub(super) fn new(mask: &LabelVolume) -> Option<Self> {
        let comps = tumour_components(mask);
        if comps.count() == 0 {
            return None;
        }
        let g = mask.geometry();
        let spacing = g.spacing_mm();
        Some(Self {
            count: comps.count() as u32,
            ids: comps.label_volume(),
            labels: mask.labels().to_vec(),
            boxes: comps.bounding_boxes(),
            shape: g.shape(),
            spacing,
            diagonal: spacing.iter().map(|s| s * s).sum::<f64>().sqrt(),
            voxel_mm3: g.voxel_volume_mm3(),
        })
    }

    /// The components, by label: 1 to their count.
    pub(super) fn components(&self) -> std::ops::RangeInclusive<u32> {
        1..=self.count
    }

    /// Component `l` in its bounds grown by `margin_mm` (and a voxel), clipped to the volume.
    pub(super) fn around(&self, l: u32, margin_mm: f64, ct: &CtVolume) -> Surroundings {
        let (lo, hi) = self.boxes[l as usize];
        let b = Box3::around(lo, hi, self.shape, |t| {
            (margin_mm / self.spacing[t]).ceil() as usize + 1
        });
        let n = b.len();
        let mut s = Surroundings {
            b,
            this: vec![false; n],
            rival: vec![false; n],
            labels: vec![0u8; n],
            hu: vec![0f32; n],
            in_plane: Vec::new(),
            volume: self.shape,
            spacing: self.spacing,
            diagonal: self.diagonal,
            voxel_mm3: self.voxel_mm3,
        };
        s.b.for_each(self.shape, |i, g| {
            let id = self.ids[g];
            s.this[i] = id == l;
            s.rival[i] = id != 0 && id != l;
            s.labels[i] = self.labels[g];
            s.hu[i] = ct.hu()[g];
        });
        let sp = self.spacing;
        s.in_plane = squared_distance(&s.this, s.b.shape, [sp[0], sp[1], 1e6]);
        s
    }
}

/// One component of a [`Drawn`] in box `b`: for every voxel of the box its CT value, its
/// label as drawn, whether it is the component's or another's, and its squared in-plane
/// distance (mm²) to the component.
pub(super) struct Surroundings {
    pub(super) b: Box3,
    pub(super) this: Vec<bool>,
    pub(super) rival: Vec<bool>,
    pub(super) labels: Vec<u8>,
    pub(super) hu: Vec<f32>,
    pub(super) in_plane: Vec<f64>,
    volume: [usize; 3],
    spacing: [f64; 3],
    diagonal: f64,
    voxel_mm3: f64,
}

impl Surroundings {
    /// CT values of the liver parenchyma in the component's slices, more than `mm.0` and at
    /// most `mm.1` from it in-plane; None with fewer than `SHELL_MIN_VOXELS`.
    pub(super) fn liver_values(&self, mm: (f64, f64)) -> Option<Vec<f32>> {
        let (r0, r1) = (mm.0 * mm.0, mm.1 * mm.1);
        let shell: Vec<f32> = (0..self.hu.len())
            .filter(|&i| {
                self.labels[i] == label::LIVER && self.in_plane[i] > r0 && self.in_plane[i] <= r1
            })
            .map(|i| self.hu[i])
            .collect();
        (shell.len() >= SHELL_MIN_VOXELS).then_some(shell)
    }

    /// The median of `liver_values`.
    pub(super) fn liver_median(&self, mm: (f64, f64)) -> Option<f32> {
        self.liver_values(mm).map(|mut v| median(&mut v))
    }

    /// The median CT value of the component.
    pub(super) fn lesion_median(&self) -> f32 {
        let mut own: Vec<f32> = (0..self.hu.len())
            .filter(|&i| self.this[i])
            .map(|i| self.hu[i])
            .collect();
        median(&mut own)
    }

    /// Which voxels the component may own: liver or tumour, and the component's own or nearer
    /// to it than to any other component by more than a voxel diagonal (two components never
    /// grow into touching, merging extents). Also returns the squared distances (mm²) to the
    /// component.
    pub(super) fn owned(&self) -> (Vec<bool>, Vec<f64>) {
        self.owned_or(|_| false)
    }

    /// `owned`, with the background voxels for which `background(i)` holds taken as liver.
    pub(super) fn owned_or(&self, background: impl Fn(usize) -> bool) -> (Vec<bool>, Vec<f64>) {
        let d_this = squared_distance(&self.this, self.b.shape, self.spacing);
        let d_rival = squared_distance(&self.rival, self.b.shape, self.spacing);
        let margin_mm = self.diagonal;
        let owned = (0..self.hu.len())
            .map(|i| {
                (self.labels[i] >= label::LIVER || background(i))
                    && (self.this[i] || d_this[i].sqrt() + margin_mm < d_rival[i].sqrt())
            })
            .collect();
        (owned, d_this)
    }

    /// The 26-connected parts of `extent` that carry the component: those overlapping it by
    /// at least a `CARRY_SHARE_DIVISOR`th of the largest overlap, or by `CARRY_MIN_MM3`. A
    /// part that only grazes it would become a speck of its own. None when no part overlaps.
    pub(super) fn carrying_parts(&self, extent: &[bool]) -> Option<Vec<bool>> {
        let bytes: Vec<u8> = extent.iter().map(|&v| u8::from(v)).collect();
        let parts = Components::label(&bytes, self.b.shape, |v| v == 1, Connectivity::TwentySix);
        let part = parts.label_volume();
        let mut overlap = vec![0usize; parts.count() + 1];
        for (i, &p) in part.iter().enumerate() {
            if self.this[i] && p != 0 {
                overlap[p as usize] += 1;
            }
        }
        let most = overlap.iter().copied().max().unwrap_or(0);
        (most > 0).then(|| {
            part.iter()
                .map(|&p| {
                    let o = overlap[p as usize];
                    p != 0
                        && (o * CARRY_SHARE_DIVISOR >= most
                            || o as f64 * self.voxel_mm3 >= CARRY_MIN_MM3)
                })
                .collect()
        })
    }

    /// The 26-connected parts of `extent` that hold a voxel of `seed`.
    pub(super) fn touching(&self, extent: &[bool], seed: &[bool]) -> Vec<bool> {
        let bytes: Vec<u8> = extent.iter().map(|&v| u8::from(v)).collect();
        let pieces = Components::label(&bytes, self.b.shape, |v| v == 1, Connectivity::TwentySix);
        let piece = pieces.label_volume();
        let mut keep = vec![false; pieces.count() + 1];
        for (&p, &s) in piece.iter().zip(seed) {
            if s && p != 0 {
                keep[p as usize] = true;
            }
        }
        piece.iter().map(|&p| p != 0 && keep[p as usize]).collect()
    }

    /// Writes the new extent: its voxels become tumour, the component's others liver.
    pub(super) fn write(&self, extent: &[bool], out: &mut [u8]) {
        self.b.for_each(self.volume, |i, g| {
            if extent[i] {
                out[g] = label::TUMOUR;
            } else if self.this[i] {
                out[g] = label::LIVER;
            }
        });
    }
}

/// A study for tests: 40 × 40 × 5 voxels of 1 × 1 × 2 mm, all liver at 60 HU but for
/// `hu(x, y, z)`, with tumour where `tumour(x, y, z)`.
#[cfg(test)]
pub(super) fn test_study(
    hu: impl Fn(usize, usize, usize) -> Option<f32>,
    tumour: impl Fn(usize, usize, usize) -> bool,
) -> (crate::volume::LabelVolume, CtVolume) {
    use crate::volume::{Geometry, LabelVolume};
    let g = Geometry::new(
        [40, 40, 5],
        [1.0, 1.0, 2.0],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [0.0; 3],
    )
    .unwrap();
    let (mut labels, mut values) = (vec![0u8; g.len()], vec![0f32; g.len()]);
    for z in 0..5 {
        for y in 0..40 {
            for x in 0..40 {
                let i = g.index(x, y, z);
                labels[i] = if tumour(x, y, z) {
                    label::TUMOUR
                } else {
                    label::LIVER
                };
                values[i] = hu(x, y, z).unwrap_or(60.0);
            }
        }
    }
    (
        LabelVolume::new(g.clone(), labels).unwrap(),
        CtVolume::new(g, values).unwrap(),
    )
}
