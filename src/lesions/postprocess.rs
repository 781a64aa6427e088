//! Clean-up of a raw segmentation: one liver, tumour only in and near it, no specks.

use super::{Components, Connectivity};
use crate::volume::edt::squared_distance;
use crate::volume::phantom::Rng;
use crate::volume::{CtVolume, LabelVolume, label};

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
    for (l, h) in comps.bounding_boxes().into_iter().skip(1) {
        for t in 0..3 {
            lo[t] = lo[t].min(l[t]);
            hi[t] = hi[t].max(h[t]);
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

/// Median CT value (HU) below which a tumour component is fat, not a lesion: every lesion,
/// cysts included, is at least as dense as water (0 HU), while fat lies at −150…−50 HU; a
/// component whose median lies below water is fat or mostly so (a fissure, the falciform
/// ligament, fat beyond the liver's surface taken into the liver mask, or a speck of noise
/// at such a border).
pub const FAT_MEDIAN_HU: f32 = 0.0;

/// Relabels as background every tumour component (26-connected) whose median CT value lies
/// below [`FAT_MEDIAN_HU`]: fat inside the liver's outline is neither lesion nor parenchyma.
/// Returns the number of components dropped.
pub fn drop_fat_tumours(mask: &mut LabelVolume, ct: &CtVolume) -> usize {
    if ct.geometry().shape() != mask.geometry().shape() {
        return 0;
    }
    let comps = tumour_components(mask);
    let fat: Vec<bool> = comps
        .values(ct.hu())
        .iter_mut()
        .enumerate()
        .map(|(l, v)| l > 0 && !v.is_empty() && median(v) < FAT_MEDIAN_HU)
        .collect();
    comps.fill(mask.labels_mut(), |l| fat[l as usize], label::BACKGROUND);
    fat.iter().filter(|&&f| f).count()
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

/// Relabels as background every tumour component (26-connected) of which more than
/// `max_share` of the surface (face area, in mm²) faces background: a liver lesion is mostly
/// enclosed by liver, and what the network calls tumour where its liver only reaches into
/// another organ (a kidney's medulla behind a finger of liver, the gallbladder) is that
/// organ's. Faces at the volume's edge do not count. A share of 1 or more changes nothing.
/// Returns the number of components dropped.
pub fn drop_extrahepatic_tumours(mask: &mut LabelVolume, max_share: f64) -> usize {
    if max_share >= 1.0 {
        return 0;
    }
    let ([nx, ny, nz], s) = (mask.geometry().shape(), mask.geometry().spacing_mm());
    let comps = tumour_components(mask);
    // Face areas across x, y and z, and each axis's step and extent.
    let area = [s[1] * s[2], s[0] * s[2], s[0] * s[1]];
    let step = [1, nx, nx * ny];
    let labels = mask.labels();
    // Per component: surface area facing anything but tumour, and the part facing background.
    let (mut surface, mut outside) = (vec![0.0; comps.count() + 1], vec![0.0; comps.count() + 1]);
    for (r, l) in comps.runs() {
        let (y, z) = (r.row as usize % ny, r.row as usize / ny);
        let base = nx * r.row as usize;
        for x in r.start as usize..r.end as usize {
            let i = base + x;
            let at = [x, y, z];
            for t in 0..3 {
                let n = [nx, ny, nz][t];
                for (inside, j) in [
                    (at[t] > 0, i.wrapping_sub(step[t])),
                    (at[t] + 1 < n, i + step[t]),
                ] {
                    if !inside || labels[j] == label::TUMOUR {
                        continue;
                    }
                    surface[l as usize] += area[t];
                    if labels[j] == label::BACKGROUND {
                        outside[l as usize] += area[t];
                    }
                }
            }
        }
    }
    let drop: Vec<bool> = (0..=comps.count())
        .map(|l| l > 0 && outside[l] > max_share * surface[l])
        .collect();
    comps.fill(mask.labels_mut(), |l| drop[l as usize], label::BACKGROUND);
    drop.iter().filter(|&&d| d).count()
}

/// Air: below this CT value (HU).
const AIR_HU: f32 = -500.0;
/// Fat: from air up to this CT value (HU).
const FAT_HU: f32 = -30.0;
/// Subcutaneous fat starts within this distance (mm, in-plane) of the air outside the body:
/// the skin between them is a few millimetres thick.
const SKIN_MM: f64 = 5.0;

/// Relabels as background every tumour component (26-connected) that touches subcutaneous
/// fat in-plane (itself or one of its 8 neighbours in a slice): the liver lies inside the
/// abdominal wall, so what touches the fat outside that wall is the wall's own muscle, which
/// the network's liver took in and whose density is a lesion's. Subcutaneous fat is, slice
/// by slice, the fat (`AIR_HU`..`FAT_HU`) connected in-plane (8-connected, through fat) to
/// fat within `SKIN_MM` of the air outside the body (air connected to the slice's border);
/// fat inside the abdomen is walled off from it by muscle. Returns the number dropped.
pub fn drop_body_wall_tumours(mask: &mut LabelVolume, ct: &CtVolume) -> usize {
    if ct.geometry().shape() != mask.geometry().shape() {
        return 0;
    }
    let [nx, ny, _] = mask.geometry().shape();
    let s = mask.geometry().spacing_mm();
    let comps = tumour_components(mask);
    let mut wall = vec![false; comps.count() + 1];
    // Runs come in linear order: each slice's fat is worked out once, when first needed.
    let mut slice: Option<(usize, Vec<bool>)> = None;
    for (r, l) in comps.runs() {
        let (y, z) = (r.row as usize % ny, r.row as usize / ny);
        if slice.as_ref().is_none_or(|(k, _)| *k != z) {
            let hu = &ct.hu()[nx * ny * z..nx * ny * (z + 1)];
            slice = Some((z, subcutaneous_fat(hu, [nx, ny], [s[0], s[1]])));
        }
        let fat = &slice.as_ref().expect("set above").1;
        if wall[l as usize] {
            continue;
        }
        let (y0, y1) = (y.saturating_sub(1), (y + 1).min(ny - 1));
        let (x0, x1) = (
            (r.start as usize).saturating_sub(1),
            (r.end as usize).min(nx - 1),
        );
        wall[l as usize] = (y0..=y1).any(|yy| fat[nx * yy + x0..=nx * yy + x1].contains(&true));
    }
    comps.fill(mask.labels_mut(), |l| wall[l as usize], label::BACKGROUND);
    wall.iter().filter(|&&w| w).count()
}

/// The subcutaneous fat of one slice of `shape` CT values (see [`drop_body_wall_tumours`]).
fn subcutaneous_fat(hu: &[f32], shape: [usize; 2], spacing: [f64; 2]) -> Vec<bool> {
    let [nx, ny] = shape;
    let grid = [nx, ny, 1];
    let (air, fat) = (2u8, 1u8);
    let class: Vec<u8> = hu
        .iter()
        .map(|&h| match h {
            h if h < AIR_HU => air,
            h if h < FAT_HU => fat,
            _ => 0,
        })
        .collect();
    let pockets = Components::label(&class, grid, |v| v == air, Connectivity::TwentySix);
    let boxes = pockets.bounding_boxes();
    let mut outside = vec![0u8; nx * ny];
    pockets.fill(
        &mut outside,
        |l| {
            let (lo, hi) = boxes[l as usize];
            lo[0] == 0 || lo[1] == 0 || hi[0] + 1 == nx || hi[1] + 1 == ny
        },
        1,
    );
    let outside: Vec<bool> = outside.iter().map(|&v| v == 1).collect();
    let to_air = squared_distance(&outside, grid, [spacing[0], spacing[1], 1.0]);
    let layers = Components::label(&class, grid, |v| v == fat, Connectivity::TwentySix);
    let mut under_skin = vec![false; layers.count() + 1];
    for (r, l) in layers.runs() {
        let row = nx * r.row as usize;
        if (r.start as usize..r.end as usize).any(|x| to_air[row + x] <= SKIN_MM * SKIN_MM) {
            under_skin[l as usize] = true;
        }
    }
    let mut out = vec![0u8; nx * ny];
    layers.fill(&mut out, |l| under_skin[l as usize], 1);
    out.iter().map(|&v| v == 1).collect()
}

/// Copies of a component's shape that [`contrast_z`] places in lesion-free liver.
const CONTRAST_COPIES: usize = 200;

/// How much darker than the study's own liver each picked tumour component is, in standard
/// deviations: the component's median CT value is compared with the medians of up to 200
/// copies of its shape moved to random places in lesion-free liver of the same study (liver,
/// label 1, at least 2 voxels in-plane from any tumour; a copy needs 95% of its voxels there).
/// That spread holds noise, texture, vessels and partial volume as this study has them, so
/// the score is the signal-to-noise ratio of an observer that knows the component's place and
/// shape — a test the CT itself makes of a candidate lesion. Positive: darker than the liver.
/// Medians keep bright vessels from dominating a copy. Indexed by component label (0 unused);
/// None for components not picked or where fewer than 10 copies fit. Deterministic: each
/// component's places come from its first voxel.
pub fn contrast_z(
    mask: &LabelVolume,
    ct: &CtVolume,
    comps: &Components,
    pick: impl Fn(u32) -> bool,
) -> Vec<Option<f64>> {
    let mut out = vec![None; comps.count() + 1];
    let picked: Vec<u32> = (1..=comps.count() as u32).filter(|&l| pick(l)).collect();
    if picked.is_empty() || ct.geometry().shape() != mask.geometry().shape() {
        return out;
    }
    let [nx, ny, nz] = mask.geometry().shape();
    let (labels, hu) = (mask.labels(), ct.hu());
    // Lesion-free liver: liver with no tumour within 2 voxels along x or y (a 5 × 5 box).
    let near_tumour = {
        let mut a: Vec<bool> = labels.iter().map(|&v| v == label::TUMOUR).collect();
        for (step, n) in [(1, nx), (nx, ny)] {
            let src = a.clone();
            for (i, d) in a.iter_mut().enumerate() {
                let c = (i / step) % n;
                let lo = c.saturating_sub(2);
                let hi = (c + 2).min(n - 1);
                *d = (lo..=hi).any(|cc| src[i + cc * step - c * step]);
            }
        }
        a
    };
    let free: Vec<bool> = labels
        .iter()
        .zip(&near_tumour)
        .map(|(&v, &t)| v == label::LIVER && !t)
        .collect();
    let free_list: Vec<u32> = (0..free.len() as u32)
        .filter(|&i| free[i as usize])
        .collect();
    if free_list.is_empty() {
        return out;
    }
    // Voxels of the picked components, as (x, y, z).
    let mut voxels: Vec<Vec<[usize; 3]>> = vec![Vec::new(); comps.count() + 1];
    for (r, l) in comps.runs() {
        if !pick(l) {
            continue;
        }
        let (y, z) = (r.row as usize % ny, r.row as usize / ny);
        voxels[l as usize].extend((r.start as usize..r.end as usize).map(|x| [x, y, z]));
    }
    let first = comps.first_voxels();
    let boxes = comps.bounding_boxes();
    let index = |[x, y, z]: [usize; 3]| x + nx * (y + ny * z);
    let mut values = Vec::new();
    for l in picked {
        let vox = &voxels[l as usize];
        let (lo, hi) = boxes[l as usize];
        let rel: Vec<[usize; 3]> = vox
            .iter()
            .map(|v| [v[0] - lo[0], v[1] - lo[1], v[2] - lo[2]])
            .collect();
        let span = [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]];
        values.clear();
        values.extend(vox.iter().map(|&v| hu[index(v)]));
        let own = median(&mut values) as f64;
        let mut rng = Rng::new(first[l as usize] as u64, 0xc0_47_a5);
        let mut copies = Vec::with_capacity(CONTRAST_COPIES);
        let need = (rel.len() * 95).div_ceil(100);
        for _ in 0..CONTRAST_COPIES * 20 {
            if copies.len() == CONTRAST_COPIES {
                break;
            }
            let c = free_list[rng.below(free_list.len())] as usize;
            let centre = [c % nx, (c / nx) % ny, c / (nx * ny)];
            let mut origin = [0usize; 3];
            let mut fits = true;
            for t in 0..3 {
                let n = [nx, ny, nz][t];
                match centre[t].checked_sub(span[t] / 2) {
                    Some(o) if o + span[t] < n => origin[t] = o,
                    _ => fits = false,
                }
            }
            if !fits {
                continue;
            }
            let at = |r: &[usize; 3]| index([r[0] + origin[0], r[1] + origin[1], r[2] + origin[2]]);
            if rel.iter().filter(|r| free[at(r)]).count() < need {
                continue;
            }
            values.clear();
            values.extend(rel.iter().map(|r| hu[at(r)]));
            copies.push(median(&mut values) as f64);
        }
        if copies.len() < 10 {
            continue;
        }
        let n = copies.len() as f64;
        let mean = copies.iter().sum::<f64>() / n;
        let sd = (copies.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n).sqrt();
        out[l as usize] = Some((mean - own) / sd.max(1e-6));
    }
    out
}

/// The median of `v` (the upper of the two middle values for an even count); `v` is reordered.
pub(crate) fn median(v: &mut [f32]) -> f32 {
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, f32::total_cmp).1
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
    fn tumour_touching_subcutaneous_fat_is_dropped() {
        // One 30 × 30 slice of 1 mm pixels, rings from the border inward: air (2 pixels),
        // skin, fat (3), muscle (3), liver. The network's liver took in the muscle. Inside
        // the liver, a gas pocket (x 14–15, y 20–21) with fat around it. Tumour A lies in
        // the muscle against the fat under the skin; tumour C against the fat around the gas.
        let ring = |i: usize, j: usize| i.min(j).min(29 - i).min(29 - j);
        let pocket = |i: usize, j: usize| (13..=16).contains(&i) && (19..=22).contains(&j);
        let gas = |i: usize, j: usize| (14..=15).contains(&i) && (20..=21).contains(&j);
        let a = |i: usize, j: usize| (6..=7).contains(&i) && (10..=13).contains(&j);
        let c = |i: usize, j: usize| (17..=18).contains(&i) && (20..=21).contains(&j);
        let mut m = mask([30, 30, 1], |i, j, _| match ring(i, j) {
            _ if a(i, j) || c(i, j) => 2,
            0..=5 => 0,
            _ => 1,
        });
        let hu_of = |air: f32| -> Vec<f32> {
            let g = m.geometry();
            let mut hu = vec![0.0; g.len()];
            for j in 0..30 {
                for i in 0..30 {
                    hu[g.index(i, j, 0)] = match ring(i, j) {
                        _ if gas(i, j) => -1000.0,
                        _ if pocket(i, j) => -100.0,
                        0..=1 => air,
                        2 => 40.0,
                        3..=5 => -100.0,
                        6..=8 => 52.0,
                        _ => 60.0,
                    };
                }
            }
            hu
        };
        let g = m.geometry().clone();
        // Without air outside the body (a body that fills the image), no fat is known to be
        // under the skin: nothing goes.
        let filled = CtVolume::new(g.clone(), hu_of(40.0)).unwrap();
        assert_eq!(drop_body_wall_tumours(&mut m.clone(), &filled), 0);
        let ct = CtVolume::new(g.clone(), hu_of(-1000.0)).unwrap();
        assert_eq!(drop_body_wall_tumours(&mut m, &ct), 1);
        assert_eq!(
            m.labels()[g.index(6, 11, 0)],
            label::BACKGROUND,
            "A dropped"
        );
        assert_eq!(m.labels()[g.index(17, 20, 0)], label::TUMOUR, "C kept");
    }

    #[test]
    fn tumour_mostly_facing_background_is_dropped() {
        // Liver in x 0..=5 of a 12 × 3 × 3 volume (1 × 1 × 2 mm). Tumour A fills x 2..=3 at
        // y 1, z 1, enclosed by liver; tumour B fills x 6..=8 in every y and z beside the
        // liver, in background, so only its face at x 5 touches liver.
        let mut m = mask([12, 3, 3], |i, j, k| match (i, j, k) {
            (2..=3, 1, 1) => 2,
            (6..=8, _, _) => 2,
            (0..=5, _, _) => 1,
            _ => 0,
        });
        let g = m.geometry().clone();
        // B: surface 9 × 2 mm² toward the liver, 9 × 2 toward x 9, and across y and z the
        // rest (faces at the volume's edge do not count): only x 9 faces background, half.
        assert_eq!(drop_extrahepatic_tumours(&mut m.clone(), 0.5), 0);
        assert_eq!(drop_extrahepatic_tumours(&mut m, 0.4), 1);
        assert_eq!(m.labels()[g.index(7, 1, 1)], 0, "B dropped to background");
        assert_eq!(
            m.labels()[g.index(2, 1, 1)],
            2,
            "A, enclosed by liver, kept"
        );
        assert_eq!(
            drop_extrahepatic_tumours(&mut m, 0.0),
            0,
            "A faces no background"
        );
        // A share of 1 or more keeps everything.
        let mut all = mask([3, 1, 1], |i, _, _| if i == 1 { 2 } else { 0 });
        assert_eq!(drop_extrahepatic_tumours(&mut all, 1.0), 0);
        assert_eq!(drop_extrahepatic_tumours(&mut all, 0.99), 1);
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

    #[test]
    fn a_fat_dense_component_is_no_lesion_and_a_cyst_dense_one_stays() {
        // Four tumour components of 3 voxels in liver at 60 HU: fat (-80 HU), fat partly
        // volumed with liver (median -20 HU: mostly fat), a lesion at the fat's border (one
        // voxel of fat, median 25 HU) and a cyst (5 HU).
        let mut m = mask([20, 1, 1], |i, _, _| match i {
            1..=3 | 6..=8 | 11..=13 | 16..=18 => 2,
            _ => 1,
        });
        let hu: Vec<f32> = (0..20)
            .map(|i| match i {
                1..=3 => -80.0,
                6 => -90.0,
                7 => -20.0,
                8 => 40.0,
                11 => -90.0,
                12 => 25.0,
                13 => 30.0,
                16..=18 => 5.0,
                _ => 60.0,
            })
            .collect();
        let ct = CtVolume::new(m.geometry().clone(), hu).unwrap();
        assert_eq!(drop_fat_tumours(&mut m, &ct), 2);
        assert!(m.labels()[1..=3].iter().all(|&v| v == label::BACKGROUND));
        assert!(m.labels()[6..=8].iter().all(|&v| v == label::BACKGROUND));
        assert!(m.labels()[11..=13].iter().all(|&v| v == label::TUMOUR));
        assert!(m.labels()[16..=18].iter().all(|&v| v == label::TUMOUR));
        assert_eq!(m.labels()[0], label::LIVER);
    }

    #[test]
    fn the_ct_confirms_a_dark_candidate_and_not_one_like_the_liver() {
        // Liver of 60 HU with noise of ±15 HU everywhere; two 4 × 4 × 2 tumour components:
        // one 25 HU darker than the liver, one with the liver's own values.
        let shape = [40, 40, 6];
        let m = mask(shape, |i, j, k| {
            let a = (4..8).contains(&i) && (4..8).contains(&j);
            let b = (26..30).contains(&i) && (26..30).contains(&j);
            if (a || b) && (2..4).contains(&k) {
                2
            } else {
                1
            }
        });
        let mut rng = Rng::new(7, 0);
        let hu: Vec<f32> = m
            .labels()
            .iter()
            .enumerate()
            .map(|(n, _)| {
                let (i, j) = (n % 40, (n / 40) % 40);
                let dark =
                    (4..8).contains(&i) && (4..8).contains(&j) && (2..4).contains(&(n / 1600));
                let base = if dark { 35.0 } else { 60.0 };
                base + rng.range(-15.0, 15.0) as f32
            })
            .collect();
        let ct = CtVolume::new(m.geometry().clone(), hu).unwrap();
        let comps = tumour_components(&m);
        assert_eq!(comps.count(), 2);
        let z = contrast_z(&m, &ct, &comps, |_| true);
        let (dark, plain) = (z[1].unwrap(), z[2].unwrap());
        assert!(dark > 5.0, "dark candidate: z {dark}");
        assert!(plain.abs() < 3.0, "candidate like the liver: z {plain}");
        // Only picked components are scored, and the same input gives the same scores.
        let only = contrast_z(&m, &ct, &comps, |l| l == 2);
        assert_eq!(only[1], None);
        assert_eq!(only[2], z[2]);
    }
}
