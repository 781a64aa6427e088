//! The report's pictures, drawn on RGB buffers with plotters: axial slices through lesions
//! with contours, a zoomed inset and a scale bar; label projections in the three planes.
//!
//! Orientation is radiological everywhere: the patient's right on the image's left, anterior
//! up (axial), superior up (coronal, sagittal; anterior on the left in sagittal), derived from
//! the affine's axis signs (RAS+ world). Pixels are square in millimetres: anisotropic
//! spacing keeps its true aspect ratio. Text is kept out of the images (it lives in the HTML).

use base64::Engine;
use plotters::backend::BitMapBackend;
use plotters::prelude::*;

use crate::lesions::{Components, Lesion};
use crate::volume::preview::window;
use crate::volume::{CtVolume, Geometry, LabelVolume, label};

/// An RGB picture.
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Picture {
    fn new(width: usize, height: usize) -> Self {
        Picture {
            width,
            height,
            rgb: vec![0; width * height * 3],
        }
    }
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let o = (y * self.width + x) * 3;
        self.rgb[o..o + 3].copy_from_slice(&c);
    }
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.rgb[o], self.rgb[o + 1], self.rgb[o + 2]]
    }
    /// PNG bytes.
    pub fn png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            if let Ok(mut w) = enc.write_header() {
                let _ = w.write_image_data(&self.rgb);
            }
        }
        out
    }
    /// A `data:` URI of the PNG, for a self-contained HTML file.
    pub fn data_uri(&self) -> String {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(self.png())
        )
    }
    /// Draws with plotters on this picture.
    fn draw(&mut self, f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>)) {
        let (w, h) = (self.width as u32, self.height as u32);
        let backend = BitMapBackend::with_buffer(&mut self.rgb, (w, h));
        let area = backend.into_drawing_area();
        f(&area);
        let _ = area.present();
    }
}

/// Colours of the contours.
pub const LIVER: [u8; 3] = [40, 220, 40];
pub const TUMOUR: [u8; 3] = [255, 50, 50];
pub const THIS_LESION: [u8; 3] = [255, 230, 0];
pub const TRUTH: [u8; 3] = [0, 200, 255];

/// How an axial slice maps onto the screen (radiological, square millimetre pixels).
#[derive(Clone, Copy, Debug)]
pub struct AxialView {
    nx: usize,
    ny: usize,
    sx: f64,
    sy: f64,
    flip_i: bool,
    flip_j: bool,
}

impl AxialView {
    pub fn new(g: &Geometry) -> Self {
        let [nx, ny, _] = g.shape();
        let s = g.spacing_mm();
        let a = g.affine();
        AxialView {
            nx,
            ny,
            sx: s[0],
            sy: s[1],
            // RAS+ world: x grows toward the patient's right. Screen columns must run toward
            // the patient's left, so a voxel axis along +x is flipped; likewise rows run
            // from anterior (+y) to posterior.
            flip_i: a[0][0] > 0.0,
            flip_j: a[1][1] > 0.0,
        }
    }
    /// Extent on screen in mm (width, height).
    pub fn extent_mm(&self) -> (f64, f64) {
        (self.nx as f64 * self.sx, self.ny as f64 * self.sy)
    }
    /// The voxel (i, j) under screen millimetre position (X right, Y down).
    pub fn voxel(&self, x_mm: f64, y_mm: f64) -> Option<(usize, usize)> {
        if x_mm < 0.0 || y_mm < 0.0 {
            return None;
        }
        let c = (x_mm / self.sx) as usize;
        let r = (y_mm / self.sy) as usize;
        if c >= self.nx || r >= self.ny {
            return None;
        }
        let i = if self.flip_i { self.nx - 1 - c } else { c };
        let j = if self.flip_j { self.ny - 1 - r } else { r };
        Some((i, j))
    }
    /// Screen millimetre position of voxel (i, j)'s centre.
    pub fn screen_mm(&self, i: f64, j: f64) -> (f64, f64) {
        let c = if self.flip_i {
            self.nx as f64 - 1.0 - i
        } else {
            i
        };
        let r = if self.flip_j {
            self.ny as f64 - 1.0 - j
        } else {
            j
        };
        ((c + 0.5) * self.sx, (r + 0.5) * self.sy)
    }
}

