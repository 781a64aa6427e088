//! Synthetic abdominal CT studies with a known liver and tumour segmentation.
//!
//! Anatomy is a set of implicit shapes in patient coordinates (millimetres): `u` runs toward the
//! patient's left (image right in radiological view), `v` toward posterior (image bottom), `w`
//! toward superior. The body outline and organ positions are laid out on a nominal abdomen
//! (165 × 120 mm half-axes) and stretched to the study's body size. Each voxel centre is
//! classified (first matching structure wins), given a tissue value with texture, then the
//! image is blurred (partial volume) and correlated noise is added. See `docs/phantoms.md`.

use rayon::prelude::*;

use super::blur::{gaussian_blur, kernel_norm};
use super::{CtVolume, Geometry, LabelVolume, label};

/// What to generate.
#[derive(Clone, Debug)]
pub struct PhantomSpec {
    /// Voxels along x, y, z.
    pub shape: [usize; 3],
    /// In-plane and slice spacing in mm; chosen per study when `None` (field of view 310–460
    /// mm, slice thickness 1–5 mm).
    pub spacing_mm: Option<[f64; 3]>,
    /// Seed of the series; study `index` of seed `seed` is always the same study.
    pub seed: u64,
}

/// A planted lesion, as generated (before clipping to the liver).
#[derive(Clone, Debug)]
pub struct PlantedLesion {
    pub centre_mm: [f64; 3],
    pub diameter_mm: f64,
    pub kind: LesionKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LesionKind {
    Hypodense,
    LowContrast,
    RimEnhancing,
}

/// One generated study.
pub struct Phantom {
    pub ct: CtVolume,
    pub truth: LabelVolume,
    pub lesions: Vec<PlantedLesion>,
    /// Noise standard deviation in HU.
    pub noise_hu: f64,
}

/// Generates study `index` of the series `spec`.
pub fn generate(spec: &PhantomSpec, index: u64) -> Result<Phantom, String> {
    let [nx, ny, nz] = spec.shape;
    if nx < 16 || ny < 16 || nz < 1 {
        return Err(format!(
            "shape {nx}x{ny}x{nz}: a phantom needs at least 16x16 voxels per slice"
        ));
    }
    let mut rng = Rng::new(spec.seed, index);
    let spacing = match spec.spacing_mm {
        Some(s) => {
            if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(format!("spacing {s:?}: every spacing must be positive"));
            }
            s
        }
        None => {
            let fov = rng.range(310.0, 460.0);
            let lo = (150.0 / nz as f64).clamp(1.0, 5.0);
            let hi = (300.0 / nz as f64).clamp(1.0, 5.0);
            let dz = (rng.range(lo, hi) * 8.0).round() / 8.0;
            [fov / nx as f64, fov / ny as f64, dz.clamp(1.0, 5.0)]
        }
    };
    let anatomy = Anatomy::sample(&mut rng, spec.shape, spacing, index);
    let geometry = Geometry::new(
        spec.shape,
        spacing,
        [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],
        [
            (nx as f64 - 1.0) / 2.0 * spacing[0],
            (ny as f64 - 1.0) / 2.0 * spacing[1] + anatomy.table_shift,
            -(nz as f64 - 1.0) / 2.0 * spacing[2] - 400.0,
        ],
    )?;

    let plane = nx * ny;
    let mut hu = vec![0.0f32; geometry.len()];
    let mut labels = vec![0u8; geometry.len()];
    hu.par_chunks_mut(plane)
        .zip(labels.par_chunks_mut(plane))
        .enumerate()
        .for_each(|(k, (hs, ls))| {
            let w = (k as f64 - (nz as f64 - 1.0) / 2.0) * spacing[2];
            for j in 0..ny {
                let v = (j as f64 - (ny as f64 - 1.0) / 2.0) * spacing[1];
                for i in 0..nx {
                    let u = (i as f64 - (nx as f64 - 1.0) / 2.0) * spacing[0];
                    let (h, l) = anatomy.tissue(u, v, w);
                    hs[i + nx * j] = h as f32;
                    ls[i + nx * j] = l;
                }
            }
        });

