//! Exact Euclidean distance transform with anisotropic spacing (Felzenszwalb & Huttenlocher,
//! "Distance Transforms of Sampled Functions", 2012): one lower envelope of parabolas per line,
//! separably along x, y and z. Linear time in the number of voxels.

use rayon::prelude::*;

/// Squared distance in mm² from each voxel to the nearest feature voxel (`f64::INFINITY`
/// where there is none). `features` is in Fortran order on a grid of `shape`.
pub fn squared_distance(features: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [nx, ny, nz] = shape;
    assert_eq!(
        features.len(),
        nx * ny * nz,
        "features do not match the shape"
    );
    let mut d: Vec<f64> = features
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let plane = nx * ny;
    // x: contiguous rows.
    d.par_chunks_mut(nx).for_each_init(
        || Scratch::new(nx),
        |s, row| transform_line(row, spacing[0] * spacing[0], s),
    );
    // y: columns within each slice.
    if ny > 1 {
        d.par_chunks_mut(plane).for_each_init(
            || (Scratch::new(ny), vec![0.0; ny]),
            |(s, line), sl| {
                for i in 0..nx {
                    for j in 0..ny {
                        line[j] = sl[i + nx * j];
                    }
                    transform_line(line, spacing[1] * spacing[1], s);
                    for j in 0..ny {
                        sl[i + nx * j] = line[j];
                    }
                }
            },
        );
    }
    // z: gather lines across slices, in blocks of x so that each block is independent.
    if nz > 1 {
        let w2 = spacing[2] * spacing[2];
        let src = d.clone();
        let columns: Vec<(usize, Vec<f64>)> = (0..plane)
            .into_par_iter()
            .map_init(
                || Scratch::new(nz),
                |s, p| {
                    let mut line: Vec<f64> = (0..nz).map(|k| src[p + plane * k]).collect();
                    if line.iter().any(|v| v.is_finite()) {
                        transform_line(&mut line, w2, s);
                    }
                    (p, line)
                },
            )
            .collect();
        for (p, line) in columns {
            for (k, v) in line.into_iter().enumerate() {
                d[p + plane * k] = v;
            }
        }
    }
    d
}

struct Scratch {
    v: Vec<usize>,
    z: Vec<f64>,
    out: Vec<f64>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Scratch {
            v: vec![0; n],
            z: vec![0.0; n + 1],
            out: vec![0.0; n],
        }
    }
}

/// In place: f(q) → min_p (w2·(q − p)² + f(p)).
fn transform_line(f: &mut [f64], w2: f64, s: &mut Scratch) {
    let n = f.len();
    // Parabolas only from finite samples.
    let mut k: usize = 0;
    let mut started = false;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        if !started {
            s.v[0] = q;
            s.z[0] = f64::NEG_INFINITY;
            s.z[1] = f64::INFINITY;
            started = true;
            continue;
        }
        loop {
            let p = s.v[k];
            let sx = ((f[q] + w2 * (q * q) as f64) - (f[p] + w2 * (p * p) as f64))
                / (2.0 * w2 * (q as f64 - p as f64));
            if sx <= s.z[k] {
                if k == 0 {
                    // Cannot happen for finite inputs with z[0] = -inf; kept for safety.
                    break;
                }
                k -= 1;
            } else {
                k += 1;
                s.v[k] = q;
                s.z[k] = sx;
                s.z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    if !started {
        return; // no feature on this line: stays infinite
    }
    let mut j = 0;
    for q in 0..n {
        while s.z[j + 1] < q as f64 {
            j += 1;
        }
        let p = s.v[j];
        let dq = q as f64 - p as f64;
        s.out[q] = w2 * dq * dq + f[p];
    }
    f.copy_from_slice(&s.out[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::phantom::Rng;

    #[test]
    fn matches_brute_force_with_anisotropic_spacing() {
        let mut rng = Rng::new(3, 3);
        for case in 0..40 {
            let shape = [1 + rng.below(9), 1 + rng.below(8), 1 + rng.below(7)];
            let spacing = [
                rng.range(0.3, 2.0),
                rng.range(0.3, 2.0),
                rng.range(0.5, 5.0),
            ];
            let n: usize = shape.iter().product();
            let density = rng.range(0.0, 0.3);
            let feat: Vec<bool> = (0..n).map(|_| rng.unit() < density).collect();
            let got = squared_distance(&feat, shape, spacing);
            let coords = |i: usize| {
                [
                    i % shape[0],
                    (i / shape[0]) % shape[1],
                    i / (shape[0] * shape[1]),
                ]
            };
            for (a, &g) in got.iter().enumerate() {
                let ca = coords(a);
                let mut best = f64::INFINITY;
                for b in (0..n).filter(|&b| feat[b]) {
                    let cb = coords(b);
                    let d: f64 = (0..3)
                        .map(|t| ((ca[t] as f64 - cb[t] as f64) * spacing[t]).powi(2))
                        .sum();
                    best = best.min(d);
                }
                if best.is_infinite() {
                    assert!(g.is_infinite(), "case {case}");
                } else {
                    assert!(
                        (g - best).abs() <= 1e-9 * (1.0 + best),
                        "case {case} voxel {a}: {g} vs {best}"
                    );
                }
            }
        }
    }
}
