//! Small dark lesions the network did not find, found in the CT itself. The patch classifier
//! misses lesions under about 1 mL that a reader sees at once: dark spots 30–40 HU below the
//! liver, often beside a contrast-filled vessel or inside a thin bright rim, which its patches
//! have learned to take for liver between vessels. This step looks for them the way a
//! matched filter would: the CT, lightly smoothed in-plane to the size of such a lesion, is
//! compared with the liver around it (a wide, robust local mean of the parenchyma), and the
//! difference is scored in units of its own spread over the study's liver — noise, texture
//! and partial volume as this scan has them. A spot is kept as tumour only where it is
//! unmistakable: a peak score well above anything noise or texture reach, away from the
//! liver's surface (where partial volume with fat and neighbouring organs darkens the edge)
//! unless dark throughout, not water- or fat-dense (gallbladder, fissures), and of a small
//! lesion's size.

use super::Components;
use super::postprocess::median;
use crate::lesions::Connectivity;
use crate::volume::blur::{gaussian_blur, kernel_radius};
use crate::volume::crop::{Window, bounding_box};
use crate::volume::edt::squared_distance;
use crate::volume::{CtVolume, LabelVolume, label};

/// In-plane Gaussian smoothing of the CT (σ, mm): the size of the lesions looked for.
const SMOOTH_MM: f64 = 1.5;
/// The local liver: parenchyma averaged with an in-plane Gaussian of this σ (mm).
const BACKGROUND_MM: f64 = 8.0;
/// Parenchyma values are clipped to its median − this × its spread and + `CLIP_HIGH` ×
/// before averaging, so vessels and lesions do not pull the local liver away.
const CLIP_LOW: f32 = 3.0;
const CLIP_HIGH: f32 = 2.0;
/// Where spots are looked for: liver voxels at least this far (mm) in-plane from the
/// liver's edge, with liver in the slices above and below …
const EDGE_MM: f64 = 3.0;
/// … and farther than this (mm, in-plane) from any tumour the network found, in the same slice
/// or the next ones: what lies nearer is that lesion's own (the network draws small lesions
/// too small, and the extent refinement that follows grows them by up to 6 mm).
const TUMOUR_GAP_MM: f64 = 6.0;
/// A spot: 26-connected voxels scoring at least this.
const SPOT_Z: f64 = 2.5;
/// A spot's deepest point is not water- or fat-dense (smoothed HU at least this) …
const MIN_HU: f32 = 10.0;
/// … and lies at least this far (mm, 3D) inside the liver, …
const SURFACE_MM: f64 = 4.5;
/// … unless the spot is plainly darker than the liver, its median at least this many HU below
/// the parenchyma's, with the surface that near in-plane, not above or below. Partial volume
/// with what lies beyond the liver darkens a spot's deepest voxels but hardly its median; a
/// small lesion at the surface is dark throughout. (The liver's last slices average it with the
/// fat beyond: there the surface rule holds whatever the contrast.)
const CLEAR_HU: f32 = 30.0;
/// A spot's volume (mm³) lies in this range: smaller is noise, larger a dark region that
/// the network saw and did not call (fissure, ligament).
const VOLUME_MM3: (f64, f64) = (100.0, 1000.0);
/// Fewest voxels the spread of the score is estimated from.
const MIN_SEARCH_VOXELS: usize = 1000;

/// Marks as tumour the small dark spots of the liver (label 1) whose peak score (local liver
/// minus smoothed CT, in units of the score's robust spread over the search region) reaches
/// `min_z`, as described in the module notes; an infinite or NaN `min_z` changes nothing.
/// Deterministic. Returns the number of spots added.
///
/// The work is done on the liver's bounding box, grown in-plane by the reach of the widest blur
/// and by a slice above and below: every value the search reads inside the liver (blurs,
/// distances to the liver's outside and to tumour) is then the one the whole volume gives, so
/// the result is identical at a fraction of the cost.
pub fn find_missed_lesions(mask: &mut LabelVolume, ct: &CtVolume, min_z: f64) -> usize {
    if !min_z.is_finite() || ct.geometry().shape() != mask.geometry().shape() {
        return 0;
    }
    let shape = mask.geometry().shape();
    let spacing = mask.geometry().spacing_mm();
    let Some(bbox) = bounding_box(mask.labels(), shape, |v| v >= label::LIVER) else {
        return 0;
    };
    let widest = BACKGROUND_MM.max(SMOOTH_MM);
    let margin = [
        kernel_radius(widest / spacing[0]) + 1,
        kernel_radius(widest / spacing[1]) + 1,
        1,
    ];
    let voxel_mm3 = mask.geometry().voxel_volume_mm3();
    let window = Window::around(bbox, margin, shape);
    if window.is_whole() {
        return search(mask.labels_mut(), ct.hu(), shape, spacing, voxel_mm3, min_z);
    }
    let mut labels = window.extract(mask.labels());
    let hu = window.extract(ct.hu());
    let added = search(&mut labels, &hu, window.shape(), spacing, voxel_mm3, min_z);
    if added > 0 {
        window.write_back(&labels, mask.labels_mut());
    }
    added
}

