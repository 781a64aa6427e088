//! Study reports and batch digests: view models, askama templates (`templates/`), and the
//! pictures (`images`, `render3d`). Pure: takes volumes and results, returns HTML; never
//! touches the database.

pub mod digest;
pub mod images;
pub mod render3d;

use askama::Template;
use serde::Serialize;

use crate::lesions::{self, Components, Connectivity, Lesion};
use crate::metrics::StudyMetrics;
use crate::volume::{CtVolume, LabelVolume, label};

/// Where a report's numbers came from.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub model_name: String,
    pub model_version: String,
    pub weights_sha256: String,
    pub code_version: String,
    /// Inference parameters (JSON).
    pub parameters: String,
    /// Step timings (JSON, milliseconds).
    pub timings: String,
    pub input_sha256: String,
    pub run_id: i64,
}

/// Everything a study report shows.
pub struct StudyInput<'a> {
    /// The pseudonymous study label shown in the header (e.g. "Study 12").
    pub study_label: String,
    pub processed: String,
    pub ct: &'a CtVolume,
    pub mask: &'a LabelVolume,
    pub truth: Option<&'a LabelVolume>,
    pub metrics: Option<&'a StudyMetrics>,
    pub provenance: Provenance,
    /// At most this many lesion figures (the largest lesions).
    pub max_figures: usize,
}

/// Why a report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("template: {0}")]
    Template(#[from] askama::Error),
    #[error("{0}")]
    Input(String),
}

struct LesionRow {
    number: usize,
    volume_ml: String,
    longest_axial_mm: String,
    max_3d_mm: String,
    centroid_mm: String,
    slices: String,
    mean_hu: String,
}

struct Figure {
    number: usize,
    slice: usize,
    image: String,
    width: usize,
    height: usize,
    bar_mm: String,
    inset_bar_mm: String,
    inset_zoom: String,
}

struct MetricRow {
    name: &'static str,
    liver: String,
    tumour: String,
}