/// What is drawn on a slice.
pub struct SliceLayers<'a> {
    pub ct: &'a [f32],
    pub pred: &'a [u8],
    pub truth: Option<&'a [u8]>,
    /// Component label per voxel of this slice (0 = none), and the one to highlight.
    pub lesion_ids: Option<(&'a [u32], u32)>,
}

/// Renders the screen rectangle `[x0, x1) × [y0, y1)` (mm) of a slice into `w × h` pixels:
/// liver window, liver (green), tumour (red), highlighted lesion (yellow), truth tumour (cyan).
pub fn render_slice(
    view: &AxialView,
    layers: &SliceLayers<'_>,
    rect: (f64, f64, f64, f64),
    w: usize,
    h: usize,
) -> Picture {
    let (x0, y0, x1, y1) = rect;
    let px = (x1 - x0) / w as f64;
    let py = (y1 - y0) / h as f64;
    let nx = view.nx;
    let idx: Vec<Option<usize>> = (0..w * h)
        .map(|p| {
            let (x, y) = (p % w, p / w);
            view.voxel(x0 + (x as f64 + 0.5) * px, y0 + (y as f64 + 0.5) * py)
                .map(|(i, j)| i + nx * j)
        })
        .collect();
    let mut pic = Picture::new(w, h);
    for (p, v) in idx.iter().enumerate() {
        let g = v.map_or(0, |v| window(layers.ct[v], 60.0, 400.0));
        pic.set(p % w, p / w, [g, g, g]);
    }
    let member = |p: usize, f: &dyn Fn(usize) -> bool| idx[p].is_some_and(f);
    let edge = |p: usize, f: &dyn Fn(usize) -> bool| {
        if !member(p, f) {
            return false;
        }
        let (x, y) = (p % w, p / w);
        (x == 0 || !member(p - 1, f))
            || (x + 1 == w || !member(p + 1, f))
            || (y == 0 || !member(p - w, f))
            || (y + 1 == h || !member(p + w, f))
    };
    let liver = |v: usize| layers.pred[v] >= label::LIVER;
    let tumour = |v: usize| layers.pred[v] == label::TUMOUR;
    for p in 0..w * h {
        let (x, y) = (p % w, p / w);
        if let Some((ids, this)) = layers.lesion_ids {
            let mine = |v: usize| ids[v] == this;
            if edge(p, &mine) {
                pic.set(x, y, THIS_LESION);
                continue;
            }
        }
        if edge(p, &tumour) {
            pic.set(x, y, TUMOUR);
        } else if let Some(t) = layers.truth
            && edge(p, &|v: usize| t[v] == label::TUMOUR)
        {
            pic.set(x, y, TRUTH);
        } else if edge(p, &liver) {
            pic.set(x, y, LIVER);
        }
    }
    pic
}

/// A scale bar length (mm) about a fifth of `extent_mm`.
pub fn bar_length(extent_mm: f64) -> f64 {
    let want = extent_mm / 5.0;
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        .into_iter()
        .rev()
        .find(|&l| l <= want)
        .unwrap_or(1.0)
}

/// One lesion's picture and what the caption needs.
pub struct LesionFigure {
    pub number: usize,
    pub slice: usize,
    pub image: String,
    pub width: usize,
    pub height: usize,
    pub bar_mm: f64,
    pub inset_bar_mm: f64,
    pub inset_zoom: f64,
    /// Where the lesion's centre is drawn (pixels), for checks.
    pub centre_px: (usize, usize),
}

/// Per component, the number of voxels in each slice.
pub fn areas_by_slice(comps: &Components, nz: usize, ny: usize) -> Vec<Vec<u32>> {
    let mut a = vec![vec![0u32; nz]; comps.count() + 1];
    for (run, c) in comps.runs() {
        let k = run.row as usize / ny;
        a[c as usize][k] += run.end - run.start;
    }
    a
}

fn component_slice(comps: &Components, k: usize, nx: usize, ny: usize) -> Vec<u32> {
    let mut ids = vec![0u32; nx * ny];
    let lo = (k * ny) as u32;
    let hi = ((k + 1) * ny) as u32;
    for (run, c) in comps.runs().filter(|(r, _)| r.row >= lo && r.row < hi) {
        let j = (run.row - lo) as usize;
        for i in run.start..run.end {
            ids[i as usize + nx * j] = c;
        }
    }
    ids
}

