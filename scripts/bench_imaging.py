"""Driver of scripts/bench-imaging: runs both sides on the same files and prints the table."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
from medpy.metric import binary as medpy_binary
from scipy import ndimage

HEPAFLOW = sys.argv[1]
QUICK = "--quick" in sys.argv
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "var" / "bench"
SHAPE = "256x256x80" if QUICK else "512x512x300"
REPEAT = 3 if QUICK else 5


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def hepaflow_bench(*args, threads=None):
    env = dict(os.environ, HEPAFLOW_LOG="warn")
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([HEPAFLOW, "bench", "--repeat", str(REPEAT), *map(str, args)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def timed(f, repeat=REPEAT):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


# The study: a phantom, and a prediction made from its truth (shifted, dilated liver; tumours
# grown and one dropped), written by nibabel.
study = DATA / SHAPE
study.mkdir(parents=True, exist_ok=True)
vol, seg, pred = study / "volume-0.nii.gz", study / "segmentation-0.nii.gz", study / "pred-0.nii.gz"
if not seg.exists():
    log(f"generating a {SHAPE} phantom")
    subprocess.run([HEPAFLOW, "phantom", "--out", str(study), "--count", "1", "--seed", "42",
                    "--shape", SHAPE], check=True)
if not pred.exists():
    log("making a prediction from the truth")
    img = nib.load(str(seg))
    t = np.asarray(img.dataobj).astype(np.uint8)
    liver = ndimage.binary_dilation(np.roll(t >= 1, 2, axis=0), iterations=1)
    tum = ndimage.binary_dilation(np.roll(t == 2, 1, axis=1), iterations=1) & liver
    p = np.zeros_like(t)
    p[liver] = 1
    p[tum] = 2
    out = nib.Nifti1Image(p, img.affine, img.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(pred))

rows = []

# 1. Read .nii.gz
log("read: nibabel get_fdata")
ref_s, data = timed(lambda: nib.load(str(vol)).get_fdata())
ours = hepaflow_bench("read", vol)
rows.append(("read .nii.gz (int16 -> float)", "nibabel get_fdata", ref_s, ours["median_s"],
             f"shape {list(data.shape)} = {ours['shape']}", ">= 2x"))
del data

# 2. 26-connected labelling
truth = np.asarray(nib.load(str(seg)).dataobj)
ct = nib.load(str(vol)).get_fdata()
for name, mask, structure, src in [
    ("tumour", truth == 2, "tumour", seg),
    ("liver", truth >= 1, "liver", seg),
    ("CT > 150 HU (many parts)", ct > 150, "hu>150", vol),
]:
    m = np.asfortranarray(mask.astype(np.uint8))
    log(f"label: cc3d on {name}")
    ref_s, labels = timed(lambda: cc3d.connected_components(m, connectivity=26))
    n_ref = int(labels.max())
    ref_sizes = np.bincount(labels.ravel(order="F"))[1:].tolist()
    ours = hepaflow_bench("label", src, "--structure", structure)
    ours1 = hepaflow_bench("label", src, "--structure", structure, threads=1)
    same = ours["components"] == n_ref and ours["sizes"] == ref_sizes
    rows.append((f"label 26-conn: {name}", "cc3d (1 thread)", ref_s, ours["median_s"],
                 f"{n_ref} components, sizes {'identical' if same else 'DIFFER'}", ">= 1x"))
    rows.append((f"  same, hepaflow on 1 thread", "cc3d (1 thread)", ref_s, ours1["median_s"], "", ">= 1x"))
del ct

# 3. Surface distances (liver, the large structure)
log("surface: MedPy assd + hd + hd95 (one run each; slow)")
img = nib.load(str(seg))
sp = img.header.get_zooms()[:3]
t = np.asarray(img.dataobj) >= 1
p = np.asarray(nib.load(str(pred)).dataobj) >= 1
t0 = time.perf_counter()
medpy_assd = medpy_binary.assd(p, t, voxelspacing=sp)
medpy_hd = medpy_binary.hd(p, t, voxelspacing=sp)
medpy_hd95 = medpy_binary.hd95(p, t, voxelspacing=sp)
ref_s = time.perf_counter() - t0
sds = getattr(medpy_binary, "__surface_distances")
pooled = np.hstack((sds(p, t, sp, 1), sds(t, p, sp, 1)))
ours = hepaflow_bench("surface", "--truth", seg, "--pred", pred, "--structure", "liver")


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


errs = [rel(ours["assd"], pooled.mean()), rel(ours["mssd"], medpy_hd), rel(ours["hd95"], medpy_hd95)]
rows.append(("ASSD/MSSD/HD95, liver", "MedPy assd+hd+hd95", ref_s, ours["median_s"],
             f"max rel diff {max(errs):.1e} (pooled ASSD; MedPy's own assd, a mean of means, = {medpy_assd:.6f})",
             ">= 20x"))

print()
print(f"hepaflow imaging benchmark, study {SHAPE}, {os.cpu_count()} CPUs, medians of {REPEAT} (MedPy: 1 run)")
print(f"{'stage':<36} {'reference':<22} {'ref s':>8} {'ours s':>8} {'ratio':>7}  target  check")
for stage, ref, r, o, check, target in rows:
    print(f"{stage:<36} {ref:<22} {r:>8.3f} {o:>8.3f} {r / o:>6.1f}x  {target:<6}  {check}")
