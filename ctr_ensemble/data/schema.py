"""The Criteo display-advertising layout: label, I1..I13 (numeric), C1..C26 (categorical)."""

from __future__ import annotations

N_NUM = 13
N_CAT = 26
LABEL = "label"
NUM_COLS = [f"I{i}" for i in range(1, N_NUM + 1)]
CAT_COLS = [f"C{i}" for i in range(1, N_CAT + 1)]
COLUMNS = [LABEL, *NUM_COLS, *CAT_COLS]
