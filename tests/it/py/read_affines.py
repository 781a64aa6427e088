"""Prints, for each NIfTI file given, what nibabel reads: affine, codes, dtype, unique values."""
import json
import sys

import nibabel as nib
import numpy as np

out = {}
for path in sys.argv[1:]:
    img = nib.load(path)
    h = img.header
    out[path] = {
        "affine": img.affine.tolist(),
        "qform_code": int(h["qform_code"]),
        "sform_code": int(h["sform_code"]),
        "qform": h.get_qform().tolist(),
        "sform": h.get_sform().tolist(),
        "dtype": str(h.get_data_dtype()),
        "shape": list(img.shape),
        "values": sorted(int(v) for v in np.unique(np.asarray(img.dataobj))) if h.get_data_dtype().kind in "iu" else None,
    }
print(json.dumps(out))
