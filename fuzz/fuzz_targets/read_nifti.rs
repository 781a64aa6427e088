//! Fuzzes the whole NIfTI reading path: gzip detection, header parsing and validation, bounded
//! decoding, and conversion to a CT volume and to a label mask. Any panic is a bug.
#![no_main]

use hepaflow::volume::{NiftiFile, ReadLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small cap keeps each run fast; the cap logic itself is what is being exercised.
    let limits = ReadLimits { max_decoded_bytes: 1 << 22 };
    if let Ok(f) = NiftiFile::from_reader(data, "fuzz.nii", &limits) {
        let _ = f.stats();
        if let Ok(f) = NiftiFile::from_reader(data, "fuzz.nii", &limits) {
            let _ = f.into_labels();
        }
        if let Ok(f) = NiftiFile::from_reader(data, "fuzz.nii", &limits) {
            let _ = f.into_ct();
        }
    }
});
