//! 3D connected-component labelling on runs: each row of the volume is reduced to runs of
//! foreground voxels, runs of neighbouring rows are merged with a union-find, and labels are
//! numbered in the order of each component's first voxel (linear index), as scipy and cc3d do.

use rayon::prelude::*;

/// Which voxels touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Connectivity {
    /// Faces only.
    Six,
    /// Faces and edges.
    Eighteen,
    /// Faces, edges and corners (the LiTS convention for lesions).
    #[default]
    TwentySix,
}

impl Connectivity {
    pub fn from_neighbours(n: u32) -> Option<Self> {
        match n {
            6 => Some(Self::Six),
            18 => Some(Self::Eighteen),
            26 => Some(Self::TwentySix),
            _ => None,
        }
    }
}

/// A horizontal run of foreground voxels `[start, end)` in row `row` (= j + ny·k).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub row: u32,
    pub start: u32,
    pub end: u32,
}

/// The components of a binary mask.
#[derive(Clone, Debug)]
pub struct Components {
    shape: [usize; 3],
    runs: Vec<Run>,
    /// Component of each run, 1-based.
    run_label: Vec<u32>,
    count: usize,
}

impl Components {
    /// Labels the voxels of `values` for which `pred` holds.
    pub fn label<F>(values: &[u8], shape: [usize; 3], pred: F, conn: Connectivity) -> Self
    where
        F: Fn(u8) -> bool + Sync,
    {
        let [nx, ny, nz] = shape;
        assert_eq!(values.len(), nx * ny * nz, "values do not match the shape");
        let rows = ny * nz;
        // Runs per slice in parallel, then concatenated in row order.
        let per_slice: Vec<(Vec<Run>, Vec<u32>)> = (0..nz)
            .into_par_iter()
            .map(|k| {
                let mut runs = Vec::new();
                let mut counts = vec![0u32; ny];
                for (j, c) in counts.iter_mut().enumerate() {
                    let row = j + ny * k;
                    let line = &values[row * nx..(row + 1) * nx];
                    let before = runs.len();
                    row_runs(line, row as u32, &pred, &mut runs);
                    *c = (runs.len() - before) as u32;
                }
                (runs, counts)
            })
            .collect();
        let total: usize = per_slice.iter().map(|(r, _)| r.len()).sum();
        let mut runs = Vec::with_capacity(total);
        let mut row_start = Vec::with_capacity(rows + 1);
        row_start.push(0u32);
        for (r, counts) in per_slice {
            runs.extend_from_slice(&r);
            for c in counts {
                let last = *row_start.last().expect("non-empty");
                row_start.push(last + c);
            }
        }

        let mut uf = UnionFind::new(runs.len());
        let range = |row: usize| row_start[row] as usize..row_start[row + 1] as usize;
        for k in 0..nz {
            for j in 0..ny {
                let row = j + ny * k;
                let cur = range(row);
                if cur.is_empty() {
                    continue;
                }
                // (dj, dk, extension): previous rows that may touch this one.
                let mut link = |dj: isize, dk: isize, ext: u32| {
                    let (jj, kk) = (j as isize + dj, k as isize + dk);
                    if jj < 0 || kk < 0 || jj >= ny as isize || kk >= nz as isize {
                        return;
                    }
                    let other = range(jj as usize + ny * kk as usize);
                    merge_rows(&runs, cur.clone(), other, ext, &mut uf);
                };
                match conn {
                    Connectivity::Six => {
                        link(-1, 0, 0);
                        link(0, -1, 0);
                    }
                    Connectivity::Eighteen => {
                        link(-1, 0, 1);
                        link(0, -1, 1);
                        link(-1, -1, 0);
                        link(1, -1, 0);
                    }
                    Connectivity::TwentySix => {
                        link(-1, 0, 1);
                        link(0, -1, 1);
                        link(-1, -1, 1);
                        link(1, -1, 1);
                    }
                }
            }
        }

        // Number components by first appearance; runs are in linear-index order.
        let mut id_of_root = vec![0u32; runs.len()];
        let mut run_label = vec![0u32; runs.len()];
        let mut count = 0u32;
        for (r, out) in run_label.iter_mut().enumerate() {
            let root = uf.find(r as u32) as usize;
            if id_of_root[root] == 0 {
                count += 1;
                id_of_root[root] = count;
            }
            *out = id_of_root[root];
        }
        Components {
            shape,
            runs,
            run_label,
            count: count as usize,
        }
    }

