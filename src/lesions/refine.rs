//! Extent refinement of tumour components from the CT: the network decides *where* a lesion
//! is, the study's own contrast between that lesion and the liver around it decides *how far*
//! it reaches. A patch classifier trained on class-balanced crops draws small and
//! low-contrast lesions too small and leaves out the bright rim of rim-enhancing ones; a
//! threshold halfway between the lesion's and its surrounding liver's median CT values, on
//! a lightly smoothed CT, recovers the boundary the CT itself shows.

use super::Components;
use super::postprocess::median;
use super::surroundings::{Drawn, MIN_CONTRAST_HU, SHELL_MM};
use crate::lesions::Connectivity;
use crate::volume::blur::gaussian_blur;
use crate::volume::edt::squared_distance;
use crate::volume::{CtVolume, LabelVolume, label};

/// Where between the component's median (0) and its shell's (1) the boundary lies.
const THRESHOLD_FRACTION: f32 = 0.5;
/// In-plane Gaussian smoothing of the CT before the threshold (σ, mm).
const SMOOTH_MM: f64 = 1.4;
/// A rim-enhancing lesion's rim: voxels within this distance (mm) of the dark core, in its
/// slices, that are brighter than the shell's median by `RIM_HU`.
const RIM_MM: f64 = 4.5;
const RIM_HU: f32 = 20.0;
/// … and rings around the core, one pixel wide, whose median is brighter than the shell's by
/// `RIM_RING_HU` (`bright_rings`), each of at least `RIM_RING_MIN_VOXELS` voxels.
const RIM_RING_HU: f32 = 6.0;
const RIM_RING_MIN_VOXELS: usize = 8;
/// The liver the rings are compared with: parenchyma in the component's slices this far from
/// it in-plane (mm), beyond any rim.
const RIM_SHELL_MM: (f64, f64) = (8.0, 14.0);
/// Radius (mm) of the in-plane disc that closes each redrawn lesion: two pixels of a typical
/// abdominal CT.
const CLOSE_MM: f64 = 3.6;

