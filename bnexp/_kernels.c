/* bnexp._kernels: the Adam update and batch norm (with the ReLU after it) as compiled loops, built
 * with the package when a C compiler is there (pyproject.toml: an optional extension; without it
 * bnexp.fused reports the kernels missing and NumPy runs the same formulas).
 *
 * The kernels themselves are in _kernels_body.h, once for float and once for double. This file
 * holds the Python entry points: each takes NumPy arrays through the buffer protocol
 * (C-contiguous, checked against the sizes it is given), the sizes, and the scalars as Python
 * floats, which it rounds once to the arrays' type as NumPy does with a Python float against a
 * float32 array. bnexp.fused checks layouts and dtypes before calling; the checks here only keep
 * a wrong call from touching memory outside the arrays. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

enum { NO_RELU = 0, RELU_APART = 1, RELU_IN_PLACE = 2 };

/* Each kernel is compiled for AVX2 as well as the baseline where GCC can pick one at load time
 * (an ifunc): the arithmetic is the same IEEE operations in both, only wider. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL
#endif

/* A forward kernel's row of batch-norm outputs `expr` (a function of j) at offset o, written as
 * `relu` says; one loop per mode so that each one vectorizes. */
#define STORE_ROW(expr)                                                                        \
    do {                                                                                       \
        if (relu == RELU_IN_PLACE) {                                                           \
            for (Py_ssize_t j = 0; j < d; j++) {                                               \
                T val = (expr);                                                                \
                out[o + j] = val <= zero ? zero : val;                                         \
            }                                                                                  \
        } else if (relu == RELU_APART) {                                                       \
            for (Py_ssize_t j = 0; j < d; j++) {                                               \
                T val = (expr);                                                                \
                out[o + j] = val;                                                              \
                h[o + j] = val <= zero ? zero : val;                                           \
            }                                                                                  \
        } else {                                                                               \
            for (Py_ssize_t j = 0; j < d; j++)                                                 \
                out[o + j] = (expr);                                                           \
        }                                                                                      \
    } while (0)

#define T float
#define SQRT sqrtf
#define NAME(x) x##_f32
#include "_kernels_body.h"
#undef T
#undef SQRT
#undef NAME

#define T double
#define SQRT sqrt
#define NAME(x) x##_f64
#include "_kernels_body.h"
#undef T
#undef SQRT
#undef NAME

/* ------------------------------------------------------------------------------------------ */
/* argument handling                                                                          */
/* ------------------------------------------------------------------------------------------ */

#define MAX_ARRAYS 11

/* The buffers a call holds, released together. */
typedef struct {
    Py_buffer views[MAX_ARRAYS];
    int count;
} Held;

static void release(Held *held)
{
    for (int i = 0; i < held->count; i++)
        PyBuffer_Release(&held->views[i]);
    held->count = 0;
}

/* The data of `obj`, a C-contiguous buffer of exactly `items` native floats (float when
 * itemsize is 4, double when 8; writable when asked), held in `held`; NULL with a Python error
 * otherwise. */
static void *array(PyObject *obj, Py_ssize_t items, Py_ssize_t itemsize, int writable, Held *held)
{
    Py_buffer *view = &held->views[held->count];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return NULL;
    held->count++;
    if (view->len != items * itemsize || view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "bnexp._kernels: an array of %zd bytes where %zd x %zd "
                     "were expected", view->len, items, itemsize);
        return NULL;
    }
    const char *format = view->format ? view->format : "B";
    if (strcmp(format, itemsize == sizeof(double) ? "d" : "f") != 0) {
        PyErr_Format(PyExc_ValueError, "bnexp._kernels: an array of format '%s' where native "
                     "float%d was expected", format, (int)(8 * itemsize));
        return NULL;
    }
    return view->buf;
}

static int check_count(Py_ssize_t nargs, Py_ssize_t want, const char *name)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "bnexp._kernels.%s takes %zd arguments (%zd given)", name, want,
                 nargs);
    return -1;
}

