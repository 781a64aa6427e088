//! `hepaflow lesions` and `hepaflow metrics` against an independent numpy/scipy computation of
//! METRICS.md on masks written by nibabel: every value to 1e-6 relative, nulls where nulls.

use serde_json::Value;

use crate::support::*;

/// Compares two JSON values: numbers to `rel`, nulls and integers exactly, recursively.
/// Keys of `want` must all be in `got` (extra keys in `got` are allowed).
fn same(path: &str, got: &Value, want: &Value, rel: f64) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= rel * w.abs().max(1e-9),
                "{path}: {g} vs {w}"
            );
        }
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let gv = g.get(k).unwrap_or_else(|| panic!("{path}.{k} missing"));
                same(&format!("{path}.{k}"), gv, wv, rel);
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{path}: length");
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                same(&format!("{path}[{i}]"), gv, wv, rel);
            }
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}

#[test]
fn lesions_and_metrics_agree_with_the_scipy_reference() {
    let dir = tempdir();
    run_py("metrics_reference.py", &[dir.path()]);
    let expected = read_json(&dir.path().join("expected.json"));
    let cases = expected.as_object().unwrap();
    assert!(cases.len() >= 6);
    for (name, want) in cases {
        let f = |kind: &str| dir.path().join(format!("{name}-{kind}.nii.gz"));
        let got = json_of(
            hepaflow()
                .args(["metrics", "--json", "--truth"])
                .arg(f("truth"))
                .arg("--pred")
                .arg(f("pred")),
        );
        same(&format!("{name}.metrics"), &got, &want["metrics"], 1e-6);
        let got = json_of(
            hepaflow()
                .args(["lesions", "--json", "--mask"])
                .arg(f("truth"))
                .arg("--ct")
                .arg(f("ct")),
        );
        same(&format!("{name}.lesions"), &got, &want["lesions"], 1e-6);
    }
}

#[test]
fn mismatched_grids_and_bad_masks_are_bad_input() {
    let dir = tempdir();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for (d, shape) in [(&a, "32x32x8"), (&b, "32x32x9")] {
        let o = hepaflow()
            .args(["phantom", "--count", "1", "--shape", shape, "--out"])
            .arg(d)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = hepaflow()
        .args(["metrics", "--truth"])
        .arg(a.join("segmentation-0.nii.gz"))
        .arg("--pred")
        .arg(b.join("segmentation-0.nii.gz"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not the same voxel grid"),
        "{}",
        stderr(&o)
    );
    // A CT volume is not a label mask.
    let o = hepaflow()
        .args(["lesions", "--mask"])
        .arg(a.join("volume-0.nii.gz"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("label mask may only hold"),
        "{}",
        stderr(&o)
    );
}