/// Redraws each tumour component (26-connected) within `grow_mm` of where the network put it,
/// from the CT: the component's median CT value and the median of the liver around it
/// (`SHELL_MM`) set a threshold halfway between them; the voxels of the smoothed CT darker
/// than that (beyond the component itself, only those an in-plane 3 × 3 opening of them
/// keeps), connected to the part of the component that is, become the lesion's core, and
/// voxels next to that core brighter than the liver by `RIM_HU` its rim (rim-enhancing
/// lesions); that extent is closed in-plane with a disc of `CLOSE_MM` and the liver it
/// encloses in a slice joins it. A component's voxels outside the new extent become liver.
/// Tumour takes liver (label 1) voxels, and background voxels as dark as the lesion (within
/// the threshold's distance of its median: the part of a lesion at the liver's surface that
/// the network's liver cut off), never fat, air, vessels or organs as bright as the liver; each
/// component grows only into voxels nearer to it than to any other component (by a voxel
/// diagonal), so neighbours never merge by growing. Components with no shell, too little
/// contrast (< `MIN_CONTRAST_HU`) or no dark voxel of their own keep the network's extent.
/// `grow_mm` ≤ 0 changes nothing. Deterministic. Returns the number of components redrawn.
pub fn refine_tumour_extents(mask: &mut LabelVolume, ct: &CtVolume, grow_mm: f64) -> usize {
    if grow_mm.is_nan() || grow_mm <= 0.0 || ct.geometry().shape() != mask.geometry().shape() {
        return 0;
    }
    let Some(drawn) = Drawn::new(mask) else {
        return 0;
    };
    let spacing = drawn.spacing;
    let reach = grow_mm + RIM_MM;
    // Voxels that may join lie within `reach` of a component; a rival that matters to one of
    // them lies within 2·reach + a diagonal. The smoothing needs 3σ more.
    let margin_mm = (2.0 * reach + drawn.diagonal).max(RIM_SHELL_MM.1) + 3.0 * SMOOTH_MM;
    let mut changed = 0;
    for l in drawn.components() {
        let around = drawn.around(l, margin_mm, ct);
        let n = around.b.len();
        let Some(liver_hu) = around.liver_median(SHELL_MM) else {
            continue;
        };
        let lesion_hu = around.lesion_median();
        if liver_hu - lesion_hu < MIN_CONTRAST_HU {
            continue;
        }
        let threshold = lesion_hu + THRESHOLD_FRACTION * (liver_hu - lesion_hu);
        let sigma = [SMOOTH_MM / spacing[0], SMOOTH_MM / spacing[1], 0.0];
        // The rim of a rim-enhancing lesion can fill the near shell; the rings compare with
        // liver beyond it.
        let far_hu = around.liver_median(RIM_SHELL_MM).unwrap_or(liver_hu);
        let smooth = gaussian_blur(around.hu.clone(), around.b.shape, sigma);
        // Where the network's liver cuts through a lesion at its surface, the part it left
        // out is background as dark as the lesion: the lesion may take background voxels
        // whose smoothed CT lies as near its median as the threshold does — never fat, air,
        // vessels or organs as bright as the liver.
        let lowest = lesion_hu - (threshold - lesion_hu);
        let (owned, d_this) = around.owned_or(|i| {
            around.labels[i] == label::BACKGROUND && smooth[i] > lowest && smooth[i] < threshold
        });
        let this = &around.this;

        let grow2 = grow_mm * grow_mm;
        let dark: Vec<bool> = (0..n)
            .map(|i| owned[i] && d_this[i] <= grow2 && smooth[i] < threshold)
            .collect();
        // Beyond the network's extent, only what an in-plane 3 × 3 opening keeps: a faint
        // lesion's threshold cuts through the liver's noise, and the specks and one-pixel
        // threads of liver below it would otherwise join the lesion.
        let bs = around.b.shape;
        let opened = square_filter(&square_filter(&dark, bs, false), bs, true);
        let dark: Vec<bool> = (0..n).map(|i| dark[i] && (this[i] || opened[i])).collect();
        // The dark parts the component overlaps much (a part that only grazes it, where the
        // component's own non-dark voxels bridged to it, would become a speck of its own).
        let Some(core) = around.carrying_parts(&dark) else {
            continue;
        };
        // Distances to the core within its slices: on thick slices a bright vessel in the
        // slice above a lesion is no rim of it.
        let d_core = squared_distance(&core, bs, [spacing[0], spacing[1], 1e6]);
        let rim_hu = liver_hu + RIM_HU;
        let mut new: Vec<bool> = (0..n)
            .map(|i| core[i] || (d_core[i] <= RIM_MM * RIM_MM && smooth[i] > rim_hu))
            .collect();
        let ring_mm = spacing[0].min(spacing[1]);
        let candidate = |i: usize| owned[i] && !core[i];
        for i in bright_rings(&d_core, &smooth, candidate, ring_mm, far_hu) {
            new[i] = true;
        }
        // A lesion is solid: its notches and the liver it encloses in a slice are its own.
        close_in_plane(&mut new, bs, spacing);
        fill_holes_in_plane(&mut new, bs);
        for (v, &o) in new.iter_mut().zip(&owned) {
            *v = *v && o;
        }
        // Rim pieces cut off from the core are not this lesion's.
        let new = around.touching(&new, &core);
        around.write(&new, mask.labels_mut());
        changed += 1;
    }
    changed
}

/// The voxels of the rings around a lesion's core in its own slices, `ring_mm` wide each, out to the farthest
/// ring within `RIM_MM` whose median (smoothed CT) is brighter than the liver by
/// `RIM_RING_HU`: a thin enhancing rim that blur and partial volume have dimmed below `RIM_HU`
/// voxel by voxel still lifts the median of a whole ring, which noise and a vessel crossing
/// part of it do not. The rings inside that one (the blurred step from the dark core up to the
/// rim) join with it. `candidate` says which voxels may join; `d_core` holds squared in-plane
/// distances (mm²) to the core (thick slices would make a ring's caps a different distance
/// from its sides).
fn bright_rings(
    d_core: &[f64],
    smooth: &[f32],
    candidate: impl Fn(usize) -> bool,
    ring_mm: f64,
    liver_hu: f32,
) -> Vec<usize> {
    let rings = (RIM_MM / ring_mm).ceil() as usize;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); rings];
    for (i, &d) in d_core.iter().enumerate() {
        if d > 0.0 && d <= RIM_MM * RIM_MM && candidate(i) {
            let k = ((d.sqrt() / ring_mm).ceil() as usize).clamp(1, rings) - 1;
            members[k].push(i);
        }
    }
    let farthest = members.iter().rposition(|ring| {
        let mut values: Vec<f32> = ring.iter().map(|&i| smooth[i]).collect();
        ring.len() >= RIM_RING_MIN_VOXELS && median(&mut values) >= liver_hu + RIM_RING_HU
    });
    match farthest {
        Some(k) => members[..=k].concat(),
        None => Vec::new(),
    }
}

