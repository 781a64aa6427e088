//! The tumour thresholds and the false-positive filter of a model, from its studies in one pass.
//!
//! Two thresholds shape the tumour a model draws: the tumour threshold (a component's extent)
//! and the seed threshold (the peak a component needs to be kept without the CT's say). They are
//! chosen on a fixed grid by the tumour Dice per case that the whole post-processing gives; the
//! false-positive filter then learns from the tumour components the chosen pair leaves on the
//! studies. Each study is read, run through the network and post-processed with every pair while
//! it is in memory — its Dice and its components' exemplars kept per pair, the volumes dropped —
//! so a folder of any size is calibrated on one study at a time.

use rayon::prelude::*;
use tch::Device;

use super::Classifier;
use super::infer::{self, InferOptions, ProbabilityMaps};
use super::train::{StudyFiles, TrainError};
use crate::lesions::{self, Exemplar, FalsePositiveFilter};
use crate::metrics;
use crate::volume::{CtVolume, LabelVolume, ReadLimits};

/// The (tumour threshold, seed threshold) pairs tried: tumour thresholds 0.30–0.90 in steps
/// of 0.05, each with every seed of 0.98, 0.95, 0.9 and 0.8 above it and with a seed equal to
/// it. The order settles ties (the first wins): the lower tumour threshold (recall), and for it
/// the higher seed — where the studies cannot tell seeds apart, more of the components are then
/// left for the CT to confirm (`--tumour-confirm-z`), and a raised seed has never lowered the
/// held-out Dice of the models measured (docs/benchmarks.md).
pub fn threshold_pairs() -> Vec<(f32, f32)> {
    let mut out = Vec::new();
    for step in 0..=12 {
        let t = 0.3 + 0.05 * step as f32;
        out.extend(
            [0.98, 0.95, 0.9, 0.8]
                .into_iter()
                .filter(|&s| s > t)
                .map(|s| (t, s)),
        );
        out.push((t, t));
    }
    out
}

/// What one study says about each pair: its tumour Dice (None when neither its reference nor
/// the mask has tumour: the study does not count) and its tumour components as exemplars.
#[derive(Clone, Debug)]
pub struct StudyScores {
    pub dice: Vec<Option<f64>>,
    pub exemplars: Vec<Vec<Exemplar>>,
}

/// Post-processes one study's probabilities with every pair of `pairs` and scores the masks
/// against its reference: the same masks as [`infer::candidates`] with each pair, made once
/// per tumour threshold (in parallel) up to the CT's say on each component, whose evidence
/// serves every seed; seeds that drop the same components share the rest.
pub fn score_study(
    ct: &CtVolume,
    truth: &LabelVolume,
    maps: &ProbabilityMaps,
    opts: &InferOptions,
    pairs: &[(f32, f32)],
) -> StudyScores {
    let mut thresholds: Vec<f32> = pairs.iter().map(|p| p.0).collect();
    thresholds.sort_by(f32::total_cmp);
    thresholds.dedup();
    // (pair index, Dice, exemplars) of each pair, grouped by tumour threshold.
    type Scored = (usize, Option<f64>, Vec<Exemplar>);
    let per_threshold: Vec<Vec<Scored>> = thresholds
        .par_iter()
        .map(|&t| {
            let group: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].0 == t).collect();
            let seeds: Vec<f32> = group.iter().map(|&i| pairs[i].1).collect();
            let base = infer::thresholded(maps, ct, opts, t);
            let evidence = infer::TumourEvidence::gather(
                maps,
                ct,
                &base,
                &seeds,
                opts.tumour_confirm_z,
                opts.tumour_sure_z,
            );
            // The components each scored seed dropped, and where its score is in `out`.
            let mut done: Vec<(Vec<bool>, usize)> = Vec::new();
            let mut out: Vec<Scored> = Vec::with_capacity(group.len());
            for (&i, &seed) in group.iter().zip(&seeds) {
                let drop = evidence.verdict(seed);
                if let Some(&(_, j)) = done.iter().find(|d| d.0 == drop) {
                    let (_, dice, ex) = &out[j];
                    let scored = (i, *dice, ex.clone());
                    out.push(scored);
                    continue;
                }
                let mut mask = base.clone();
                evidence.apply(&mut mask, &drop);
                // The components the filter judges: its exemplars, and the mask the pair is
                // scored on (the outlines' last redrawing changes extents, not which lesions
                // there are, and moved this choice only within the noise of three studies).
                let pred = infer::after_confirmation(mask, ct, opts);
                let exemplars = lesions::exemplars(&pred, ct, truth);
                let c = metrics::tumour_counts(truth, &pred);
                let dice = (c.truth + c.pred > 0).then(|| metrics::overlap(c).0);
                done.push((drop, out.len()));
                out.push((i, dice, exemplars));
            }
            out
        })
        .collect();
    let mut dice = vec![None; pairs.len()];
    let mut exemplars = vec![Vec::new(); pairs.len()];
    for (i, d, e) in per_threshold.into_iter().flatten() {
        dice[i] = d;
        exemplars[i] = e;
    }
    StudyScores { dice, exemplars }
}

