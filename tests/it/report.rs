//! Reports: escaping, pictures checked by their pixels (the lesion's contour where the lesion
//! is, radiological orientation on an asymmetric volume, true aspect ratio), and a snapshot
//! of the rendered HTML of a phantom study.

use base64::Engine;
use hepaflow::report::{self, Provenance, StudyInput, images};
use hepaflow::volume::{CtVolume, Geometry, LabelVolume};

use crate::support::{hepaflow, root, stderr, tempdir};

fn provenance() -> Provenance {
    Provenance {
        model_name: "demo".into(),
        model_version: "1".into(),
        weights_sha256: "ab".repeat(32),
        code_version: "test".into(),
        parameters: "{\"mode\":\"dense\"}".into(),
        timings: "{\"segment_ms\":1}".into(),
        input_sha256: "cd".repeat(32),
        run_id: 7,
    }
}

/// A 64 × 48 × 6 volume: liver on the voxel-i-low half, one lesion at i 8..16, j 6..14.
fn asymmetric(flip_x: bool, spacing: [f64; 3]) -> (CtVolume, LabelVolume) {
    let shape = [64, 48, 6];
    let sx = if flip_x { 1.0 } else { -1.0 };
    let g = Geometry::new(
        shape,
        spacing,
        [[sx, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],
        [0.0, 0.0, 0.0],
    )
    .unwrap();
    let n = shape[0] * shape[1] * shape[2];
    let mut labels = vec![0u8; n];
    let mut hu = vec![-900.0f32; n];
    for k in 0..shape[2] {
        for j in 2..40 {
            for i in 2..30 {
                let v = i + shape[0] * (j + shape[1] * k);
                labels[v] = 1;
                hu[v] = 60.0;
                if (8..16).contains(&i) && (6..14).contains(&j) && (1..5).contains(&k) {
                    labels[v] = 2;
                    hu[v] = 20.0;
                }
            }
        }
    }
    (
        CtVolume::new(g.clone(), hu).unwrap(),
        LabelVolume::new(g, labels).unwrap(),
    )
}

fn decode(uri: &str) -> (usize, usize, Vec<u8>) {
    let b64 = uri
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URI");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// Mean position of the pixels of `colour`, ignoring the inset's corner.
fn centroid_of(
    w: usize,
    h: usize,
    rgb: &[u8],
    colour: [u8; 3],
    skip: (usize, usize, usize),
) -> Option<(f64, f64, usize)> {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0);
    for y in 0..h {
        for x in 0..w {
            if x >= skip.0 && x < skip.1 && y < skip.2 {
                continue;
            }
            let o = (y * w + x) * 3;
            if rgb[o..o + 3] == colour {
                sx += x as f64;
                sy += y as f64;
                n += 1;
            }
        }
    }
    (n > 0).then(|| (sx / n as f64, sy / n as f64, n))
}

fn figure(ct: &CtVolume, mask: &LabelVolume) -> images::LesionFigure {
    let (comps, lesions) = report::lesions_of(mask, ct);
    let [_, ny, nz] = mask.geometry().shape();
    let areas = images::areas_by_slice(&comps, nz, ny);
    assert_eq!(lesions.len(), 1);
    images::lesion_figure(ct, mask, None, &comps, &areas, &lesions[0], 512)
}

#[test]
fn the_lesion_is_drawn_where_it_is_in_radiological_orientation() {
    // i toward the patient's left (the usual CT layout): the lesion, at low i (patient's
    // right) and low j (anterior), is on the image's left and top.
    let (ct, mask) = asymmetric(false, [1.0, 1.0, 3.0]);
    let fig = figure(&ct, &mask);
    let (w, h, rgb) = decode(&fig.image);
    assert_eq!((w, h), (512, 384), "64 x 48 mm at square pixels");
    let inset = (w as f64 * 0.34).round() as usize + 8;
    let (cx, cy, n) = centroid_of(w, h, &rgb, images::THIS_LESION, (w - inset, w, inset))
        .expect("the lesion's contour is drawn");
    assert!(n > 50, "{n} contour pixels");
    // Lesion centre: i = 12 of 64, j = 10 of 48 (voxel centres) -> x ≈ 12.5/64 · 512, y ≈ 10.5/48 · 384.
    assert!(
        (cx - 100.0).abs() < 12.0 && (cy - 84.0).abs() < 12.0,
        "contour centre ({cx}, {cy})"
    );
    assert!(fig.slice >= 1 && fig.slice <= 4);
    // The liver contour is drawn too, on the same side.
    let (lx, _, _) = centroid_of(w, h, &rgb, images::LIVER, (w - inset, w, inset)).unwrap();
    assert!(lx < w as f64 / 2.0);

    // The same voxels with i toward the patient's right: mirrored on screen.
    let (ct, mask) = asymmetric(true, [1.0, 1.0, 3.0]);
    let fig = figure(&ct, &mask);
    let (w, h, rgb) = decode(&fig.image);
    let (cx, cy2, n2) = centroid_of(w, h, &rgb, images::THIS_LESION, (0, inset, inset)).unwrap();
    assert!(n2 > 50 && (cy2 - 84.0).abs() < 12.0);
    assert!(
        (cx - (512.0 - 100.0)).abs() < 12.0,
        "mirrored contour at {cx}"
    );
}

#[test]
fn anisotropic_pixels_keep_their_true_aspect() {
    let (ct, mask) = asymmetric(false, [0.8, 1.6, 3.0]);
    let fig = figure(&ct, &mask);
    let (w, h, _) = decode(&fig.image);
    // 64 · 0.8 = 51.2 mm wide, 48 · 1.6 = 76.8 mm tall.
    assert_eq!(w, 512);
    assert_eq!(h, 768);
    let p = images::projections(&ct, &mask, 4.0);
    assert_eq!((p.coronal.width, p.coronal.height), (205, 72));
    assert_eq!((p.sagittal.width, p.sagittal.height), (307, 72));
}

fn render(label: &str, model: &str) -> String {
    let (ct, mask) = asymmetric(false, [1.0, 1.0, 3.0]);
    let mut prov = provenance();
    prov.model_name = model.into();
    report::render_study(&StudyInput {
        study_label: label.into(),
        processed: "2026-01-01 00:00 UTC".into(),
        ct: &ct,
        mask: &mask,
        truth: Some(&mask),
        metrics: Some(&hepaflow::metrics::evaluate(&mask, &mask).unwrap()),
        provenance: prov,
        max_figures: 4,
    })
    .unwrap()
}

#[test]
fn everything_in_a_report_is_escaped() {
    let html = render("<script>alert('x')</script>", "O'Hara & <b>Sons</b>");
    assert!(!html.contains("<script>"), "raw script tag in the report");
    assert!(
        html.contains("&lt;script&gt;") || html.contains("&#60;script&#62;"),
        "{}",
        &html[html.find("<h1>").unwrap()..][..200]
    );
    assert!(!html.contains("<b>Sons</b>"));
    assert!(
        html.contains("O&#39;Hara") || html.contains("O&#x27;Hara"),
        "apostrophe escaped"
    );
    assert!(html.contains("&amp;") || html.contains("&#38;"));
}

#[test]
fn report_html_matches_its_snapshot() {
    let html = render("Study 1", "demo");
    // Pictures are checked by content elsewhere; the snapshot holds the text.
    let mut text = String::new();
    let mut rest = html.as_str();
    while let Some(i) = rest.find("data:image/png;base64,") {
        text.push_str(&rest[..i]);
        text.push_str("data:image/png;base64,…");
        rest = &rest[i..];
        let end = rest.find('"').unwrap();
        rest = &rest[end..];
    }
    text.push_str(rest);
    let path = root().join("tests/it/snapshots/report.html");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("snapshot (UPDATE_SNAPSHOTS=1 writes it)");
    if want != text {
        std::fs::write(path.with_extension("html.new"), &text).unwrap();
        panic!("report HTML differs from tests/it/snapshots/report.html (see report.html.new)");
    }
    // The numbers are the lesion tool's.
    for needle in [
        "Lesion 1",
        "Dice",
        "1.0000",
        "Software output, to be verified",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
}

#[test]
fn the_report_numbers_match_the_lesions_command() {
    let dir = tempdir();
    let (ct, mask) = asymmetric(false, [1.0, 1.0, 3.0]);
    mask.write(&dir.path().join("m.nii.gz")).unwrap();
    let out = hepaflow()
        .args(["lesions", "--json", "--mask"])
        .arg(dir.path().join("m.nii.gz"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let html = render("Study 1", "demo");
    let vol = format!("{:.2}", cli["lesions"][0]["volume_ml"].as_f64().unwrap());
    let liver = format!("{:.1} mL", cli["liver_ml"].as_f64().unwrap());
    assert!(html.contains(&format!("<td>{vol}</td>")), "{vol}");
    assert!(html.contains(&liver), "{liver}");
    let _ = ct;
}
