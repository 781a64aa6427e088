//! The segmentation engine on real libtorch: training writes a usable model, dense and patch
//! evaluation agree, segmentation keeps the input's geometry, bad models are refused.

use std::path::Path;

use crate::support::*;
use hepaflow::segment::infer::{self, InferOptions, Mode};
use hepaflow::segment::{Architecture, Classifier, InputSpec};
use hepaflow::volume::phantom::{PhantomSpec, generate};
use hepaflow::volume::{LabelVolume, ReadLimits};
use tch::Device;

fn phantoms(dir: &Path, count: u32, shape: &str, seed: u32) {
    let o = hepaflow()
        .args([
            "phantom",
            "--count",
            &count.to_string(),
            "--shape",
            shape,
            "--seed",
            &seed.to_string(),
            "--out",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn dense_and_patch_modes_agree_on_every_patch() {
    // Random weights exercise the same arithmetic as trained ones.
    tch::manual_seed(3);
    let arch = Architecture::vgg16(0.0625, 63).unwrap();
    let clf = Classifier::fresh(&arch, InputSpec::default(), Device::Cpu);
    let spec = PhantomSpec {
        shape: [40, 36, 3],
        spacing_mm: Some([9.0, 9.0, 5.0]),
        seed: 1,
    };
    let ct = generate(&spec, 0).unwrap().ct;
    for stride in [1, 2, 4] {
        let opts = |mode| InferOptions {
            mode,
            stride,
            ..InferOptions::default()
        };
        let d = infer::probabilities(&clf, &ct, &opts(Mode::Dense), Device::Cpu);
        let p = infer::probabilities(&clf, &ct, &opts(Mode::Patch), Device::Cpu);
        assert_eq!((d.nu, d.nv, d.x0, d.y0), (p.nu, p.nv, p.x0, p.y0));
        let mut max = 0.0f32;
        for c in 0..3 {
            for (a, b) in d.probs[c].iter().zip(&p.probs[c]) {
                max = max.max((a - b).abs());
            }
        }
        assert!(
            max <= 1e-4,
            "stride {stride}: max probability difference {max}"
        );
        // Not trivially equal: the network says something other than background somewhere.
        assert!(
            d.probs[0].iter().any(|&v| v < 0.99),
            "stride {stride}: all background"
        );
    }
}

#[test]
fn torchscript_models_give_the_native_results() {
    tch::manual_seed(5);
    let dir = tempdir();
    let arch = Architecture::vgg16(0.0625, 59).unwrap();
    let native = Classifier::fresh(&arch, InputSpec::default(), Device::Cpu);
    native.export_torchscript(dir.path()).unwrap();
    let script = Classifier::load(dir.path(), Device::Cpu, false).unwrap();
    assert_eq!(script.card().weights_file, "model.pt");
    let spec = PhantomSpec {
        shape: [48, 48, 2],
        spacing_mm: Some([8.0, 8.0, 5.0]),
        seed: 2,
    };
    let ct = generate(&spec, 0).unwrap().ct;
    let opts = InferOptions::default();
    let a = infer::probabilities(&native, &ct, &opts, Device::Cpu);
    let b = infer::probabilities(&script, &ct, &opts, Device::Cpu);
    let max = (0..3)
        .flat_map(|c| {
            a.probs[c]
                .iter()
                .zip(&b.probs[c])
                .map(|(x, y)| (x - y).abs())
        })
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-5, "max difference {max}");
}

#[test]
fn training_writes_a_model_that_segments_with_the_input_geometry() {
    let dir = tempdir();
    let data = dir.path().join("data");
    phantoms(&data, 3, "80x80x10", 4);
    let model = dir.path().join("model");
    let o = hepaflow()
        .args([
            "train", "--epochs", "2", "--steps", "4", "--batch", "2", "--width", "0.0625",
            "--device", "cpu", "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("card.json")).unwrap()).unwrap();
    let sha = hepaflow::segment::sha256_file(&model.join("model.safetensors")).unwrap();
    assert_eq!(card["weights_sha256"], sha);
    assert_eq!(
        card["architecture"]["widths"],
        serde_json::json!([4, 8, 16, 32, 32])
    );
    assert_eq!(card["validation"].as_array().unwrap().len(), 2);
    let data_rows = card["training"]["data"].as_array().unwrap();
    assert_eq!(data_rows.len(), 3);
    // A quarter of the studies (at least one) is held out.
    let held = data_rows
        .iter()
        .filter(|d| d["split"] == "validation")
        .count();
    assert_eq!(held, 1);

    let out = dir.path().join("mask.nii.gz");
    let o = hepaflow()
        .args(["segment", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(data.join("volume-1.nii.gz"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let limits = ReadLimits::default();
    let mask = LabelVolume::read(&out, &limits).unwrap();
    let truth = LabelVolume::read(&data.join("segmentation-1.nii.gz"), &limits).unwrap();
    assert!(mask.geometry().same_grid(truth.geometry()));
    assert_eq!(mask.geometry().xform(), truth.geometry().xform());

    let o = hepaflow()
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["studies"].as_array().unwrap().len(), 3);
    assert!(j["batch"]["liver"]["dice_global"].is_number());

    // Broken models: each is a clear bad-input error (exit code 3) naming the file.
    let broken = |name: &str, f: &dyn Fn(&Path)| {
        let m = dir.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        for file in ["card.json", "model.safetensors"] {
            std::fs::copy(model.join(file), m.join(file)).unwrap();
        }
        f(&m);
        let o = hepaflow()
            .args(["segment", "--device", "cpu", "--model"])
            .arg(&m)
            .arg("--input")
            .arg(data.join("volume-0.nii.gz"))
            .arg("--output")
            .arg(dir.path().join("x.nii.gz"))
            .output()
            .unwrap();
        (o.status.code(), stderr(&o))
    };
    let (code, err) = broken("no-weights", &|m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap()
    });
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("missing"),
        "{err}"
    );
    let (code, err) = broken("truncated", &|m| {
        let p = m.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("sha256"), "{err}");
    let (code, err) = broken("truncated-unhashed", &|m| {
        let p = m.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        let c = std::fs::read_to_string(m.join("card.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&c).unwrap();
        v["weights_sha256"] = "".into();
        std::fs::write(m.join("card.json"), v.to_string()).unwrap();
    });
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot load the weights"), "{err}");
    let (code, err) = broken("other-architecture", &|m| {
        let c = std::fs::read_to_string(m.join("card.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&c).unwrap();
        v["architecture"]["widths"] = serde_json::json!([8, 16, 32, 64, 64]);
        std::fs::write(m.join("card.json"), v.to_string()).unwrap();
    });
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot load the weights"), "{err}");
    let (code, err) = broken("bad-card", &|m| {
        std::fs::write(m.join("card.json"), "{\"format\": 1").unwrap()
    });
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("card.json") && err.contains("invalid model card"),
        "{err}"
    );
}