    // Partial-volume blur: in-plane point spread of ~0.8 mm, slice profile of 0.4 slices.
    let sigma = [
        (0.8 / spacing[0]).max(0.0),
        (0.8 / spacing[1]).max(0.0),
        0.4,
    ];
    let mut hu = gaussian_blur(hu, spec.shape, sigma);

    // Correlated noise: white noise blurred in-plane, rescaled to the study's sigma.
    let noise_sigma = [0.6, 0.6, 0.0];
    let noise_seed = rng.next_u64();
    let white: Vec<f32> = (0..geometry.len())
        .into_par_iter()
        .map(|n| gaussian_hash(noise_seed, n as u64) as f32)
        .collect();
    let gain = 1.0 / kernel_norm(noise_sigma) as f32;
    let noise = gaussian_blur(white, spec.shape, noise_sigma);
    let sd = anatomy.noise_hu as f32 * gain;
    hu.par_iter_mut()
        .zip(noise.par_iter())
        .for_each(|(h, n)| *h = (*h + sd * n).round().clamp(-1024.0, 3071.0));

    let ct = CtVolume::new(geometry.clone(), hu)?;
    let truth = LabelVolume::new(geometry, labels)?;
    Ok(Phantom {
        ct,
        truth,
        lesions: anatomy
            .lesions
            .iter()
            .map(|l| PlantedLesion {
                centre_mm: l.centre,
                diameter_mm: 2.0 * (l.radii[0] * l.radii[1] * l.radii[2]).cbrt(),
                kind: l.kind,
            })
            .collect(),
        noise_hu: anatomy.noise_hu,
    })
}

// ---------------------------------------------------------------------------------------------
// Random numbers and smooth noise (self-contained, so a seed gives the same study everywhere).

