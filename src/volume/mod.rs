//! Volumes: CT images and label masks on a voxel grid placed in world space, their NIfTI
//! reading and writing, and the synthetic CT phantoms.
//!
//! Voxels are stored in NIfTI (Fortran) order: x fastest, then y, then z (the slice index).

pub mod blur;
pub mod crop;
pub mod edt;
mod geometry;
pub mod nifti;
pub mod phantom;
pub mod preview;
pub mod resample;

pub use geometry::{Geometry, XformFields};
pub use nifti::{NiftiError, NiftiFile, ReadLimits};

use std::path::Path;

/// LiTS label values.
pub mod label {
    pub const BACKGROUND: u8 = 0;
    pub const LIVER: u8 = 1;
    pub const TUMOUR: u8 = 2;
}

/// A CT image in Hounsfield units (after the file's scaling), on its grid.
#[derive(Clone, Debug)]
pub struct CtVolume {
    geometry: Geometry,
    hu: Vec<f32>,
}

impl CtVolume {
    /// `hu` must hold one value per voxel of `geometry`, in Fortran order.
    pub fn new(geometry: Geometry, hu: Vec<f32>) -> Result<Self, String> {
        if hu.len() != geometry.len() {
            return Err(format!(
                "{} values for a grid of {} voxels",
                hu.len(),
                geometry.len()
            ));
        }
        Ok(Self { geometry, hu })
    }
    /// Reads a CT volume from a NIfTI file.
    pub fn read(path: &Path, limits: &ReadLimits) -> Result<Self, NiftiError> {
        NiftiFile::open(path, limits)?.into_ct()
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    pub fn hu(&self) -> &[f32] {
        &self.hu
    }
    /// Axial slice `k` (x fastest).
    pub fn slice(&self, k: usize) -> &[f32] {
        let [nx, ny, _] = self.geometry.shape();
        &self.hu[k * nx * ny..(k + 1) * nx * ny]
    }
}

/// A LiTS label mask (0 background, 1 liver, 2 tumour) on its grid.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelVolume {
    geometry: Geometry,
    labels: Vec<u8>,
}

impl LabelVolume {
    /// `labels` must hold one value in 0..=2 per voxel of `geometry`, in Fortran order.
    pub fn new(geometry: Geometry, labels: Vec<u8>) -> Result<Self, String> {
        if labels.len() != geometry.len() {
            return Err(format!(
                "{} labels for a grid of {} voxels",
                labels.len(),
                geometry.len()
            ));
        }
        if let Some(i) = labels.iter().position(|&l| l > label::TUMOUR) {
            return Err(format!("label {} at index {i} is not 0, 1 or 2", labels[i]));
        }
        Ok(Self { geometry, labels })
    }
    /// Reads a label mask from a NIfTI file (any datatype whose values are 0, 1 or 2).
    pub fn read(path: &Path, limits: &ReadLimits) -> Result<Self, NiftiError> {
        NiftiFile::open(path, limits)?.into_labels()
    }
    /// Writes the mask as uint8 NIfTI with its geometry (atomically).
    pub fn write(&self, path: &Path) -> Result<(), NiftiError> {
        nifti::write_labels(path, self)
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
    /// Mutable labels (the caller keeps them in 0..=2).
    pub fn labels_mut(&mut self) -> &mut [u8] {
        &mut self.labels
    }
    pub fn into_parts(self) -> (Geometry, Vec<u8>) {
        (self.geometry, self.labels)
    }
}
