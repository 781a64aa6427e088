//! Voxel grids in patient space: shape, spacing and the voxel → world affine.

/// The NIfTI spatial fields that a file carries, kept verbatim so that a mask written for a
/// study reproduces the study's geometry exactly (codes, quaternion, sform rows, pixdim, units).
#[derive(Clone, Debug, PartialEq)]
pub struct XformFields {
    pub qform_code: i16,
    pub sform_code: i16,
    /// quatern_b, quatern_c, quatern_d
    pub quatern: [f64; 3],
    /// qoffset_x, qoffset_y, qoffset_z
    pub qoffset: [f64; 3],
    /// srow_x, srow_y, srow_z
    pub srow: [[f64; 4]; 3],
    /// pixdim[0..8] as stored (pixdim[0] is qfac)
    pub pixdim: [f64; 8],
    pub xyzt_units: u8,
}

/// A 3D voxel grid placed in world space (millimetres, NIfTI RAS+).
///
/// Invariants (checked by every constructor): every extent is ≥ 1, every spacing is finite and
/// positive, the affine is finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    shape: [usize; 3],
    spacing_mm: [f64; 3],
    affine: [[f64; 4]; 4],
    xform: XformFields,
}

/// Unit code of NIfTI `xyzt_units & 7`, as a factor to millimetres.
pub(crate) fn space_unit_to_mm(xyzt_units: u8) -> Option<f64> {
    match xyzt_units & 0x07 {
        0 | 2 => Some(1.0), // unknown (assume mm, as every reader does) or mm
        1 => Some(1000.0),  // metre
        3 => Some(0.001),   // micron
        _ => None,
    }
}

impl Geometry {
    /// Builds a geometry from the NIfTI fields, choosing the affine as nibabel does:
    /// sform when `sform_code > 0`, else qform when `qform_code > 0`, else the base affine
    /// from pixdim (x flipped, origin at the centre). Lengths are converted to millimetres.
    pub(crate) fn from_fields(shape: [usize; 3], xform: XformFields) -> Result<Self, String> {
        let unit = space_unit_to_mm(xform.xyzt_units)
            .ok_or_else(|| format!("xyzt_units = {}: unknown spatial unit", xform.xyzt_units))?;
        let zooms = [xform.pixdim[1], xform.pixdim[2], xform.pixdim[3]];
        let mut affine = [[0.0; 4]; 4];
        affine[3][3] = 1.0;
        if xform.sform_code > 0 {
            affine[..3].copy_from_slice(&xform.srow);
        } else if xform.qform_code > 0 {
            let [b, c, d] = xform.quatern;
            let w2 = 1.0 - (b * b + c * c + d * d);
            let a = if w2 < 0.0 {
                if w2 < -1e-6 {
                    return Err(format!(
                        "quatern_b/c/d = {b}/{c}/{d}: not a unit quaternion (b²+c²+d² > 1)"
                    ));
                }
                0.0
            } else {
                w2.sqrt()
            };
            let rot = [
                [
                    a * a + b * b - c * c - d * d,
                    2.0 * (b * c - a * d),
                    2.0 * (b * d + a * c),
                ],
                [
                    2.0 * (b * c + a * d),
                    a * a + c * c - b * b - d * d,
                    2.0 * (c * d - a * b),
                ],
                [
                    2.0 * (b * d - a * c),
                    2.0 * (c * d + a * b),
                    a * a + d * d - c * c - b * b,
                ],
            ];
            let qfac = if xform.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
            let z = [zooms[0], zooms[1], zooms[2] * qfac];
            for r in 0..3 {
                for col in 0..3 {
                    affine[r][col] = rot[r][col] * z[col];
                }
                affine[r][3] = xform.qoffset[r];
            }
        } else {
            let z = [-zooms[0], zooms[1], zooms[2]];
            for r in 0..3 {
                affine[r][r] = z[r];
                affine[r][3] = -((shape[r] as f64 - 1.0) / 2.0) * z[r];
            }
        }
        for row in affine.iter_mut().take(3) {
            for v in row.iter_mut() {
                *v *= unit;
            }
        }
        if affine.iter().flatten().any(|v| !v.is_finite()) {
            return Err("affine: not finite".into());
        }
        let spacing_mm = [zooms[0] * unit, zooms[1] * unit, zooms[2] * unit];
        Self::check(shape, spacing_mm)?;
        Ok(Self {
            shape,
            spacing_mm,
            affine,
            xform,
        })
    }

