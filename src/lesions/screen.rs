//! A learned last step against false positives: every tumour component of a finished mask is
//! described by where it lies relative to the liver and by its CT values, and compared with
//! the components a model produced on its own training studies, each known to be a lesion or
//! not. A component whose nearest such exemplars are all false positives, and near, becomes
//! liver. How many neighbours and how near are chosen on the exemplars themselves, each left
//! out in turn: the setting that removes the most false positives and no lesion.
//!
//! What it catches is what a patch classifier cannot see from a patch: a structure that looks
//! like a lesion but sits where, in every training study, something else was — the
//! gallbladder, fluid-dense and pressed into the liver's underside, is the case in point.
//! A lesion is kept where a training lesion lies among its nearest exemplars, or where no
//! cluster of false positives lies close.

use serde::{Deserialize, Serialize};

use super::{Components, tumour_components};
use crate::volume::{CtVolume, LabelVolume, label};

/// The features, in order: the component's centroid minus the liver's centroid (liver and
/// tumour voxels) in world millimetres along the study's x, y and z world axes, the median
/// and the standard deviation of its CT values (HU).
pub const FEATURES: [&str; 5] = ["dx_mm", "dy_mm", "dz_mm", "median_hu", "sd_hu"];

/// Exemplars of each kind a filter needs at least.
pub const MIN_EXEMPLARS: usize = 3;

/// Neighbour counts [`FalsePositiveFilter::fit`] tries.
pub const NEIGHBOURS: [usize; 2] = [2, 3];

/// Fewer neighbours are taken only when, left out in turn, they remove at least this many
/// more false-positive exemplars than the most with more neighbours: one exemplar more is
/// within the noise of a few dozen (one false positive fewer among a model's exemplars
/// turned 3 neighbours into 2 and lowered a scoring set's tumour Dice from 0.79 to 0.64).
pub const FEWER_NEIGHBOURS_MARGIN: usize = 2;

/// Radii (in units of each feature's standard deviation over the exemplars) it tries.
pub const RADII: [f64; 6] = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0];

/// A component's share of voxels in reference tumour from which it counts as a lesion.
pub const LESION_SHARE: f64 = 0.1;

/// One component a model produced on a training study, described by [`FEATURES`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Exemplar {
    pub features: Vec<f64>,
    /// Whether it overlaps a reference lesion (at least [`LESION_SHARE`] of its voxels).
    pub lesion: bool,
}

/// Nearest-exemplar filter of tumour components (stored in the model card).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FalsePositiveFilter {
    /// Names of the features, in order ([`FEATURES`]).
    pub features: Vec<String>,
    /// Each feature's divisor before distances are taken (its standard deviation over the
    /// exemplars).
    pub scale: Vec<f64>,
    /// A component goes when this many nearest exemplars are all false positives ...
    pub neighbours: usize,
    /// ... and lie within this scaled distance of it.
    pub radius: f64,
    /// Studies the exemplars came from.
    pub studies: usize,
    pub exemplars: Vec<Exemplar>,
}

