"""The compiled Adam kernel behind `bnexp.fused` (importing this module imports numba).

One module-level function, so that numba's on-disk cache finds it again in the next process
(each cached function costs load time at start-up, hence one function for both layouts).
"""

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy", nogil=True)
def adam(w, g, m, v, lr, per_row, b1, c1, b2, c2, k1, k2, eps):  # pragma: no cover - compiled
    """One Adam step in place: w, g, m, v are (R, C) C-contiguous; lr is (R,) when `per_row`,
    else (C,). Each element gets bnexp.optim._adam_inplace's operations in its order and dtype.

    The inner loop reads contiguous memory and a rate that is fixed (per row) or contiguous (per
    column), which the compiler vectorizes.
    """
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            rate = lr[i] if per_row else lr[j]
            mk = b1 * m[i, j] + c1 * g[i, j]
            vk = b2 * v[i, j] + c2 * (g[i, j] * g[i, j])
            m[i, j] = mk
            v[i, j] = vk
            w[i, j] = w[i, j] - (mk / k1 * rate) / (np.sqrt(vk / k2) + eps)