    /// Number of components.
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }
    /// The runs, in linear order, with their component (1-based).
    pub fn runs(&self) -> impl Iterator<Item = (Run, u32)> + '_ {
        self.runs
            .iter()
            .copied()
            .zip(self.run_label.iter().copied())
    }
    /// Sets every voxel of the components `pick` chooses (by 1-based label) to `value` in
    /// `labels` (the volume they were found in). Returns the voxels set.
    pub fn fill(&self, labels: &mut [u8], pick: impl Fn(u32) -> bool, value: u8) -> u64 {
        let nx = self.shape[0];
        let mut set = 0;
        for (r, l) in self.runs() {
            if pick(l) {
                let base = r.row as usize * nx;
                labels[base + r.start as usize..base + r.end as usize].fill(value);
                set += u64::from(r.end - r.start);
            }
        }
        set
    }
    /// Voxel count of each component; index 0 is unused (background).
    pub fn sizes(&self) -> Vec<u64> {
        let mut s = vec![0u64; self.count + 1];
        for (r, l) in self.runs() {
            s[l as usize] += u64::from(r.end - r.start);
        }
        s
    }
    /// Inclusive voxel bounds `(lo, hi)` of each component; index 0 is unused.
    pub fn bounding_boxes(&self) -> Vec<([usize; 3], [usize; 3])> {
        let ny = self.shape[1];
        let mut out = vec![([usize::MAX; 3], [0usize; 3]); self.count + 1];
        for (r, l) in self.runs() {
            let (y, z) = (r.row as usize % ny, r.row as usize / ny);
            let (lo, hi) = &mut out[l as usize];
            for (t, (a, b)) in [(r.start as usize, r.end as usize - 1), (y, y), (z, z)]
                .into_iter()
                .enumerate()
            {
                lo[t] = lo[t].min(a);
                hi[t] = hi[t].max(b);
            }
        }
        out
    }
    /// The values of `volume` (on the grid the components were found in) under each component,
    /// in linear order; index 0 is unused.
    pub fn values<T: Copy>(&self, volume: &[T]) -> Vec<Vec<T>> {
        let nx = self.shape[0];
        let mut out = vec![Vec::new(); self.count + 1];
        for (r, l) in self.runs() {
            let base = r.row as usize * nx;
            out[l as usize]
                .extend_from_slice(&volume[base + r.start as usize..base + r.end as usize]);
        }
        out
    }
    /// Linear index of each component's first voxel; index 0 is unused.
    pub fn first_voxels(&self) -> Vec<usize> {
        let nx = self.shape[0];
        let mut first = vec![usize::MAX; self.count + 1];
        for (r, l) in self.runs() {
            let f = &mut first[l as usize];
            if *f == usize::MAX {
                *f = r.row as usize * nx + r.start as usize;
            }
        }
        first
    }
    /// A label per voxel: 0 background, 1..=count components.
    pub fn label_volume(&self) -> Vec<u32> {
        let nx = self.shape[0];
        let mut out = vec![0u32; self.shape.iter().product()];
        for (r, l) in self.runs() {
            let base = r.row as usize * nx;
            out[base + r.start as usize..base + r.end as usize].fill(l);
        }
        out
    }
}

/// Appends the runs of one row.
#[inline]
fn row_runs<F: Fn(u8) -> bool>(line: &[u8], row: u32, pred: &F, out: &mut Vec<Run>) {
    let n = line.len();
    let mut i = 0;
    while i < n {
        // Skip background quickly, eight bytes at a time while they are all zero and zero is
        // background.
        if !pred(0) {
            while i + 8 <= n && u64::from_ne_bytes(line[i..i + 8].try_into().expect("8 bytes")) == 0
            {
                i += 8;
            }
        }
        while i < n && !pred(line[i]) {
            i += 1;
        }
        if i >= n {
            break;
        }
        let start = i;
        while i < n && pred(line[i]) {
            i += 1;
        }
        out.push(Run {
            row,
            start: start as u32,
            end: i as u32,
        });
    }
}

