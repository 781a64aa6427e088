//! Accuracy of a predicted label mask against ground truth, as LiTS and MedPy define it
//! (`../shared/design/METRICS.md`): overlap and surface metrics per structure, lesion
//! detection, and batch aggregation. Pure functions, no I/O.

mod batch;
mod detection;
pub mod surface;

pub use batch::{BatchSummary, aggregate};
pub use detection::{Detection, SizeCounts, detect};

use rayon::prelude::*;
use serde::Serialize;

use crate::volume::{LabelVolume, label};

/// The metrics of one structure (liver or tumour).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct StructureMetrics {
    pub dice: f64,
    pub jaccard: f64,
    pub voe: f64,
    pub rvd: Option<f64>,
    pub assd_mm: Option<f64>,
    pub mssd_mm: Option<f64>,
    pub hd95_mm: Option<f64>,
    pub rmsd_mm: Option<f64>,
    pub truth_ml: f64,
    pub pred_ml: f64,
    /// Why the surface metrics are null, when they are.
    #[serde(skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub surface_note: Option<&'static str>,
    #[serde(skip)]
    pub counts: Counts,
}

/// Voxel counts behind the overlap metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub truth: u64,
    pub pred: u64,
    pub both: u64,
}

/// Everything `hepaflow metrics` reports for one study.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct StudyMetrics {
    pub liver: StructureMetrics,
    pub tumour: StructureMetrics,
    pub detection: Detection,
}

/// The two masks are not on the same voxel grid.
#[derive(Debug, thiserror::Error)]
#[error("prediction grid {pred:?} does not match the truth grid {truth:?} (shape or affine)")]
pub struct GridMismatch {
    pub truth: [usize; 3],
    pub pred: [usize; 3],
}

/// Dice, Jaccard, VOE and RVD from counts, with METRICS.md's empty-mask rules.
pub fn overlap(c: Counts) -> (f64, f64, f64, Option<f64>) {
    if c.truth == 0 && c.pred == 0 {
        return (1.0, 1.0, 0.0, None);
    }
    let dice = 2.0 * c.both as f64 / (c.truth + c.pred) as f64;
    let union = c.truth + c.pred - c.both;
    let jaccard = c.both as f64 / union as f64;
    let rvd = (c.truth > 0).then(|| (c.pred as f64 - c.truth as f64) / c.truth as f64);
    (dice, jaccard, 1.0 - jaccard, rvd)
}

/// Tumour voxel counts of a prediction against its reference (on the same grid).
pub fn tumour_counts(truth: &LabelVolume, pred: &LabelVolume) -> Counts {
    count(truth.labels(), pred.labels()).1
}

/// Voxel counts for (liver, tumour) in one pass.
fn count(truth: &[u8], pred: &[u8]) -> (Counts, Counts) {
    truth
        .par_chunks(1 << 16)
        .zip(pred.par_chunks(1 << 16))
        .map(|(t, p)| {
            let (mut l, mut m) = (Counts::default(), Counts::default());
            for (&a, &b) in t.iter().zip(p) {
                let (tl, pl) = (a >= label::LIVER, b >= label::LIVER);
                let (tt, pt) = (a == label::TUMOUR, b == label::TUMOUR);
                l.truth += u64::from(tl);
                l.pred += u64::from(pl);
                l.both += u64::from(tl && pl);
                m.truth += u64::from(tt);
                m.pred += u64::from(pt);
                m.both += u64::from(tt && pt);
            }
            (l, m)
        })
        .reduce(
            || (Counts::default(), Counts::default()),
            |a, b| {
                let add = |x: Counts, y: Counts| Counts {
                    truth: x.truth + y.truth,
                    pred: x.pred + y.pred,
                    both: x.both + y.both,
                };
                (add(a.0, b.0), add(a.1, b.1))
            },
        )
}

fn structure<F: Fn(u8) -> bool + Sync>(
    truth: &LabelVolume,
    pred: &LabelVolume,
    c: Counts,
    is_in: F,
) -> StructureMetrics {
    let g = truth.geometry();
    let ml = g.voxel_volume_mm3() / 1000.0;
    let (dice, jaccard, voe, rvd) = overlap(c);
    let dists = surface::surface_distances(
        truth.labels(),
        pred.labels(),
        g.shape(),
        g.spacing_mm(),
        is_in,
    );
    let s = dists.and_then(surface::stats);
    let note = match (c.truth, c.pred) {
        (0, 0) => Some("both masks are empty"),
        (0, _) => Some("the ground truth is empty"),
        (_, 0) => Some("the prediction is empty"),
        _ => None,
    };
    StructureMetrics {
        dice,
        jaccard,
        voe,
        rvd,
        assd_mm: s.map(|s| s.assd),
        mssd_mm: s.map(|s| s.mssd),
        hd95_mm: s.map(|s| s.hd95),
        rmsd_mm: s.map(|s| s.rmsd),
        truth_ml: c.truth as f64 * ml,
        pred_ml: c.pred as f64 * ml,
        surface_note: note,
        counts: c,
    }
}