    /// A scanner-space geometry whose axes are the affine's columns, for generated data.
    /// `rotation` must be orthonormal (a proper rotation, optionally with the third axis
    /// flipped); `origin_mm` is the world position of voxel (0, 0, 0).
    pub fn new(
        shape: [usize; 3],
        spacing_mm: [f64; 3],
        rotation: [[f64; 3]; 3],
        origin_mm: [f64; 3],
    ) -> Result<Self, String> {
        Self::check(shape, spacing_mm)?;
        let det = rotation[0][0]
            * (rotation[1][1] * rotation[2][2] - rotation[1][2] * rotation[2][1])
            - rotation[0][1] * (rotation[1][0] * rotation[2][2] - rotation[1][2] * rotation[2][0])
            + rotation[0][2] * (rotation[1][0] * rotation[2][1] - rotation[1][1] * rotation[2][0]);
        let qfac = if det < 0.0 { -1.0 } else { 1.0 };
        let mut r = rotation;
        for row in r.iter_mut() {
            row[2] *= qfac;
        }
        let quat = rotation_to_quaternion(&r);
        let mut affine = [[0.0; 4]; 4];
        affine[3][3] = 1.0;
        for i in 0..3 {
            for j in 0..3 {
                affine[i][j] = rotation[i][j] * spacing_mm[j];
            }
            affine[i][3] = origin_mm[i];
        }
        let srow = [affine[0], affine[1], affine[2]];
        let xform = XformFields {
            qform_code: 1,
            sform_code: 1,
            quatern: quat,
            qoffset: origin_mm,
            srow,
            pixdim: [
                qfac,
                spacing_mm[0],
                spacing_mm[1],
                spacing_mm[2],
                0.0,
                0.0,
                0.0,
                0.0,
            ],
            xyzt_units: 2, // millimetres
        };
        Ok(Self {
            shape,
            spacing_mm,
            affine,
            xform,
        })
    }

    fn check(shape: [usize; 3], spacing_mm: [f64; 3]) -> Result<(), String> {
        for (i, &n) in shape.iter().enumerate() {
            if n == 0 {
                return Err(format!(
                    "dim[{}] = 0: every dimension must be at least 1",
                    i + 1
                ));
            }
        }
        for (i, &s) in spacing_mm.iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(format!(
                    "pixdim[{}] = {s}: voxel spacing must be finite and positive",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }
    pub fn spacing_mm(&self) -> [f64; 3] {
        self.spacing_mm
    }
    pub fn affine(&self) -> &[[f64; 4]; 4] {
        &self.affine
    }
    pub fn xform(&self) -> &XformFields {
        &self.xform
    }
    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.shape[0] * self.shape[1] * self.shape[2]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// |pixdim1 × pixdim2 × pixdim3| in mm³.
    pub fn voxel_volume_mm3(&self) -> f64 {
        (self.spacing_mm[0] * self.spacing_mm[1] * self.spacing_mm[2]).abs()
    }
    /// Linear (Fortran-order, x fastest) index of voxel (i, j, k).
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        i + self.shape[0] * (j + self.shape[1] * k)
    }
    /// World position in mm of the centre of voxel (i, j, k).
    pub fn voxel_to_world(&self, ijk: [f64; 3]) -> [f64; 3] {
        let a = &self.affine;
        let mut out = [0.0; 3];
        for (r, o) in out.iter_mut().enumerate() {
            *o = a[r][0] * ijk[0] + a[r][1] * ijk[1] + a[r][2] * ijk[2] + a[r][3];
        }
        out
    }
    /// The grid with `shape_xy` pixels in x and y, each `r` (x, y) times the size of the
    /// present ones; voxel (0, 0, k) keeps its place (for in-plane resampling).
    pub fn rescaled_in_plane(&self, shape_xy: [usize; 2], r: [f64; 2]) -> Geometry {
        let mut g = self.clone();
        g.shape = [shape_xy[0].max(1), shape_xy[1].max(1), self.shape[2]];
        for (col, r) in r.into_iter().enumerate() {
            g.spacing_mm[col] *= r;
            g.xform.pixdim[col + 1] *= r;
            for row in 0..3 {
                g.affine[row][col] *= r;
                g.xform.srow[row][col] *= r;
            }
        }
        g
    }
    /// Same grid and placement with the given shape (for masks of the same study).
    pub fn same_grid(&self, other: &Geometry) -> bool {
        self.shape == other.shape
            && self
                .affine
                .iter()
                .flatten()
                .zip(other.affine.iter().flatten())
                .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + a.abs()))
    }
}