/// Morphological closing with an in-plane disc of radius `CLOSE_MM`, added to the mask (a
/// closing never removes a voxel): fills the gaps between core and rim and the notches that
/// noise cuts into a faint lesion's outline.
fn close_in_plane(mask: &mut [bool], shape: [usize; 3], spacing: [f64; 3]) {
    let plane = [spacing[0], spacing[1], 1e6];
    let r2 = CLOSE_MM * CLOSE_MM;
    let dilated: Vec<bool> = squared_distance(mask, shape, plane)
        .into_iter()
        .map(|d| d <= r2)
        .collect();
    let outside: Vec<bool> = dilated.iter().map(|&d| !d).collect();
    let to_outside = squared_distance(&outside, shape, plane);
    for (m, d) in mask.iter_mut().zip(to_outside) {
        *m = *m || d > r2;
    }
}

/// Fills, slice by slice, the holes of the mask: the in-plane (4-connected) components of
/// unset voxels that do not reach the slice's border.
fn fill_holes_in_plane(mask: &mut [bool], shape: [usize; 3]) {
    let [nx, ny, _] = shape;
    for slice in mask.chunks_mut(nx * ny) {
        let mut bytes: Vec<u8> = slice.iter().map(|&v| u8::from(v)).collect();
        let gaps = Components::label(&bytes, [nx, ny, 1], |v| v == 0, Connectivity::Six);
        let boxes = gaps.bounding_boxes();
        let enclosed = |l: u32| {
            let (lo, hi) = boxes[l as usize];
            lo[0] > 0 && lo[1] > 0 && hi[0] + 1 < nx && hi[1] + 1 < ny
        };
        if gaps.fill(&mut bytes, enclosed, 1) > 0 {
            for (v, &b) in slice.iter_mut().zip(&bytes) {
                *v = b == 1;
            }
        }
    }
}

