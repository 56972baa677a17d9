"""The patch model's pooling chosen from normal images alone: per position or position-free.

A position-free patch Gaussian (one for every patch) assumes nothing about where the parts
of a product lie; a per-position one (PaDiM) knows what is normal at each place. Where the
picture's framing shows (crop and tile edges, fixtures, vignetting, the backbone's zero
padding), the border's patches are normal only at the border: a position-free model, which
fits them together with the far more numerous inner patches, scores them as rare, and its
map maximum then measures the frame instead of the product.

That shows on the normals themselves. Each held-out normal is scored out of fold by the
position-free model, and the cell where its score grid peaks is taken. Where the frame
dominates, most normals peak on the outermost ring of cells (96% of magnetic-tile crops);
where it does not, few do (the ring is 9% of a 44 x 44 grid: 0% of fryum, 12% of capsules,
measured at 352 px). More than half on the ring chooses the per-position model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BORDER_PEAK_LIMIT = 0.5
"""The share of normals whose position-free map peaks on the border ring above which the
per-position model is chosen."""
MIN_GRID = 3
"""The smallest grid with an inner cell: on smaller ones every cell is on the border, the
rule says nothing and the position-free model is kept."""


def peaks_on_border(score_maps: np.ndarray) -> np.ndarray:
    """(n,) bool: whether each (g, g) score grid of ``score_maps`` peaks on its outermost
    ring of cells.

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.pooling import peaks_on_border
    >>> maps = np.zeros((2, 4, 4))
    >>> maps[0, 0, 2] = 1.0  # first row: the border
    >>> maps[1, 1, 2] = 1.0  # an inner cell
    >>> peaks_on_border(maps).tolist()
    [True, False]
    """
    score_maps = np.asarray(score_maps)
    n, rows, columns = score_maps.shape
    row, column = np.unravel_index(score_maps.reshape(n, -1).argmax(axis=1), (rows, columns))
    return (row == 0) | (row == rows - 1) | (column == 0) | (column == columns - 1)


@dataclass(frozen=True)
class PoolChoice:
    """The pooling chosen for a patch model, and the evidence.

    ``radius`` is the chosen ``pool_radius`` (0 per position, None position-free);
    ``border_peak_share`` the share of the ``n_images`` out-of-fold normals whose
    position-free score grid peaked on the border ring (NaN on grids under ``MIN_GRID``).

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.pooling import PoolChoice
    >>> PoolChoice.from_peaks(np.array([True, True, False]), grid=44).radius
    0
    >>> print(PoolChoice.from_peaks(np.array([True, False, False]), grid=44).radius)
    None
    """

    radius: int | None
    border_peak_share: float
    n_images: int

    @classmethod
    def from_peaks(cls, on_border: np.ndarray, grid: int) -> PoolChoice:
        """Choose from the normals' :func:`peaks_on_border` on a ``grid`` x ``grid`` map."""
        on_border = np.asarray(on_border, dtype=bool)
        if grid < MIN_GRID or not on_border.size:
            return cls(None, float("nan"), int(on_border.size))
        share = float(on_border.mean())
        return cls(0 if share > BORDER_PEAK_LIMIT else None, share, int(on_border.size))

    @property
    def label(self) -> str:
        """ "per-position" or "position-free"."""
        return "per-position" if self.radius == 0 else "position-free"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None); :meth:`from_dict` inverts it."""
        share = self.border_peak_share
        return {
            "radius": self.radius,
            "border_peak_share": None if np.isnan(share) else share,
            "n_images": self.n_images,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolChoice:
        share = data.get("border_peak_share")
        return cls(data["radius"], float("nan") if share is None else share, data["n_images"])
