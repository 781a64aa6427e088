//! Aggregates over a batch of studies (METRICS.md, "Batch aggregation").

use serde::Serialize;

use super::{Counts, StudyMetrics};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StructureSummary {
    /// Mean of per-study Dice, skipping studies where both masks are empty.
    pub dice_per_case: Option<f64>,
    /// 2 Σ|T∩P| / (Σ|T| + Σ|P|).
    pub dice_global: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BatchSummary {
    pub studies: usize,
    pub liver: StructureSummary,
    pub tumour: StructureSummary,
    /// RMSE of (predicted − true) tumour burden in percentage points, over studies where both
    /// burdens exist (non-empty livers).
    pub tumour_burden_rmse: Option<f64>,
    pub tumour_burden_max_abs_error: Option<f64>,
}

fn summary<'a>(items: impl Iterator<Item = (f64, &'a Counts)> + Clone) -> StructureSummary {
    let per: Vec<f64> = items
        .clone()
        .filter(|(_, c)| c.truth + c.pred > 0)
        .map(|(d, _)| d)
        .collect();
    let (both, sum) = items.fold((0u64, 0u64), |(b, s), (_, c)| {
        (b + c.both, s + c.truth + c.pred)
    });
    StructureSummary {
        dice_per_case: (!per.is_empty()).then(|| per.iter().sum::<f64>() / per.len() as f64),
        dice_global: (sum > 0).then(|| 2.0 * both as f64 / sum as f64),
    }
}

/// Batch aggregates of per-study metrics.
pub fn aggregate(studies: &[StudyMetrics]) -> BatchSummary {
    let burden =
        |tumour: u64, liver: u64| (liver > 0).then(|| 100.0 * tumour as f64 / liver as f64);
    let errors: Vec<f64> = studies
        .iter()
        .filter_map(|s| {
            let t = burden(s.tumour.counts.truth, s.liver.counts.truth)?;
            let p = burden(s.tumour.counts.pred, s.liver.counts.pred)?;
            Some(p - t)
        })
        .collect();
    BatchSummary {
        studies: studies.len(),
        liver: summary(studies.iter().map(|s| (s.liver.dice, &s.liver.counts))),
        tumour: summary(studies.iter().map(|s| (s.tumour.dice, &s.tumour.counts))),
        tumour_burden_rmse: (!errors.is_empty())
            .then(|| (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt()),
        tumour_burden_max_abs_error: errors.iter().map(|e| e.abs()).reduce(f64::max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::evaluate;
    use crate::volume::{Geometry, LabelVolume};

    #[test]
    fn aggregates_by_hand() {
        let g = Geometry::new(
            [10, 1, 1],
            [1.0; 3],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [0.0; 3],
        )
        .unwrap();
        let v =
            |s: &str| LabelVolume::new(g.clone(), s.bytes().map(|b| b - b'0').collect()).unwrap();
        // Study A: liver T 4 voxels, P 4 voxels, overlap 2 → Dice 0.5; tumour T 1 (at 0) P 0.
        // Study B: identical, liver 5 with tumour 1 → Dice 1, burden 20% both.
        let a = evaluate(&v("2111000000"), &v("0011110000")).unwrap();
        let b = evaluate(&v("1112100000"), &v("1112100000")).unwrap();
        let s = aggregate(&[a, b]);
        assert!((s.liver.dice_per_case.unwrap() - 0.75).abs() < 1e-12);
        // Global: 2 (2 + 5) / ((4 + 4) + (5 + 5)) = 14/18.
        assert!((s.liver.dice_global.unwrap() - 14.0 / 18.0).abs() < 1e-12);
        // Burden errors: A: 0% − 25% = −25; B: 0 → RMSE sqrt(625/2), max 25.
        assert!((s.tumour_burden_rmse.unwrap() - (625.0f64 / 2.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.tumour_burden_max_abs_error, Some(25.0));
        // Tumour per case: A Dice 0 (T 1, P 0), B Dice 1 → 0.5.
        assert!((s.tumour.dice_per_case.unwrap() - 0.5).abs() < 1e-12);
    }
}