impl FalsePositiveFilter {
    /// A filter from exemplars, with the (neighbours, radius) of [`NEIGHBOURS`] × [`RADII`]
    /// under which, each exemplar left out in turn and judged by the others, the most false
    /// positives and no lesion go (fewer neighbours only by [`FEWER_NEIGHBOURS_MARGIN`] more
    /// false positives; ties: the wider radius — the farthest reach the exemplars show to be
    /// safe, so a false positive that recurs a little apart from its training examples still
    /// goes). An error
    /// when there are fewer than [`MIN_EXEMPLARS`] lesions or false positives (nothing to
    /// tell apart) or no setting removes a false positive without a lesion.
    pub fn fit(exemplars: Vec<Exemplar>, studies: usize) -> Result<Self, String> {
        let lesions = exemplars.iter().filter(|e| e.lesion).count();
        let fps = exemplars.len() - lesions;
        if lesions < MIN_EXEMPLARS || fps < MIN_EXEMPLARS {
            return Err(format!(
                "{lesions} lesion and {fps} false-positive components found; a filter needs at least {MIN_EXEMPLARS} of each"
            ));
        }
        let n = FEATURES.len();
        let m = exemplars.len() as f64;
        let scale = (0..n)
            .map(|j| {
                let mean = exemplars.iter().map(|e| e.features[j]).sum::<f64>() / m;
                let var = exemplars
                    .iter()
                    .map(|e| (e.features[j] - mean).powi(2))
                    .sum::<f64>()
                    / m;
                if var.sqrt() > 1e-6 { var.sqrt() } else { 1.0 }
            })
            .collect();
        let mut f = Self {
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
            scale,
            neighbours: 1,
            radius: RADII[0],
            studies,
            exemplars,
        };
        // (false positives removed, neighbours, radius) of the best setting so far.
        let mut best: Option<(usize, usize, f64)> = None;
        for &k in NEIGHBOURS.iter().rev() {
            for &r in &RADII {
                let (removed_fp, removed_lesion) = f.leave_one_out(k, r);
                // Radii rise: a tie with the same neighbours takes the wider radius.
                let better = match best {
                    None => removed_fp > 0,
                    Some((fp, bk, _)) if k == bk => removed_fp >= fp,
                    Some((fp, _, _)) => removed_fp >= fp + FEWER_NEIGHBOURS_MARGIN,
                };
                if removed_lesion == 0 && better {
                    best = Some((removed_fp, k, r));
                }
            }
        }
        let (_, k, r) = best.ok_or_else(|| {
            format!(
                "no setting removes a false positive without removing a lesion among {m} components"
            )
        })?;
        (f.neighbours, f.radius) = (k, r);
        f.validate()?;
        Ok(f)
    }

    /// (false positives, lesions) among the exemplars that `k` neighbours within `r` reject
    /// when each is left out and judged by the others.
    fn leave_one_out(&self, k: usize, r: f64) -> (usize, usize) {
        let (mut fp, mut lesion) = (0, 0);
        for (i, e) in self.exemplars.iter().enumerate() {
            if self.judge(&e.features, k, r, Some(i)) {
                if e.lesion {
                    lesion += 1;
                } else {
                    fp += 1;
                }
            }
        }
        (fp, lesion)
    }

    /// Whether the `k` nearest exemplars (but `skip`) of `f` are all false positives within
    /// scaled distance `r` (ties: the earlier exemplar). Never with fewer than `k` exemplars.
    fn judge(&self, f: &[f64], k: usize, r: f64, skip: Option<usize>) -> bool {
        let others = self.exemplars.len() - usize::from(skip.is_some());
        if k == 0 || others < k {
            return false;
        }
        let mut d: Vec<(f64, bool)> = self
            .exemplars
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != skip)
            .map(|(_, e)| {
                let d2 = e
                    .features
                    .iter()
                    .zip(f)
                    .zip(&self.scale)
                    .map(|((a, b), s)| ((a - b) / s).powi(2))
                    .sum::<f64>();
                (d2, e.lesion)
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0));
        d[..k].iter().all(|&(_, lesion)| !lesion) && d[k - 1].0 <= r * r
    }

    /// Checks a filter read from a card: the known features, positive finite scales, finite
    /// exemplars of the right length, at least one neighbour.
    pub fn validate(&self) -> Result<(), String> {
        if self.features != FEATURES {
            return Err(format!(
                "false_positive_filter.features {:?}: expected {FEATURES:?}",
                self.features
            ));
        }
        if self.scale.len() != FEATURES.len()
            || !self.scale.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            return Err(format!(
                "false_positive_filter.scale {:?}: expected {} positive numbers",
                self.scale,
                FEATURES.len()
            ));
        }
        if self.neighbours == 0 {
            return Err("false_positive_filter.neighbours: must be at least 1".into());
        }
        if !(self.radius.is_finite() && self.radius > 0.0) {
            return Err(format!(
                "false_positive_filter.radius {}: must be a positive number",
                self.radius
            ));
        }
        if let Some(i) = self.exemplars.iter().position(|e| {
            e.features.len() != FEATURES.len() || !e.features.iter().all(|v| v.is_finite())
        }) {
            return Err(format!(
                "false_positive_filter.exemplars[{i}]: expected {} finite numbers",
                FEATURES.len()
            ));
        }
        Ok(())
    }

    /// Whether a component with features `f` is a false positive: its `neighbours` nearest
    /// exemplars are all false positives within the filter's radius.
    pub fn rejects(&self, f: &[f64], neighbours: usize) -> bool {
        self.judge(f, neighbours, self.radius, None)
    }
}

