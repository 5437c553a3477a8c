/* The kernels of bnexp._kernels for one float type, included once per type by _kernels.c with
 * T (the type), SQRT (its square root) and NAME(x) (a type suffix) defined.
 *
 * Each kernel evaluates the NumPy formulas of bnexp.optim and bnexp.layers element by element, in
 * their order and in T, so its results are the same bits: IEEE arithmetic, no fused multiply-add
 * (-ffp-contract=off) and no reassociation (no -ffast-math). Sums over the batch axis add the rows
 * in order into an accumulator that starts at +0, as NumPy's sum(axis=-2) does on a C-contiguous
 * array with D >= 2 (bnexp.fused hands over no other layout). The loops run along contiguous
 * memory, which the compiler vectorizes without changing any element's operations.
 *
 * Arrays are (B, N, D) C-contiguous with per-feature arrays (B, D); `relu` selects what the
 * forward kernels write: NO_RELU the batch-norm output into out; RELU_APART that into out and
 * max(out, 0) into h; RELU_IN_PLACE max(out, 0) only, into out (h unused). The ReLU is
 * np.maximum(o, 0): NaN stays NaN, and -0.0 gives +0.0.
 */

/* One Adam step in place, bnexp.optim._adam_inplace's operations: w, g, m, v are (R, C); lr is
 * (R,) when per_row, else (C,). */
static KERNEL void NAME(adam)(T *restrict w, const T *restrict g, T *restrict m, T *restrict v,
                              const T *restrict lr, int per_row, Py_ssize_t rows, Py_ssize_t cols,
                              T b1, T c1, T b2, T c2, T k1, T k2, T eps)
{
    for (Py_ssize_t i = 0; i < rows; i++) {
        Py_ssize_t o = i * cols;
        for (Py_ssize_t j = 0; j < cols; j++) {
            T r = per_row ? lr[i] : lr[j];
            T gk = g[o + j];
            T mk = b1 * m[o + j] + c1 * gk;
            T vk = b2 * v[o + j] + c2 * (gk * gk);
            m[o + j] = mk;
            v[o + j] = vk;
            w[o + j] = w[o + j] - (mk / k1 * r) / (SQRT(vk / k2) + eps);
        }
    }
}

/* Test mode, layers._batchnorm_inference: out = (x - rm) / sqrt(rv + eps) * g + b.
 * scale: scratch of D elements. */
static KERNEL void NAME(bn_inference)(const T *restrict x, const T *restrict rm,
                                      const T *restrict rv, const T *restrict g,
                                      const T *restrict b, T eps, T *out, T *h, int relu,
                                      Py_ssize_t nb, Py_ssize_t n, Py_ssize_t d, T *restrict scale)
{
    const T zero = eps - eps;
    for (Py_ssize_t k = 0; k < nb; k++) {
        const T *rmk = rm + k * d, *gk = g + k * d, *bk = b + k * d;
        for (Py_ssize_t j = 0; j < d; j++)
            scale[j] = SQRT(rv[k * d + j] + eps);
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t o = (k * n + i) * d;
            STORE_ROW((x[o + j] - rmk[j]) / scale[j] * gk[j] + bk[j]);
        }
    }
}

/* Train/batch mode, the staged forward of layers.batchnorm_forward (batch statistics).
 * x, xmu, xhat, out, h: (B, N, D); g, b: (B, D); n_t: N as T. mean, var, std, inv_std: (B, D)
 * outputs. */
static KERNEL void NAME(bn_batch)(const T *restrict x, const T *restrict g, const T *restrict b,
                                  T eps, T one, T n_t, T *restrict xmu, T *restrict xhat, T *out,
                                  T *h, int relu, T *restrict mean, T *restrict var,
                                  T *restrict std, T *restrict inv_std, Py_ssize_t nb,
                                  Py_ssize_t n, Py_ssize_t d)
{
    const T zero = one - one;
    for (Py_ssize_t k = 0; k < nb; k++) {
        T *mk = mean + k * d, *vk = var + k * d, *sk = std + k * d, *ik = inv_std + k * d;
        const T *gk = g + k * d, *bk = b + k * d;
        for (Py_ssize_t j = 0; j < d; j++)
            mk[j] = zero;
        for (Py_ssize_t i = 0; i < n; i++) {
            const T *xi = x + (k * n + i) * d;
            for (Py_ssize_t j = 0; j < d; j++)
                mk[j] += xi[j];
        }
        for (Py_ssize_t j = 0; j < d; j++) {
            mk[j] = mk[j] / n_t;
            vk[j] = zero;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t o = (k * n + i) * d;
            for (Py_ssize_t j = 0; j < d; j++) {
                T dev = x[o + j] - mk[j];
                xmu[o + j] = dev;
                vk[j] += dev * dev;
            }
        }
        for (Py_ssize_t j = 0; j < d; j++) {
            vk[j] = vk[j] / n_t;
            sk[j] = SQRT(vk[j] + eps);
            ik[j] = one / sk[j];
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t o = (k * n + i) * d;
            for (Py_ssize_t j = 0; j < d; j++)
                xhat[o + j] = xmu[o + j] * ik[j];
            STORE_ROW(gk[j] * xhat[o + j] + bk[j]);
        }
    }
}

/* layers.batchnorm_backward_alt, after layers.relu_backward when `relu` (a: the ReLU's input,
 * unused otherwise; its gradient dout * (a > 0) is formed on the fly, never stored).
 * dout, a, xhat, dx: (B, N, D); inv_std, g: (B, D); dgamma, dbeta: (B, D) outputs. */
static KERNEL void NAME(bn_backward)(const T *restrict dout, const T *restrict a,
                                     const T *restrict xhat, const T *restrict inv_std,
                                     const T *restrict g, T one, T n_t, int relu,
                                     T *restrict dx, T *restrict dgamma, T *restrict dbeta,
                                     Py_ssize_t nb, Py_ssize_t n, Py_ssize_t d)
{
    const T zero = one - one;
    for (Py_ssize_t k = 0; k < nb; k++) {
        T *dgk = dgamma + k * d, *dbk = dbeta + k * d;
        const T *ik = inv_std + k * d, *gk = g + k * d;
        for (Py_ssize_t j = 0; j < d; j++) {
            dbk[j] = zero;
            dgk[j] = zero;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t o = (k * n + i) * d;
            for (Py_ssize_t j = 0; j < d; j++) {
                T dj = relu ? dout[o + j] * (a[o + j] > zero ? one : zero) : dout[o + j];
                dbk[j] += dj;
                dgk[j] += dj * xhat[o + j];
            }
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t o = (k * n + i) * d;
            for (Py_ssize_t j = 0; j < d; j++) {
                T dj = relu ? dout[o + j] * (a[o + j] > zero ? one : zero) : dout[o + j];
                T scale = gk[j] * ik[j];
                dx[o + j] = scale * (dj - dbk[j] / n_t - xhat[o + j] * (dgk[j] / n_t));
            }
        }
    }
}
