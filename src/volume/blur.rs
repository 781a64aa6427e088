//! Separable Gaussian blur with edge replication.

use rayon::prelude::*;

/// How many voxels on each side of a voxel its blurred value reads (σ in voxels).
pub fn kernel_radius(sigma: f64) -> usize {
    if sigma < 0.25 {
        0
    } else {
        (3.0 * sigma).ceil() as usize
    }
}

/// Normalised Gaussian weights out to 3σ (σ in voxels); a single 1 below σ 0.25.
fn kernel(sigma: f64) -> Vec<f32> {
    if sigma < 0.25 {
        return vec![1.0];
    }
    let r = kernel_radius(sigma) as i64;
    let k: Vec<f64> = (-r..=r)
        .map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.iter().map(|v| (v / s) as f32).collect()
}

/// Root of the sum of squared weights of the separable kernel (noise gain).
pub(crate) fn kernel_norm(sigma: [f64; 3]) -> f64 {
    sigma
        .iter()
        .map(|&s| kernel(s).iter().map(|&w| (w as f64).powi(2)).sum::<f64>())
        .product::<f64>()
        .sqrt()
}

/// Separable Gaussian blur of a volume in Fortran order (σ in voxels per axis), edges
/// replicated.
pub fn gaussian_blur(data: Vec<f32>, shape: [usize; 3], sigma: [f64; 3]) -> Vec<f32> {
    let [nx, ny, nz] = shape;
    let plane = nx * ny;
    let mut data = data;
    // x: along rows.
    let kx = kernel(sigma[0]);
    if kx.len() > 1 {
        let r = (kx.len() / 2) as isize;
        let src = data.clone();
        data.par_chunks_mut(nx)
            .zip(src.par_chunks(nx))
            .for_each(|(out, row)| {
                for (i, o) in out.iter_mut().enumerate() {
                    let mut acc = 0.0;
                    for (t, &w) in kx.iter().enumerate() {
                        let x = (i as isize + t as isize - r).clamp(0, nx as isize - 1) as usize;
                        acc += w * row[x];
                    }
                    *o = acc;
                }
            });
    }
    // y: whole rows at a time within each slice.
    let ky = kernel(sigma[1]);
    if ky.len() > 1 {
        let r = (ky.len() / 2) as isize;
        let src = data.clone();
        data.par_chunks_mut(plane)
            .zip(src.par_chunks(plane))
            .for_each(|(out, sl)| {
                for j in 0..ny {
                    let o = &mut out[j * nx..(j + 1) * nx];
                    o.fill(0.0);
                    for (t, &w) in ky.iter().enumerate() {
                        let y = (j as isize + t as isize - r).clamp(0, ny as isize - 1) as usize;
                        for (a, &b) in o.iter_mut().zip(&sl[y * nx..(y + 1) * nx]) {
                            *a += w * b;
                        }
                    }
                }
            });
    }
    // z: whole slices at a time.
    let kz = kernel(sigma[2]);
    if kz.len() > 1 && nz > 1 {
        let r = (kz.len() / 2) as isize;
        let src = data.clone();
        data.par_chunks_mut(plane).enumerate().for_each(|(k, out)| {
            out.fill(0.0);
            for (t, &w) in kz.iter().enumerate() {
                let z = (k as isize + t as isize - r).clamp(0, nz as isize - 1) as usize;
                for (a, &b) in out.iter_mut().zip(&src[z * plane..(z + 1) * plane]) {
                    *a += w * b;
                }
            }
        });
    }
    data
}