/// The search of `find_missed_lesions` on a box of the volume (`labels` and `hu` of `shape`).
fn search(
    labels: &mut [u8],
    hu: &[f32],
    shape: [usize; 3],
    spacing: [f64; 3],
    voxel_mm3: f64,
    min_z: f64,
) -> usize {
    let [nx, ny, nz] = shape;
    let plane = nx * ny;
    let n = labels.len();

    let liver: Vec<bool> = labels.iter().map(|&v| v >= label::LIVER).collect();
    let mut parenchyma: Vec<f32> = (0..n)
        .filter(|&i| labels[i] == label::LIVER)
        .map(|i| hu[i])
        .collect();
    if parenchyma.len() < MIN_SEARCH_VOXELS {
        return 0;
    }
    let (liver_hu, spread) = median_and_spread(&mut parenchyma);
    drop(parenchyma);
    let (lo, hi) = (liver_hu - CLIP_LOW * spread, liver_hu + CLIP_HIGH * spread);

    // The local liver: a normalised in-plane average of clipped parenchyma.
    let bg_sigma = [BACKGROUND_MM / spacing[0], BACKGROUND_MM / spacing[1], 0.0];
    let weight: Vec<f32> = labels
        .iter()
        .map(|&v| f32::from(u8::from(v == label::LIVER)))
        .collect();
    let sum: Vec<f32> = (0..n)
        .map(|i| {
            if labels[i] == label::LIVER {
                hu[i].clamp(lo, hi)
            } else {
                0.0
            }
        })
        .collect();
    let weight = gaussian_blur(weight, shape, bg_sigma);
    let sum = gaussian_blur(sum, shape, bg_sigma);
    let smooth = gaussian_blur(
        hu.to_vec(),
        shape,
        [SMOOTH_MM / spacing[0], SMOOTH_MM / spacing[1], 0.0],
    );
    let diff: Vec<f32> = (0..n)
        .map(|i| sum[i] / weight[i].max(1e-3) - smooth[i])
        .collect();

    // Where to look.
    let outside: Vec<bool> = liver.iter().map(|&l| !l).collect();
    let edge = squared_distance(&outside, shape, [spacing[0], spacing[1], 1e6]);
    let surface = squared_distance(&outside, shape, spacing);
    let tumour: Vec<bool> = (0..n)
        .map(|i| {
            let z = i / plane;
            (z.saturating_sub(1)..(z + 2).min(nz))
                .any(|zz| labels[i % plane + zz * plane] == label::TUMOUR)
        })
        .collect();
    let to_tumour = squared_distance(&tumour, shape, [spacing[0], spacing[1], 1e6]);
    let search: Vec<bool> = (0..n)
        .map(|i| {
            let z = i / plane;
            liver[i]
                && z > 0
                && z + 1 < nz
                && liver[i - plane]
                && liver[i + plane]
                && edge[i] >= EDGE_MM * EDGE_MM
                && to_tumour[i] > TUMOUR_GAP_MM * TUMOUR_GAP_MM
        })
        .collect();
    let mut scores: Vec<f32> = (0..n).filter(|&i| search[i]).map(|i| diff[i]).collect();
    if scores.len() < MIN_SEARCH_VOXELS {
        return 0;
    }
    let sd = median_and_spread(&mut scores).1 as f64;
    drop(scores);
    if sd.is_nan() || sd <= 0.0 {
        return 0;
    }
    let z: Vec<f64> = diff.iter().map(|&d| d as f64 / sd).collect();

    let spots: Vec<u8> = (0..n)
        .map(|i| u8::from(search[i] && z[i] >= SPOT_Z))
        .collect();
    let comps = Components::label(&spots, shape, |v| v == 1, Connectivity::TwentySix);
    let sizes = comps.sizes();
    // Each spot's deepest point (highest score; ties: first voxel).
    let mut peak: Vec<Option<usize>> = vec![None; comps.count() + 1];
    for (r, l) in comps.runs() {
        let row = r.row as usize * nx;
        for x in r.start as usize..r.end as usize {
            let i = row + x;
            let p = &mut peak[l as usize];
            if p.is_none_or(|j| z[i] > z[j]) {
                *p = Some(i);
            }
        }
    }
    // A spot whose deepest point lies nearer the surface than `SURFACE_MM` is kept only where
    // that surface is beside it in-plane (not above or below it: the liver's last slices
    // average it with the fat beyond) and its median is plainly dark.
    let mut values = comps.values(hu);
    let keep: Vec<bool> = (0..=comps.count())
        .map(|l| {
            let Some(i) = peak[l] else { return false };
            let mm3 = sizes[l] as f64 * voxel_mm3;
            z[i] >= min_z
                && smooth[i] >= MIN_HU
                && (VOLUME_MM3.0..=VOLUME_MM3.1).contains(&mm3)
                && (surface[i] >= SURFACE_MM * SURFACE_MM
                    || (edge[i] < SURFACE_MM * SURFACE_MM
                        && median(&mut values[l]) <= liver_hu - CLEAR_HU))
        })
        .collect();
    let added = keep.iter().filter(|&&k| k).count();
    if added > 0 {
        comps.fill(labels, |l| keep[l as usize], label::TUMOUR);
    }
    added
}

