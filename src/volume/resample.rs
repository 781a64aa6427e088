//! In-plane resampling of volumes to given pixel sizes (slices stay as they are), so that a
//! network sees every study at a pixel size it was trained on.
//!
//! Pixel (0, 0) of every slice keeps its place; output pixel i lies at native pixel i·r with
//! r = target / native spacing. Intensities are interpolated with a tent filter widened to r
//! native pixels when r > 1 (area-weighted, so downsampling averages noise instead of
//! aliasing it); labels take the nearest native pixel.

use rayon::prelude::*;

use super::{CtVolume, Geometry, LabelVolume};

/// Native/target pixel ratios closer to 1 than this leave an axis as it is.
const SAME: f64 = 0.01;

/// The grid of `g` resampled in-plane to pixels of `pixel_mm` (x, y), and the ratio r (native
/// pixels per output pixel) of x and y; None when both axes already have those pixel sizes.
pub fn in_plane_grid(g: &Geometry, pixel_mm: [f64; 2]) -> Option<(Geometry, [f64; 2])> {
    let [nx, ny, _] = g.shape();
    let s = g.spacing_mm();
    let r = [pixel_mm[0] / s[0], pixel_mm[1] / s[1]];
    if r.iter().all(|r| (r - 1.0).abs() < SAME) {
        return None;
    }
    let r = r.map(|r| if (r - 1.0).abs() < SAME { 1.0 } else { r });
    let n = |n: usize, r: f64| ((n - 1) as f64 / r + 1e-9).floor() as usize + 1;
    Some((g.rescaled_in_plane([n(nx, r[0]), n(ny, r[1])], r), r))
}

/// One output pixel's source pixels: the first index and the weights from it on.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// Tent-filter taps for `n_out` output pixels at native positions i·r over `n_in` pixels.
fn taps(n_in: usize, n_out: usize, r: f64) -> Vec<Taps> {
    let a = r.max(1.0);
    (0..n_out)
        .map(|i| {
            let c = i as f64 * r;
            let lo = ((c - a).ceil().max(0.0)) as usize;
            let hi = ((c + a).floor() as usize).min(n_in - 1);
            let mut weights: Vec<f32> = (lo..=hi)
                .map(|j| (1.0 - (j as f64 - c).abs() / a).max(0.0) as f32)
                .collect();
            let sum: f32 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                // c sits exactly on pixel lo (a = 1): the tent is 1 there.
                weights = vec![1.0];
            }
            Taps { start: lo, weights }
        })
        .collect()
}

impl CtVolume {
    /// This volume with in-plane pixels of `pixel_mm` (x, y; see the module notes); a copy when
    /// it has them already.
    pub fn resample_in_plane(&self, pixel_mm: [f64; 2]) -> CtVolume {
        let Some((g, r)) = in_plane_grid(self.geometry(), pixel_mm) else {
            return self.clone();
        };
        let [nx, ny, nz] = self.geometry().shape();
        let [mx, my, _] = g.shape();
        let (tx, ty) = (taps(nx, mx, r[0]), taps(ny, my, r[1]));
        let mut hu = vec![0.0f32; mx * my * nz];
        hu.par_chunks_mut(mx * my)
            .zip(self.hu().par_chunks(nx * ny))
            .for_each(|(out, src)| {
                // Along x for every native row, then along y.
                let mut rows = vec![0.0f32; mx * ny];
                for y in 0..ny {
                    let row = &src[y * nx..(y + 1) * nx];
                    for (x, t) in tx.iter().enumerate() {
                        rows[y * mx + x] = t
                            .weights
                            .iter()
                            .zip(&row[t.start..])
                            .map(|(w, v)| w * v)
                            .sum();
                    }
                }
                for (y, t) in ty.iter().enumerate() {
                    let dst = &mut out[y * mx..(y + 1) * mx];
                    for (j, w) in t.weights.iter().enumerate() {
                        let row = &rows[(t.start + j) * mx..(t.start + j + 1) * mx];
                        dst.iter_mut().zip(row).for_each(|(d, v)| *d += w * v);
                    }
                }
            });
        CtVolume::new(g, hu).expect("one value per voxel")
    }
}

