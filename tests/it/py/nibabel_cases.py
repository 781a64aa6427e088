"""Writes NIfTI files with nibabel (not with hepaflow) and what nibabel reads back from them.

usage: nibabel_cases.py OUT_DIR  -> OUT_DIR/*.nii[.gz] and OUT_DIR/expected.json
"""
import json
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)


def rot(ax, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine(r, zooms, offset):
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = offset
    return a


cases = []


def save(name, img):
    path = out / name
    nib.save(img, str(path))
    cases.append(name)


shape = (13, 11, 7)

# uint8, little endian, oblique sform only
d = rng.integers(0, 256, shape).astype(np.uint8)
img = nib.Nifti1Image(d, None)
img.set_sform(affine(rot(2, 20) @ rot(0, 10), [0.7, 0.8, 2.5], [-90, 120, -300]), code=2)
img.set_qform(None, code=0)
img.header.set_data_dtype(np.uint8)
save("u8_sform_oblique.nii.gz", img)

# int16, big endian, qform only with a negative determinant (qfac = -1)
d = rng.integers(-1024, 2000, shape).astype(np.int16)
hdr = nib.Nifti1Header(endianness=">")
img = nib.Nifti1Image(d, None, hdr)
a = affine(rot(1, 15), [0.9, 0.9, 3.0], [10, -20, 30])
a[:3, 2] *= -1
img.set_qform(a, code=1)
img.set_sform(None, code=0)
img.header.set_data_dtype(np.int16)
save("i16_be_qform_flip.nii", img)

# float32, neither qform nor sform: the base affine from pixdim
d = rng.normal(0, 100, shape).astype(np.float32)
img = nib.Nifti1Image(d, None)
img.set_qform(None, code=0)
img.set_sform(None, code=0)
img.header.set_zooms((1.5, 2.0, 4.0))
save("f32_no_xform.nii.gz", img)

# float64, big endian, sform and a different qform (sform wins)
d = rng.normal(50, 30, shape).astype(np.float64)
hdr = nib.Nifti1Header(endianness=">")
img = nib.Nifti1Image(d, None, hdr)
img.set_qform(affine(np.eye(3), [1, 1, 1], [0, 0, 0]), code=1)
img.set_sform(affine(rot(0, -25), [0.6, 0.6, 1.25], [100, 50, -10]), code=1)
img.header.set_data_dtype(np.float64)
save("f64_be_sform_and_qform.nii.gz", img)

# int16 with scaling chosen by nibabel (float data stored as int16)
d = rng.normal(40, 300, shape)
img = nib.Nifti1Image(d, affine(np.diag([-1, -1, 1]), [0.75, 0.75, 2], [190, 190, -400]))
img.header.set_data_dtype(np.int16)
save("i16_scaled.nii.gz", img)

for dt, lo, hi in [(np.int8, -128, 127), (np.uint16, 0, 60000), (np.int32, -(2**30), 2**30)]:
    d = rng.integers(lo, hi, shape).astype(dt)
    img = nib.Nifti1Image(d, affine(np.eye(3), [1.1, 1.2, 1.3], [1, 2, 3]))
    img.header.set_data_dtype(dt)
    save(f"{np.dtype(dt).name}_plain.nii", img)

# NIfTI-2
d = rng.normal(0, 10, shape).astype(np.float32)
img = nib.Nifti2Image(d, affine(rot(2, 5), [0.8, 0.8, 5], [3, 4, 5]))
img.header.set_data_dtype(np.float32)
save("nifti2_f32.nii.gz", img)

# 4D with a single volume
d = rng.integers(0, 3, shape + (1,)).astype(np.uint8)
img = nib.Nifti1Image(d, affine(np.eye(3), [1, 1, 2], [0, 0, 0]))
img.header.set_data_dtype(np.uint8)
save("u8_4d_one_volume.nii.gz", img)

# An extension: vox_offset beyond 352, with the extension flag set
d = rng.integers(0, 100, shape).astype(np.int16)
img = nib.Nifti1Image(d, affine(np.eye(3), [1, 1, 1], [0, 0, 0]))
img.header.set_data_dtype(np.int16)
img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 100))
save("i16_extension.nii", img)

# NaN scl_slope: nibabel reads it as no scaling
name = "i16_nan_slope.nii"
d = rng.integers(-100, 100, shape).astype(np.int16)
img = nib.Nifti1Image(d, affine(np.eye(3), [1, 1, 1], [0, 0, 0]))
img.header.set_data_dtype(np.int16)
nib.save(img, str(out / name))
raw = bytearray((out / name).read_bytes())
struct.pack_into("<ff", raw, 112, float("nan"), 5.0)
(out / name).write_bytes(bytes(raw))
cases.append(name)

expected = {}
for name in cases:
    img = nib.load(str(out / name))
    data = img.get_fdata()
    shp = list(img.shape[:3]) + [1] * (3 - len(img.shape[:3]))
    expected[name] = {
        "shape": shp,
        "spacing_mm": [float(z) for z in img.header.get_zooms()[:3]],
        "affine": img.affine.tolist(),
        "min": float(np.nanmin(data)),
        "max": float(np.nanmax(data)),
        "mean": float(np.mean(data)),
        "sum": float(np.sum(data)),
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
    }
(out / "expected.json").write_text(json.dumps(expected, indent=1))
