//! Lesion detection: 26-connected components of the tumour in truth and prediction, matched
//! by any overlap of one voxel or more.

use serde::Serialize;

use crate::lesions::{Components, Connectivity, measure};
use crate::volume::{LabelVolume, label};

/// Detected and missed reference lesions of one size class.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SizeCounts {
    pub tp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

/// By the reference lesion's longest axial diameter.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BySize {
    /// < 10 mm
    pub small: SizeCounts,
    /// 10–20 mm
    pub medium: SizeCounts,
    /// > 20 mm
    pub large: SizeCounts,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Detection {
    pub reference_lesions: u64,
    pub predicted_lesions: u64,
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub by_size: BySize,
}

/// Matches reference and predicted lesions. The masks must share a grid.
pub fn detect(truth: &LabelVolume, pred: &LabelVolume) -> Detection {
    let g = truth.geometry();
    let shape = g.shape();
    let is_t = |v| v == label::TUMOUR;
    let (ct, cp) = rayon::join(
        || Components::label(truth.labels(), shape, is_t, Connectivity::TwentySix),
        || Components::label(pred.labels(), shape, is_t, Connectivity::TwentySix),
    );
    let mut ref_hit = vec![false; ct.count() + 1];
    let mut pred_hit = vec![false; cp.count() + 1];
    // Runs of both are sorted by (row, start): walk them together and mark overlapping pairs.
    let rt: Vec<_> = ct.runs().collect();
    let rp: Vec<_> = cp.runs().collect();
    let (mut i, mut j) = (0, 0);
    while i < rt.len() && j < rp.len() {
        let ((a, la), (b, lb)) = (rt[i], rp[j]);
        if a.row != b.row {
            if a.row < b.row {
                i += 1;
            } else {
                j += 1;
            }
            continue;
        }
        if a.start < b.end && b.start < a.end {
            ref_hit[la as usize] = true;
            pred_hit[lb as usize] = true;
        }
        if a.end < b.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    let n_ref = ct.count() as u64;
    let n_pred = cp.count() as u64;
    let tp = ref_hit.iter().skip(1).filter(|&&h| h).count() as u64;
    let pred_tp = pred_hit.iter().skip(1).filter(|&&h| h).count() as u64;
    let precision = (n_pred > 0).then(|| pred_tp as f64 / n_pred as f64);
    let recall = (n_ref > 0).then(|| tp as f64 / n_ref as f64);
    let f1 = match (precision, recall) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        _ => None,
    };
    let mut by_size = BySize::default();
    for lesion in measure(&ct, g, None) {
        let d = lesion.longest_axial_diameter_mm;
        let class = if d < 10.0 {
            &mut by_size.small
        } else if d <= 20.0 {
            &mut by_size.medium
        } else {
            &mut by_size.large
        };
        if ref_hit[lesion.component as usize] {
            class.tp += 1;
        } else {
            class.fn_ += 1;
        }
    }
    Detection {
        reference_lesions: n_ref,
        predicted_lesions: n_pred,
        tp,
        fp: n_pred - pred_tp,
        fn_: n_ref - tp,
        precision,
        recall,
        f1,
        by_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    #[test]
    fn detection_by_hand() {
        // 40×1×1 row, spacing 1 mm. Truth lesions: [0..3), [10..25) (15 mm), [30..31).
        // Prediction: [2..4) overlaps the first, [12..13) the second, [35..37) nothing.
        let g = Geometry::new(
            [40, 1, 1],
            [1.0; 3],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [0.0; 3],
        )
        .unwrap();
        let mk = |ranges: &[(usize, usize)]| {
            let mut v = vec![1u8; 40];
            for &(a, b) in ranges {
                v[a..b].fill(2);
            }
            LabelVolume::new(g.clone(), v).unwrap()
        };
        let t = mk(&[(0, 3), (10, 25), (30, 31)]);
        let p = mk(&[(2, 4), (12, 13), (35, 37)]);
        let d = detect(&t, &p);
        assert_eq!((d.reference_lesions, d.predicted_lesions), (3, 3));
        assert_eq!((d.tp, d.fp, d.fn_), (2, 1, 1));
        assert!((d.precision.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.recall.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.f1.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Diameters: 2 mm (small, hit), 14 mm (medium, hit), 0 mm (small, missed).
        assert_eq!(d.by_size.small, SizeCounts { tp: 1, fn_: 1 });
        assert_eq!(d.by_size.medium, SizeCounts { tp: 1, fn_: 0 });
        assert_eq!(d.by_size.large, SizeCounts { tp: 0, fn_: 0 });
        // No prediction: precision and F1 are null, recall 0.
        let none = detect(&t, &mk(&[]));
        assert_eq!(
            (none.precision, none.recall, none.f1),
            (None, Some(0.0), None)
        );
    }
}