impl LabelVolume {
    /// This mask with in-plane pixels of `pixel_mm` (x, y), each taking the label of the
    /// nearest native pixel; a copy when it has them already.
    pub fn resample_in_plane(&self, pixel_mm: [f64; 2]) -> LabelVolume {
        let Some((g, r)) = in_plane_grid(self.geometry(), pixel_mm) else {
            return self.clone();
        };
        let [nx, ny, nz] = self.geometry().shape();
        let [mx, my, _] = g.shape();
        let near = |i: usize, r: f64, n: usize| ((i as f64 * r).round() as usize).min(n - 1);
        let xs: Vec<usize> = (0..mx).map(|i| near(i, r[0], nx)).collect();
        let mut labels = vec![0u8; mx * my * nz];
        labels
            .par_chunks_mut(mx * my)
            .zip(self.labels().par_chunks(nx * ny))
            .for_each(|(out, src)| {
                for y in 0..my {
                    let row = &src[near(y, r[1], ny) * nx..][..nx];
                    for (x, &sx) in xs.iter().enumerate() {
                        out[y * mx + x] = row[sx];
                    }
                }
            });
        LabelVolume::new(g, labels).expect("labels of the source")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(shape: [usize; 3], spacing: [f64; 3]) -> Geometry {
        Geometry::new(
            shape,
            spacing,
            [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],
            [10.0, 20.0, -30.0],
        )
        .unwrap()
    }

    #[test]
    fn downsampling_keeps_world_positions_and_averages() {
        // 0.5 mm pixels to 1.5 mm: 31 → 11 pixels; pixel i of the output sits where native
        // pixel 3i sat, in world space too.
        let g = grid([31, 10, 2], [0.5, 0.5, 4.0]);
        let hu: Vec<f32> = (0..g.len()).map(|i| (i % 31) as f32 * 10.0).collect();
        let ct = CtVolume::new(g.clone(), hu).unwrap();
        let out = ct.resample_in_plane([1.5; 2]);
        assert_eq!(out.geometry().shape(), [11, 4, 2]);
        assert_eq!(out.geometry().spacing_mm(), [1.5, 1.5, 4.0]);
        for (i, j) in [(0usize, 0usize), (5, 3), (10, 1)] {
            let a = out.geometry().voxel_to_world([i as f64, j as f64, 1.0]);
            let b = g.voxel_to_world([3.0 * i as f64, 3.0 * j as f64, 1.0]);
            for d in 0..3 {
                assert!((a[d] - b[d]).abs() < 1e-9, "{a:?} vs {b:?}");
            }
        }
        // A linear ramp stays linear inside (the tent is symmetric): 30 HU per output pixel.
        for x in 1..10 {
            assert!(
                (out.hu()[x] - 30.0 * x as f32).abs() < 1e-3,
                "{}",
                out.hu()[x]
            );
        }
        // Noise is averaged: alternating ±100 HU along x averages down.
        let g = grid([61, 4, 1], [0.5, 0.5, 4.0]);
        let alt: Vec<f32> = (0..g.len())
            .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
            .collect();
        let out = CtVolume::new(g, alt).unwrap().resample_in_plane([1.5; 2]);
        assert!(out.hu()[5..15].iter().all(|v| v.abs() < 20.0));
    }

    #[test]
    fn upsampling_interpolates_and_labels_take_the_nearest_pixel() {
        let g = grid([5, 5, 1], [2.0, 2.0, 5.0]);
        let hu: Vec<f32> = (0..25).map(|i| (i % 5) as f32 * 100.0).collect();
        let out = CtVolume::new(g.clone(), hu)
            .unwrap()
            .resample_in_plane([1.0; 2]);
        assert_eq!(out.geometry().shape(), [9, 9, 1]);
        assert!((out.hu()[3] - 150.0).abs() < 1e-3);
        let labels: Vec<u8> = (0..25).map(|i| u8::from(i % 5 >= 3)).collect();
        let m = LabelVolume::new(g, labels)
            .unwrap()
            .resample_in_plane([1.0; 2]);
        // Native x = 3 is output x = 6; output 5 lies at native 2.5, which rounds to 3.
        assert_eq!(&m.labels()[..9], &[0, 0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn the_same_pixel_size_is_left_alone() {
        let g = grid([8, 8, 1], [1.5, 1.505, 3.0]);
        assert!(in_plane_grid(&g, [1.5; 2]).is_none());
        let ct = CtVolume::new(g, vec![7.0; 64]).unwrap();
        assert_eq!(ct.resample_in_plane([1.5; 2]).hu(), ct.hu());
    }
}
