"""How visible is each lesion of a LiTS-layout folder, and what tumour Dice could any method reach?

For every lesion (26-connected tumour component of the reference mask) the lesion's own mask is
moved to random places inside lesion-free liver of the same study, and the CT's median over
each copy gives the null distribution of "liver that looks like this shape". The lesion's
detectability is

    d' = |median HU over the lesion - mean of the null| / standard deviation of the null

Medians, not means: a copy that crosses a contrast-filled vessel gets a mean pulled far up, and
an observer that sees the vessel discounts it (with means, the spread of the copies of the
larger lesions is two to four times wider and their d' as much lower).

i.e. the signal-to-noise ratio of an ideal observer that already knows the lesion's exact shape
and place (texture, noise and partial volume included). A real method has to search the whole
liver, so it needs more than this to find a lesion without false positives.

The ceilings assume a method that segments every lesion with d' >= D perfectly, misses the
others and never errs elsewhere; its tumour Dice per case (over the lesion-bearing studies: a
lesion-free study, where it predicts nothing, leaves the mean as in METRICS.md) is an
upper bound for any method that cannot see below D, and so is the share of lesions with a
longest axial diameter of at least 10 mm that it finds (recall).

With --pred PRED (a folder of predicted masks, `segmentation-K.nii[.gz]` as in DIR), each
lesion also shows whether the prediction touches it, and lesions found are counted per d' band.

Usage: lesion_visibility.py DIR [--pred PRED] [--copies K] [--seed S]
"""

import argparse
import glob
import os
import re

import nibabel as nib
import numpy as np
from scipy import ndimage as nd
from scipy.spatial.distance import pdist

THRESHOLDS = [1.0, 2.0, 3.0, 4.0, 5.0]


def longest_axial_mm(lesion, sp):
    """Longest distance between two voxel centres of the lesion within one slice, in mm."""
    best = 0.0
    for z in np.nonzero(lesion.any(axis=(0, 1)))[0]:
        sl = lesion[:, :, z]
        edge = sl & ~nd.binary_erosion(sl)
        pts = np.argwhere(edge) * sp[:2]
        if len(pts) > 1:
            best = max(best, float(pdist(pts).max()))
    return best


def null_medians(ct, lesion, free_liver, copies, rng):
    """Medians of the CT over up to `copies` shifted copies of `lesion` lying in `free_liver`."""
    idx = np.argwhere(lesion)
    lo, hi = idx.min(0), idx.max(0)
    span = hi - lo
    box = lesion[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    rel = np.argwhere(box)
    shape = np.array(ct.shape)
    cands = np.argwhere(free_liver)
    out = []
    for _ in range(copies * 20):
        if len(out) >= copies:
            break
        origin = cands[rng.integers(len(cands))] - span // 2
        if (origin < 0).any() or (origin + span >= shape).any():
            continue
        pts = rel + origin
        inside = free_liver[pts[:, 0], pts[:, 1], pts[:, 2]]
        if inside.mean() < 0.95:
            continue
        out.append(np.median(ct[pts[:, 0], pts[:, 1], pts[:, 2]]))
    return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--pred", help="folder of predicted masks in the same layout")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    studies = sorted(
        (int(m.group(1)), p)
        for p in glob.glob(os.path.join(args.dir, "volume-*.nii*"))
        if (m := re.search(r"volume-(\d+)\.nii", p))
    )
    ceilings = {d: [] for d in THRESHOLDS}
    found_ge10 = {d: 0 for d in THRESHOLDS}
    n_ge10 = 0
    print(f"{'study':>5} {'lesion':>6} {'mL':>7} {'axial mm':>8} {'HU':>6} {'liver':>6} "
          f"{'null sd':>7} {'d_prime':>7}" + ("  found" if args.pred else ""))
    bands = {}
    for k, vpath in studies:
        spath = vpath.replace("volume-", "segmentation-")
        img = nib.load(vpath)
        ct = np.asarray(img.dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(spath).dataobj)
        pred = None
        if args.pred:
            ppath = os.path.join(args.pred, os.path.basename(spath))
            pred = np.asarray(nib.load(ppath).dataobj) == 2
            if pred.shape != seg.shape:
                raise SystemExit(f"{ppath}: shape {pred.shape}, the reference has {seg.shape}")
        sp = np.array(img.header.get_zooms()[:3], dtype=float)
        voxel_ml = float(np.prod(sp)) / 1000.0
        labels, n = nd.label(seg == 2, structure=np.ones((3, 3, 3)))
        # Lesion-free liver, kept 2 voxels in-plane away from any lesion.
        near = nd.binary_dilation(seg == 2, structure=np.ones((5, 5, 1)))
        free = (seg == 1) & ~near
        total = 0.0
        detected = {d: 0.0 for d in THRESHOLDS}
        for i in range(1, n + 1):
            m = labels == i
            vol = m.sum() * voxel_ml
            total += vol
            diam = longest_axial_mm(m, sp)
            n_ge10 += diam >= 10.0
            null = null_medians(ct, m, free, args.copies, rng)
            median = float(np.median(ct[m]))
            hit = pred is not None and bool(pred[m].any())
            found = "" if pred is None else ("    yes" if hit else "     no")
            if len(null) < 10:
                dp = float("nan")
                print(f"{k:>5} {i:>6} {vol:7.2f} {diam:8.1f} {median:6.0f}      - (no room for copies)"
                      + found)
            else:
                dp = abs(median - null.mean()) / max(null.std(), 1e-6)
                print(f"{k:>5} {i:>6} {vol:7.2f} {diam:8.1f} {median:6.0f} {null.mean():6.0f} "
                      f"{null.std():7.1f} {dp:7.1f}" + found)
            if pred is not None and not np.isnan(dp):
                band = min(int(dp), 5)
                hits = bands.setdefault(band, [0, 0])
                hits[0] += hit
                hits[1] += 1
            for d in THRESHOLDS:
                if dp >= d:
                    detected[d] += vol
                    found_ge10[d] += diam >= 10.0
        if n == 0:
            # Both masks empty: the per-case mean leaves the study out (METRICS.md).
            continue
        for d in THRESHOLDS:
            ceilings[d].append(2 * detected[d] / (detected[d] + total))
    print()
    print("ceilings for a method that sees lesions with d' >= D only")
    print(f"{'D':>4} {'Dice per case':>13} {'recall >= 10 mm':>15}  Dice per study")
    for d in THRESHOLDS:
        c = ceilings[d]
        recall = found_ge10[d] / n_ge10 if n_ge10 else float("nan")
        print(f"{d:4.1f} {np.mean(c):13.3f} {recall:15.2f}  " + " ".join(f"{x:.2f}" for x in c))
    if bands:
        print()
        print("lesions the prediction touches, by d'")
        for band in sorted(bands):
            hit, n = bands[band]
            label = f"{band}-{band + 1}" if band < 5 else ">=5"
            print(f"{label:>6} {hit:3d} of {n:3d}")


if __name__ == "__main__":
    main()
