//! A shaded 3D view of the liver (translucent) with its lesions (opaque): the boundary faces
//! of the labels on a coarsened grid form the surface mesh; faces are rotated to the
//! viewpoint, sorted far to near and filled with plotters (painter's algorithm), Lambert-shaded.

use plotters::prelude::*;

use super::images::Picture;
use crate::volume::{LabelVolume, label};

/// A viewpoint: rotation about the body's vertical axis (0 = from the front) and elevation.
#[derive(Clone, Copy, Debug)]
pub struct Viewpoint {
    pub azimuth_deg: f64,
    pub elevation_deg: f64,
}

pub const VIEWS: [Viewpoint; 2] = [
    Viewpoint {
        azimuth_deg: 0.0,
        elevation_deg: 0.0,
    },
    Viewpoint {
        azimuth_deg: -50.0,
        elevation_deg: 25.0,
    },
];

/// A face ready to fill: depth, screen corners, colour.
type Drawn = (f64, [(i32, i32); 4], RGBAColor);

struct Face {
    /// Corners in patient millimetres: x toward the patient's left, y anterior, z superior.
    corners: [[f64; 3]; 4],
    normal: [f64; 3],
    tumour: bool,
}

/// The boundary faces of liver (label ≥ 1) and tumour on a grid coarsened to at most
/// `max_cells` cells along the longest axis.
fn mesh(mask: &LabelVolume, max_cells: usize) -> Vec<Face> {
    let g = mask.geometry();
    let [nx, ny, nz] = g.shape();
    let s = g.spacing_mm();
    let a = g.affine();
    let longest = (nx as f64 * s[0])
        .max(ny as f64 * s[1])
        .max(nz as f64 * s[2]);
    let cell_mm = (longest / max_cells as f64).max(s[0].min(s[1]).min(s[2]));
    let step = [0, 1, 2].map(|d| ((cell_mm / s[d]).round() as usize).max(1));
    let dims = [
        nx.div_ceil(step[0]),
        ny.div_ceil(step[1]),
        nz.div_ceil(step[2]),
    ];
    // Coarse labels: tumour if any tumour voxel in the cell, liver if at least half liver.
    let mut liver = vec![0u32; dims[0] * dims[1] * dims[2]];
    let mut tumour = vec![false; liver.len()];
    let labels = mask.labels();
    for k in 0..nz {
        for j in 0..ny {
            let row = (k * ny + j) * nx;
            let cj = j / step[1];
            let ck = k / step[2];
            for i in 0..nx {
                let l = labels[row + i];
                if l >= label::LIVER {
                    let c = i / step[0] + dims[0] * (cj + dims[1] * ck);
                    liver[c] += 1;
                    if l == label::TUMOUR {
                        tumour[c] = true;
                    }
                }
            }
        }
    }
    let full = (step[0] * step[1] * step[2]) as u32;
    let inside_liver: Vec<bool> = liver.iter().map(|&n| 2 * n >= full).collect();
    // Patient coordinates of a coarse-grid corner (RAS+ flipped so x grows to the left).
    let dir = [
        if a[0][0] > 0.0 { -1.0 } else { 1.0 },
        if a[1][1] > 0.0 { 1.0 } else { -1.0 },
        if a[2][2] > 0.0 { 1.0 } else { -1.0 },
    ];
    let corner = |c: [usize; 3]| [0, 1, 2].map(|d| dir[d] * c[d] as f64 * step[d] as f64 * s[d]);
    let idx = |c: [usize; 3]| c[0] + dims[0] * (c[1] + dims[1] * c[2]);
    let mut faces = Vec::new();
    for (set, is_tumour) in [(&inside_liver, false), (&tumour, true)] {
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let c = [x, y, z];
                    if !set[idx(c)] || (!is_tumour && tumour[idx(c)]) {
                        continue;
                    }
                    for d in 0..3 {
                        for side in [0usize, 1] {
                            let mut n = c;
                            let outside = if side == 0 {
                                c[d] == 0 || {
                                    n[d] -= 1;
                                    !set[idx(n)]
                                }
                            } else {
                                c[d] + 1 == dims[d] || {
                                    n[d] += 1;
                                    !set[idx(n)]
                                }
                            };
                            if !outside {
                                continue;
                            }
                            let (u, v) = ((d + 1) % 3, (d + 2) % 3);
                            let mut base = c;
                            base[d] += side;
                            let mut q = [base; 4];
                            q[1][u] += 1;
                            q[2][u] += 1;
                            q[2][v] += 1;
                            q[3][v] += 1;
                            let mut normal = [0.0; 3];
                            normal[d] = dir[d] * if side == 0 { -1.0 } else { 1.0 };
                            faces.push(Face {
                                corners: q.map(corner),
                                normal,
                                tumour: is_tumour,
                            });
                        }
                    }
                }
            }
        }
    }
    faces
}