/// The axial slice through a lesion's largest cross-section, with the contours, a box, a
/// zoomed inset of the box and scale bars. `width` is the picture's width in pixels.
pub fn lesion_figure(
    ct: &CtVolume,
    mask: &LabelVolume,
    truth: Option<&LabelVolume>,
    comps: &Components,
    areas: &[Vec<u32>],
    lesion: &Lesion,
    width: usize,
) -> LesionFigure {
    let g = mask.geometry();
    let [nx, ny, _] = g.shape();
    let c = lesion.component;
    let k = areas[c as usize]
        .iter()
        .enumerate()
        .max_by_key(|&(k, &n)| (n, std::cmp::Reverse(k)))
        .map_or(0, |(k, _)| k);
    let ids = component_slice(comps, k, nx, ny);
    let plane = nx * ny;
    let layers = SliceLayers {
        ct: &ct.hu()[k * plane..(k + 1) * plane],
        pred: &mask.labels()[k * plane..(k + 1) * plane],
        truth: truth.map(|t| &t.labels()[k * plane..(k + 1) * plane]),
        lesion_ids: Some((&ids, c)),
    };
    let view = AxialView::new(g);
    let (ew, eh) = view.extent_mm();
    let scale = width as f64 / ew;
    let height = (eh * scale).round().max(1.0) as usize;
    let mut pic = render_slice(&view, &layers, (0.0, 0.0, ew, eh), width, height);
    // The lesion's box on screen (mm).
    let (mut bx0, mut by0, mut bx1, mut by1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for (p, &id) in ids.iter().enumerate() {
        if id == c {
            let (x, y) = view.screen_mm((p % nx) as f64, (p / nx) as f64);
            bx0 = bx0.min(x - view.sx / 2.0);
            bx1 = bx1.max(x + view.sx / 2.0);
            by0 = by0.min(y - view.sy / 2.0);
            by1 = by1.max(y + view.sy / 2.0);
        }
    }
    let (cx, cy) = ((bx0 + bx1) / 2.0, (by0 + by1) / 2.0);
    let side = ((bx1 - bx0).max(by1 - by0) * 1.8).max(24.0);
    let crop = (
        cx - side / 2.0,
        cy - side / 2.0,
        cx + side / 2.0,
        cy + side / 2.0,
    );
    let inset_px = (width as f64 * 0.34).round() as usize;
    let inset = render_slice(&view, &layers, crop, inset_px, inset_px);
    let inset_zoom = (inset_px as f64 / side) / scale;
    // The inset goes to the top corner away from the lesion.
    let right = cx < ew / 2.0;
    let ix = if right { width - inset_px - 4 } else { 4 };
    let iy = 4;
    for y in 0..inset_px {
        for x in 0..inset_px {
            pic.set(ix + x, iy + y, inset.get(x, y));
        }
    }
    let bar_mm = bar_length(ew);
    let inset_bar_mm = bar_length(side);
    let to_px = |mm: f64| (mm * scale).round() as i32;
    pic.draw(|area| {
        // The box is a darker yellow than the lesion's own contour.
        let yellow = RGBColor(190, 170, 0);
        let _ = area.draw(&Rectangle::new(
            [
                (to_px(crop.0), to_px(crop.1)),
                (to_px(crop.2), to_px(crop.3)),
            ],
            yellow.stroke_width(1),
        ));
        let _ = area.draw(&Rectangle::new(
            [
                (ix as i32 - 1, iy as i32 - 1),
                ((ix + inset_px) as i32, (iy + inset_px) as i32),
            ],
            WHITE.stroke_width(2),
        ));
        // Scale bars: the slice's at the bottom left, the inset's inside the inset.
        let y = height as i32 - 12;
        let _ = area.draw(&Rectangle::new(
            [(10, y), (10 + to_px(bar_mm), y + 4)],
            WHITE.filled(),
        ));
        let ib = (inset_bar_mm * inset_px as f64 / side).round() as i32;
        let iy2 = (iy + inset_px) as i32 - 10;
        let _ = area.draw(&Rectangle::new(
            [(ix as i32 + 6, iy2), (ix as i32 + 6 + ib, iy2 + 3)],
            WHITE.filled(),
        ));
    });
    LesionFigure {
        number: lesion.id,
        slice: k,
        image: pic.data_uri(),
        width,
        height,
        bar_mm,
        inset_bar_mm,
        inset_zoom,
        centre_px: (to_px(cx).max(0) as usize, to_px(cy).max(0) as usize),
    }
}

/// Label projections of the whole volume in the three planes.
pub struct Projections {
    pub axial: Picture,
    pub coronal: Picture,
    pub sagittal: Picture,
}

/// Projections along each axis: tumour red where any tumour lies on the ray, liver green
/// (brighter where thicker), elsewhere the mean CT value (soft-tissue window) for context.
pub fn projections(ct: &CtVolume, mask: &LabelVolume, px_per_mm: f64) -> Projections {
    let g = mask.geometry();
    let [nx, ny, nz] = g.shape();
    let s = g.spacing_mm();
    let a = g.affine();
    let (fi, fj, fk) = (a[0][0] > 0.0, a[1][1] > 0.0, a[2][2] > 0.0);
    let labels = mask.labels();
    let hu = ct.hu();
    // Accumulate per ray: (sum HU, liver count, tumour count).
    let mut ax = vec![(0f32, 0u32, 0u32); nx * ny];
    let mut co = vec![(0f32, 0u32, 0u32); nx * nz];
    let mut sa = vec![(0f32, 0u32, 0u32); ny * nz];
    for k in 0..nz {
        for j in 0..ny {
            let row = (k * ny + j) * nx;
            for i in 0..nx {
                let v = hu[row + i].clamp(-1000.0, 1000.0);
                let l = labels[row + i];
                let (li, tu) = (u32::from(l >= label::LIVER), u32::from(l == label::TUMOUR));
                for cell in [
                    &mut ax[i + nx * j],
                    &mut co[i + nx * k],
                    &mut sa[j + ny * k],
                ] {
                    cell.0 += v;
                    cell.1 += li;
                    cell.2 += tu;
                }
            }
        }
    }
    let paint = |cells: &[(f32, u32, u32)],
                 cols: usize,
                 rows: usize,
                 col_mm: f64,
                 row_mm: f64,
                 depth: usize,
                 col_flip: bool,
                 row_flip: bool| {
        let w = ((cols as f64 * col_mm) * px_per_mm).round().max(1.0) as usize;
        let h = ((rows as f64 * row_mm) * px_per_mm).round().max(1.0) as usize;
        let mut pic = Picture::new(w, h);
        let max_liver = cells.iter().map(|c| c.1).max().unwrap_or(1).max(1) as f32;
        for y in 0..h {
            let r = ((y as f64 + 0.5) / (h as f64) * rows as f64) as usize;
            let r = r.min(rows - 1);
            let r = if row_flip { rows - 1 - r } else { r };
            for x in 0..w {
                let c = ((x as f64 + 0.5) / (w as f64) * cols as f64) as usize;
                let c = c.min(cols - 1);
                let c = if col_flip { cols - 1 - c } else { c };
                let (sum, li, tu) = cells[c + cols * r];
                let g = window(sum / depth as f32, 0.0, 500.0);
                let px = if tu > 0 {
                    TUMOUR
                } else if li > 0 {
                    let t = 0.35 + 0.65 * (li as f32 / max_liver);
                    let mix =
                        |base: u8, tint: u8| ((1.0 - t) * base as f32 + t * tint as f32) as u8;
                    [mix(g, LIVER[0]), mix(g, LIVER[1]), mix(g, LIVER[2])]
                } else {
                    [g, g, g]
                };
                pic.set(x, y, px);
            }
        }
        pic
    };
    Projections {
        // Axial: patient's right on the left, anterior up.
        axial: paint(&ax, nx, ny, s[0], s[1], nz, fi, fj),
        // Coronal (from the front): patient's right on the left, superior up.
        coronal: paint(&co, nx, nz, s[0], s[2], ny, fi, fk),
        // Sagittal (from the patient's left): anterior on the left, superior up.
        sagittal: paint(&sa, ny, nz, s[1], s[2], nx, fj, fk),
    }
}
