//! The last word on each lesion's outline: a graph cut (`mincut`) that weighs, for every voxel
//! near a tumour component, how well its CT value fits the lesion against the liver around
//! it, what the extent drawn so far says, and how much outline a labelling costs. A threshold
//! decides each voxel alone, so the liver's noise notches a lesion's outline and adds specks
//! beside it; the outline of least energy is smooth where the CT does not insist otherwise.

use super::mincut::CutGraph;
use super::postprocess::median;
use super::surroundings::{Drawn, MIN_CONTRAST_HU, SHELL_MM};
use crate::volume::{CtVolume, LabelVolume};

/// How far (mm) beyond a component its outline may move.
const REACH_MM: f64 = 6.0;
/// Cost (in units of the CT term) of a voxel leaving the extent drawn so far, either way.
const PRIOR: f64 = 0.5;
/// Weight of a neighbour across slices, relative to an in-plane neighbour's: slices are
/// thicker than pixels, and neighbours across them agree less.
const ACROSS_SLICES: f64 = 0.5;

/// Redraws each tumour component (26-connected) as the labelling of least energy within
/// `REACH_MM` of it. A voxel's CT value x costs (x − lesion)² / 2σ² as lesion and
/// (x − liver)² / 2σ² as liver — the component's median, its surrounding liver's median and
/// that liver's robust spread σ; nothing as lesion when darker than the lesion, nothing as
/// liver when brighter than the liver (vessels) —, `PRIOR` more where it leaves the extent
/// drawn so far, and every pair of face neighbours on two sides of the outline costs
/// `smoothness` (in-plane) or `smoothness · ACROSS_SLICES` (across slices). Only the parts
/// of the cut that carry the component stay, with the component's voxels brighter than its
/// liver's median (an enhancing rim) where they touch them. Only liver voxels nearer to the
/// component than to any other by a voxel diagonal may join, so lesions never merge and
/// tumour stays inside the liver. Components with too little contrast or liver around them
/// keep their extent; `smoothness` ≤ 0 changes nothing. Deterministic. Returns the number of
/// components redrawn.
pub fn regularise_tumour_outlines(mask: &mut LabelVolume, ct: &CtVolume, smoothness: f64) -> usize {
    if smoothness.is_nan() || smoothness <= 0.0 || ct.geometry().shape() != mask.geometry().shape()
    {
        return 0;
    }
    let Some(drawn) = Drawn::new(mask) else {
        return 0;
    };
    let margin_mm = (2.0 * REACH_MM + drawn.diagonal).max(SHELL_MM.1);
    let mut changed = 0;
    for l in drawn.components() {
        let around = drawn.around(l, margin_mm, ct);
        let n = around.b.len();
        let Some(mut shell) = around.liver_values(SHELL_MM) else {
            continue;
        };
        let liver_hu = median(&mut shell);
        let mut deviations: Vec<f32> = shell.iter().map(|v| (v - liver_hu).abs()).collect();
        let sigma = (1.4826 * median(&mut deviations) as f64).max(1.0);
        let lesion_hu = around.lesion_median();
        if liver_hu - lesion_hu < MIN_CONTRAST_HU {
            continue;
        }
        let (this, hu) = (&around.this, &around.hu);

        // The voxels whose label is open: those the component may own, within reach.
        let (owned, d_this) = around.owned();
        let open: Vec<bool> = (0..n)
            .map(|i| owned[i] && d_this[i] <= REACH_MM * REACH_MM)
            .collect();
        let mut node = vec![usize::MAX; n];
        let mut count = 0;
        for i in 0..n {
            if open[i] {
                node[i] = count;
                count += 1;
            }
        }
        // Source side: lesion; sink side: liver. A closed voxel is liver, so an open
        // neighbour of it pays the pair's weight as lesion.
        let mut graph = CutGraph::new(count);
        // A CT value costs nothing beyond its class's median (darker than the lesion,
        // brighter than the liver), else its squared distance in units of 2σ².
        let var2 = 2.0 * sigma * sigma;
        let excess = |d: f32| f64::from(d.max(0.0)).powi(2) / var2;
        let [bx, by, bz] = around.b.shape;
        for i in 0..n {
            if !open[i] {
                continue;
            }
            let leaves = |joins: bool| if joins == this[i] { 0.0 } else { PRIOR };
            let mut as_lesion = excess(hu[i] - lesion_hu) + leaves(true);
            let as_liver = excess(liver_hu - hu[i]) + leaves(false);
            let (x0, y0, z0) = (i % bx, (i / bx) % by, i / (bx * by));
            let neighbours = [
                (x0 > 0, i.wrapping_sub(1), 1.0),
                (x0 + 1 < bx, i + 1, 1.0),
                (y0 > 0, i.wrapping_sub(bx), 1.0),
                (y0 + 1 < by, i + bx, 1.0),
                (z0 > 0, i.wrapping_sub(bx * by), ACROSS_SLICES),
                (z0 + 1 < bz, i + bx * by, ACROSS_SLICES),
            ];
            for (inside, j, w) in neighbours {
                let w = w * smoothness;
                if !inside || !open[j] {
                    as_lesion += w;
                } else if j > i {
                    graph.pair(node[i], node[j], w);
                }
            }
            graph.unary(node[i], as_lesion, as_liver);
        }
        let side = graph.solve();
        let cut: Vec<bool> = (0..n).map(|i| open[i] && side[node[i]]).collect();
        // The parts of the cut that carry the component; what else it leaves are specks of
        // noise.
        let Some(main) = around.carrying_parts(&cut) else {
            continue;
        };
        // The component's voxels brighter than its liver (an enhancing rim, which the
        // refinement takes where a whole ring is 6 HU brighter) stay where they touch what
        // the cut keeps.
        let with_rim: Vec<bool> = (0..n)
            .map(|i| main[i] || (this[i] && hu[i] > liver_hu))
            .collect();
        let lesion = around.touching(&with_rim, &main);
        around.write(&lesion, mask.labels_mut());
        changed += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::super::surroundings::test_study;
    use super::*;
    use crate::volume::label;

    /// The test study (40 × 40 × 5 voxels of 1 × 1 × 2 mm) with a noise pattern of ±`noise`
    /// on liver at 60 HU, 30 HU inside a disc of radius 8 around (20, 20) in slices 1..=3,
    /// 52 HU at `dips`, and tumour where `tumour(x, y, z)`.
    fn study(
        noise: f32,
        dips: &[(usize, usize, usize)],
        tumour: impl Fn(usize, usize, usize) -> bool,
    ) -> (LabelVolume, CtVolume) {
        let mut state = 7u64;
        let pattern: Vec<f32> = (0..40 * 40 * 5)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * noise
            })
            .collect();
        let hu = |x: usize, y: usize, z: usize| {
            let (dx, dy) = (x as f64 - 20.0, y as f64 - 20.0);
            let base = if dips.contains(&(x, y, z)) {
                52.0
            } else if (1..=3).contains(&z) && dx * dx + dy * dy <= 64.0 {
                30.0
            } else {
                60.0
            };
            Some(base + pattern[x + 40 * (y + 40 * z)])
        };
        test_study(hu, tumour)
    }

    fn tumour_at(mask: &LabelVolume, x: usize, y: usize, z: usize) -> bool {
        mask.labels()[x + 40 * (y + 40 * z)] == label::TUMOUR
    }

    #[test]
    fn a_lesion_drawn_too_small_takes_the_outline_the_ct_shows() {
        // The extent so far: a disc of radius 5 inside the dark disc of radius 8.
        let small = |x: usize, y: usize, z: usize| {
            let (dx, dy) = (x as f64 - 20.0, y as f64 - 20.0);
            (1..=3).contains(&z) && dx * dx + dy * dy <= 25.0
        };
        let (mut mask, ct) = study(8.0, &[], small);
        assert_eq!(regularise_tumour_outlines(&mut mask, &ct, 1.0), 1);
        for z in 1..=3 {
            assert!(
                tumour_at(&mask, 27, 20, z),
                "slice {z}: the outline reaches radius 7"
            );
            assert!(tumour_at(&mask, 20, 13, z));
            assert!(
                !tumour_at(&mask, 30, 20, z),
                "slice {z}: nothing beyond the lesion"
            );
        }
        assert!(!tumour_at(&mask, 20, 20, 0) && !tumour_at(&mask, 20, 20, 4));
    }

    #[test]
    fn noise_specks_beside_a_lesion_go() {
        // The extent so far: the dark disc plus two specks beside it where the liver's noise
        // dips (a threshold on the smoothed CT takes such specks).
        let drawn = |x: usize, y: usize, z: usize| {
            let (dx, dy) = (x as f64 - 20.0, y as f64 - 20.0);
            (1..=3).contains(&z) && (dx * dx + dy * dy <= 64.0 || (x, y) == (29, 20))
                || (x, y, z) == (20, 29, 2)
        };
        let dips = [(29, 20, 1), (29, 20, 2), (29, 20, 3), (20, 29, 2)];
        let (mut mask, ct) = study(8.0, &dips, drawn);
        regularise_tumour_outlines(&mut mask, &ct, 1.0);
        assert!(!tumour_at(&mask, 29, 20, 2) && !tumour_at(&mask, 20, 29, 2));
        assert!(tumour_at(&mask, 20, 20, 2) && tumour_at(&mask, 28, 20, 2));
        // Off: nothing changes.
        let (mut off, ct) = study(8.0, &dips, drawn);
        let before = off.labels().to_vec();
        assert_eq!(regularise_tumour_outlines(&mut off, &ct, 0.0), 0);
        assert_eq!(off.labels(), &before[..]);
    }
}