/// SplitMix64: small, fast, and stable across platforms and crate versions.
pub(crate) struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        Rng(mix(seed ^ mix(stream.wrapping_add(0x9e37_79b9_7f4a_7c15))))
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// A standard normal value that depends only on (seed, n).
fn gaussian_hash(seed: u64, n: u64) -> f64 {
    let a = mix(seed ^ mix(n));
    let b = mix(a ^ 0x5851_f42d_4c95_7f2d);
    let u1 = ((a >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Value noise on an integer lattice with smooth interpolation, in [-1, 1].
#[derive(Clone, Copy)]
struct Noise(u64);

impl Noise {
    fn lattice(self, x: i64, y: i64, z: i64) -> f64 {
        let h = mix(self.0
            ^ (x as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (y as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ (z as u64).wrapping_mul(0x1656_67b1_9e37_79f9));
        (h >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }
    fn value(self, p: [f64; 3]) -> f64 {
        let f = p.map(f64::floor);
        let t = [p[0] - f[0], p[1] - f[1], p[2] - f[2]].map(|t| t * t * (3.0 - 2.0 * t));
        let (x, y, z) = (f[0] as i64, f[1] as i64, f[2] as i64);
        let mut acc = 0.0;
        for dz in 0..2 {
            for dy in 0..2 {
                for dx in 0..2 {
                    let wx = if dx == 0 { 1.0 - t[0] } else { t[0] };
                    let wy = if dy == 0 { 1.0 - t[1] } else { t[1] };
                    let wz = if dz == 0 { 1.0 - t[2] } else { t[2] };
                    acc += wx * wy * wz * self.lattice(x + dx, y + dy, z + dz);
                }
            }
        }
        acc
    }
    /// Two octaves of value noise at feature size `scale` (mm).
    fn fbm(self, p: [f64; 3], scale: f64) -> f64 {
        let q = p.map(|c| c / scale);
        let q2 = q.map(|c| c * 2.03 + 17.0);
        (self.value(q) + 0.5 * self.value(q2)) / 1.5
    }
}

// ---------------------------------------------------------------------------------------------
// Anatomy.

#[derive(Clone, Copy)]
struct Ellipsoid {
    c: [f64; 3],
    s: [f64; 3],
}

impl Ellipsoid {
    /// Normalised radius: < 1 inside.
    #[inline]
    fn r(&self, p: [f64; 3]) -> f64 {
        let a = (p[0] - self.c[0]) / self.s[0];
        let b = (p[1] - self.c[1]) / self.s[1];
        let c = (p[2] - self.c[2]) / self.s[2];
        (a * a + b * b + c * c).sqrt()
    }
}

struct Lesion {
    centre: [f64; 3],
    /// Rows: the lesion's axes in world (u, v, w) coordinates.
    axes: [[f64; 3]; 3],
    radii: [f64; 3],
    kind: LesionKind,
    core_hu: f64,
    rim_hu: f64,
    rim_mm: f64,
    noise: Noise,
    reach: f64,
}

impl Lesion {
    /// Normalised perturbed radius (< 1 inside) and depth below the lesion surface in mm.
    fn eval(&self, p: [f64; 3]) -> Option<(f64, f64)> {
        let d = [
            p[0] - self.centre[0],
            p[1] - self.centre[1],
            p[2] - self.centre[2],
        ];
        if d[0].abs() > self.reach || d[1].abs() > self.reach || d[2].abs() > self.reach {
            return None;
        }
        let mut q = [0.0; 3];
        for (a, qa) in q.iter_mut().enumerate() {
            *qa = (self.axes[a][0] * d[0] + self.axes[a][1] * d[1] + self.axes[a][2] * d[2])
                / self.radii[a];
        }
        let r = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt();
        if r > 1.4 {
            return None;
        }
        let r = r + 0.18 * self.noise.value(q.map(|c| c * 1.6 + 5.0));
        let mean_r = (self.radii[0] * self.radii[1] * self.radii[2]).cbrt();
        Some((r, (1.0 - r) * mean_r))
    }
}

struct Segment {
    a: [f64; 3],
    b: [f64; 3],
    ra: f64,
    rb: f64,
    lo: [f64; 3],
    hi: [f64; 3],
}

impl Segment {
    fn new(a: [f64; 3], b: [f64; 3], ra: f64, rb: f64) -> Self {
        let r = ra.max(rb);
        let lo = [0, 1, 2].map(|i| a[i].min(b[i]) - r);
        let hi = [0, 1, 2].map(|i| a[i].max(b[i]) + r);
        Segment {
            a,
            b,
            ra,
            rb,
            lo,
            hi,
        }
    }
    /// Inside the tapered tube?
    fn contains(&self, p: [f64; 3]) -> bool {
        if (0..3).any(|i| p[i] < self.lo[i] || p[i] > self.hi[i]) {
            return false;
        }
        let ab = [0, 1, 2].map(|i| self.b[i] - self.a[i]);
        let ap = [0, 1, 2].map(|i| p[i] - self.a[i]);
        let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
        let t = ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / len2).clamp(0.0, 1.0);
        let d2: f64 = (0..3).map(|i| (ap[i] - t * ab[i]).powi(2)).sum();
        let r = self.ra + t * (self.rb - self.ra);
        d2 <= r * r
    }
}

struct Anatomy {
    /// Stretch from nominal to real body size, in u and v.
    su: f64,
    sv: f64,
    body_a: f64,
    body_b: f64,
    body_v: f64,
    body_noise: Noise,
    fat_mm: f64,
    muscle_mm: f64,
    table_shift: f64,
    table_v: Option<f64>,
    liver_hu: f64,
    spleen_hu: f64,
    kidney_hu: f64,
    aorta_hu: f64,
    vessel_hu: f64,
    noise_hu: f64,
    liver: [Ellipsoid; 3],
    liver_noise: Noise,
    texture: Noise,
    kidneys: [Ellipsoid; 2],
    spleen: Ellipsoid,
    spleen_cut: Ellipsoid,
    stomach: Ellipsoid,
    gallbladder: Option<Ellipsoid>,
    bowel: Vec<Ellipsoid>,
    vessels: Vec<Segment>,
    lesions: Vec<Lesion>,
    w_liver: f64,
    rib_top: f64,
}

/// Polynomial smooth minimum (blends lobes into one organ).
fn smin(a: f64, b: f64, k: f64) -> f64 {
    let h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0);
    b + (a - b) * h - k * h * (1.0 - h)
}

impl Anatomy {
    fn sample(rng: &mut Rng, shape: [usize; 3], spacing: [f64; 3], index: u64) -> Self {
        let fov_u = shape[0] as f64 * spacing[0];
        let fov_v = shape[1] as f64 * spacing[1];
        let extent_w = shape[2] as f64 * spacing[2];
        // The whole abdomen with air around it is always in view.
        let body_a = (fov_u / 2.0 * rng.range(0.74, 0.86)).min(195.0);
        let body_b = (body_a * rng.range(0.68, 0.8)).min(fov_v / 2.0 * 0.8);
        let su = body_a / 165.0;
        let sv = body_b / 120.0;
        let body_v = -0.06 * body_b;
        let liver_hu = rng.range(50.0, 70.0);
        let w_liver = rng.range(-0.1, 0.1) * extent_w.min(200.0);
        let j = |rng: &mut Rng, x: f64, f: f64| x * rng.range(1.0 - f, 1.0 + f);
        let liver = [
            Ellipsoid {
                c: [j(rng, -75.0, 0.08), j(rng, -5.0, 0.5), w_liver],
                s: [j(rng, 70.0, 0.1), j(rng, 72.0, 0.08), j(rng, 78.0, 0.12)],
            },
            Ellipsoid {
                c: [
                    j(rng, 0.0, 0.0) + rng.range(-12.0, 12.0),
                    j(rng, -65.0, 0.08),
                    w_liver + 22.0,
                ],
                s: [j(rng, 60.0, 0.2), j(rng, 30.0, 0.15), j(rng, 45.0, 0.15)],
            },
            Ellipsoid {
                c: [-45.0, j(rng, 30.0, 0.15), w_liver + 18.0],
                s: [j(rng, 30.0, 0.15), j(rng, 25.0, 0.15), j(rng, 45.0, 0.15)],
            },
        ];
        let liver_noise = Noise(rng.next_u64());
        let kidneys = [
            Ellipsoid {
                c: [-68.0, 48.0, w_liver - rng.range(50.0, 70.0)],
                s: [26.0, 22.0, 52.0],
            },
            Ellipsoid {
                c: [68.0, 48.0, w_liver - rng.range(30.0, 50.0)],
                s: [26.0, 22.0, 52.0],
            },
        ];
        let spleen = Ellipsoid {
            c: [j(rng, 100.0, 0.05), 40.0, w_liver + rng.range(0.0, 25.0)],
            s: [j(rng, 30.0, 0.15), j(rng, 52.0, 0.15), j(rng, 55.0, 0.15)],
        };
        let spleen_cut = Ellipsoid {
            c: [spleen.c[0] - 38.0, spleen.c[1] - 12.0, spleen.c[2]],
            s: [30.0, 45.0, 60.0],
        };
        let stomach = Ellipsoid {
            c: [j(rng, 55.0, 0.1), -40.0, w_liver + rng.range(10.0, 35.0)],
            s: [j(rng, 40.0, 0.2), j(rng, 30.0, 0.2), j(rng, 45.0, 0.2)],
        };
        let gallbladder = (rng.unit() < 0.7).then(|| Ellipsoid {
            c: [-42.0, -42.0, w_liver - rng.range(35.0, 50.0)],
            s: [j(rng, 15.0, 0.2), j(rng, 13.0, 0.2), j(rng, 28.0, 0.2)],
        });
        let bowel = (0..6)
            .map(|_| Ellipsoid {
                c: [
                    rng.range(-90.0, 90.0),
                    rng.range(-70.0, 10.0),
                    w_liver - rng.range(75.0, 160.0),
                ],
                s: [
                    rng.range(14.0, 24.0),
                    rng.range(12.0, 20.0),
                    rng.range(20.0, 40.0),
                ],
            })
            .collect();

        let mut anatomy = Anatomy {
            su,
            sv,
            body_a,
            body_b,
            body_v,
            body_noise: Noise(rng.next_u64()),
            fat_mm: rng.range(8.0, 28.0) * su.min(1.0),
            muscle_mm: rng.range(8.0, 13.0) * su.min(1.0),
            table_shift: rng.range(-10.0, 10.0),
            table_v: None,
            liver_hu,
            spleen_hu: liver_hu + rng.range(-5.0, 15.0),
            kidney_hu: rng.range(140.0, 185.0),
            aorta_hu: rng.range(130.0, 200.0),
            vessel_hu: liver_hu + rng.range(70.0, 110.0),
            noise_hu: rng.range(8.0, 20.0),
            liver,
            liver_noise,
            texture: Noise(rng.next_u64()),
            kidneys,
            spleen,
            spleen_cut,
            stomach,
            gallbladder,
            bowel,
            vessels: Vec::new(),
            lesions: Vec::new(),
            w_liver,
            rib_top: w_liver + rng.range(70.0, 100.0),
        };
        let table_v = body_v + body_b + rng.range(8.0, 20.0);
        if table_v + 8.0 < fov_v / 2.0 {
            anatomy.table_v = Some(table_v);
        }
        anatomy.vessels = anatomy.sample_vessels(rng);
        anatomy.lesions = anatomy.sample_lesions(rng, extent_w, index);
        anatomy
    }

    /// Nominal coordinates of a real point.
    #[inline]
    fn nominal(&self, u: f64, v: f64, w: f64) -> [f64; 3] {
        [u / self.su, (v - self.body_v) / self.sv, w]
    }
    #[inline]
    fn real(&self, n: [f64; 3]) -> [f64; 3] {
        [n[0] * self.su, n[1] * self.sv + self.body_v, n[2]]
    }

    /// Signed liver function in nominal coordinates: < 0 inside.
    fn liver_f(&self, n: [f64; 3]) -> f64 {
        let e = self.liver.map(|e| e.r(n) - 1.0);
        let f = smin(smin(e[0], e[1], 0.3), e[2], 0.25);
        if f > 0.4 {
            return f;
        }
        f + 0.12 * self.liver_noise.fbm(n, 38.0)
    }

    fn inside_liver_cavity(&self, n: [f64; 3]) -> bool {
        let p = self.real(n);
        self.liver_f(n) < -0.05
            && self.body_depth(p[0], p[1], p[2]) > self.fat_mm + self.muscle_mm + 3.0
    }

    fn random_liver_point(&self, rng: &mut Rng, margin: f64) -> Option<[f64; 3]> {
        for _ in 0..400 {
            let e = &self.liver[rng.below(3)];
            let n = [0, 1, 2].map(|i| e.c[i] + e.s[i] * rng.range(-1.0, 1.0));
            if self.liver_f(n) < -margin && self.inside_liver_cavity(n) {
                return Some(n);
            }
        }
        None
    }

    fn sample_vessels(&self, rng: &mut Rng) -> Vec<Segment> {
        let mut out = Vec::new();
        let grow =
            |rng: &mut Rng, start: [f64; 3], r0: f64, count: usize, out: &mut Vec<Segment>| {
                for _ in 0..count {
                    let Some(target) = self.random_liver_point(rng, 0.15) else {
                        return;
                    };
                    // A gently curved path in three pieces, tapering.
                    let mut a = start;
                    let mut ra = r0;
                    for step in 1..=3 {
                        let t = step as f64 / 3.0;
                        let mut b = [0, 1, 2].map(|i| start[i] + t * (target[i] - start[i]));
                        if step < 3 {
                            for c in b.iter_mut() {
                                *c += rng.range(-8.0, 8.0);
                            }
                        }
                        let rb = (r0 * (1.0 - 0.55 * t)).max(1.2);
                        out.push(Segment::new(self.real(a), self.real(b), ra, rb));
                        a = b;
                        ra = rb;
                    }
                }
            };
        // Portal branches from the hilum, hepatic veins from near the IVC.
        let hilum = [-35.0, 5.0, self.w_liver - 15.0];
        grow(rng, hilum, 5.5, 6, &mut out);
        let confluence = [-25.0, 30.0, self.w_liver + 45.0];
        grow(rng, confluence, 4.5, 3, &mut out);
        out
    }

    fn sample_lesions(&self, rng: &mut Rng, extent_w: f64, index: u64) -> Vec<Lesion> {
        // At least one study in every 8 has no lesion.
        let count = if index % 8 == 7 {
            0
        } else {
            const WEIGHTS: [f64; 7] = [0.06, 0.24, 0.22, 0.16, 0.13, 0.11, 0.08];
            let mut x = rng.unit();
            let mut n = 0;
            while n < 6 && x >= WEIGHTS[n] {
                x -= WEIGHTS[n];
                n += 1;
            }
            n
        };
        let half_w = extent_w / 2.0;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let size_class = rng.unit();
            let diameter = if size_class < 0.3 {
                rng.range(3.0, 10.0)
            } else if size_class < 0.7 {
                rng.range(10.0, 25.0)
            } else {
                rng.range(25.0, 60.0)
            };
            let r = diameter / 2.0;
            let touches_edge = rng.unit() < 0.2;
            let mut centre = None;
            for _ in 0..50 {
                let margin = if touches_edge { 0.0 } else { 0.12 };
                let Some(n) = self.random_liver_point(rng, margin) else {
                    break;
                };
                let p = self.real(n);
                if touches_edge && self.liver_f(n) < -0.12 {
                    continue;
                }
                // Keep the lesion inside the scanned slab.
                if (p[2].abs() + r * 0.5) < half_w {
                    centre = Some(p);
                    break;
                }
            }
            let Some(centre) = centre else { continue };
            let kind = match rng.unit() {
                x if x < 0.6 => LesionKind::Hypodense,
                x if x < 0.8 => LesionKind::LowContrast,
                _ => LesionKind::RimEnhancing,
            };
            let core_hu = match kind {
                LesionKind::Hypodense => rng.range(10.0, 45.0),
                LesionKind::LowContrast => self.liver_hu - rng.range(8.0, 15.0),
                LesionKind::RimEnhancing => rng.range(15.0, 40.0),
            };
            let axes = random_rotation(rng);
            let radii = [
                r * rng.range(0.8, 1.2),
                r * rng.range(0.8, 1.2),
                r * rng.range(0.8, 1.2),
            ];
            let reach = radii.iter().cloned().fold(0.0, f64::max) * 1.5;
            out.push(Lesion {
                centre,
                axes,
                radii,
                kind,
                core_hu,
                rim_hu: self.liver_hu + rng.range(25.0, 40.0),
                rim_mm: rng.range(2.0, 4.0).min(r * 0.4),
                noise: Noise(rng.next_u64()),
                reach,
            });
        }
        out
    }

    /// Depth below the skin in mm (negative outside the body).
    fn body_depth(&self, u: f64, v: f64, w: f64) -> f64 {
        let y = v - self.body_v;
        let theta = y.atan2(u);
        let wobble = 1.0
            + 0.035
                * self
                    .body_noise
                    .value([theta.cos() * 2.0 + 3.0, theta.sin() * 2.0, w / 90.0]);
        let a = self.body_a * wobble;
        let b = self.body_b * wobble;
        const P: f64 = 2.3;
        let q = ((u / a).abs().powf(P) + (y / b).abs().powf(P)).powf(1.0 / P);
        let radius = (a * b) / ((b * theta.cos()).powi(2) + (a * theta.sin()).powi(2)).sqrt();
        (1.0 - q) * radius
    }

    /// Tissue value (HU, before blur and noise) and label at a point (real mm).
    fn tissue(&self, u: f64, v: f64, w: f64) -> (f64, u8) {
        let depth = self.body_depth(u, v, w);
        if depth < 0.0 {
            if let Some(tv) = self.table_v
                && v > tv
                && v < tv + 7.0
                && u.abs() < self.body_a * 1.15
            {
                return (
                    if v < tv + 1.5 || v > tv + 5.5 {
                        250.0
                    } else {
                        -250.0
                    },
                    0,
                );
            }
            return (-1000.0, 0);
        }
        let n = self.nominal(u, v, w);
        let p = [u, v, w];
        let tex = |scale: f64, amp: f64| amp * self.texture.fbm(p, scale);
        if depth < 2.0 {
            return (40.0 + tex(4.0, 5.0), 0);
        }
        if let Some(h) = self.bone(n, depth) {
            return (h + tex(3.0, 30.0), 0);
        }
        let wall = self.fat_mm + self.muscle_mm;
        if depth < self.fat_mm {
            return (-100.0 + tex(6.0, 8.0), 0);
        }
        if depth < wall {
            return (52.0 + tex(5.0, 5.0), 0);
        }
        // Paraspinal and psoas muscles.
        let para = |cu: f64, cv: f64, au: f64, av: f64| {
            ((n[0] - cu) / au).powi(2) + ((n[1] - cv) / av).powi(2) < 1.0
        };
        if para(-36.0, 92.0, 24.0, 20.0)
            || para(36.0, 92.0, 24.0, 20.0)
            || para(-34.0, 58.0, 12.0, 14.0)
            || para(34.0, 58.0, 12.0, 14.0)
        {
            return (50.0 + tex(5.0, 5.0), 0);
        }
        // Great vessels.
        if (n[0] - 10.0).powi(2) + (n[1] - 33.0).powi(2) < 11.0f64.powi(2) {
            return (self.aorta_hu + tex(5.0, 4.0), 0);
        }
        if ((n[0] + 26.0) / 13.0).powi(2) + ((n[1] - 30.0) / 10.0).powi(2) < 1.0 {
            return (self.vessel_hu - 20.0 + tex(5.0, 4.0), 0);
        }
        for k in &self.kidneys {
            let r = k.r(n);
            if r < 1.0 {
                return if r < 0.5 {
                    (25.0 + tex(3.0, 8.0), 0)
                } else {
                    (self.kidney_hu + tex(4.0, 6.0), 0)
                };
            }
        }
        if self.spleen.r(n) < 1.0 && self.spleen_cut.r(n) > 1.0 {
            return (self.spleen_hu + tex(5.0, 5.0), 0);
        }
        let rs = self.stomach.r(n);
        if rs < 1.0 {
            let wall_r = 1.0 - 4.0 / self.stomach.s[0];
            return if rs > wall_r {
                (55.0 + tex(3.0, 5.0), 0)
            } else if n[1] < self.stomach.c[1] - 10.0 {
                (-1000.0, 0)
            } else {
                (10.0 + tex(6.0, 4.0), 0)
            };
        }
        if let Some(g) = &self.gallbladder
            && g.r(n) < 1.0
        {
            return (8.0 + tex(6.0, 3.0), 0);
        }
        // Liver, with its vessels and lesions.
        if self.liver_f(n) < 0.0 {
            let mut hu = self.liver_hu + tex(7.0, 5.0);
            for l in &self.lesions {
                if let Some((r, depth_mm)) = l.eval(p)
                    && r < 1.0
                {
                    let inner = match l.kind {
                        LesionKind::RimEnhancing if depth_mm < l.rim_mm => l.rim_hu,
                        _ => l.core_hu,
                    };
                    return (inner + 4.0 * l.noise.fbm(p, 4.0), label::TUMOUR);
                }
            }
            if self.vessels.iter().any(|s| s.contains(p)) {
                hu = self.vessel_hu + tex(3.0, 4.0);
            }
            return (hu, label::LIVER);
        }
        for b in &self.bowel {
            let r = b.r(n);
            if r < 1.0 {
                return if r > 0.85 {
                    (45.0 + tex(3.0, 5.0), 0)
                } else if n[1] < b.c[1] - 0.5 * b.s[1] {
                    (-1000.0, 0)
                } else {
                    (25.0 + tex(4.0, 8.0), 0)
                };
            }
        }
        (-90.0 + tex(8.0, 10.0), 0)
    }

    /// Spine and ribs (nominal coordinates).
    fn bone(&self, n: [f64; 3], depth: f64) -> Option<f64> {
        let [u, v, w] = n;
        // Vertebral body with discs, canal, arch and spinous process.
        let r_vb = 19.0;
        let dv = ((u * u) + (v - 62.0).powi(2)).sqrt();
        if dv < r_vb {
            if (w + 1000.0).rem_euclid(32.0) < 7.0 {
                return Some(85.0);
            }
            return Some(if dv > r_vb - 2.0 { 700.0 } else { 230.0 });
        }
        let dc = (u * u + (v - 90.0).powi(2)).sqrt();
        if dc < 8.0 {
            return Some(15.0);
        }
        if dc < 13.0 || (u.abs() < 4.0 && v > 95.0 && v < 116.0) {
            return Some(600.0);
        }
        // Ribs: oblique bands just inside the wall, descending toward the front.
        let wall = self.fat_mm + self.muscle_mm;
        if depth > self.fat_mm + 0.3 * self.muscle_mm
            && depth < wall + 5.0
            && w < self.rib_top + 5.0
        {
            let phi = u.abs().atan2(v - 40.0).to_degrees(); // 0 = posterior, 180 = anterior
            if phi > 20.0 {
                for rib in 0..14 {
                    let end = 150.0 - 6.0 * rib as f64;
                    if phi > end {
                        continue;
                    }
                    let w_rib = self.rib_top - 24.0 * rib as f64 - 110.0 * (phi - 20.0) / 130.0;
                    if (w - w_rib).abs() < 4.5 {
                        let core = depth > self.fat_mm + 0.3 * self.muscle_mm + 1.5
                            && depth < wall + 3.5
                            && (w - w_rib).abs() < 3.0;
                        return Some(if core { 260.0 } else { 650.0 });
                    }
                }
            }
        }
        None
    }
}

fn random_rotation(rng: &mut Rng) -> [[f64; 3]; 3] {
    // A random unit quaternion (Shoemake).
    let (u1, u2, u3) = (
        rng.unit(),
        rng.unit() * std::f64::consts::TAU,
        rng.unit() * std::f64::consts::TAU,
    );
    let (a, b) = ((1.0 - u1).sqrt(), u1.sqrt());
    let (x, y, z, w) = (a * u2.sin(), a * u2.cos(), b * u3.sin(), b * u3.cos());
    [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - z * w),
            2.0 * (x * z + y * w),
        ],
        [
            2.0 * (x * y + z * w),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - x * w),
        ],
        [
            2.0 * (x * z - y * w),
            2.0 * (y * z + x * w),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> PhantomSpec {
        PhantomSpec {
            shape: [96, 96, 24],
            spacing_mm: None,
            seed,
        }
    }

    #[test]
    fn same_seed_same_study_and_different_seeds_differ() {
        let a = generate(&small(3), 1).unwrap();
        let b = generate(&small(3), 1).unwrap();
        let c = generate(&small(4), 1).unwrap();
        assert_eq!(a.ct.hu(), b.ct.hu());
        assert_eq!(a.truth.labels(), b.truth.labels());
        assert_ne!(a.ct.hu(), c.ct.hu());
    }

    #[test]
    fn field_of_view_and_slice_thickness_are_realistic() {
        for i in 0..8 {
            let p = generate(&small(11), i).unwrap();
            let s = p.ct.geometry().spacing_mm();
            let fov = s[0] * 96.0;
            assert!((310.0..=460.0).contains(&fov), "fov {fov}");
            assert!((1.0..=5.0).contains(&s[2]), "dz {}", s[2]);
            // Air around the body: the first and last rows and columns are air.
            let sl = p.ct.slice(12);
            let edge_mean: f32 = sl[..96].iter().sum::<f32>() / 96.0;
            assert!(edge_mean < -900.0, "edge {edge_mean}");
        }
    }

    #[test]
    fn liver_is_present_and_tumour_lies_inside_it() {
        let p = generate(&small(5), 0).unwrap();
        let liver = p.truth.labels().iter().filter(|&&l| l >= 1).count();
        assert!(liver > 1000, "liver voxels {liver}");
        // Mean HU of the liver sits in the parenchyma range (vessels and lesions included).
        let (mut s, mut n) = (0.0f64, 0usize);
        for (&l, &h) in p.truth.labels().iter().zip(p.ct.hu()) {
            if l == 1 {
                s += h as f64;
                n += 1;
            }
        }
        let mean = s / n as f64;
        assert!((45.0..=95.0).contains(&mean), "liver mean {mean}");
    }

    #[test]
    fn blur_preserves_a_constant_field() {
        let out = gaussian_blur(vec![7.0; 8 * 8 * 4], [8, 8, 4], [1.0, 1.0, 0.6]);
        assert!(out.iter().all(|v| (v - 7.0).abs() < 1e-4));
    }
}