/// In-plane 3 × 3 dilation (`any`) or erosion (all); beyond the box counts as unset for a
/// dilation and as set for an erosion.
fn square_filter(mask: &[bool], shape: [usize; 3], any: bool) -> Vec<bool> {
    let [nx, ny, _] = shape;
    let mut out = vec![false; mask.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (x, y) = (i % nx, (i / nx) % ny);
        let mut hit = !any;
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                let v = if xx < 0 || yy < 0 || xx >= nx as i64 || yy >= ny as i64 {
                    !any
                } else {
                    mask[(i as i64 + dx + dy * nx as i64) as usize]
                };
                if any && v {
                    hit = true;
                } else if !any && !v {
                    hit = false;
                }
            }
        }
        *o = hit;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::postprocess::tumour_components;
    use super::super::surroundings::test_study as study;
    use super::*;
    use crate::volume::label;

    /// In-plane distance from (cx, cy) on slices 1..=3.
    fn r(x: usize, y: usize, z: usize, cx: f64, cy: f64) -> f64 {
        if !(1..=3).contains(&z) {
            return f64::INFINITY;
        }
        ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt()
    }

    fn tumour_where(m: &LabelVolume, f: impl Fn(usize, usize, usize) -> bool) -> (usize, usize) {
        let g = m.geometry();
        let (mut hit, mut all) = (0, 0);
        for z in 0..5 {
            for y in 0..40 {
                for x in 0..40 {
                    if f(x, y, z) {
                        all += 1;
                        hit += usize::from(m.labels()[g.index(x, y, z)] == label::TUMOUR);
                    }
                }
            }
        }
        (hit, all)
    }

    /// Labels background the voxels of every slice where `f(x, y)` holds.
    fn background_where(m: &mut LabelVolume, f: impl Fn(usize, usize) -> bool) {
        let g = m.geometry().clone();
        for z in 0..5 {
            for y in 0..40 {
                for x in 0..40 {
                    if f(x, y) {
                        m.labels_mut()[g.index(x, y, z)] = label::BACKGROUND;
                    }
                }
            }
        }
    }

    #[test]
    fn a_lesion_drawn_too_small_takes_the_extent_the_ct_shows() {
        // A 20 HU disc of radius 7 mm; the network found only its middle (radius 3).
        let (mut m, ct) = study(
            |x, y, z| (r(x, y, z, 20.0, 20.0) <= 7.0).then_some(20.0),
            |x, y, z| r(x, y, z, 20.0, 20.0) <= 3.0,
        );
        assert_eq!(refine_tumour_extents(&mut m, &ct, 6.0), 1);
        let (inside, all) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) <= 6.0);
        assert_eq!(inside, all, "the disc's inside is tumour");
        let (outside, _) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) > 8.0);
        assert_eq!(outside, 0, "nothing beyond its edge");
        // Growth stops at `grow_mm`: 2 mm more than the network's radius of 3.
        let (mut m2, ct2) = study(
            |x, y, z| (r(x, y, z, 20.0, 20.0) <= 7.0).then_some(20.0),
            |x, y, z| r(x, y, z, 20.0, 20.0) <= 3.0,
        );
        refine_tumour_extents(&mut m2, &ct2, 2.0);
        let (beyond, _) = tumour_where(&m2, |x, y, z| r(x, y, z, 20.0, 20.0) > 5.5);
        assert_eq!(beyond, 0);
    }

    #[test]
    fn threads_of_liver_below_the_threshold_do_not_join() {
        // A 40 HU disc of radius 5 (network: radius 3) with a one-pixel thread of 20 HU from
        // its edge along +x (x 26..=29, y 20): smoothed, the thread's middle lies below the
        // threshold halfway to the 60 HU liver (its sides do not), but it is no lesion; an arm
        // three pixels wide is.
        for half_width in [0usize, 1] {
            let thread = move |x: usize, y: usize, z: usize| {
                (1..=3).contains(&z) && (26..=29).contains(&x) && y.abs_diff(20) <= half_width
            };
            let (mut m, ct) = study(
                |x, y, z| {
                    (r(x, y, z, 20.0, 20.0) <= 5.0)
                        .then_some(40.0)
                        .or(thread(x, y, z).then_some(20.0))
                },
                |x, y, z| r(x, y, z, 20.0, 20.0) <= 3.0,
            );
            refine_tumour_extents(&mut m, &ct, 10.0);
            let (disc, all) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) <= 4.0);
            assert_eq!(disc, all, "the disc is tumour");
            let (on_thread, all) = tumour_where(&m, |x, y, z| thread(x, y, z) && x >= 27);
            if half_width == 0 {
                assert_eq!(on_thread, 0, "a one-pixel thread stays liver");
            } else {
                assert_eq!(on_thread, all, "a wider dark arm joins");
            }
        }
    }

    #[test]
    fn a_rim_enhancing_lesion_gets_its_bright_rim() {
        // Core of radius 5 at 20 HU inside a 3 mm rim at 110 HU; the network found the core.
        let (mut m, ct) = study(
            |x, y, z| {
                let d = r(x, y, z, 20.0, 20.0);
                (d <= 5.0).then_some(20.0).or((d <= 8.0).then_some(110.0))
            },
            |x, y, z| r(x, y, z, 20.0, 20.0) <= 4.0,
        );
        refine_tumour_extents(&mut m, &ct, 6.0);
        let (rim, all) = tumour_where(&m, |x, y, z| (6.0..=7.0).contains(&r(x, y, z, 20.0, 20.0)));
        assert_eq!(rim, all, "the rim is tumour");
        let (outside, _) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) > 9.5);
        assert_eq!(outside, 0);
    }

    #[test]
    fn a_dim_rim_joins_ring_by_ring() {
        // Core of radius 5 at 20 HU inside a rim to radius 8 only 20 HU above the 60 HU liver
        // (blurred thin rims look like that): no rim voxel reaches liver + 20, but the rings'
        // medians do reach liver + 6. Without the rim, nothing beyond the core joins.
        for rim_hu in [80.0, 60.0] {
            let (mut m, ct) = study(
                |x, y, z| {
                    let d = r(x, y, z, 20.0, 20.0);
                    (d <= 5.0).then_some(20.0).or((d <= 8.0).then_some(rim_hu))
                },
                |x, y, z| r(x, y, z, 20.0, 20.0) <= 4.0,
            );
            refine_tumour_extents(&mut m, &ct, 6.0);
            let (rim, all) =
                tumour_where(&m, |x, y, z| (6.5..=7.5).contains(&r(x, y, z, 20.0, 20.0)));
            if rim_hu > 60.0 {
                assert_eq!(rim, all, "the dim rim is tumour");
            } else {
                assert_eq!(rim, 0, "no rim, no ring");
            }
            let (outside, _) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) > 9.5);
            assert_eq!(outside, 0);
        }
    }

    #[test]
    fn a_lesion_takes_the_liver_it_encloses() {
        // A 20 HU ring from radius 5 to 10 around 60 HU liver (wider than the closing can
        // fill); the network drew the ring. Its middle becomes tumour, nothing beyond it does.
        let ring = |x, y, z| (5.0..=10.0).contains(&r(x, y, z, 20.0, 20.0));
        let (mut m, ct) = study(|x, y, z| ring(x, y, z).then_some(20.0), ring);
        assert_eq!(refine_tumour_extents(&mut m, &ct, 6.0), 1);
        let (middle, all) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) < 5.0);
        assert_eq!(middle, all, "the enclosed liver is tumour");
        let (outside, _) = tumour_where(&m, |x, y, z| r(x, y, z, 20.0, 20.0) > 11.5);
        assert_eq!(outside, 0, "nothing beyond the ring");
    }

    #[test]
    fn tumour_the_ct_does_not_show_keeps_the_networks_extent() {
        // No contrast: the component stays as drawn; growth 0 changes nothing either.
        let disc = |x, y, z| r(x, y, z, 20.0, 20.0) <= 4.0;
        let (mut m, ct) = study(|_, _, _| None, disc);
        let before = m.labels().to_vec();
        assert_eq!(refine_tumour_extents(&mut m, &ct, 6.0), 0);
        assert_eq!(m.labels(), &before[..]);
        let (mut m, ct) = study(|x, y, z| disc(x, y, z).then_some(10.0), disc);
        assert_eq!(refine_tumour_extents(&mut m, &ct, 0.0), 0);
        assert_eq!(m.labels(), &before[..]);
    }

    #[test]
    fn the_part_of_a_surface_lesion_the_network_called_background_joins() {
        // A 20 HU disc of radius 7 at (26, 20), the liver ending at x = 33 (the disc clipped
        // by it); beyond, fat at y < 20 and an organ as bright as the liver at y ≥ 20. The
        // network's liver stops at x = 27, its tumour is the disc's middle on its side.
        let (mut m, ct) = study(
            |x, y, z| {
                if x >= 34 {
                    Some(if y < 20 { -100.0 } else { 60.0 })
                } else {
                    (r(x, y, z, 26.0, 20.0) <= 7.0).then_some(20.0)
                }
            },
            |x, y, z| r(x, y, z, 26.0, 20.0) <= 4.0 && x <= 27,
        );
        background_where(&mut m, |x, _| x >= 28);
        assert_eq!(refine_tumour_extents(&mut m, &ct, 6.0), 1);
        let (cut_off, all) = tumour_where(&m, |x, y, z| {
            (28..=31).contains(&x) && r(x, y, z, 26.0, 20.0) <= 5.5
        });
        assert_eq!(cut_off, all, "the part called background is tumour");
        let (beyond, _) = tumour_where(&m, |x, _, _| x >= 34);
        assert_eq!(beyond, 0, "neither the fat nor the bright organ");
        let (liver, _) = tumour_where(&m, |x, y, z| x >= 28 && r(x, y, z, 26.0, 20.0) > 8.0);
        assert_eq!(liver, 0, "nor background as bright as the liver");
    }

    #[test]
    fn neighbours_do_not_merge_by_growing_and_tumour_stays_in_the_liver() {
        // One dark band from x 8 to 31 (y 17..=23); the network drew two components at its
        // ends. Background (label 0) at y ≥ 30 stays background though it is dark too: liver
        // as bright as the liver's median lies between.
        let band = |x: usize, y: usize, z: usize| {
            (1..=3).contains(&z) && (8..=31).contains(&x) && (17..=23).contains(&y)
        };
        let (mut m, ct) = study(
            |x, y, z| (band(x, y, z) || y >= 30).then_some(15.0),
            |x, y, z| band(x, y, z) && (x <= 11 || x >= 28),
        );
        background_where(&mut m, |_, y| y >= 30);
        // 10 mm of growth would make them meet at x ≈ 20.
        assert_eq!(refine_tumour_extents(&mut m, &ct, 10.0), 2);
        assert_eq!(tumour_components(&m).count(), 2, "still two lesions");
        let (grown, _) = tumour_where(&m, |x, y, z| band(x, y, z) && (12..=17).contains(&x));
        assert!(grown > 0, "each grew along the band");
        let (bg, _) = tumour_where(&m, |_, y, _| y >= 30);
        assert_eq!(bg, 0);
    }
}