/// Unions the runs of two rows that overlap, allowing a gap of `ext` (diagonal contact).
fn merge_rows(
    runs: &[Run],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
    ext: u32,
    uf: &mut UnionFind,
) {
    let (mut i, mut j) = (a.start, b.start);
    while i < a.end && j < b.end {
        let (ra, rb) = (runs[i], runs[j]);
        if ra.start < rb.end + ext && rb.start < ra.end + ext {
            uf.union(i as u32, j as u32);
        }
        // Advance whichever run ends first.
        if ra.end < rb.end {
            i += 1;
        } else {
            j += 1;
        }
    }
}

struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }
    #[inline]
    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }
    #[inline]
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::phantom::Rng;

    /// Flood fill with an explicit neighbourhood: the independent reference.
    fn brute(values: &[u8], shape: [usize; 3], conn: Connectivity) -> Vec<u32> {
        let [nx, ny, nz] = shape;
        let mut out = vec![0u32; values.len()];
        let mut next = 0;
        let mut offsets = Vec::new();
        for dz in -1i64..=1 {
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let n = dx.abs() + dy.abs() + dz.abs();
                    let ok = match conn {
                        Connectivity::Six => n == 1,
                        Connectivity::Eighteen => n == 1 || n == 2,
                        Connectivity::TwentySix => n >= 1,
                    };
                    if ok {
                        offsets.push((dx, dy, dz));
                    }
                }
            }
        }
        for start in 0..values.len() {
            if values[start] == 0 || out[start] != 0 {
                continue;
            }
            next += 1;
            out[start] = next;
            let mut stack = vec![start];
            while let Some(v) = stack.pop() {
                let (x, y, z) = (
                    (v % nx) as i64,
                    ((v / nx) % ny) as i64,
                    (v / (nx * ny)) as i64,
                );
                for &(dx, dy, dz) in &offsets {
                    let (a, b, c) = (x + dx, y + dy, z + dz);
                    if a < 0 || b < 0 || c < 0 || a >= nx as i64 || b >= ny as i64 || c >= nz as i64
                    {
                        continue;
                    }
                    let w = a as usize + nx * (b as usize + ny * c as usize);
                    if values[w] != 0 && out[w] == 0 {
                        out[w] = next;
                        stack.push(w);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_flood_fill_on_random_volumes_for_every_connectivity() {
        let mut rng = Rng::new(1, 2);
        for case in 0..60 {
            let shape = [1 + rng.below(13), 1 + rng.below(11), 1 + rng.below(9)];
            let density = rng.range(0.05, 0.6);
            let n = shape.iter().product();
            let values: Vec<u8> = (0..n).map(|_| u8::from(rng.unit() < density)).collect();
            for conn in [
                Connectivity::Six,
                Connectivity::Eighteen,
                Connectivity::TwentySix,
            ] {
                let want = brute(&values, shape, conn);
                let got = Components::label(&values, shape, |v| v != 0, conn);
                assert_eq!(got.label_volume(), want, "case {case} {conn:?} {shape:?}");
                assert_eq!(got.count(), *want.iter().max().unwrap_or(&0) as usize);
            }
        }
    }

    #[test]
    fn diagonal_contacts_follow_the_connectivity() {
        // Two voxels touching at an edge (dx = 1, dy = 1) and two touching at a corner.
        let shape = [3, 3, 2];
        let mut v = vec![0u8; 18];
        v[0] = 1; // (0,0,0)
        v[4] = 1; // (1,1,0): edge contact with (0,0,0)
        let l = |v: &[u8], c| Components::label(v, shape, |x| x != 0, c).count();
        assert_eq!(l(&v, Connectivity::Six), 2);
        assert_eq!(l(&v, Connectivity::Eighteen), 1);
        let mut w = vec![0u8; 18];
        w[0] = 1; // (0,0,0)
        w[9 + 4] = 1; // (1,1,1): corner contact
        assert_eq!(l(&w, Connectivity::Eighteen), 2);
        assert_eq!(l(&w, Connectivity::TwentySix), 1);
    }
}
