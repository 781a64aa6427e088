//! Minimum s–t cut of a graph with non-negative real capacities (Dinic's maximum flow): the
//! exact minimiser of a two-label energy with unary costs and symmetric pairwise costs
//! (Boykov & Jolly's graph cut).

/// Residual capacity below which an arc counts as saturated.
const EPS: f64 = 1e-9;

/// A flow network of `n` nodes plus a source and a sink.
pub struct CutGraph {
    n: usize,
    /// First arc out of each node, the next arc out of the same node, and each arc's head
    /// (u32: a lesion's neighbourhood has far fewer than 4 billion arcs, and half the memory).
    head: Vec<u32>,
    next: Vec<u32>,
    to: Vec<u32>,
    cap: Vec<f64>,
}

const NONE: u32 = u32::MAX;

impl CutGraph {
    /// `n` nodes, numbered 0..n; the source and the sink come on top.
    pub fn new(n: usize) -> Self {
        assert!(n + 2 < NONE as usize, "{n} nodes: too many for a cut graph");
        Self {
            n,
            head: vec![NONE; n + 2],
            next: Vec::new(),
            to: Vec::new(),
            cap: Vec::new(),
        }
    }

    fn source(&self) -> usize {
        self.n
    }

    fn sink(&self) -> usize {
        self.n + 1
    }

    /// An arc `a → b` of capacity `ab` and its reverse of capacity `ba`.
    fn arc(&mut self, a: usize, b: usize, ab: f64, ba: f64) {
        for (from, to, cap) in [(a, b, ab), (b, a, ba)] {
            assert!(
                self.to.len() < NONE as usize,
                "too many arcs for a cut graph"
            );
            self.next.push(self.head[from]);
            self.head[from] = self.to.len() as u32;
            self.to.push(to as u32);
            self.cap.push(cap.max(0.0));
        }
    }

    /// Node `i` pays `source_side` when it ends on the source's side of the cut and
    /// `sink_side` when it ends on the sink's (costs ≥ 0; only their difference matters).
    pub fn unary(&mut self, i: usize, source_side: f64, sink_side: f64) {
        let m = source_side.min(sink_side);
        let (s, t) = (source_side - m, sink_side - m);
        // Ending on the sink's side cuts the source's arc; on the source's side, the sink's.
        if t > EPS {
            let src = self.source();
            self.arc(src, i, t, 0.0);
        }
        if s > EPS {
            let snk = self.sink();
            self.arc(i, snk, s, 0.0);
        }
    }

    /// Nodes `a` and `b` pay `w` when the cut separates them.
    pub fn pair(&mut self, a: usize, b: usize, w: f64) {
        if w > EPS {
            self.arc(a, b, w, w);
        }
    }