/// Quaternion (b, c, d) with a ≥ 0 of a proper rotation matrix (NIfTI's convention).
fn rotation_to_quaternion(r: &[[f64; 3]; 3]) -> [f64; 3] {
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (a, b, c, d);
    if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        a = 0.25 * s;
        b = (r[2][1] - r[1][2]) / s;
        c = (r[0][2] - r[2][0]) / s;
        d = (r[1][0] - r[0][1]) / s;
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        a = (r[2][1] - r[1][2]) / s;
        b = 0.25 * s;
        c = (r[0][1] + r[1][0]) / s;
        d = (r[0][2] + r[2][0]) / s;
    } else if r[1][1] > r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        a = (r[0][2] - r[2][0]) / s;
        b = (r[0][1] + r[1][0]) / s;
        c = 0.25 * s;
        d = (r[1][2] + r[2][1]) / s;
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        a = (r[1][0] - r[0][1]) / s;
        b = (r[0][2] + r[2][0]) / s;
        c = (r[1][2] + r[2][1]) / s;
        d = 0.25 * s;
    }
    if a < 0.0 { [-b, -c, -d] } else { [b, c, d] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quaternion_round_trip_reproduces_the_affine() {
        let rot = [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]];
        let g = Geometry::new([10, 12, 5], [0.8, 0.8, 2.5], rot, [100.0, 80.0, -30.0]).unwrap();
        let mut fields = g.xform().clone();
        fields.sform_code = 0; // force the qform path
        let q = Geometry::from_fields([10, 12, 5], fields).unwrap();
        for r in 0..4 {
            for c in 0..4 {
                assert!(
                    (q.affine()[r][c] - g.affine()[r][c]).abs() < 1e-9,
                    "{r},{c}"
                );
            }
        }
    }

    #[test]
    fn base_affine_matches_nibabel_convention() {
        let mut f = Geometry::new([4, 6, 3], [2.0, 3.0, 4.0], ident(), [0.0; 3])
            .unwrap()
            .xform()
            .clone();
        f.qform_code = 0;
        f.sform_code = 0;
        let g = Geometry::from_fields([4, 6, 3], f).unwrap();
        // nibabel: diag(-zx, zy, zz), translation -(shape-1)/2 * zooms (x flipped)
        assert_eq!(g.affine()[0], [-2.0, 0.0, 0.0, 3.0]);
        assert_eq!(g.affine()[1], [0.0, 3.0, 0.0, -7.5]);
        assert_eq!(g.affine()[2], [0.0, 0.0, 4.0, -4.0]);
    }

    #[test]
    fn metres_become_millimetres() {
        let mut f = Geometry::new([2, 2, 2], [1.0; 3], ident(), [0.0; 3])
            .unwrap()
            .xform()
            .clone();
        f.xyzt_units = 1;
        f.pixdim[1..4].copy_from_slice(&[0.001, 0.001, 0.002]);
        f.srow = [
            [0.001, 0.0, 0.0, 0.01],
            [0.0, 0.001, 0.0, 0.0],
            [0.0, 0.0, 0.002, 0.0],
        ];
        let g = Geometry::from_fields([2, 2, 2], f).unwrap();
        assert!((g.spacing_mm()[2] - 2.0).abs() < 1e-12);
        assert!((g.affine()[0][3] - 10.0).abs() < 1e-12);
    }

    fn ident() -> [[f64; 3]; 3] {
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    }
}
