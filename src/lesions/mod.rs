//! Lesion analysis of a label mask: 3D connected components of the tumour, their measurements
//! (volume, centroid, RECIST-style and 3D diameters, mean HU, slice range), liver and tumour
//! volumes, and the post-processing a segmenter applies to its raw mask.
//! Definitions: `../shared/design/METRICS.md`. Pure functions, no I/O.

mod components;
mod detect;
mod mincut;
mod postprocess;
mod refine;
mod regularise;
mod screen;
mod surroundings;

pub use components::{Components, Connectivity, Run};
pub use detect::find_missed_lesions;
pub use postprocess::{
    contrast_z, drop_body_wall_tumours, drop_end_slice_tumours, drop_extrahepatic_tumours,
    drop_fat_tumours, drop_small_tumours, drop_tumour_outside_liver, keep_largest_liver,
    tumour_components,
};
pub use refine::refine_tumour_extents;
pub use regularise::regularise_tumour_outlines;
pub use screen::{
    Exemplar, FalsePositiveFilter, component_features, drop_false_positives, exemplars,
};

use serde::Serialize;

use crate::volume::{CtVolume, Geometry, LabelVolume, label};

/// One lesion (a 26-connected component of the tumour).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Lesion {
    /// 1.. by descending volume (ties: lowest first voxel index).
    pub id: usize,
    pub voxels: u64,
    pub volume_ml: f64,
    /// Mean of the voxel centres in world coordinates (mm).
    pub centroid_mm: [f64; 3],
    /// Largest distance between two voxel centres in one axial slice (RECIST).
    pub longest_axial_diameter_mm: f64,
    /// Largest 3D distance between two voxel centres.
    pub max_diameter_mm: f64,
    /// Mean CT value over the lesion (None without a CT).
    pub mean_hu: Option<f64>,
    /// First and last slice (third voxel index).
    pub slice_range: [usize; 2],
    /// Linear index of the lesion's first voxel (for ordering; not serialised).
    #[serde(skip)]
    pub first_voxel: usize,
    /// The component's label in the `Components` it was measured from (not serialised).
    #[serde(skip)]
    pub component: u32,
}

/// What `hepaflow lesions` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LesionReport {
    pub liver_ml: f64,
    pub tumour_ml: f64,
    /// 100 × tumour / liver volume; None when the liver is empty.
    pub tumour_burden_pct: Option<f64>,
    pub lesions: Vec<Lesion>,
}

/// Volumes and lesions of a mask, with mean HU from `ct` when given (same grid).
pub fn analyze(mask: &LabelVolume, ct: Option<&CtVolume>) -> LesionReport {
    let g = mask.geometry();
    let ml = g.voxel_volume_mm3() / 1000.0;
    let (liver, tumour) = mask.labels().iter().fold((0u64, 0u64), |(l, t), &v| {
        (
            l + u64::from(v >= label::LIVER),
            t + u64::from(v == label::TUMOUR),
        )
    });
    let liver_ml = liver as f64 * ml;
    let tumour_ml = tumour as f64 * ml;
    let comps = Components::label(
        mask.labels(),
        g.shape(),
        |v| v == label::TUMOUR,
        Connectivity::TwentySix,
    );
    LesionReport {
        liver_ml,
        tumour_ml,
        tumour_burden_pct: (liver > 0).then(|| 100.0 * tumour as f64 / liver as f64),
        lesions: measure(&comps, g, ct),
    }
}

