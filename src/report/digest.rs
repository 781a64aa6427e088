//! The batch digest: every study of a batch with its key numbers and a link to its report,
//! the failures with their reasons, and the model's accuracy where ground truth exists
//! (per-case and global Dice, a plot of per-study Dice and of predicted against true tumour
//! volume, drawn with plotters as SVG).

use askama::Template;
use plotters::prelude::*;

/// One study of the batch.
#[derive(Clone, Debug)]
pub struct DigestStudy {
    pub study: i64,
    pub run: i64,
    pub state: String,
    pub lesions: Option<i32>,
    pub liver_ml: Option<f64>,
    pub tumour_ml: Option<f64>,
    pub liver_dice: Option<f64>,
    pub tumour_dice: Option<f64>,
    /// Ground-truth volumes (mL) when known.
    pub truth_liver_ml: Option<f64>,
    pub truth_tumour_ml: Option<f64>,
    /// Link to the study's report.
    pub link: String,
}

/// A failure of the batch.
#[derive(Clone, Debug)]
pub struct DigestFailure {
    pub what: String,
    pub reason: String,
}

pub struct DigestInput {
    pub title: String,
    pub generated: String,
    pub studies: Vec<DigestStudy>,
    pub failures: Vec<DigestFailure>,
}

struct Row {
    study: i64,
    state: String,
    lesions: String,
    liver_ml: String,
    tumour_ml: String,
    liver_dice: String,
    tumour_dice: String,
    link: String,
}

#[derive(Template)]
#[template(path = "digest.html")]
struct DigestPage<'a> {
    title: &'a str,
    generated: &'a str,
    rows: Vec<Row>,
    failures: &'a [DigestFailure],
    with_truth: usize,
    accuracy: Vec<(&'static str, String, String)>,
    dice_chart: String,
    volume_chart: String,
}

fn fo(v: Option<f64>, d: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("–".into(), |v| format!("{v:.d$}"))
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Global Dice from per-study Dice and volumes: Σ 2|A∩B| / Σ (|A| + |B|).
fn global(pairs: &[(f64, f64, f64)]) -> Option<f64> {
    let (num, den) = pairs.iter().fold((0.0, 0.0), |(n, d), &(dice, t, p)| {
        (n + dice * (t + p), d + t + p)
    });
    (den > 0.0).then(|| num / den)
}

fn dice_chart(studies: &[&DigestStudy]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 260)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let n = studies.len().max(1) as f64;
        if let Ok(mut chart) = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .caption("Dice per study", ("sans-serif", 16))
            .build_cartesian_2d(0f64..n, 0f64..1f64)
        {
            let _ = chart
                .configure_mesh()
                .x_desc("study (in batch order)")
                .y_desc("Dice")
                .x_labels(studies.len().clamp(1, 12))
                .draw();
            let liver: Vec<(f64, f64)> = studies
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i as f64 + 0.3, s.liver_dice?)))
                .collect();
            let tumour: Vec<(f64, f64)> = studies
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i as f64 + 0.7, s.tumour_dice?)))
                .collect();
            let _ = chart
                .draw_series(liver.iter().map(|&(x, y)| {
                    Rectangle::new([(x - 0.18, 0.0), (x + 0.18, y)], GREEN.filled())
                }))
                .map(|s| {
                    s.label("liver").legend(|(x, y)| {
                        Rectangle::new([(x, y - 4), (x + 8, y + 4)], GREEN.filled())
                    })
                });
            let _ = chart
                .draw_series(
                    tumour.iter().map(|&(x, y)| {
                        Rectangle::new([(x - 0.18, 0.0), (x + 0.18, y)], RED.filled())
                    }),
                )
                .map(|s| {
                    s.label("tumour")
                        .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 8, y + 4)], RED.filled()))
                });
            let _ = chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw();
        }
        let _ = root.present();
    }
    svg
}

fn volume_chart(points: &[(f64, f64)]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (320, 300)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let max = points.iter().map(|&(t, p)| t.max(p)).fold(1.0f64, f64::max) * 1.1;
        if let Ok(mut chart) = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .caption("Tumour volume (mL)", ("sans-serif", 16))
            .build_cartesian_2d(0f64..max, 0f64..max)
        {
            let _ = chart
                .configure_mesh()
                .x_desc("ground truth")
                .y_desc("predicted")
                .draw();
            let _ = chart.draw_series(LineSeries::new(
                vec![(0.0, 0.0), (max, max)],
                BLACK.mix(0.4),
            ));
            let _ = chart.draw_series(
                points
                    .iter()
                    .map(|&(t, p)| Circle::new((t, p), 4, RED.filled())),
            );
        }
        let _ = root.present();
    }
    svg
}

/// Renders the digest page (self-contained HTML).
pub fn render(input: &DigestInput) -> Result<String, askama::Error> {
    let rows = input
        .studies
        .iter()
        .map(|s| Row {
            study: s.study,
            state: s.state.clone(),
            lesions: s.lesions.map_or("–".into(), |n| n.to_string()),
            liver_ml: fo(s.liver_ml, 1),
            tumour_ml: fo(s.tumour_ml, 2),
            liver_dice: fo(s.liver_dice, 3),
            tumour_dice: fo(s.tumour_dice, 3),
            link: s.link.clone(),
        })
        .collect();
    let scored: Vec<&DigestStudy> = input
        .studies
        .iter()
        .filter(|s| s.liver_dice.is_some())
        .collect();
    let per_case = |f: fn(&DigestStudy) -> Option<f64>| {
        mean(&scored.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    let pairs = |dice: fn(&DigestStudy) -> Option<f64>,
                 truth: fn(&DigestStudy) -> Option<f64>,
                 pred: fn(&DigestStudy) -> Option<f64>| {
        scored
            .iter()
            .filter_map(|s| Some((dice(s)?, truth(s)?, pred(s)?)))
            .collect::<Vec<_>>()
    };
    let liver_pairs = pairs(|s| s.liver_dice, |s| s.truth_liver_ml, |s| s.liver_ml);
    let tumour_pairs = pairs(|s| s.tumour_dice, |s| s.truth_tumour_ml, |s| s.tumour_ml);
    let accuracy = if scored.is_empty() {
        vec![]
    } else {
        vec![
            (
                "Dice per case (mean)",
                fo(per_case(|s| s.liver_dice), 4),
                fo(per_case(|s| s.tumour_dice), 4),
            ),
            (
                "Dice global",
                fo(global(&liver_pairs), 4),
                fo(global(&tumour_pairs), 4),
            ),
        ]
    };
    let volumes: Vec<(f64, f64)> = tumour_pairs.iter().map(|&(_, t, p)| (t, p)).collect();
    let page = DigestPage {
        title: &input.title,
        generated: &input.generated,
        rows,
        failures: &input.failures,
        with_truth: scored.len(),
        accuracy,
        dice_chart: if scored.is_empty() {
            String::new()
        } else {
            dice_chart(&scored)
        },
        volume_chart: if volumes.is_empty() {
            String::new()
        } else {
            volume_chart(&volumes)
        },
    };
    page.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_dice_weights_by_volume() {
        // Two studies: a perfect small one and a half-overlapping big one.
        let g = global(&[(1.0, 1.0, 1.0), (0.5, 100.0, 100.0)]).unwrap();
        assert!((g - (2.0 + 100.0) / 202.0).abs() < 1e-12);
        assert_eq!(global(&[]), None);
    }
}