    /// Computes a maximum flow and returns, for every node, whether it lies on the source's
    /// side of a minimum cut (reachable from the source in the residual graph).
    pub fn solve(mut self) -> Vec<bool> {
        let total = self.n + 2;
        let (s, t) = (self.source(), self.sink());
        let mut level = vec![u32::MAX; total];
        let mut current = vec![NONE; total];
        let mut queue: Vec<usize> = Vec::with_capacity(total);
        loop {
            // Levels by breadth-first search over unsaturated arcs.
            level.fill(u32::MAX);
            level[s] = 0;
            queue.clear();
            queue.push(s);
            let mut k = 0;
            while k < queue.len() {
                let u = queue[k];
                k += 1;
                let mut e = self.head[u];
                while e != NONE {
                    let (a, v) = (e as usize, self.to[e as usize] as usize);
                    if self.cap[a] > EPS && level[v] == u32::MAX {
                        level[v] = level[u] + 1;
                        queue.push(v);
                    }
                    e = self.next[a];
                }
            }
            if level[t] == u32::MAX {
                break;
            }
            current.copy_from_slice(&self.head);
            // Blocking flow: depth-first along rising levels, with an explicit stack of arcs.
            let mut path: Vec<usize> = Vec::new();
            loop {
                let u = path.last().map_or(s, |&e| self.to[e] as usize);
                if u == t {
                    let push = path
                        .iter()
                        .map(|&e| self.cap[e])
                        .fold(f64::INFINITY, f64::min);
                    for &e in &path {
                        self.cap[e] -= push;
                        self.cap[e ^ 1] += push;
                    }
                    // Back up to the tail of the first saturated arc.
                    let cut = path.iter().position(|&e| self.cap[e] <= EPS).unwrap_or(0);
                    path.truncate(cut);
                    continue;
                }
                let mut advanced = false;
                while current[u] != NONE {
                    let e = current[u] as usize;
                    let v = self.to[e] as usize;
                    if self.cap[e] > EPS && level[v] == level[u] + 1 {
                        path.push(e);
                        advanced = true;
                        break;
                    }
                    current[u] = self.next[e];
                }
                if !advanced {
                    // Dead end: no flow passes through `u` any more in this phase.
                    level[u] = u32::MAX;
                    match path.pop() {
                        Some(e) => {
                            let tail = self.to[e ^ 1] as usize;
                            current[tail] = self.next[current[tail] as usize];
                        }
                        None => break,
                    }
                }
            }
        }
        // The source's side: reachable through unsaturated arcs.
        let mut reached = vec![false; total];
        reached[s] = true;
        let mut stack = vec![s];
        while let Some(u) = stack.pop() {
            let mut e = self.head[u];
            while e != NONE {
                let (a, v) = (e as usize, self.to[e as usize] as usize);
                if self.cap[a] > EPS && !reached[v] {
                    reached[v] = true;
                    stack.push(v);
                }
                e = self.next[a];
            }
        }
        reached.truncate(self.n);
        reached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every labelling of a small graph, by brute force: the cut's labelling has the least
    /// energy.
    #[test]
    fn the_cut_minimises_the_energy() {
        let mut seed = 12345u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..200 {
            let n = 7;
            let unary: Vec<(f64, f64)> = (0..n).map(|_| (3.0 * rand(), 3.0 * rand())).collect();
            let pairs: Vec<(usize, usize, f64)> = (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .filter_map(|(a, b)| {
                    let w = rand();
                    (w < 0.5).then_some((a, b, 2.0 * w))
                })
                .collect();
            let energy = |side: &dyn Fn(usize) -> bool| {
                let u: f64 = (0..n)
                    .map(|i| if side(i) { unary[i].0 } else { unary[i].1 })
                    .sum();
                let p: f64 = pairs
                    .iter()
                    .filter(|(a, b, _)| side(*a) != side(*b))
                    .map(|p| p.2)
                    .sum();
                u + p
            };
            let mut g = CutGraph::new(n);
            for (i, &(s, t)) in unary.iter().enumerate() {
                g.unary(i, s, t);
            }
            for &(a, b, w) in &pairs {
                g.pair(a, b, w);
            }
            let cut = g.solve();
            let got = energy(&|i| cut[i]);
            let best = (0..1u32 << n)
                .map(|m| energy(&|i| m >> i & 1 == 1))
                .fold(f64::INFINITY, f64::min);
            assert!(
                (got - best).abs() < 1e-9,
                "cut energy {got}, minimum {best}"
            );
        }
    }

    #[test]
    fn a_chain_is_cut_at_its_weakest_link() {
        // 0 – 1 – 2 – 3: node 0 wants the source, node 3 the sink; the 1–2 link is weakest.
        let mut g = CutGraph::new(4);
        g.unary(0, 0.0, 10.0);
        g.unary(3, 10.0, 0.0);
        g.pair(0, 1, 5.0);
        g.pair(1, 2, 1.0);
        g.pair(2, 3, 5.0);
        assert_eq!(g.solve(), vec![true, true, false, false]);
    }
}