/// Measures every component, numbered by descending size.
pub fn measure(comps: &Components, g: &Geometry, ct: Option<&CtVolume>) -> Vec<Lesion> {
    let n = comps.count();
    let [nx, ny, _] = g.shape();
    let ml = g.voxel_volume_mm3() / 1000.0;
    let mut acc = vec![Acc::default(); n + 1];
    let hu = ct.map(|c| c.hu());
    for (r, l) in comps.runs() {
        let a = &mut acc[l as usize];
        let (j, k) = (r.row as usize % ny, r.row as usize / ny);
        let len = u64::from(r.end - r.start);
        if a.voxels == 0 {
            a.first = r.row as usize * nx + r.start as usize;
            a.k_min = k;
        }
        a.voxels += len;
        // Sum of i over the run: start + ... + end-1.
        a.sum[0] += (u64::from(r.start) + u64::from(r.end) - 1) as f64 * len as f64 / 2.0;
        a.sum[1] += (j as u64 * len) as f64;
        a.sum[2] += (k as u64 * len) as f64;
        a.k_max = k;
        if let Some(hu) = hu {
            let base = r.row as usize * nx;
            a.hu += hu[base + r.start as usize..base + r.end as usize]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>();
        }
        a.points.push([r.start as i64, j as i64, k as i64]);
        if r.end - r.start > 1 {
            a.points.push([r.end as i64 - 1, j as i64, k as i64]);
        }
    }
    let spacing = g.spacing_mm();
    let mut out: Vec<Lesion> = acc
        .into_iter()
        .enumerate()
        .skip(1)
        .map(|(component, a)| {
            let v = a.voxels as f64;
            let mean = [a.sum[0] / v, a.sum[1] / v, a.sum[2] / v];
            let (axial, max3d) = diameters(&a.points, spacing);
            Lesion {
                id: 0,
                voxels: a.voxels,
                volume_ml: v * ml,
                centroid_mm: g.voxel_to_world(mean),
                longest_axial_diameter_mm: axial,
                max_diameter_mm: max3d,
                mean_hu: hu.map(|_| a.hu / v),
                slice_range: [a.k_min, a.k_max],
                first_voxel: a.first,
                component: component as u32,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.voxels
            .cmp(&a.voxels)
            .then(a.first_voxel.cmp(&b.first_voxel))
    });
    for (i, l) in out.iter_mut().enumerate() {
        l.id = i + 1;
    }
    out
}

#[derive(Clone, Default)]
struct Acc {
    voxels: u64,
    first: usize,
    sum: [f64; 3],
    k_min: usize,
    k_max: usize,
    hu: f64,
    /// End voxels of every run, in (k, j, i) order of the runs.
    points: Vec<[i64; 3]>,
}

/// Exact (longest axial, largest 3D) distances between voxel centres, in mm.
///
/// The farthest pair of a point set lies on its convex hull. The hull of one slice's voxels is
/// the hull of its run ends; a vertex of the 3D hull is a vertex of its own slice's hull. So the
/// axial diameter is a brute-force maximum over each slice's hull vertices, and the 3D diameter
/// one over all slices' hull vertices together.
fn diameters(points: &[[i64; 3]], spacing: [f64; 3]) -> (f64, f64) {
    let d2 = |a: &[i64; 3], b: &[i64; 3]| {
        let dx = (a[0] - b[0]) as f64 * spacing[0];
        let dy = (a[1] - b[1]) as f64 * spacing[1];
        let dz = (a[2] - b[2]) as f64 * spacing[2];
        dx * dx + dy * dy + dz * dz
    };
    let mut best_axial = 0.0f64;
    let mut vertices: Vec<[i64; 3]> = Vec::new();
    let mut start = 0;
    while start < points.len() {
        let k = points[start][2];
        let mut end = start;
        while end < points.len() && points[end][2] == k {
            end += 1;
        }
        let hull = hull_2d(&points[start..end]);
        for (a, p) in hull.iter().enumerate() {
            for q in &hull[a + 1..] {
                best_axial = best_axial.max(d2(p, q));
            }
        }
        vertices.extend(hull);
        start = end;
    }
    let mut best = best_axial;
    for (a, p) in vertices.iter().enumerate() {
        for q in &vertices[a + 1..] {
            if p[2] != q[2] {
                best = best.max(d2(p, q));
            }
        }
    }
    (best_axial.sqrt(), best.sqrt())
}

/// Convex hull vertices of points in one slice (Andrew's monotone chain; collinear points
/// dropped, a single point or a segment returned as its extremes).
fn hull_2d(points: &[[i64; 3]]) -> Vec<[i64; 3]> {
    let mut p: Vec<[i64; 3]> = points.to_vec();
    p.sort_unstable_by_key(|q| (q[0], q[1]));
    p.dedup();
    if p.len() <= 2 {
        return p;
    }
    let cross = |o: &[i64; 3], a: &[i64; 3], b: &[i64; 3]| {
        (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    };
    let mut hull: Vec<[i64; 3]> = Vec::with_capacity(2 * p.len());
    for q in &p {
        while hull.len() >= 2 && cross(&hull[hull.len() - 2], &hull[hull.len() - 1], q) <= 0 {
            hull.pop();
        }
        hull.push(*q);
    }
    let lower = hull.len() + 1;
    for q in p.iter().rev().skip(1) {
        while hull.len() >= lower && cross(&hull[hull.len() - 2], &hull[hull.len() - 1], q) <= 0 {
            hull.pop();
        }
        hull.push(*q);
    }
    hull.pop();
    hull
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::phantom::Rng;

    fn geometry(shape: [usize; 3], spacing: [f64; 3]) -> Geometry {
        Geometry::new(
            shape,
            spacing,
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [10.0, -5.0, 2.0],
        )
        .unwrap()
    }

    fn brute_diameters(vox: &[[i64; 3]], s: [f64; 3]) -> (f64, f64) {
        let (mut ax, mut all) = (0.0f64, 0.0f64);
        for a in vox {
            for b in vox {
                let d = (((a[0] - b[0]) as f64 * s[0]).powi(2)
                    + ((a[1] - b[1]) as f64 * s[1]).powi(2)
                    + ((a[2] - b[2]) as f64 * s[2]).powi(2))
                .sqrt();
                all = all.max(d);
                if a[2] == b[2] {
                    ax = ax.max(d);
                }
            }
        }
        (ax, all)
    }

    #[test]
    fn diameters_match_brute_force_on_random_lesions() {
        let mut rng = Rng::new(7, 7);
        for case in 0..80 {
            let shape = [2 + rng.below(14), 2 + rng.below(14), 1 + rng.below(7)];
            let spacing = [
                rng.range(0.5, 2.0),
                rng.range(0.5, 2.0),
                rng.range(0.8, 5.0),
            ];
            let n: usize = shape.iter().product();
            let density = rng.range(0.2, 0.9);
            let labels: Vec<u8> = (0..n)
                .map(|_| if rng.unit() < density { 2 } else { 1 })
                .collect();
            let g = geometry(shape, spacing);
            let mask = LabelVolume::new(g.clone(), labels.clone()).unwrap();
            let report = analyze(&mask, None);
            let comps = Components::label(&labels, shape, |v| v == 2, Connectivity::TwentySix);
            let lv = comps.label_volume();
            for les in &report.lesions {
                // Find this lesion's component by its first voxel.
                let c = lv[les.first_voxel];
                let vox: Vec<[i64; 3]> = (0..n)
                    .filter(|&i| lv[i] == c)
                    .map(|i| {
                        [
                            (i % shape[0]) as i64,
                            ((i / shape[0]) % shape[1]) as i64,
                            (i / (shape[0] * shape[1])) as i64,
                        ]
                    })
                    .collect();
                let (ax, all) = brute_diameters(&vox, spacing);
                assert!(
                    (les.longest_axial_diameter_mm - ax).abs() < 1e-9,
                    "case {case}: axial {} vs {ax}",
                    les.longest_axial_diameter_mm
                );
                assert!(
                    (les.max_diameter_mm - all).abs() < 1e-9,
                    "case {case}: 3D {} vs {all}",
                    les.max_diameter_mm
                );
                assert_eq!(les.voxels as usize, vox.len());
            }
        }
    }

    #[test]
    fn hand_computed_lesions() {
        // 5 × 4 × 3 grid, spacing 1 × 2 × 3 mm; one 2-voxel lesion along x in slice 0 and one
        // single voxel in slice 2; the rest liver.
        let g = geometry([5, 4, 3], [1.0, 2.0, 3.0]);
        let mut labels = vec![1u8; 60];
        labels[g.index(1, 1, 0)] = 2;
        labels[g.index(2, 1, 0)] = 2;
        labels[g.index(4, 3, 2)] = 2;
        let ct_vals: Vec<f32> = (0..60).map(|i| i as f32).collect();
        let ct = CtVolume::new(g.clone(), ct_vals).unwrap();
        let r = analyze(&LabelVolume::new(g.clone(), labels).unwrap(), Some(&ct));
        assert_eq!(r.lesions.len(), 2);
        assert!((r.liver_ml - 60.0 * 6.0 / 1000.0).abs() < 1e-12);
        assert!((r.tumour_ml - 3.0 * 6.0 / 1000.0).abs() < 1e-12);
        assert!((r.tumour_burden_pct.unwrap() - 5.0).abs() < 1e-12);
        let a = &r.lesions[0];
        assert_eq!((a.id, a.voxels), (1, 2));
        assert_eq!(a.longest_axial_diameter_mm, 1.0);
        assert_eq!(a.max_diameter_mm, 1.0);
        assert_eq!(a.slice_range, [0, 0]);
        // Centroid (1.5, 1, 0) in voxels → world (10 + 1.5, -5 + 2, 2 + 0).
        assert_eq!(a.centroid_mm, [11.5, -3.0, 2.0]);
        assert_eq!(a.mean_hu, Some((6.0 + 7.0) / 2.0));
        let b = &r.lesions[1];
        assert_eq!((b.id, b.voxels, b.max_diameter_mm), (2, 1, 0.0));
        assert_eq!(b.slice_range, [2, 2]);
    }

    #[test]
    fn empty_liver_has_no_burden() {
        let g = geometry([3, 3, 3], [1.0; 3]);
        let r = analyze(&LabelVolume::new(g, vec![0; 27]).unwrap(), None);
        assert_eq!(r.tumour_burden_pct, None);
        assert!(r.lesions.is_empty());
    }
}