/* Sizes and flags: Python ints; scalars: Python floats (or anything float() takes). */
#define SIZE(i) PyLong_AsSsize_t(args[i])
#define SCALAR(i) PyFloat_AsDouble(args[i])
#define GOT_ERROR() (PyErr_Occurred() != NULL)

/* adam(w, g, m, v, lr, per_row, rows, cols, b1, c1, b2, c2, k1, k2, eps, double) */
static PyObject *py_adam(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_count(nargs, 16, "adam") < 0)
        return NULL;
    int per_row = PyObject_IsTrue(args[5]), dbl = PyObject_IsTrue(args[15]);
    Py_ssize_t rows = SIZE(6), cols = SIZE(7);
    double c[7];
    for (int i = 0; i < 7; i++)
        c[i] = SCALAR(8 + i);
    if (GOT_ERROR() || per_row < 0 || dbl < 0)
        return NULL;
    Py_ssize_t size = dbl ? sizeof(double) : sizeof(float), n = rows * cols;
    Held held = {.count = 0};
    void *w = array(args[0], n, size, 1, &held);
    void *g = w ? array(args[1], n, size, 0, &held) : NULL;
    void *m = g ? array(args[2], n, size, 1, &held) : NULL;
    void *v = m ? array(args[3], n, size, 1, &held) : NULL;
    void *lr = v ? array(args[4], per_row ? rows : cols, size, 0, &held) : NULL;
    if (lr == NULL) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        adam_f64(w, g, m, v, lr, per_row, rows, cols, c[0], c[1], c[2], c[3], c[4], c[5], c[6]);
    else
        adam_f32(w, g, m, v, lr, per_row, rows, cols, (float)c[0], (float)c[1], (float)c[2],
                 (float)c[3], (float)c[4], (float)c[5], (float)c[6]);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* bn_inference(x, rm, rv, g, b, eps, out, h, relu, B, N, D, double) */
static PyObject *py_bn_inference(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_count(nargs, 13, "bn_inference") < 0)
        return NULL;
    double eps = SCALAR(5);
    Py_ssize_t relu = SIZE(8), nb = SIZE(9), n = SIZE(10), d = SIZE(11);
    int dbl = PyObject_IsTrue(args[12]);
    if (GOT_ERROR() || dbl < 0)
        return NULL;
    Py_ssize_t size = dbl ? sizeof(double) : sizeof(float), full = nb * n * d, feat = nb * d;
    Held held = {.count = 0};
    void *p[8] = {NULL};
    Py_ssize_t items[8] = {full, feat, feat, feat, feat, 0, full, full};
    int ok = 1;
    for (int i = 0; i < 8 && ok; i++)
        if (i != 5)
            ok = (p[i] = array(args[i], items[i], size, i >= 6, &held)) != NULL;
    void *scale = ok ? PyMem_RawMalloc(d * size + 1) : NULL;
    if (scale == NULL) {
        release(&held);
        return ok ? PyErr_NoMemory() : NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        bn_inference_f64(p[0], p[1], p[2], p[3], p[4], eps, p[6], p[7], (int)relu, nb, n, d,
                         scale);
    else
        bn_inference_f32(p[0], p[1], p[2], p[3], p[4], (float)eps, p[6], p[7], (int)relu, nb, n,
                         d, scale);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scale);
    release(&held);
    Py_RETURN_NONE;
}

/* bn_batch(x, g, b, eps, one, n_t, xmu, xhat, out, h, relu, mean, var, std, inv_std, B, N, D,
 *          double) */