#[derive(Template)]
#[template(path = "report.html")]
struct ReportPage<'a> {
    study_label: &'a str,
    processed: &'a str,
    shape: String,
    spacing: String,
    liver_ml: String,
    lesion_count: usize,
    tumour_ml: String,
    burden: String,
    largest: String,
    lesions: Vec<LesionRow>,
    figures: Vec<Figure>,
    more_lesions: usize,
    projections: [(&'static str, String, usize, usize); 3],
    views: Vec<(String, String)>,
    has_truth: bool,
    metric_rows: Vec<MetricRow>,
    detection: Vec<(&'static str, String)>,
    provenance: &'a Provenance,
}

fn f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn fo(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| f(v, digits))
}

/// The measured lesions of a mask, with the components they came from.
pub fn lesions_of(mask: &LabelVolume, ct: &CtVolume) -> (Components, Vec<Lesion>) {
    let comps = Components::label(
        mask.labels(),
        mask.geometry().shape(),
        |v| v == label::TUMOUR,
        Connectivity::TwentySix,
    );
    let l = lesions::measure(&comps, mask.geometry(), Some(ct));
    (comps, l)
}

/// Renders the self-contained HTML report of one study.
pub fn render_study(input: &StudyInput<'_>) -> Result<String, ReportError> {
    let g = input.mask.geometry();
    if !g.same_grid(input.ct.geometry()) {
        return Err(ReportError::Input(
            "the mask is not on the CT's voxel grid".into(),
        ));
    }
    let summary = lesions::analyze(input.mask, None);
    let (comps, lesions) = lesions_of(input.mask, input.ct);
    let [nx, ny, nz] = g.shape();
    let s = g.spacing_mm();
    let areas = images::areas_by_slice(&comps, nz, ny);
    let figures: Vec<Figure> = lesions
        .iter()
        .take(input.max_figures)
        .map(|l| {
            let fig =
                images::lesion_figure(input.ct, input.mask, input.truth, &comps, &areas, l, 512);
            Figure {
                number: fig.number,
                slice: fig.slice,
                image: fig.image,
                width: fig.width,
                height: fig.height,
                bar_mm: f(fig.bar_mm, 0),
                inset_bar_mm: f(fig.inset_bar_mm, 0),
                inset_zoom: f(fig.inset_zoom, 1),
            }
        })
        .collect();
    let ext = (nx as f64 * s[0])
        .max(ny as f64 * s[1])
        .max(nz as f64 * s[2]);
    let p = images::projections(input.ct, input.mask, 300.0 / ext);
    let pic =
        |name: &'static str, pic: &images::Picture| (name, pic.data_uri(), pic.width, pic.height);
    let projections = [
        pic(
            "Axial (from below: patient's right on the left, anterior up)",
            &p.axial,
        ),
        pic(
            "Coronal (from the front: patient's right on the left, superior up)",
            &p.coronal,
        ),
        pic(
            "Sagittal (from the patient's left: anterior on the left, superior up)",
            &p.sagittal,
        ),
    ];
    let views = render3d::render(input.mask, 420, &render3d::VIEWS)
        .into_iter()
        .zip(["From the front", "From the front left, above"])
        .map(|(p, name)| (name.to_string(), p.data_uri()))
        .collect();
    let rows = lesions
        .iter()
        .map(|l| LesionRow {
            number: l.id,
            volume_ml: f(l.volume_ml, 2),
            longest_axial_mm: f(l.longest_axial_diameter_mm, 1),
            max_3d_mm: f(l.max_diameter_mm, 1),
            centroid_mm: format!(
                "{}, {}, {}",
                f(l.centroid_mm[0], 1),
                f(l.centroid_mm[1], 1),
                f(l.centroid_mm[2], 1)
            ),
            slices: format!("{}–{}", l.slice_range[0], l.slice_range[1]),
            mean_hu: fo(l.mean_hu, 0),
        })
        .collect();
    let (metric_rows, detection) = match input.metrics {
        Some(m) => metric_tables(m),
        None => (vec![], vec![]),
    };
    let largest = lesions.first().map_or("none".into(), |l| {
        format!(
            "lesion 1: {} mL, {} mm longest axial diameter",
            f(l.volume_ml, 2),
            f(l.longest_axial_diameter_mm, 1)
        )
    });
    let page = ReportPage {
        study_label: &input.study_label,
        processed: &input.processed,
        shape: format!("{nx} × {ny} × {nz} voxels"),
        spacing: format!("{} × {} × {} mm", f(s[0], 3), f(s[1], 3), f(s[2], 3)),
        liver_ml: f(summary.liver_ml, 1),
        lesion_count: lesions.len(),
        tumour_ml: f(summary.tumour_ml, 2),
        burden: fo(summary.tumour_burden_pct, 2),
        largest,
        lesions: rows,
        more_lesions: lesions.len().saturating_sub(figures.len()),
        figures,
        projections,
        views,
        has_truth: input.metrics.is_some(),
        metric_rows,
        detection,
        provenance: &input.provenance,
    };
    Ok(page.render()?)
}

fn metric_tables(m: &StudyMetrics) -> (Vec<MetricRow>, Vec<(&'static str, String)>) {
    let row = |name, l: String, t: String| MetricRow {
        name,
        liver: l,
        tumour: t,
    };
    let (l, t) = (&m.liver, &m.tumour);
    let rows = vec![
        row("Dice", f(l.dice, 4), f(t.dice, 4)),
        row("Jaccard", f(l.jaccard, 4), f(t.jaccard, 4)),
        row("VOE", f(l.voe, 4), f(t.voe, 4)),
        row("RVD", fo(l.rvd, 4), fo(t.rvd, 4)),
        row("ASSD (mm)", fo(l.assd_mm, 2), fo(t.assd_mm, 2)),
        row("MSSD (mm)", fo(l.mssd_mm, 2), fo(t.mssd_mm, 2)),
        row("HD95 (mm)", fo(l.hd95_mm, 2), fo(t.hd95_mm, 2)),
        row("RMSD (mm)", fo(l.rmsd_mm, 2), fo(t.rmsd_mm, 2)),
    ];
    let d = &m.detection;
    let detection = vec![
        ("reference lesions", d.reference_lesions.to_string()),
        ("predicted lesions", d.predicted_lesions.to_string()),
        ("true positives", d.tp.to_string()),
        ("false positives", d.fp.to_string()),
        ("false negatives", d.fn_.to_string()),
        ("precision", fo(d.precision, 3)),
        ("recall", fo(d.recall, 3)),
        ("F1", fo(d.f1, 3)),
    ];
    (rows, detection)
}