/// The index of the pair with the best tumour Dice per case over `scores` (ties: the first),
/// and that Dice (0 when no study counts for any pair).
pub fn best_pair(scores: &[&StudyScores], pairs: usize) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for p in 0..pairs {
        let counted: Vec<f64> = scores.iter().filter_map(|s| s.dice[p]).collect();
        let score = if counted.is_empty() {
            0.0
        } else {
            counted.iter().sum::<f64>() / counted.len() as f64
        };
        tracing::debug!(pair = p, dice = score, "thresholds scored");
        if score > best.1 + 1e-9 {
            best = (p, score);
        }
    }
    best
}

/// A study already in memory (the held-out studies of a training run): id, CT, reference and
/// the model's probability maps.
pub type LoadedStudy<'a> = (&'a str, &'a CtVolume, &'a LabelVolume, &'a ProbabilityMaps);

/// Which studies choose the thresholds.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    /// Keep these thresholds; only the filter is fitted.
    Fixed(f32, f32),
    /// Every study given.
    All,
    /// The studies with these ids (a training run's held-out studies); the others are then
    /// post-processed with the chosen pair alone.
    HeldOut(Vec<String>),
}

/// The outcome: the thresholds, the Dice per case they gave on the studies that chose them
/// (None with fixed thresholds), and the filter fitted with them on every study (the error
/// says why none could be: too few components of a kind).
#[derive(Clone, Debug)]
pub struct Calibration {
    pub threshold: f32,
    pub seed: f32,
    pub dice_per_case: Option<f64>,
    pub filter: Result<FalsePositiveFilter, String>,
}

