//! Clean-up of a raw segmentation: one liver, tumour only in and near it, no specks.

use super::{Components, Connectivity};
use crate::volume::edt::squared_distance;
use crate::volume::{LabelVolume, label};

/// The tumour components (26-connected) of a mask, the lesions of every rule below.
pub fn tumour_components(mask: &LabelVolume) -> Components {
    Components::label(
        mask.labels(),
        mask.geometry().shape(),
        |v| v == label::TUMOUR,
        Connectivity::TwentySix,
    )
}

/// Keeps the largest 26-connected component of the liver (label ≥ 1, tumours included);
/// everything outside it becomes background. Returns the number of voxels removed.
pub fn keep_largest_liver(mask: &mut LabelVolume) -> u64 {
    let shape = mask.geometry().shape();
    let comps = Components::label(
        mask.labels(),
        shape,
        |v| v >= label::LIVER,
        Connectivity::TwentySix,
    );
    if comps.count() <= 1 {
        return 0;
    }
    let sizes = comps.sizes();
    let keep = (1..sizes.len())
        .max_by_key(|&c| (sizes[c], std::cmp::Reverse(c)))
        .unwrap_or(1) as u32;
    comps.fill(mask.labels_mut(), |l| l != keep, label::BACKGROUND)
}

/// Removes every tumour component (26-connected) that comes no closer than `margin_mm` to
/// liver parenchyma (label 1): a lesion is judged as a whole, so the core of a large lesion,
/// far from any parenchyma, stays with its rim. Returns the voxels removed.
pub fn drop_tumour_outside_liver(mask: &mut LabelVolume, margin_mm: f64) -> u64 {
    let g = mask.geometry().clone();
    let [nx, ny, nz] = g.shape();
    let s = g.spacing_mm();
    let comps = tumour_components(mask);
    if comps.count() == 0 {
        return 0;
    }
    // Box around every tumour voxel, grown by the margin: every liver voxel that can be within
    // the margin of a tumour voxel lies inside it.
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for (r, _) in comps.runs() {
        let (y, z) = (r.row as usize % ny, r.row as usize / ny);
        for (t, (a, b)) in [(r.start as usize, r.end as usize - 1), (y, y), (z, z)]
            .into_iter()
            .enumerate()
        {
            lo[t] = lo[t].min(a);
            hi[t] = hi[t].max(b);
        }
    }
    let shape = [nx, ny, nz];
    for t in 0..3 {
        let grow = (margin_mm.max(0.0) / s[t]).ceil() as usize;
        lo[t] = lo[t].saturating_sub(grow);
        hi[t] = (hi[t] + grow).min(shape[t] - 1);
    }
    let b = [hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, hi[2] - lo[2] + 1];
    let mut feat = vec![false; b[0] * b[1] * b[2]];
    for z in 0..b[2] {
        for y in 0..b[1] {
            let row = nx * ((lo[1] + y) + ny * (lo[2] + z));
            let src = &mask.labels()[row + lo[0]..row + lo[0] + b[0]];
            let dst = &mut feat[b[0] * (y + b[1] * z)..b[0] * (y + b[1] * z + 1)];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v == label::LIVER;
            }
        }
    }
    let d2 = squared_distance(&feat, b, s);
    // The closest approach of each component to the parenchyma.
    let mut nearest = vec![f64::INFINITY; comps.count() + 1];
    for (r, l) in comps.runs() {
        let (y, z) = (r.row as usize % ny - lo[1], r.row as usize / ny - lo[2]);
        let base = b[0] * (y + b[1] * z);
        let near = &mut nearest[l as usize];
        for x in r.start as usize..r.end as usize {
            *near = near.min(d2[base + x - lo[0]]);
        }
    }
    let limit = margin_mm * margin_mm;
    comps.fill(
        mask.labels_mut(),
        |l| nearest[l as usize] > limit,
        label::BACKGROUND,
    )
}

/// Relabels tumour components smaller than `min_ml` as liver (they lie in the liver).
/// Returns the number of components dropped.
pub fn drop_small_tumours(mask: &mut LabelVolume, min_ml: f64) -> usize {
    let ml = mask.geometry().voxel_volume_mm3() / 1000.0;
    let comps = tumour_components(mask);
    let sizes = comps.sizes();
    let small: Vec<bool> = sizes.iter().map(|&n| (n as f64) * ml < min_ml).collect();
    comps.fill(mask.labels_mut(), |l| small[l as usize], label::LIVER);
    small.iter().skip(1).filter(|&&s| s).count()
}

