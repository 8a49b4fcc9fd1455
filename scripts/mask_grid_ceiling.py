"""How well a mask decoder with a GRID x GRID logit map can do at best: the mean Dice it reaches.

PRS-Med's decoder upsamples its token-grid logits bilinearly (align_corners=True) to the mask size.
For each test mask this fits the best such logit map (Adam on BCE + soft Dice, 1500 steps) and
reports the Dice of its 0.5 threshold. Each map is fitted to its own mask (nothing to generalise),
so a trained decoder at that grid stays below this estimate.

    python scripts/mask_grid_ceiling.py DATA_ROOT [GRID]    # needs numpy and pillow

BENCHMARKS.md (session 5): on the demo's 60 test masks, 0.928 at 8x8 and 0.979 at 16x16.
"""
import glob
import sys

import numpy as np
from PIL import Image


def interp(n_out, n_in):
    # align_corners=True bilinear
    A = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = i * (n_in - 1) / (n_out - 1)
        j = min(int(np.floor(x)), n_in - 2); f = x - j
        A[i, j] += 1 - f; A[i, j + 1] += f
    return A


root = sys.argv[1]; grid = int(sys.argv[2]) if len(sys.argv) > 2 else 8
files = sorted(glob.glob(root + "/*/test_masks/*.png"))
dices = []; sizes = []
for f in files:
    M = (np.array(Image.open(f).convert("L")) > 127).astype(float)
    n = M.shape[0]; A = interp(n, grid)
    L = np.zeros((grid, grid)); m = np.zeros_like(L); v = np.zeros_like(L)
    for t in range(1, 1501):
        Z = A @ L @ A.T; P = 1 / (1 + np.exp(-Z))
        inter = (P * M).sum(); den = P.sum() + M.sum()
        # BCE + soft dice grads wrt Z
        gz = (P - M) / M.size
        gd = -(2 * M * den - 2 * inter) / den**2 * P * (1 - P)
        g = A.T @ (gz * 10 + gd) @ A
        m = 0.9 * m + 0.1 * g; v = 0.999 * v + 0.001 * g * g
        L -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    Z = A @ L @ A.T; B = Z > 0
    d = 2 * (B * M).sum() / (B.sum() + M.sum())
    dices.append(d); sizes.append(M.sum())
dices = np.array(dices); sizes = np.array(sizes)
print(f"grid {grid}: n={len(dices)} mean Dice ceiling {dices.mean():.4f} min {dices.min():.3f}")
o = np.argsort(sizes)
for q in np.array_split(o, 4):
    print(f"  area {sizes[q].min():.0f}-{sizes[q].max():.0f}: {dices[q].mean():.3f}")
