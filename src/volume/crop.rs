//! Boxes within a volume: the bounding box of a structure and copies of a box in and out, so
//! that work over a structure (surface distances, searches inside the liver) runs on the few
//! voxels around it instead of the whole study.

use rayon::prelude::*;

/// Inclusive voxel bounds `(lo, hi)` of a box.
pub type Bbox = ([usize; 3], [usize; 3]);

/// The bounding box of the voxels of `v` (Fortran order, `shape`) for which `is_in` holds; None
/// when there are none.
pub fn bounding_box<F>(v: &[u8], shape: [usize; 3], is_in: F) -> Option<Bbox>
where
    F: Fn(u8) -> bool + Sync,
{
    let [nx, ny, _] = shape;
    let plane = nx * ny;
    v.par_chunks(plane)
        .enumerate()
        .filter_map(|(k, sl)| {
            let (mut lo, mut hi) = ([usize::MAX, usize::MAX, k], [0, 0, k]);
            let mut any = false;
            for j in 0..ny {
                let row = &sl[j * nx..(j + 1) * nx];
                let Some(first) = row.iter().position(|&x| is_in(x)) else {
                    continue;
                };
                let last = row.iter().rposition(|&x| is_in(x)).expect("has one");
                any = true;
                lo[0] = lo[0].min(first);
                hi[0] = hi[0].max(last);
                lo[1] = lo[1].min(j);
                hi[1] = j;
            }
            any.then_some((lo, hi))
        })
        .reduce_with(|a, b| {
            (
                [0, 1, 2].map(|t| a.0[t].min(b.0[t])),
                [0, 1, 2].map(|t| a.1[t].max(b.1[t])),
            )
        })
}

/// A box of a volume: its first voxel and its extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    origin: [usize; 3],
    shape: [usize; 3],
    volume: [usize; 3],
}

impl Window {
    /// `bbox` grown by `margin` voxels on each side of each axis, within a volume of `volume`.
    pub fn around(bbox: Bbox, margin: [usize; 3], volume: [usize; 3]) -> Self {
        let origin = [0, 1, 2].map(|t| bbox.0[t].saturating_sub(margin[t]));
        let end = [0, 1, 2].map(|t| (bbox.1[t] + margin[t] + 1).min(volume[t]));
        Window {
            origin,
            shape: [0, 1, 2].map(|t| end[t] - origin[t]),
            volume,
        }
    }

    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Whether the window is the whole volume.
    pub fn is_whole(&self) -> bool {
        self.shape == self.volume
    }

    /// The index in the whole volume of each row's first voxel, row by row (y fastest).
    fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        let [nx, ny, _] = self.volume;
        let [x0, y0, z0] = self.origin;
        (0..self.shape[2]).flat_map(move |z| {
            (0..self.shape[1]).map(move |y| x0 + nx * ((y0 + y) + ny * (z0 + z)))
        })
    }

    /// The window's voxels of `data` (the whole volume), in Fortran order.
    pub fn extract<T: Copy>(&self, data: &[T]) -> Vec<T> {
        let w = self.shape[0];
        let mut out = Vec::with_capacity(self.shape.iter().product());
        for start in self.rows() {
            out.extend_from_slice(&data[start..start + w]);
        }
        out
    }

    /// Writes `part` (the window's voxels, as `extract` gives them) back into `data`.
    pub fn write_back<T: Copy>(&self, part: &[T], data: &mut [T]) {
        let w = self.shape[0];
        for (start, src) in self.rows().zip(part.chunks_exact(w)) {
            data[start..start + w].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_around_a_box_is_clipped_to_the_volume_and_round_trips() {
        let shape = [6, 5, 4];
        let mut v = vec![0u8; 120];
        // Voxels (1, 2, 1) and (3, 4, 2).
        v[1 + 6 * (2 + 5)] = 1;
        v[3 + 6 * (4 + 5 * 2)] = 1;
        let b = bounding_box(&v, shape, |x| x == 1).unwrap();
        assert_eq!(b, ([1, 2, 1], [3, 4, 2]));
        assert_eq!(bounding_box(&v, shape, |x| x == 2), None);
        let w = Window::around(b, [1, 1, 1], shape);
        assert_eq!(w.shape(), [5, 4, 4]);
        assert!(!w.is_whole());
        assert!(Window::around(b, [9, 9, 9], shape).is_whole());
        let data: Vec<u32> = (0..120).collect();
        let part = w.extract(&data);
        assert_eq!(part.len(), 80);
        // First voxel (0, 1, 0), last (4, 4, 3).
        assert_eq!(part[0], 6);
        assert_eq!(*part.last().unwrap(), 4 + 6 * (4 + 5 * 3));
        let mut back = vec![0u32; 120];
        w.write_back(&part, &mut back);
        for (i, (&a, &b)) in data.iter().zip(&back).enumerate() {
            let (x, y) = (i % 6, (i / 6) % 5);
            assert_eq!(b, if x < 5 && y >= 1 { a } else { 0 }, "voxel {i}");
        }
    }
}