/// [`FEATURES`] of each tumour component of `comps` (index 0 unused, an empty vector; also
/// every entry empty when `ct` is on another grid or the mask has no liver).
pub fn component_features(mask: &LabelVolume, ct: &CtVolume, comps: &Components) -> Vec<Vec<f64>> {
    let mut out = vec![Vec::new(); comps.count() + 1];
    let g = mask.geometry();
    if ct.geometry().shape() != g.shape() {
        return out;
    }
    let [nx, ny, _] = g.shape();
    // Liver centroid (liver and tumour voxels), in voxel coordinates.
    let (mut sum, mut n) = ([0f64; 3], 0u64);
    for (i, &v) in mask.labels().iter().enumerate() {
        if v >= label::LIVER {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            sum[0] += x as f64;
            sum[1] += y as f64;
            sum[2] += z as f64;
            n += 1;
        }
    }
    if n == 0 {
        return out;
    }
    let liver = g.voxel_to_world(sum.map(|s| s / n as f64));
    let hu = ct.hu();
    let mut sums = vec![[0f64; 3]; comps.count() + 1];
    for (r, l) in comps.runs() {
        let (y, z) = (r.row as usize % ny, r.row as usize / ny);
        let s = &mut sums[l as usize];
        for x in r.start as usize..r.end as usize {
            s[0] += x as f64;
            s[1] += y as f64;
            s[2] += z as f64;
        }
    }
    let mut values = comps.values(hu);
    for l in 1..=comps.count() {
        let v = &mut values[l];
        let m = v.len() as f64;
        let c = g.voxel_to_world(sums[l].map(|s| s / m));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / m;
        let sd = (v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / m)
            .sqrt();
        let mid = v.len() / 2;
        let (_, median, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
        out[l] = vec![
            c[0] - liver[0],
            c[1] - liver[1],
            c[2] - liver[2],
            f64::from(*median),
            sd,
        ];
    }
    out
}

/// Turns the tumour components `filter` rejects (with `neighbours` nearest exemplars) into
/// liver. Returns the number of components changed.
pub fn drop_false_positives(
    mask: &mut LabelVolume,
    ct: &CtVolume,
    filter: &FalsePositiveFilter,
    neighbours: usize,
) -> usize {
    let comps = tumour_components(mask);
    if comps.count() == 0 || neighbours == 0 {
        return 0;
    }
    let f = component_features(mask, ct, &comps);
    let drop: Vec<bool> = f
        .iter()
        .map(|f| !f.is_empty() && filter.rejects(f, neighbours))
        .collect();
    comps.fill(mask.labels_mut(), |l| drop[l as usize], label::LIVER);
    drop.iter().filter(|&&d| d).count()
}

/// The tumour components of a model's mask `pred` as exemplars, each a lesion when at least
/// [`LESION_SHARE`] of its voxels are tumour in `truth` (same grid as `pred` and `ct`).
pub fn exemplars(pred: &LabelVolume, ct: &CtVolume, truth: &LabelVolume) -> Vec<Exemplar> {
    let comps = tumour_components(pred);
    let f = component_features(pred, ct, &comps);
    let nx = pred.geometry().shape()[0];
    let t = truth.labels();
    let mut hit = vec![0u64; comps.count() + 1];
    for (r, l) in comps.runs() {
        let base = r.row as usize * nx;
        hit[l as usize] += t[base + r.start as usize..base + r.end as usize]
            .iter()
            .filter(|&&v| v == label::TUMOUR)
            .count() as u64;
    }
    let sizes = comps.sizes();
    (1..=comps.count())
        .filter(|&l| !f[l].is_empty())
        .map(|l| Exemplar {
            features: f[l].clone(),
            lesion: hit[l] as f64 >= LESION_SHARE * sizes[l] as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    fn grid(shape: [usize; 3]) -> Geometry {
        let axes = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        Geometry::new(shape, [1.0; 3], axes, [0.0; 3]).unwrap()
    }

    /// A 40 × 20 × 4 liver (60 HU) with two 2 × 2 × 2 dark components (20 HU): one at x 2–3
    /// (left edge), one at x 30–31.
    fn study() -> (LabelVolume, CtVolume) {
        let g = grid([40, 20, 4]);
        let [nx, ny, _] = g.shape();
        let mut labels = vec![label::LIVER; g.len()];
        let mut hu = vec![60.0f32; g.len()];
        for (i, (l, h)) in labels.iter_mut().zip(hu.iter_mut()).enumerate() {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            if (8..10).contains(&y)
                && (1..3).contains(&z)
                && ((2..4).contains(&x) || (30..32).contains(&x))
            {
                *l = label::TUMOUR;
                *h = 20.0;
            }
        }
        (
            LabelVolume::new(g.clone(), labels).unwrap(),
            CtVolume::new(g, hu).unwrap(),
        )
    }

    #[test]
    fn features_are_positions_relative_to_the_liver_and_ct_values() {
        let (mask, ct) = study();
        let comps = tumour_components(&mask);
        let f = component_features(&mask, &ct, &comps);
        assert_eq!(comps.count(), 2);
        // Liver centroid (19.5, 9.5, 1.5); components at x 2.5 and 30.5, y 8.5, z 1.5.
        let mut xs: Vec<f64> = f[1..].iter().map(|f| f[0]).collect();
        xs.sort_by(f64::total_cmp);
        assert!(
            (xs[0] + 17.0).abs() < 1e-9 && (xs[1] - 11.0).abs() < 1e-9,
            "{xs:?}"
        );
        for f in &f[1..] {
            assert!((f[1] + 1.0).abs() < 1e-9 && f[2].abs() < 1e-9, "{f:?}");
            assert_eq!((f[3], f[4]), (20.0, 0.0));
        }
    }

    /// An exemplar at `x` mm (the rest as the components of [`study`] have it).
    fn ex(x: f64, lesion: bool) -> Exemplar {
        Exemplar {
            features: vec![x, -1.0, 0.0, 20.0, 0.0],
            lesion,
        }
    }

    #[test]
    fn a_component_goes_only_where_its_nearest_exemplars_are_all_false_positives() {
        // False positives at the left edge (x −17 … −15), lesions on the right (x 5 … 12).
        let filter = FalsePositiveFilter::fit(
            [
                (-17.0, false),
                (-16.0, false),
                (-15.0, false),
                (5.0, true),
                (10.0, true),
                (12.0, true),
            ]
            .map(|(x, l)| ex(x, l))
            .to_vec(),
            3,
        )
        .unwrap();
        // Left out in turn, each false positive has two false positives nearest, close by; a
        // third neighbour would be a lesion. Every radius spares the lesions: the widest.
        assert_eq!((filter.neighbours, filter.radius), (2, RADII[5]));
        let (mut mask, ct) = study();
        let before = mask.clone();
        assert_eq!(drop_false_positives(&mut mask, &ct, &filter, 2), 1);
        let changed: Vec<usize> = (0..mask.labels().len())
            .filter(|&i| mask.labels()[i] != before.labels()[i])
            .collect();
        // The left component (x 2–3) became liver; the right one stays.
        assert_eq!(changed.len(), 8);
        assert!(changed.iter().all(|&i| i % 40 < 4));
        assert!(changed.iter().all(|&i| mask.labels()[i] == label::LIVER));
        // One lesion among the nearest keeps it: put a lesion exemplar beside the left edge.
        let mut mixed = filter.clone();
        mixed.exemplars.push(ex(-17.5, true));
        let mut kept = before.clone();
        assert_eq!(drop_false_positives(&mut kept, &ct, &mixed, 2), 0);
        // So does distance: the same false positives, judged with a tiny radius, from afar.
        let mut far = filter.clone();
        for e in &mut far.exemplars {
            e.features[3] += 5.0 * far.scale[3];
        }
        let mut kept = before.clone();
        assert_eq!(drop_false_positives(&mut kept, &ct, &far, 2), 0);
        // Neighbours 0 changes nothing.
        let mut off = before.clone();
        assert_eq!(drop_false_positives(&mut off, &ct, &filter, 0), 0);
    }

    #[test]
    fn fewer_neighbours_only_for_two_more_false_positives() {
        // A cluster of four false positives (x −17 … −14), lesions at x 20, 22, 24 and −58.5.
        // Left out in turn, a false positive at x 2.5 has two of the cluster nearest (16.5 and
        // 17.5 away) and then the lesion at 20; so has one at x −37 (−17 and −16, then the
        // lesion at −58.5). Two neighbours remove one more false positive than three with the
        // first, two more with both: only then are two taken.
        let fit = |lone: &[f64]| {
            let all = [-17.0, -16.0, -15.0, -14.0]
                .iter()
                .chain(lone)
                .map(|&x| ex(x, false))
                .chain([20.0, 22.0, 24.0, -58.5].map(|x| ex(x, true)))
                .collect();
            let f = FalsePositiveFilter::fit(all, 5).unwrap();
            (f.neighbours, f.radius)
        };
        assert_eq!(fit(&[2.5]), (3, 1.5));
        assert_eq!(fit(&[2.5, -37.0]), (2, 1.5));
    }

    #[test]
    fn the_widest_radius_that_spares_every_lesion_is_taken() {
        // A lesion at x −5 beside the false positives: left out, its two nearest exemplars are
        // false positives 0.77 and 0.84 standard deviations away, so radii up to 0.75 remove
        // the three false positives and spare it; from 1.0 on it would go too.
        let fit = |lesion_x: f64| {
            let set = [
                (-17.0, false),
                (-16.0, false),
                (-15.0, false),
                (lesion_x, true),
            ];
            let more = [(10.0, true), (12.0, true), (14.0, true)];
            let all = set.iter().chain(&more).map(|&(x, l)| ex(x, l)).collect();
            let f = FalsePositiveFilter::fit(all, 4).unwrap();
            (f.neighbours, f.radius)
        };
        assert_eq!(fit(-5.0), (2, 0.75));
        // Nearer still, only the narrowest radius spares it.
        assert_eq!(fit(-8.0), (2, 0.5));
    }

    #[test]
    fn exemplars_are_labelled_by_the_reference_and_fitting_needs_both_kinds() {
        let (pred, ct) = study();
        // Reference: only the right component is a lesion.
        let mut labels = pred.labels().to_vec();
        for (i, l) in labels.iter_mut().enumerate() {
            if *l == label::TUMOUR && i % 40 < 10 {
                *l = label::LIVER;
            }
        }
        let truth = LabelVolume::new(pred.geometry().clone(), labels).unwrap();
        let mut found = exemplars(&pred, &ct, &truth);
        found.sort_by(|a, b| a.features[0].total_cmp(&b.features[0]));
        assert_eq!(
            found.iter().map(|e| e.lesion).collect::<Vec<_>>(),
            [false, true]
        );
        let err = FalsePositiveFilter::fit(found, 1).unwrap_err();
        assert!(err.contains("1 lesion and 1 false-positive"), "{err}");
        // Lesions and false positives side by side: no setting spares every lesion.
        let err = FalsePositiveFilter::fit((0..8).map(|i| ex(i as f64, i % 2 == 0)).collect(), 2)
            .unwrap_err();
        assert!(err.contains("no setting"), "{err}");
    }

    #[test]
    fn cards_with_broken_filters_are_refused() {
        let good = FalsePositiveFilter::fit(
            (0..6)
                .map(|i| ex(i as f64 + 10.0 * f64::from(i >= 3), i >= 3))
                .collect(),
            2,
        )
        .unwrap();
        assert!(good.validate().is_ok());
        let mut bad = good.clone();
        bad.scale[0] = 0.0;
        assert!(bad.validate().unwrap_err().contains("scale"));
        let mut bad = good.clone();
        bad.exemplars[3].features.pop();
        assert!(bad.validate().unwrap_err().contains("exemplars[3]"));
        let mut bad = good.clone();
        bad.features[0] = "x".into();
        assert!(bad.validate().unwrap_err().contains("features"));
        let mut bad = good.clone();
        bad.radius = f64::NAN;
        assert!(bad.validate().unwrap_err().contains("radius"));
        let mut bad = good;
        bad.neighbours = 0;
        assert!(bad.validate().unwrap_err().contains("neighbours"));
    }
}
