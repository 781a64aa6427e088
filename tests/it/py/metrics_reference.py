"""Independent reference for `hepaflow lesions` and `hepaflow metrics`, straight from the
definitions of METRICS.md with numpy and scipy (the functions MedPy's surface distances call).

usage: metrics_reference.py OUT_DIR
Writes case-N-{truth,pred,ct}.nii.gz and expected.json: {case: {"metrics": ..., "lesions": ...}}.
"""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(11)
S26 = np.ones((3, 3, 3), bool)
S6 = ndimage.generate_binary_structure(3, 1)


def blobs(shape, n, rmin, rmax, spacing):
    """Union of random ellipsoids with noisy surfaces."""
    m = np.zeros(shape, bool)
    grid = np.indices(shape).astype(float)
    for _ in range(n):
        c = [rng.uniform(0, s) for s in shape]
        r = [rng.uniform(rmin, rmax) / sp for sp in spacing]
        d = sum(((grid[i] - c[i]) / r[i]) ** 2 for i in range(3))
        noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5) * 0.6
        m |= d + noise < 1
    return m


def labels(liver, tumour):
    v = np.zeros(liver.shape, np.uint8)
    v[liver] = 1
    v[tumour] = 2
    return v


def affine(spacing):
    a = np.diag(list(spacing) + [1.0])
    a[:3, 3] = [-100.0, 30.0, 250.0]
    a[0, :3] *= -1  # x flipped, as in most CT
    return a


def surface(m):
    return m ^ ndimage.binary_erosion(m, structure=S6, iterations=1)


def structure(t, p, spacing, voxml):
    nt, np_, both = int(t.sum()), int(p.sum()), int((t & p).sum())
    r = {"truth_ml": nt * voxml, "pred_ml": np_ * voxml}
    if nt == 0 and np_ == 0:
        r.update(dice=1.0, jaccard=1.0, voe=0.0, rvd=None)
    else:
        j = both / (nt + np_ - both)
        r.update(dice=2 * both / (nt + np_), jaccard=j, voe=1 - j, rvd=(np_ - nt) / nt if nt else None)
    if nt == 0 or np_ == 0:
        r.update(assd_mm=None, mssd_mm=None, hd95_mm=None, rmsd_mm=None)
    else:
        st, sp = surface(t), surface(p)
        d1 = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
        d2 = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
        d = np.hstack((d1, d2))
        r.update(assd_mm=float(d.mean()), mssd_mm=float(d.max()),
                 hd95_mm=float(np.percentile(d, 95)), rmsd_mm=float(np.sqrt((d ** 2).mean())))
    return r


def axial_diameter(coords_mm, k):
    best = 0.0
    for z in np.unique(k):
        c = coords_mm[k == z]
        if len(c) > 1:
            best = max(best, float(pdist(c).max()))
    return best


def lesions(mask, ct, spacing, aff):
    vox = abs(np.prod(spacing)) / 1000.0
    lab, n = ndimage.label(mask == 2, structure=S26)
    items = []
    for c in range(1, n + 1):
        idx = np.argwhere(lab == c)  # (i, j, k)
        first = int(np.ravel_multi_index(idx.T, mask.shape, order="F").min())
        mm = idx * np.asarray(spacing)
        mean = idx.mean(axis=0)
        world = aff[:3, :3] @ mean + aff[:3, 3]
        items.append({
            "first": first,
            "voxels": len(idx),
            "volume_ml": len(idx) * vox,
            "centroid_mm": world.tolist(),
            "longest_axial_diameter_mm": axial_diameter(mm, idx[:, 2]),
            "max_diameter_mm": float(pdist(mm).max()) if len(idx) > 1 else 0.0,
            "mean_hu": float(ct[tuple(idx.T)].mean()),
            "slice_range": [int(idx[:, 2].min()), int(idx[:, 2].max())],
        })
    items.sort(key=lambda d: (-d["voxels"], d["first"]))
    for i, d in enumerate(items):
        d["id"] = i + 1
        del d["first"]
    liver = int((mask >= 1).sum())
    tum = int((mask == 2).sum())
    return {"liver_ml": liver * vox, "tumour_ml": tum * vox,
            "tumour_burden_pct": 100 * tum / liver if liver else None, "lesions": items}