static PyObject *py_bn_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_count(nargs, 19, "bn_batch") < 0)
        return NULL;
    double eps = SCALAR(3), one = SCALAR(4), n_t = SCALAR(5);
    Py_ssize_t relu = SIZE(10), nb = SIZE(15), n = SIZE(16), d = SIZE(17);
    int dbl = PyObject_IsTrue(args[18]);
    if (GOT_ERROR() || dbl < 0)
        return NULL;
    Py_ssize_t size = dbl ? sizeof(double) : sizeof(float), full = nb * n * d, feat = nb * d;
    /* argument index -> elements (0: a scalar or a size, not an array), writable */
    static const int index[] = {0, 1, 2, 6, 7, 8, 9, 11, 12, 13, 14};
    Held held = {.count = 0};
    void *p[15] = {NULL};
    int ok = 1;
    for (int i = 0; i < 11 && ok; i++) {
        int at = index[i];
        int is_full = at == 0 || (at >= 6 && at <= 9), writable = at >= 6;
        ok = (p[at] = array(args[at], is_full ? full : feat, size, writable, &held)) != NULL;
    }
    if (!ok) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        bn_batch_f64(p[0], p[1], p[2], eps, one, n_t, p[6], p[7], p[8], p[9], (int)relu, p[11],
                     p[12], p[13], p[14], nb, n, d);
    else
        bn_batch_f32(p[0], p[1], p[2], (float)eps, (float)one, (float)n_t, p[6], p[7], p[8],
                     p[9], (int)relu, p[11], p[12], p[13], p[14], nb, n, d);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* bn_backward(dout, a, xhat, inv_std, g, one, n_t, relu, dx, dgamma, dbeta, B, N, D, double) */
static PyObject *py_bn_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_count(nargs, 15, "bn_backward") < 0)
        return NULL;
    double one = SCALAR(5), n_t = SCALAR(6);
    int relu = PyObject_IsTrue(args[7]), dbl = PyObject_IsTrue(args[14]);
    Py_ssize_t nb = SIZE(11), n = SIZE(12), d = SIZE(13);
    if (GOT_ERROR() || relu < 0 || dbl < 0)
        return NULL;
    Py_ssize_t size = dbl ? sizeof(double) : sizeof(float), full = nb * n * d, feat = nb * d;
    static const int index[] = {0, 1, 2, 3, 4, 8, 9, 10};
    Held held = {.count = 0};
    void *p[11] = {NULL};
    int ok = 1;
    for (int i = 0; i < 8 && ok; i++) {
        int at = index[i];
        int is_full = at <= 2 || at == 8, writable = at >= 8;
        ok = (p[at] = array(args[at], is_full ? full : feat, size, writable, &held)) != NULL;
    }
    if (!ok) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        bn_backward_f64(p[0], p[1], p[2], p[3], p[4], one, n_t, relu, p[8], p[9], p[10], nb, n, d);
    else
        bn_backward_f32(p[0], p[1], p[2], p[3], p[4], (float)one, (float)n_t, relu, p[8], p[9],
                        p[10], nb, n, d);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"adam", (PyCFunction)(void (*)(void))py_adam, METH_FASTCALL,
     "adam(w, g, m, v, lr, per_row, rows, cols, b1, c1, b2, c2, k1, k2, eps, double)"},
    {"bn_inference", (PyCFunction)(void (*)(void))py_bn_inference, METH_FASTCALL,
     "bn_inference(x, rm, rv, g, b, eps, out, h, relu, B, N, D, double)"},
    {"bn_batch", (PyCFunction)(void (*)(void))py_bn_batch, METH_FASTCALL,
     "bn_batch(x, g, b, eps, one, n, xmu, xhat, out, h, relu, mean, var, std, inv_std, B, N, D, "
     "double)"},
    {"bn_backward", (PyCFunction)(void (*)(void))py_bn_backward, METH_FASTCALL,
     "bn_backward(dout, a, xhat, inv_std, g, one, n, relu, dx, dgamma, dbeta, B, N, D, double)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_kernels",
    .m_doc = "Compiled Adam and batch-norm (+ ReLU) kernels behind bnexp.fused (see _kernels.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    /* The forward kernels' `relu` modes, for bnexp.fused to pass. */
    if (PyModule_AddIntConstant(mod, "NO_RELU", NO_RELU) < 0 ||
        PyModule_AddIntConstant(mod, "RELU_APART", RELU_APART) < 0 ||
        PyModule_AddIntConstant(mod, "RELU_IN_PLACE", RELU_IN_PLACE) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