/// Calibrates `clf` on `studies` (those in `loaded`, by id, used as they are; the others read
/// and run through the network one at a time) as the module notes describe.
pub fn calibrate(
    clf: &Classifier,
    studies: &[StudyFiles],
    loaded: &[LoadedStudy],
    opts: &InferOptions,
    scope: &Scope,
    limits: &ReadLimits,
    device: Device,
) -> Result<Calibration, TrainError> {
    let find = |s: &StudyFiles| loaded.iter().find(|l| l.0 == s.id).copied();
    // Scores of `subset` of the studies with `pairs`.
    let pass = |subset: &[&StudyFiles], pairs: &[(f32, f32)]| -> Result<Vec<_>, TrainError> {
        subset
            .iter()
            .map(|s| match find(s) {
                Some((_, ct, truth, maps)) => Ok(score_study(ct, truth, maps, opts, pairs)),
                None => {
                    let (ct, truth) = s.read(limits)?;
                    let maps = infer::probabilities(clf, &ct, opts, device);
                    Ok(score_study(&ct, &truth, &maps, opts, pairs))
                }
            })
            .collect()
    };
    let exemplars_of = |scores: &mut [StudyScores], p: usize| -> Vec<Exemplar> {
        scores
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.exemplars[p]))
            .collect()
    };
    let all: Vec<&StudyFiles> = studies.iter().collect();
    let (pair, dice, exemplars) = match scope {
        &Scope::Fixed(t, s) => {
            let mut scores = pass(&all, &[(t, s)])?;
            ((t, s), None, exemplars_of(&mut scores, 0))
        }
        Scope::All | Scope::HeldOut(_) => {
            let held: Vec<&StudyFiles> = match scope {
                Scope::HeldOut(ids) => all
                    .iter()
                    .copied()
                    .filter(|s| ids.contains(&s.id))
                    .collect(),
                _ => all.clone(),
            };
            if held.is_empty() {
                return Err(TrainError::Data(
                    "none of the studies the thresholds are to be chosen on is there".into(),
                ));
            }
            let pairs = threshold_pairs();
            let mut scores = pass(&held, &pairs)?;
            let (best, dice) = best_pair(&scores.iter().collect::<Vec<_>>(), pairs.len());
            // Exemplars in the studies' order; the studies that did not choose are
            // post-processed with the chosen pair alone.
            let mut exemplars = Vec::new();
            for s in &all {
                match held.iter().position(|h| h.id == s.id) {
                    Some(i) => exemplars.append(&mut scores[i].exemplars[best]),
                    None => exemplars.extend(exemplars_of(&mut pass(&[s], &[pairs[best]])?, 0)),
                }
            }
            (pairs[best], Some(dice), exemplars)
        }
    };
    Ok(Calibration {
        threshold: pair.0,
        seed: pair.1,
        dice_per_case: dice,
        filter: FalsePositiveFilter::fit(exemplars, studies.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::label;
    use crate::volume::phantom::{self, PhantomSpec, Rng};

    #[test]
    fn scoring_every_pair_at_once_gives_each_pair_its_own_mask() {
        // A phantom with lesions, and noisy stride-2 maps drawn from its reference: lesions
        // at tumour probabilities 0.3–0.85 (weak for the higher seeds), liver with false spots.
        let spec = PhantomSpec {
            shape: [128, 128, 12],
            spacing_mm: Some([2.5, 2.5, 4.0]),
            seed: 5,
        };
        let p = (0..16)
            .map(|k| phantom::generate(&spec, k).unwrap())
            .find(|p| p.lesions.len() >= 2)
            .expect("a phantom with lesions");
        let (ct, truth) = (&p.ct, &p.truth);
        let [nx, ny, nz] = truth.geometry().shape();
        let (nu, nv) = (nx / 2, ny / 2);
        let mut rng = Rng::new(7, 0);
        let mut probs = [Vec::new(), Vec::new(), Vec::new()];
        for k in 0..nz {
            for v in 0..nv {
                for u in 0..nu {
                    let l = truth.labels()[2 * u + nx * (2 * v + ny * k)];
                    let t = match l {
                        label::TUMOUR => rng.range(0.3, 0.85),
                        label::LIVER if rng.unit() < 0.03 => rng.range(0.3, 0.99),
                        label::LIVER => rng.range(0.0, 0.2),
                        _ => 0.0,
                    } as f32;
                    let liver = if l == 0 { 0.05 } else { 1.0 - t };
                    probs[0].push(1.0 - liver - t);
                    probs[1].push(liver);
                    probs[2].push(t);
                }
            }
        }
        let maps = ProbabilityMaps::stride_two(nu, nv, nz, probs);
        let opts = InferOptions::default();
        let pairs = threshold_pairs();
        let scores = score_study(ct, truth, &maps, &opts, &pairs);
        for (i, &(t, seed)) in pairs.iter().enumerate() {
            let pred = infer::candidates(&maps, ct, &opts, t, seed);
            let c = metrics::tumour_counts(truth, &pred);
            let dice = (c.truth + c.pred > 0).then(|| metrics::overlap(c).0);
            assert_eq!(scores.dice[i], dice, "pair {t}/{seed}");
            assert_eq!(scores.exemplars[i], lesions::exemplars(&pred, ct, truth));
        }
        // The pairs differ, the seeds of one threshold too: not a comparison of empty masks.
        let mut seen: Vec<u64> = scores.dice.iter().flatten().map(|d| d.to_bits()).collect();
        seen.sort();
        seen.dedup();
        assert!(seen.len() >= 3, "{:?}", scores.dice);
        let seeds_matter = pairs.iter().zip(&scores.dice).any(|(a, da)| {
            pairs
                .iter()
                .zip(&scores.dice)
                .any(|(b, db)| a.0 == b.0 && da != db)
        });
        assert!(seeds_matter, "{:?}", scores.dice);
    }

    #[test]
    fn the_grid_keeps_its_order_and_ties_go_to_the_first_pair() {
        let pairs = threshold_pairs();
        assert_eq!(pairs[0], (0.3, 0.98));
        assert_eq!(pairs[3], (0.3, 0.8));
        assert_eq!(pairs[4], (0.3, 0.3));
        let last = *pairs.last().unwrap();
        assert!((last.0 - 0.9).abs() < 1e-6 && last.0 == last.1, "{last:?}");
        assert_eq!(pairs.len(), 61);
        assert!(pairs.iter().all(|&(t, s)| s >= t && s <= 0.98));
        assert_eq!(pairs.iter().filter(|p| p.0 == p.1).count(), 13);
        // Two studies, three pairs: pair 1 and 2 tie, the study without tumour (None) does not
        // count, and a pair no study counts for scores 0.
        let a = StudyScores {
            dice: vec![Some(0.2), Some(0.6), Some(0.6)],
            exemplars: vec![vec![]; 3],
        };
        let b = StudyScores {
            dice: vec![None, Some(0.8), Some(0.8)],
            exemplars: vec![vec![]; 3],
        };
        assert_eq!(best_pair(&[&a, &b], 3), (1, 0.7));
        let none = StudyScores {
            dice: vec![None, None],
            exemplars: vec![vec![]; 2],
        };
        assert_eq!(best_pair(&[&none], 2), (0, 0.0));
    }
}