def size_class(d):
    return "small" if d < 10 else ("medium" if d <= 20 else "large")


def detection(t, p, spacing):
    lt, nt = ndimage.label(t == 2, structure=S26)
    lp, npred = ndimage.label(p == 2, structure=S26)
    ref_hit = {int(v) for v in np.unique(lt[(lt > 0) & (lp > 0)])}
    pred_hit = {int(v) for v in np.unique(lp[(lt > 0) & (lp > 0)])}
    tp = len(ref_hit)
    prec = len(pred_hit) / npred if npred else None
    rec = tp / nt if nt else None
    f1 = 2 * prec * rec / (prec + rec) if prec is not None and rec is not None and prec + rec > 0 else None
    by = {k: {"tp": 0, "fn": 0} for k in ("small", "medium", "large")}
    for c in range(1, nt + 1):
        idx = np.argwhere(lt == c)
        d = axial_diameter(idx * np.asarray(spacing), idx[:, 2])
        by[size_class(d)]["tp" if c in ref_hit else "fn"] += 1
    return {"reference_lesions": nt, "predicted_lesions": npred, "tp": tp,
            "fp": npred - len(pred_hit), "fn": nt - tp, "precision": prec, "recall": rec,
            "f1": f1, "by_size": by}


cases = []
shape, sp = (40, 36, 20), (0.8, 1.1, 2.5)
liver_t = blobs(shape, 3, 10, 18, sp)
liver_p = ndimage.binary_dilation(liver_t, iterations=1) ^ (blobs(shape, 2, 3, 6, sp) & liver_t)
tum_t = blobs(shape, 4, 2, 6, sp) & liver_t
tum_p = ndimage.binary_dilation(tum_t) & liver_p & ~blobs(shape, 1, 3, 5, sp) | (blobs(shape, 2, 1, 3, sp) & liver_p)
cases.append(("blobs-anisotropic", shape, sp, labels(liver_t, tum_t), labels(liver_p, tum_p)))
cases.append(("tumour-missed", shape, sp, labels(liver_t, tum_t), labels(liver_p, np.zeros(shape, bool))))
cases.append(("no-tumour-anywhere", shape, sp, labels(liver_t, np.zeros(shape, bool)), labels(liver_p, np.zeros(shape, bool))))
shape2, sp2 = (24, 24, 12), (1.5, 1.5, 1.0)
edge_t = np.zeros(shape2, bool); edge_t[:10, :, :6] = True
edge_p = np.zeros(shape2, bool); edge_p[:12, 2:, :5] = True
tedge = np.zeros(shape2, bool); tedge[0:3, 0:3, 0:2] = True; tedge[23, 23, 11] = True
pedge = np.zeros(shape2, bool); pedge[0:2, 0:4, 0:3] = True
cases.append(("touching-edges", shape2, sp2, labels(edge_t | tedge, tedge), labels(edge_p | pedge, pedge)))
specks_t = (rng.random(shape) < 0.02) & liver_t
specks_p = (rng.random(shape) < 0.02) & liver_p
cases.append(("many-small-lesions", shape, sp, labels(liver_t, specks_t), labels(liver_p, specks_p)))
cases.append(("empty-truth", shape2, sp2, np.zeros(shape2, np.uint8), labels(edge_p, pedge)))

expected = {}
for name, shp, spc, t, p in cases:
    aff = affine(spc)
    ct = rng.normal(60, 20, shp).astype(np.float32)
    for kind, arr, dt in (("truth", t, np.uint8), ("pred", p, np.uint8), ("ct", ct, np.float32)):
        img = nib.Nifti1Image(arr.astype(dt), aff)
        img.header.set_data_dtype(dt)
        img.header.set_zooms(spc)
        nib.save(img, str(out / f"{name}-{kind}.nii.gz"))
    ct_read = np.asarray(nib.load(str(out / f"{name}-ct.nii.gz")).get_fdata())
    voxml = float(np.prod(spc)) / 1000.0
    expected[name] = {
        "metrics": {
            "liver": structure(t >= 1, p >= 1, spc, voxml),
            "tumour": structure(t == 2, p == 2, spc, voxml),
            "detection": detection(t, p, spc),
        },
        "lesions": lesions(t, ct_read, spc, aff),
    }
(out / "expected.json").write_text(json.dumps(expected, indent=1))
