//! `hepaflow phantom`: LiTS layout, determinism, and realistic content.

use crate::support::*;
use hepaflow::volume::{CtVolume, LabelVolume, ReadLimits};

#[test]
fn phantoms_are_written_in_lits_layout_and_are_deterministic() {
    let a = tempdir();
    let b = tempdir();
    for d in [&a, &b] {
        let o = hepaflow()
            .args([
                "phantom", "--count", "3", "--seed", "9", "--shape", "96x96x20", "--out",
            ])
            .arg(d.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let limits = ReadLimits::default();
    for k in 0..3 {
        let v = format!("volume-{k}.nii.gz");
        let s = format!("segmentation-{k}.nii.gz");
        assert_eq!(
            std::fs::read(a.path().join(&v)).unwrap(),
            std::fs::read(b.path().join(&v)).unwrap(),
            "{v} differs between runs"
        );
        let ct = CtVolume::read(&a.path().join(&v), &limits).unwrap();
        let seg = LabelVolume::read(&a.path().join(&s), &limits).unwrap();
        assert_eq!(ct.geometry().shape(), [96, 96, 20]);
        assert!(ct.geometry().same_grid(seg.geometry()));
        let liver = seg.labels().iter().filter(|&&l| l >= 1).count();
        assert!(liver > 500, "study {k}: {liver} liver voxels");
    }
}

#[test]
fn lesion_counts_sizes_and_contrast_are_realistic() {
    use hepaflow::volume::phantom::{PhantomSpec, generate};
    let spec = PhantomSpec {
        shape: [128, 128, 32],
        spacing_mm: None,
        seed: 21,
    };
    let mut no_lesion = 0;
    for k in 0..16 {
        let p = generate(&spec, k).unwrap();
        assert!(p.lesions.len() <= 6);
        if p.lesions.is_empty() {
            no_lesion += 1;
        }
        for l in &p.lesions {
            assert!(
                (2.4..=72.0).contains(&l.diameter_mm),
                "diameter {}",
                l.diameter_mm
            );
        }
        assert!((8.0..=20.0).contains(&p.noise_hu));
        // Tumour is darker than the liver parenchyma on average (mostly hypodense lesions).
        let (mut lt, mut nt, mut ll, mut nl) = (0.0, 0, 0.0, 0);
        for (&lab, &h) in p.truth.labels().iter().zip(p.ct.hu()) {
            match lab {
                1 => {
                    ll += h as f64;
                    nl += 1;
                }
                2 => {
                    lt += h as f64;
                    nt += 1;
                }
                _ => {}
            }
        }
        if nt > 200 {
            assert!(
                lt / (nt as f64) < ll / (nl as f64),
                "study {k}: tumour not darker"
            );
        }
    }
    assert!(no_lesion >= 2, "{no_lesion} of 16 studies without lesions");
}

#[test]
fn bad_phantom_arguments_are_usage_errors() {
    let d = tempdir();
    let o = hepaflow()
        .args(["phantom", "--shape", "12x12", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("XxYxZ"));
}