/// The median of `values` and their robust standard deviation (1.4826 × the median absolute
/// deviation: the standard deviation for normal values, unmoved by a minority of outliers).
fn median_and_spread(values: &mut [f32]) -> (f32, f32) {
    let centre = median(values);
    let mut dev: Vec<f32> = values.iter().map(|v| (v - centre).abs()).collect();
    (centre, 1.4826 * median(&mut dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    /// A liver of 64 × 64 × 12 voxels (1 × 1 × 2 mm; slices 2–13) inside a 72 × 72 × 16 volume
    /// of fat, at 60 HU with deterministic noise of about 8 HU, and dark spots (centre in
    /// voxels, radius in mm, HU) in it.
    fn study(spots: &[([f64; 3], f64, f32)]) -> (LabelVolume, CtVolume) {
        study_in([72, 72, 16], spots)
    }

    /// The same liver in the corner of a volume of fat of `shape` (at least 72 × 72 × 16).
    fn study_in(shape: [usize; 3], spots: &[([f64; 3], f64, f32)]) -> (LabelVolume, CtVolume) {
        let [nx, ny, nz] = shape;
        let axes = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let g = Geometry::new(shape, [1.0, 1.0, 2.0], axes, [0.0; 3]).unwrap();
        let mut labels = vec![label::BACKGROUND; g.len()];
        let mut hu = vec![-90.0f32; g.len()];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let i = x + nx * (y + ny * z);
                    // xorshift noise, roughly uniform ±14 HU (sd ≈ 8).
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let noise = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 28.0;
                    if (4..68).contains(&x) && (4..68).contains(&y) && (2..14).contains(&z) {
                        labels[i] = label::LIVER;
                        hu[i] = 60.0 + noise;
                        for &(c, r, dark) in spots {
                            let d2 = (x as f64 - c[0]).powi(2)
                                + (y as f64 - c[1]).powi(2)
                                + (2.0 * (z as f64 - c[2])).powi(2);
                            if d2 <= r * r {
                                hu[i] = dark + noise;
                            }
                        }
                    } else {
                        hu[i] += noise;
                    }
                }
            }
        }
        (
            LabelVolume::new(g.clone(), labels).unwrap(),
            CtVolume::new(g, hu).unwrap(),
        )
    }

    fn tumour_voxels(mask: &LabelVolume) -> Vec<usize> {
        (0..mask.labels().len())
            .filter(|&i| mask.labels()[i] == label::TUMOUR)
            .collect()
    }

    #[test]
    fn a_small_dark_spot_in_the_liver_becomes_tumour() {
        // A 4 mm-radius spot 35 HU darker than the liver, deep inside it.
        let (mut mask, ct) = study(&[([30.0, 36.0, 6.0], 4.0, 25.0)]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 1);
        let t = tumour_voxels(&mask);
        assert!(!t.is_empty());
        for i in t {
            let (x, y, z) = (i % 72, (i / 72) % 72, i / (72 * 72));
            let d2 = (x as f64 - 30.0).powi(2)
                + (y as f64 - 36.0).powi(2)
                + (2.0 * (z as f64 - 6.0)).powi(2);
            assert!(d2 <= 36.0, "tumour at ({x}, {y}, {z}) is not the spot");
        }
        // Infinity turns the step off.
        let (mut mask, ct) = study(&[([30.0, 36.0, 6.0], 4.0, 25.0)]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, f64::INFINITY), 0);
        assert!(tumour_voxels(&mask).is_empty());
    }

    /// The study of `study`, with an organ of nearly the liver's density (55 HU) instead of fat
    /// beyond its edge at x < 4, as where the liver meets the kidney or the stomach.
    fn beside_an_organ(spots: &[([f64; 3], f64, f32)]) -> (LabelVolume, CtVolume) {
        let (mask, ct) = study(spots);
        let hu = ct
            .hu()
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 72 < 4 { v + 145.0 } else { v })
            .collect();
        (mask, CtVolume::new(ct.geometry().clone(), hu).unwrap())
    }

    #[test]
    fn a_plainly_dark_spot_at_the_liver_s_surface_becomes_tumour() {
        // 40 HU darker than the liver, centred 3.5 mm inside its edge: the spot's deepest point
        // lies nearer the surface than `SURFACE_MM`, and its median decides.
        let (mut mask, ct) = beside_an_organ(&[([6.5, 36.0, 7.0], 4.0, 20.0)]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 1);
        let t = tumour_voxels(&mask);
        assert!(t.iter().all(|&i| {
            let (x, y, z) = (i % 72, (i / 72) % 72, i / (72 * 72));
            (x as f64 - 6.5).powi(2) + (y as f64 - 36.0).powi(2) + (2.0 * (z as f64 - 7.0)).powi(2)
                <= 36.0
        }));
        // The same spot 20 HU darker than the liver: partial volume with what lies beyond the
        // liver looks like that near its surface, and it is left alone there …
        let (mut mask, ct) = beside_an_organ(&[([6.5, 36.0, 7.0], 4.0, 40.0)]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 0);
        // … but found deep inside the liver.
        let (mut mask, ct) = beside_an_organ(&[([30.0, 36.0, 7.0], 4.0, 40.0)]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 1);
        // (Near the liver's last slices the surface rule holds whatever the contrast: see
        // `noise_faint_large_or_fluid_dark_regions_and_found_lesions_are_left_alone`.)
    }

    #[test]
    fn the_search_on_the_liver_s_box_equals_the_search_on_the_whole_volume() {
        // The liver fills x, y 4–67 and slices 2–13 of 150 × 130 × 20: its box grown by the
        // blur's reach (25 px) and a slice leaves fat beyond it on three sides.
        let spots = [
            ([30.0, 36.0, 6.0], 4.0, 25.0),
            ([50.0, 20.0, 9.0], 3.0, 28.0),
            ([12.0, 60.0, 4.0], 3.5, 30.0),
        ];
        let (mut boxed, ct) = study_in([150, 130, 20], &spots);
        let mut whole = boxed.clone();
        let spacing = ct.geometry().spacing_mm();
        let added = search(
            whole.labels_mut(),
            ct.hu(),
            [150, 130, 20],
            spacing,
            ct.geometry().voxel_volume_mm3(),
            4.0,
        );
        assert!(added >= 2, "the spots are found ({added})");
        assert_eq!(find_missed_lesions(&mut boxed, &ct, 4.0), added);
        assert!(
            boxed.labels() == whole.labels(),
            "the same voxels become tumour"
        );
    }

    #[test]
    fn noise_faint_large_or_fluid_dark_regions_and_found_lesions_are_left_alone() {
        // Noise alone.
        let (mut mask, ct) = study(&[]);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 0);
        assert!(tumour_voxels(&mask).is_empty());
        // None of these is the small, clear, deep lesion looked for (the spot of the test
        // above, changed in one respect each).
        for (what, spot) in [
            ("5 HU of contrast", ([30.0, 36.0, 6.0], 4.0, 55.0)),
            ("fluid density", ([30.0, 36.0, 6.0], 4.0, -5.0)),
            ("a large dark region", ([36.0, 36.0, 8.0], 9.0, 25.0)),
            (
                "at the liver's edge, beside fat",
                ([7.0, 36.0, 6.0], 5.0, 25.0),
            ),
            (
                "at the liver's edge, 15 HU of contrast",
                ([7.0, 36.0, 6.0], 5.0, 45.0),
            ),
            (
                "4 mm from the liver's last slice",
                ([36.0, 36.0, 3.0], 4.0, 25.0),
            ),
        ] {
            let (mut mask, ct) = study(&[spot]);
            assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 0, "{what}");
        }
        // A spot the network already marked (its voxels are tumour) gains no neighbour.
        let (mut mask, ct) = study(&[([30.0, 36.0, 6.0], 4.0, 25.0)]);
        for i in 0..mask.labels().len() {
            let (x, y, z) = (i % 72, (i / 72) % 72, i / (72 * 72));
            if (28..=32).contains(&x) && (34..=38).contains(&y) && (5..=7).contains(&z) {
                mask.labels_mut()[i] = label::TUMOUR;
            }
        }
        let before = tumour_voxels(&mask);
        assert_eq!(find_missed_lesions(&mut mask, &ct, 5.0), 0);
        assert_eq!(tumour_voxels(&mask), before);
    }
}
