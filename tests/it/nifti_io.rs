//! NIfTI reading compared with nibabel, and masks written by hepaflow read back by nibabel.

use serde_json::Value;

use crate::support::*;
use hepaflow::volume::{LabelVolume, NiftiFile, ReadLimits};

#[test]
fn inspect_agrees_with_nibabel_on_files_it_wrote() {
    let dir = tempdir();
    run_py("nibabel_cases.py", &[dir.path()]);
    let expected = read_json(&dir.path().join("expected.json"));
    let cases = expected.as_object().unwrap();
    assert!(cases.len() >= 12, "only {} cases", cases.len());
    for (name, want) in cases {
        let got = json_of(
            hepaflow()
                .args(["inspect", "--json"])
                .arg(dir.path().join(name)),
        );
        assert_eq!(got["shape"], want["shape"], "{name}: shape");
        assert_eq!(got["format"], want["format"], "{name}: format");
        for i in 0..3 {
            let (g, w) = (
                got["spacing_mm"][i].as_f64().unwrap(),
                want["spacing_mm"][i].as_f64().unwrap(),
            );
            assert!(close(g, w, 1e-6), "{name}: spacing[{i}] {g} vs {w}");
        }
        for r in 0..4 {
            for c in 0..4 {
                let g = got["affine"][r][c].as_f64().unwrap();
                let w = want["affine"][r][c].as_f64().unwrap();
                assert!(
                    (g - w).abs() < 1e-5 * (1.0 + w.abs()),
                    "{name}: affine[{r}][{c}] {g} vs {w}"
                );
            }
        }
        for k in ["min", "max", "mean", "sum"] {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!(close(g, w, 1e-6), "{name}: {k} {g} vs {w}");
        }
    }
}

#[test]
fn masks_carry_the_source_geometry_when_nibabel_reads_them() {
    let dir = tempdir();
    run_py("nibabel_cases.py", &[dir.path()]);
    let limits = ReadLimits::default();
    let mut pairs = Vec::new();
    for src in [
        "i16_be_qform_flip.nii",
        "u8_sform_oblique.nii.gz",
        "f32_no_xform.nii.gz",
        "f64_be_sform_and_qform.nii.gz",
    ] {
        let f = NiftiFile::open(&dir.path().join(src), &limits).unwrap();
        let g = f.geometry().clone();
        let labels: Vec<u8> = (0..g.len()).map(|i| (i % 3) as u8).collect();
        let mask = LabelVolume::new(g, labels).unwrap();
        let out = dir.path().join(format!("mask-{src}"));
        let out = if src.ends_with(".gz") {
            out
        } else {
            out.with_extension("nii.gz")
        };
        mask.write(&out).unwrap();
        pairs.push((dir.path().join(src), out));
    }
    let args: Vec<&std::path::Path> = pairs
        .iter()
        .flat_map(|(a, b)| [a.as_path(), b.as_path()])
        .collect();
    let read: Value = serde_json::from_str(&run_py("read_affines.py", &args)).unwrap();
    for (src, mask) in &pairs {
        let s = &read[src.to_str().unwrap()];
        let m = &read[mask.to_str().unwrap()];
        assert_eq!(m["dtype"], "uint8");
        assert_eq!(m["values"], serde_json::json!([0, 1, 2]));
        assert_eq!(m["qform_code"], s["qform_code"], "{}", mask.display());
        assert_eq!(m["sform_code"], s["sform_code"], "{}", mask.display());
        for key in ["affine", "qform", "sform"] {
            for r in 0..4 {
                for c in 0..4 {
                    let a = s[key][r][c].as_f64().unwrap();
                    let b = m[key][r][c].as_f64().unwrap();
                    assert!(
                        (a - b).abs() < 1e-5 * (1.0 + a.abs()),
                        "{}: {key}[{r}][{c}] {a} vs {b}",
                        mask.display()
                    );
                }
            }
        }
    }
}

#[test]
fn label_reading_accepts_any_integer_datatype_and_names_a_bad_value() {
    let dir = tempdir();
    run_py("nibabel_cases.py", &[dir.path()]);
    let limits = ReadLimits::default();
    // 4D uint8 with values 0..2: a valid mask.
    let m = LabelVolume::read(&dir.path().join("u8_4d_one_volume.nii.gz"), &limits).unwrap();
    assert_eq!(m.geometry().shape(), [13, 11, 7]);
    // Random uint8 values include 3 and more: rejected with the voxel and the value.
    let e = LabelVolume::read(&dir.path().join("u8_sform_oblique.nii.gz"), &limits).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("u8_sform_oblique.nii.gz") && msg.contains("voxel ("),
        "{msg}"
    );
}