/// Renders the mesh from each viewpoint into `size × size` pictures.
pub fn render(mask: &LabelVolume, size: usize, views: &[Viewpoint]) -> Vec<Picture> {
    let faces = mesh(mask, 72);
    if faces.is_empty() {
        return views
            .iter()
            .map(|_| {
                let mut p = Picture {
                    width: size,
                    height: size,
                    rgb: vec![0; size * size * 3],
                };
                p.rgb.fill(20);
                p
            })
            .collect();
    }
    // Centre of the liver's corners.
    let mut lo = [f64::MAX; 3];
    let mut hi = [f64::MIN; 3];
    for f in &faces {
        for c in &f.corners {
            for d in 0..3 {
                lo[d] = lo[d].min(c[d]);
                hi[d] = hi[d].max(c[d]);
            }
        }
    }
    let centre = [0, 1, 2].map(|d| (lo[d] + hi[d]) / 2.0);
    let radius = (0..3)
        .map(|d| (hi[d] - lo[d]) / 2.0)
        .map(|r| r * r)
        .sum::<f64>()
        .sqrt()
        .max(1.0);
    views
        .iter()
        .map(|v| {
            let (az, el) = (v.azimuth_deg.to_radians(), v.elevation_deg.to_radians());
            // Camera axes: screen x (right), screen y (up), depth (toward the viewer).
            // From the front, the patient's right is on the screen's left: screen x = +x.
            let rot = |p: [f64; 3]| {
                let (x, y, z) = (p[0] - centre[0], p[1] - centre[1], p[2] - centre[2]);
                let x1 = x * az.cos() + y * az.sin();
                let y1 = -x * az.sin() + y * az.cos();
                // Seen from above when the elevation is positive.
                let depth = y1 * el.cos() + z * el.sin();
                let up = -y1 * el.sin() + z * el.cos();
                (x1, up, depth)
            };
            let scale = size as f64 * 0.46 / radius;
            let mut drawn: Vec<Drawn> = faces
                .iter()
                .filter_map(|f| {
                    let (_, _, nz) = rot([
                        f.normal[0] + centre[0],
                        f.normal[1] + centre[1],
                        f.normal[2] + centre[2],
                    ]);
                    if nz <= 0.0 && f.tumour {
                        return None; // back face of an opaque surface
                    }
                    let pts = f.corners.map(rot);
                    let depth = pts.iter().map(|p| p.2).sum::<f64>() / 4.0;
                    let shade = 0.35 + 0.65 * nz.abs().min(1.0);
                    let (base, alpha) = if f.tumour {
                        ([235.0, 60.0, 50.0], 1.0)
                    } else {
                        ([90.0, 200.0, 110.0], 0.18)
                    };
                    let c = RGBAColor(
                        (base[0] * shade) as u8,
                        (base[1] * shade) as u8,
                        (base[2] * shade) as u8,
                        alpha,
                    );
                    let screen = pts.map(|p| {
                        (
                            (size as f64 / 2.0 + p.0 * scale).round() as i32,
                            (size as f64 / 2.0 - p.1 * scale).round() as i32,
                        )
                    });
                    Some((depth, screen, c))
                })
                .collect();
            // Far to near.
            drawn.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut pic = Picture {
                width: size,
                height: size,
                rgb: vec![18; size * size * 3],
            };
            {
                let backend = plotters::backend::BitMapBackend::with_buffer(
                    &mut pic.rgb,
                    (size as u32, size as u32),
                );
                let area = backend.into_drawing_area();
                for (_, q, c) in &drawn {
                    let _ = area.draw(&Polygon::new(q.to_vec(), c.filled()));
                }
                let _ = area.present();
            }
            pic
        })
        .collect()
}