/// Every metric of METRICS.md for one study. The masks must share a grid.
pub fn evaluate(truth: &LabelVolume, pred: &LabelVolume) -> Result<StudyMetrics, GridMismatch> {
    if !truth.geometry().same_grid(pred.geometry()) {
        return Err(GridMismatch {
            truth: truth.geometry().shape(),
            pred: pred.geometry().shape(),
        });
    }
    let (cl, ct) = count(truth.labels(), pred.labels());
    let (liver, tumour) = rayon::join(
        || structure(truth, pred, cl, |v| v >= label::LIVER),
        || structure(truth, pred, ct, |v| v == label::TUMOUR),
    );
    Ok(StudyMetrics {
        liver,
        tumour,
        detection: detect(truth, pred),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    fn vol(shape: [usize; 3], spacing: [f64; 3], labels: Vec<u8>) -> LabelVolume {
        let g = Geometry::new(
            shape,
            spacing,
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [0.0; 3],
        )
        .unwrap();
        LabelVolume::new(g, labels).unwrap()
    }

    fn check(c: Counts, want: (f64, f64, f64, Option<f64>)) {
        let got = overlap(c);
        assert!((got.0 - want.0).abs() < 1e-12, "{c:?}: dice {got:?}");
        assert!((got.1 - want.1).abs() < 1e-12, "{c:?}: jaccard {got:?}");
        assert!((got.2 - want.2).abs() < 1e-12, "{c:?}: voe {got:?}");
        match (got.3, want.3) {
            (None, None) => {}
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{c:?}: rvd {a} vs {b}"),
            _ => panic!("{c:?}: rvd {:?} vs {:?}", got.3, want.3),
        }
    }

    #[test]
    fn overlap_by_hand() {
        // |T| = 4, |P| = 6, |T∩P| = 3: Dice 6/10, Jaccard 3/7, RVD (6-4)/4.
        check(
            Counts {
                truth: 4,
                pred: 6,
                both: 3,
            },
            (0.6, 3.0 / 7.0, 4.0 / 7.0, Some(0.5)),
        );
        check(
            Counts {
                truth: 0,
                pred: 0,
                both: 0,
            },
            (1.0, 1.0, 0.0, None),
        );
        check(
            Counts {
                truth: 0,
                pred: 5,
                both: 0,
            },
            (0.0, 0.0, 1.0, None),
        );
        check(
            Counts {
                truth: 5,
                pred: 0,
                both: 0,
            },
            (0.0, 0.0, 1.0, Some(-1.0)),
        );
    }

    #[test]
    fn shifted_slab_has_the_distance_arithmetic_gives() {
        // A 2×2×10 column (every voxel touches the array edge, so every voxel is surface);
        // truth fills slices 2..=5, the prediction 4..=7: a shift of 2 slices of 2.5 mm.
        let shape = [2, 2, 10];
        let sp = [1.0, 1.0, 2.5];
        let slab = |a: usize, b: usize| -> Vec<u8> {
            (0..40)
                .map(|i| u8::from((a..=b).contains(&(i / 4))))
                .collect()
        };
        let m = evaluate(&vol(shape, sp, slab(2, 5)), &vol(shape, sp, slab(4, 7))).unwrap();
        // Each direction: 8 zeros (slices 4, 5 / 4, 5), 4 × 2.5 mm, 4 × 5.0 mm; pooled 32.
        let l = &m.liver;
        assert!((l.assd_mm.unwrap() - (8.0 * 2.5 + 8.0 * 5.0) / 32.0).abs() < 1e-12);
        assert_eq!(l.mssd_mm, Some(5.0));
        assert_eq!(l.hd95_mm, Some(5.0));
        assert!((l.rmsd_mm.unwrap() - ((8.0 * 6.25 + 8.0 * 25.0) / 32.0f64).sqrt()).abs() < 1e-12);
        assert!((l.dice - 0.5).abs() < 1e-12);
        // Anisotropy matters: the same shift with 1 mm slices gives 2.5 times less.
        let m1 = evaluate(
            &vol(shape, [1.0; 3], slab(2, 5)),
            &vol(shape, [1.0; 3], slab(4, 7)),
        )
        .unwrap();
        assert!((m1.liver.assd_mm.unwrap() * 2.5 - l.assd_mm.unwrap()).abs() < 1e-12);
    }

    #[test]
    fn identical_masks_have_zero_distances_and_empty_masks_null() {
        let shape = [8, 8, 4];
        let mut t = vec![0u8; 256];
        t[60..100].fill(1);
        t[70] = 2;
        let a = vol(shape, [0.7, 0.7, 3.0], t.clone());
        let m = evaluate(&a, &a).unwrap();
        assert_eq!(m.liver.dice, 1.0);
        assert_eq!(m.liver.assd_mm, Some(0.0));
        assert_eq!(m.liver.hd95_mm, Some(0.0));
        let empty = vol(shape, [0.7, 0.7, 3.0], vec![0; 256]);
        let m = evaluate(&a, &empty).unwrap();
        assert_eq!(m.tumour.assd_mm, None);
        assert_eq!(m.tumour.rvd, Some(-1.0));
        assert_eq!(m.tumour.dice, 0.0);
        let m = evaluate(&empty, &empty).unwrap();
        assert_eq!(m.tumour.dice, 1.0);
        assert_eq!(m.tumour.rvd, None);
        assert_eq!(m.liver.surface_note, Some("both masks are empty"));
    }

    #[test]
    fn dice_is_symmetric() {
        let mut rng = crate::volume::phantom::Rng::new(5, 5);
        let shape = [9, 7, 5];
        for _ in 0..20 {
            let a: Vec<u8> = (0..315).map(|_| rng.below(3) as u8).collect();
            let b: Vec<u8> = (0..315).map(|_| rng.below(3) as u8).collect();
            let (x, y) = (
                vol(shape, [1.0, 1.5, 2.0], a),
                vol(shape, [1.0, 1.5, 2.0], b),
            );
            let m1 = evaluate(&x, &y).unwrap();
            let m2 = evaluate(&y, &x).unwrap();
            assert_eq!(m1.liver.dice, m2.liver.dice);
            assert_eq!(m1.tumour.jaccard, m2.tumour.jaccard);
            assert_eq!(m1.liver.assd_mm, m2.liver.assd_mm);
            assert_eq!(m1.liver.hd95_mm, m2.liver.hd95_mm);
        }
    }
}