/// Relabels as liver every tumour component (26-connected) of which more than `max_share` of
/// the voxels lie where the liver ends along z: the slice above or below is background there.
/// On thick slices the last slice of the dome or of the tip averages liver with the fat beyond
/// it and looks hypodense; a lesion spans slices inside the liver too. Neighbours beyond the
/// volume do not count (a scan may cut the liver). A share of 1 or more changes nothing.
/// Returns the number of components changed.
pub fn drop_end_slice_tumours(mask: &mut LabelVolume, max_share: f64) -> usize {
    if max_share >= 1.0 {
        return 0;
    }
    let [nx, ny, nz] = mask.geometry().shape();
    let comps = tumour_components(mask);
    if comps.count() == 0 {
        return 0;
    }
    let labels = mask.labels();
    let slice = nx * ny;
    let mut at_end = vec![0u64; comps.count() + 1];
    for (r, l) in comps.runs() {
        let z = r.row as usize / ny;
        let base = nx * r.row as usize;
        for x in r.start as usize..r.end as usize {
            let i = base + x;
            let below = z > 0 && labels[i - slice] == label::BACKGROUND;
            let above = z + 1 < nz && labels[i + slice] == label::BACKGROUND;
            if below || above {
                at_end[l as usize] += 1;
            }
        }
    }
    let sizes = comps.sizes();
    let drop: Vec<bool> = (0..=comps.count())
        .map(|l| l > 0 && at_end[l] as f64 > max_share * sizes[l] as f64)
        .collect();
    comps.fill(mask.labels_mut(), |l| drop[l as usize], label::LIVER);
    drop.iter().filter(|&&d| d).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    fn mask(shape: [usize; 3], f: impl Fn(usize, usize, usize) -> u8) -> LabelVolume {
        let g = Geometry::new(
            shape,
            [1.0, 1.0, 2.0],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [0.0; 3],
        )
        .unwrap();
        let mut v = vec![0u8; g.len()];
        for k in 0..shape[2] {
            for j in 0..shape[1] {
                for i in 0..shape[0] {
                    v[g.index(i, j, k)] = f(i, j, k);
                }
            }
        }
        LabelVolume::new(g, v).unwrap()
    }

    #[test]
    fn only_the_largest_liver_survives() {
        let mut m = mask([10, 4, 2], |i, _, _| match i {
            0..=5 => 1,
            8 => 2,
            _ => 0,
        });
        assert_eq!(keep_largest_liver(&mut m), 8);
        assert!(m.labels().iter().all(|&v| v <= 1));
    }

    #[test]
    fn tumour_far_from_liver_is_removed() {
        // Liver at x 0..=2, tumour at x = 3 (touching) and x = 9 (6 mm away).
        let mut m = mask([10, 1, 1], |i, _, _| match i {
            0..=2 => 1,
            3 | 9 => 2,
            _ => 0,
        });
        assert_eq!(drop_tumour_outside_liver(&mut m, 5.0), 1);
        assert_eq!(m.labels()[3], 2);
        assert_eq!(m.labels()[9], 0);
    }

    #[test]
    fn a_large_lesion_keeps_its_core() {
        // Liver at x 0..=1 and 23..=25; a tumour of 12 voxels touching the liver (its far end
        // 12 mm away from it) and a lone tumour voxel at x 18, 5 mm from the nearest liver.
        let mut m = mask([26, 1, 1], |i, _, _| match i {
            0..=1 | 23..=25 => 1,
            2..=13 => 2,
            18 => 2,
            _ => 0,
        });
        assert_eq!(drop_tumour_outside_liver(&mut m, 3.0), 1);
        assert!(m.labels()[2..=13].iter().all(|&v| v == 2));
        assert_eq!(m.labels()[18], 0);
    }

    #[test]
    fn tumour_in_the_last_liver_slice_becomes_liver() {
        // Liver in slices 1..=5 of 8 (x 0..=7); tumour A only in slice 5, the liver's last
        // (slice 6 is background above it); tumour B in slices 2..=4, inside the liver;
        // tumour C in slice 0 and 1 at x 6..=7, where the scan begins (slice 0 is the volume's
        // first: nothing below counts) and slice 1's x 6..=7 lie above tumour, not background.
        let mut m = mask([8, 2, 8], |i, _, k| match (i, k) {
            (0..=1, 5) => 2,
            (3..=4, 2..=4) => 2,
            (6..=7, 0..=1) => 2,
            (_, 0..=5) => 1,
            _ => 0,
        });
        assert_eq!(drop_end_slice_tumours(&mut m, 0.5), 1);
        let g = m.geometry().clone();
        assert_eq!(
            m.labels()[g.index(0, 0, 5)],
            1,
            "end-slice component dropped"
        );
        assert_eq!(m.labels()[g.index(3, 0, 3)], 2, "interior lesion kept");
        assert_eq!(
            m.labels()[g.index(6, 0, 0)],
            2,
            "lesion at the volume's edge kept"
        );
        // A lesion with half its voxels in the end slice stays at a share of 0.5, and no
        // share of 1 or more drops anything.
        let mut half = mask([4, 1, 4], |i, _, k| match (i, k) {
            (1..=2, 1..=2) => 2,
            (_, 0..=2) => 1,
            _ => 0,
        });
        assert_eq!(drop_end_slice_tumours(&mut half, 0.5), 0);
        assert_eq!(drop_end_slice_tumours(&mut half, 0.4), 1);
        let mut m2 = mask([8, 2, 8], |i, _, k| match (i, k) {
            (0..=1, 5) => 2,
            (_, 0..=5) => 1,
            _ => 0,
        });
        assert_eq!(drop_end_slice_tumours(&mut m2, 1.0), 0);
    }

    #[test]
    fn small_tumours_become_liver() {
        // Voxel volume 2 mm³; one tumour voxel (0.002 mL) and one of 3 voxels (0.006 mL).
        let mut m = mask([9, 1, 1], |i, _, _| match i {
            1 | 4..=6 => 2,
            _ => 1,
        });
        assert_eq!(drop_small_tumours(&mut m, 0.005), 1);
        assert_eq!(m.labels()[1], 1);
        assert_eq!(m.labels()[5], 2);
    }
}
