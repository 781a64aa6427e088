//! Surface distances as MedPy computes them (`__surface_distances`, connectivity 1), exactly,
//! but only inside the bounding box of the two masks.
//!
//! The surface of a mask is the mask minus its erosion by the 6-neighbourhood, with outside the
//! array counted as background. Every surface voxel of either mask lies in the union of the two
//! masks' bounding boxes, and outside that box everything is background, so surfaces and exact
//! Euclidean distances computed on the box equal those on the whole array.

use rayon::prelude::*;

use crate::volume::crop::bounding_box;
use crate::volume::edt::squared_distance;

/// Pooled surface-distance statistics (mm).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SurfaceStats {
    pub assd: f64,
    pub mssd: f64,
    pub hd95: f64,
    pub rmsd: f64,
}

/// Distances from each surface voxel of P to T's surface and from each of T to P's, pooled.
/// None when either structure is empty.
pub fn surface_distances<F>(
    truth: &[u8],
    pred: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    is_in: F,
) -> Option<Vec<f64>>
where
    F: Fn(u8) -> bool + Sync,
{
    let bt = bounding_box(truth, shape, &is_in)?;
    let bp = bounding_box(pred, shape, &is_in)?;
    let lo = [0, 1, 2].map(|t| bt.0[t].min(bp.0[t]));
    let hi = [0, 1, 2].map(|t| bt.1[t].max(bp.1[t]));
    let b = [hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, hi[2] - lo[2] + 1];
    let crop = |v: &[u8]| -> Vec<bool> {
        let [nx, ny, _] = shape;
        let mut out = vec![false; b[0] * b[1] * b[2]];
        out.par_chunks_mut(b[0] * b[1])
            .enumerate()
            .for_each(|(z, sl)| {
                for y in 0..b[1] {
                    let src = lo[0] + nx * ((lo[1] + y) + ny * (lo[2] + z));
                    for x in 0..b[0] {
                        sl[x + b[0] * y] = is_in(v[src + x]);
                    }
                }
            });
        out
    };
    let t = crop(truth);
    let p = crop(pred);
    let st = surface(&t, b);
    let sp = surface(&p, b);
    let dt = squared_distance(&st, b, spacing);
    let dp = squared_distance(&sp, b, spacing);
    let mut out: Vec<f64> = sp
        .par_iter()
        .zip(dt.par_iter())
        .filter(|(s, _)| **s)
        .map(|(_, d)| d.sqrt())
        .collect();
    out.par_extend(
        st.par_iter()
            .zip(dp.par_iter())
            .filter(|(s, _)| **s)
            .map(|(_, d)| d.sqrt()),
    );
    Some(out)
}

/// ASSD (mean), MSSD (max), HD95 (numpy's linear percentile) and RMSD of a pooled list.
pub fn stats(mut d: Vec<f64>) -> Option<SurfaceStats> {
    if d.is_empty() {
        return None;
    }
    let n = d.len();
    let sum: f64 = d.iter().sum();
    let sum2: f64 = d.iter().map(|v| v * v).sum();
    let mssd = d.iter().cloned().fold(0.0, f64::max);
    let hd95 = percentile(&mut d, 95.0);
    Some(SurfaceStats {
        assd: sum / n as f64,
        mssd,
        hd95,
        rmsd: (sum2 / n as f64).sqrt(),
    })
}

/// numpy's `percentile` with linear interpolation between closest ranks.
pub fn percentile(d: &mut [f64], q: f64) -> f64 {
    let n = d.len();
    let pos = (n - 1) as f64 * q / 100.0;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut a, rest) = d.select_nth_unstable_by(lo, f64::total_cmp);
    if frac == 0.0 || rest.is_empty() {
        return a;
    }
    let b = rest.iter().cloned().fold(f64::INFINITY, f64::min);
    a + (b - a) * frac
}

/// mask XOR erosion(mask) with the 6-neighbourhood; outside the box is background.
fn surface(m: &[bool], b: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = b;
    let plane = nx * ny;
    let mut out = vec![false; m.len()];
    out.par_chunks_mut(plane).enumerate().for_each(|(z, sl)| {
        for y in 0..ny {
            for x in 0..nx {
                let i = x + nx * (y + ny * z);
                if !m[i] {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && m[i - 1]
                    && m[i + 1]
                    && m[i - nx]
                    && m[i + nx]
                    && m[i - plane]
                    && m[i + plane];
                sl[x + nx * y] = !interior;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy() {
        // numpy.percentile([1, 2, 3, 4], 95) = 3.85; of [5] = 5; of [0, 10] = 9.5
        assert!((percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&mut [5.0], 95.0), 5.0);
        assert!((percentile(&mut [10.0, 0.0], 95.0) - 9.5).abs() < 1e-12);
    }

    #[test]
    fn surface_of_a_cube_is_its_shell() {
        let b = [5, 5, 5];
        let m = vec![true; 125];
        let s = surface(&m, b);
        assert_eq!(s.iter().filter(|&&v| v).count(), 125 - 27);
    }
}
