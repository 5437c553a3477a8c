"""The compiled extension (`bnexp._kernels`) is built wherever a C compiler is, and refuses calls
that would reach outside its arrays.

The extension is optional in the build (no compiler: NumPy runs the same formulas), and the kernel
tests skip without it; this test keeps that skip from hiding a broken build on a machine that has
a compiler.
"""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest

from bnexp import fused


def test_the_extension_is_built_wherever_a_compiler_is():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the build skips the extension by design")
    assert fused.available(), "bnexp._kernels did not build: run pip install -e . and read why"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_call_with_the_wrong_sizes_is_refused(dtype):
    """Sizes that do not match the arrays, another element type or byte order, a read-only output,
    or a strided array: a Python error, never a write outside the arrays or a misread."""
    if not fused.available():
        pytest.skip("bnexp._kernels was not built")
    kernels, double = fused._compiled, dtype == np.float64
    w, g, m, v = (np.zeros((3, 4), dtype) for _ in range(4))
    rate = np.full(3, 1e-3, dtype)
    constants = (0.9, 0.1, 0.999, 0.001, 0.1, 0.001, 1e-8)
    kernels.adam(w, g, m, v, rate, True, 3, 4, *constants, double)  # the sizes as they are
    with pytest.raises(ValueError, match="bytes"):
        kernels.adam(w, g, m, v, rate, True, 4, 4, *constants, double)
    with pytest.raises(ValueError, match="bytes"):
        kernels.adam(w, g, m, v, rate, True, 3, 4, *constants, not double)
    read_only = w.copy()
    read_only.flags.writeable = False
    with pytest.raises((ValueError, BufferError, TypeError)):
        kernels.adam(read_only, g, m, v, rate, True, 3, 4, *constants, double)
    swapped = w.astype(w.dtype.newbyteorder())
    with pytest.raises(ValueError, match="format"):
        kernels.adam(swapped, g, m, v, rate, True, 3, 4, *constants, double)
    with pytest.raises(ValueError, match="format"):
        kernels.adam(
            w.view(np.int64 if double else np.int32),
            g,
            m,
            v,
            rate,
            True,
            3,
            4,
            *constants,
            double,
        )
    strided = np.zeros((3, 8), dtype)[:, ::2]
    with pytest.raises((ValueError, BufferError, TypeError)):
        kernels.adam(strided, g, m, v, rate, True, 3, 4, *constants, double)
    with pytest.raises(ValueError, match="negative"):  # -3 x -4 would match the arrays' size
        kernels.adam(w, g, m, v, rate, True, -3, -4, *constants, double)
    with pytest.raises(TypeError, match="arguments"):
        kernels.adam(w, g, m, v)
