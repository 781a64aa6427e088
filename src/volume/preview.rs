//! Quick-look PNG images of axial slices (liver window, label contours), in radiological
//! orientation: patient's right on the image's left, anterior up, true aspect ratio.

use std::io;
use std::path::Path;

use super::{CtVolume, LabelVolume, label};

/// An 8-bit RGB image.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
}

impl Rgb {
    pub fn write_png(&self, path: &Path) -> io::Result<()> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut enc = png::Encoder::new(file, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(io::Error::other)?;
        let flat: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        w.write_image_data(&flat).map_err(io::Error::other)?;
        Ok(())
    }
}

/// Window a HU value to 0..=255 (level/width in HU).
pub fn window(hu: f32, level: f32, width: f32) -> u8 {
    (((hu - (level - width / 2.0)) / width) * 255.0).clamp(0.0, 255.0) as u8
}

/// The axial slice with the most voxels of at least `min_label`, and that count.
pub fn largest_slice(mask: &LabelVolume, min_label: u8) -> (usize, usize) {
    let [nx, ny, nz] = mask.geometry().shape();
    (0..nz)
        .map(|k| {
            let n = mask.labels()[k * nx * ny..(k + 1) * nx * ny]
                .iter()
                .filter(|&&l| l >= min_label)
                .count();
            (k, n)
        })
        .max_by_key(|&(k, n)| (n, std::cmp::Reverse(k)))
        .unwrap_or((0, 0))
}

/// The slice most worth a look: the largest tumour cross-section, else the largest liver one.
pub fn overview_slice(mask: &LabelVolume) -> usize {
    match largest_slice(mask, label::TUMOUR) {
        (k, n) if n > 0 => k,
        _ => largest_slice(mask, label::LIVER).0,
    }
}

/// Slice `k` in a liver window (W 400 / L 50) with liver (green) and tumour (red) contours.
///
/// The volume's voxel axes must be the usual CT layout (i toward the patient's left, j toward
/// posterior), which the affine of the phantoms and of most CT NIfTI files gives; columns are
/// flipped when the affine says i points to the patient's right.
pub fn slice_with_contours(ct: &CtVolume, mask: Option<&LabelVolume>, k: usize) -> Rgb {
    let g = ct.geometry();
    let [nx, ny, _] = g.shape();
    let a = g.affine();
    // RAS: a[0][0] < 0 means i runs toward the patient's left, as wanted on screen.
    let flip_i = a[0][0] > 0.0;
    let flip_j = a[1][1] > 0.0;
    let s = g.spacing_mm();
    let scale_y = s[1] / s[0];
    let height = ((ny as f64) * scale_y).round().max(1.0) as usize;
    let slice = ct.slice(k);
    let labels = mask.map(|m| &m.labels()[k * nx * ny..(k + 1) * nx * ny]);
    let at = |x: usize, yy: usize| {
        let i = if flip_i { nx - 1 - x } else { x };
        let j = ((yy as f64 + 0.5) / scale_y).floor().min(ny as f64 - 1.0) as usize;
        let j = if flip_j { ny - 1 - j } else { j };
        i + nx * j
    };
    let mut pixels = Vec::with_capacity(nx * height);
    for yy in 0..height {
        for x in 0..nx {
            let idx = at(x, yy);
            let v = window(slice[idx], 50.0, 400.0);
            let mut px = [v, v, v];
            if let Some(l) = labels {
                let me = l[idx];
                let edge = |want: u8| {
                    let inside = |x2: usize, y2: usize| l[at(x2, y2)] >= want;
                    inside(x, yy)
                        && (x == 0
                            || yy == 0
                            || x + 1 == nx
                            || yy + 1 == height
                            || !inside(x - 1, yy)
                            || !inside(x + 1, yy)
                            || !inside(x, yy - 1)
                            || !inside(x, yy + 1))
                };
                if me >= label::TUMOUR && edge(label::TUMOUR) {
                    px = [255, 40, 40];
                } else if me >= label::LIVER && edge(label::LIVER) {
                    px = [40, 220, 40];
                }
            }
            pixels.push(px);
        }
    }
    Rgb {
        width: nx,
        height,
        pixels,
    }
}
