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

#define MAX_ARGS 20

/* The buffers a call holds, released together. */
typedef struct {
    Py_buffer views[MAX_ARGS];
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

/* The call's arguments, read by `parse`: its arrays' data, its numbers, and the buffers held. */
typedef struct {
    void *data[MAX_ARGS];
    double num[MAX_ARGS];
    Py_ssize_t itemsize; /* 8: the arrays are double, 4: float */
    Held held;
} Args;

/* Read the arguments as `spec` says, one letter per argument: 'r' an array read, 'w' an array
 * written (counts[i] elements each), 'd' a number (a Python float, or anything float() takes),
 * 'n' a size (a non-negative Python int), 'b' a flag. The last argument is always the flag
 * `double`. Numbers, sizes and flags go to a->num; `counts` is called once they are read, to
 * give each array's element count from them. 0, or -1 with a Python error and nothing held. */
static int parse(PyObject *const *args, Py_ssize_t nargs, const char *name, const char *spec,
                 void (*counts)(const double *num, Py_ssize_t *out), Args *a)
{
    Py_ssize_t want = (Py_ssize_t)strlen(spec);
    a->held.count = 0;
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "bnexp._kernels.%s takes %zd arguments (%zd given)", name,
                     want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        if (spec[i] == 'd') {
            a->num[i] = PyFloat_AsDouble(args[i]);
        } else if (spec[i] == 'n') {
            Py_ssize_t size = PyLong_AsSsize_t(args[i]);
            if (size < 0 && !PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "bnexp._kernels.%s: a negative size", name);
            a->num[i] = (double)size;
        } else if (spec[i] == 'b') {
            a->num[i] = PyObject_IsTrue(args[i]);
        }
        if (PyErr_Occurred() || (spec[i] == 'b' && a->num[i] < 0))
            return -1;
    }
    a->itemsize = a->num[want - 1] ? sizeof(double) : sizeof(float);
    Py_ssize_t items[MAX_ARGS] = {0};
    counts(a->num, items);
    for (Py_ssize_t i = 0; i < want; i++) {
        if (spec[i] != 'r' && spec[i] != 'w')
            continue;
        a->data[i] = array(args[i], items[i], a->itemsize, spec[i] == 'w', &a->held);
        if (a->data[i] == NULL) {
            release(&a->held);
            return -1;
        }
    }
    return 0;
}

#define IS_DOUBLE(a) ((a).itemsize == sizeof(double))
#define SIZE(a, i) ((Py_ssize_t)(a).num[i])
/* In a counts function: the size read at argument i. */
#define AT(i) ((Py_ssize_t)num[i])

/* adam(w, g, m, v, lr, per_row, rows, cols, b1, c1, b2, c2, k1, k2, eps, double) */
static void adam_counts(const double *num, Py_ssize_t *out)
{
    out[0] = out[1] = out[2] = out[3] = AT(6) * AT(7);
    out[4] = num[5] ? AT(6) : AT(7);
}

static PyObject *py_adam(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Args a;
    if (parse(args, nargs, "adam", "wrwwrbnndddddddb", adam_counts, &a) < 0)
        return NULL;
    void **p = a.data;
    const double *c = a.num + 8;
    int per_row = (int)a.num[5];
    Py_ssize_t rows = SIZE(a, 6), cols = SIZE(a, 7);
    Py_BEGIN_ALLOW_THREADS
    if (IS_DOUBLE(a))
        adam_f64(p[0], p[1], p[2], p[3], p[4], per_row, rows, cols, c[0], c[1], c[2], c[3], c[4],
                 c[5], c[6]);
    else
        adam_f32(p[0], p[1], p[2], p[3], p[4], per_row, rows, cols, (float)c[0], (float)c[1],
                 (float)c[2], (float)c[3], (float)c[4], (float)c[5], (float)c[6]);
    Py_END_ALLOW_THREADS
    release(&a.held);
    Py_RETURN_NONE;
}

/* bn_inference(x, rm, rv, g, b, eps, out, h, relu, B, N, D, double) */
static void bn_inference_counts(const double *num, Py_ssize_t *out)
{
    Py_ssize_t full = AT(9) * AT(10) * AT(11), feat = AT(9) * AT(11);
    out[0] = out[6] = out[7] = full;
    out[1] = out[2] = out[3] = out[4] = feat;
}

static PyObject *py_bn_inference(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Args a;
    if (parse(args, nargs, "bn_inference", "rrrrrdwwnnnnb", bn_inference_counts, &a) < 0)
        return NULL;
    void **p = a.data;
    int relu = (int)a.num[8];
    Py_ssize_t nb = SIZE(a, 9), n = SIZE(a, 10), d = SIZE(a, 11);
    void *scale = PyMem_RawMalloc(d * a.itemsize + 1); /* sqrt(rv + eps) of one network */
    if (scale == NULL) {
        release(&a.held);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (IS_DOUBLE(a))
        bn_inference_f64(p[0], p[1], p[2], p[3], p[4], a.num[5], p[6], p[7], relu, nb, n, d,
                         scale);
    else
        bn_inference_f32(p[0], p[1], p[2], p[3], p[4], (float)a.num[5], p[6], p[7], relu, nb, n,
                         d, scale);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scale);
    release(&a.held);
    Py_RETURN_NONE;
}

/* bn_batch(x, g, b, eps, one, n_t, xmu, xhat, out, h, relu, mean, var, std, inv_std, B, N, D,
 *          double) */
static void bn_batch_counts(const double *num, Py_ssize_t *out)
{
    Py_ssize_t full = AT(15) * AT(16) * AT(17), feat = AT(15) * AT(17);
    out[0] = out[6] = out[7] = out[8] = out[9] = full;
    out[1] = out[2] = out[11] = out[12] = out[13] = out[14] = feat;
}

static PyObject *py_bn_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Args a;
    if (parse(args, nargs, "bn_batch", "rrrdddwwwwnwwwwnnnb", bn_batch_counts, &a) < 0)
        return NULL;
    void **p = a.data;
    const double *c = a.num + 3; /* eps, one, n_t */
    int relu = (int)a.num[10];
    Py_ssize_t nb = SIZE(a, 15), n = SIZE(a, 16), d = SIZE(a, 17);
    Py_BEGIN_ALLOW_THREADS
    if (IS_DOUBLE(a))
        bn_batch_f64(p[0], p[1], p[2], c[0], c[1], c[2], p[6], p[7], p[8], p[9], relu, p[11],
                     p[12], p[13], p[14], nb, n, d);
    else
        bn_batch_f32(p[0], p[1], p[2], (float)c[0], (float)c[1], (float)c[2], p[6], p[7], p[8],
                     p[9], relu, p[11], p[12], p[13], p[14], nb, n, d);
    Py_END_ALLOW_THREADS
    release(&a.held);
    Py_RETURN_NONE;
}

/* bn_backward(dout, a, xhat, inv_std, g, one, n_t, relu, dx, dgamma, dbeta, B, N, D, double) */
static void bn_backward_counts(const double *num, Py_ssize_t *out)
{
    Py_ssize_t full = AT(11) * AT(12) * AT(13), feat = AT(11) * AT(13);
    out[0] = out[1] = out[2] = out[8] = full;
    out[3] = out[4] = out[9] = out[10] = feat;
}

static PyObject *py_bn_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Args a;
    if (parse(args, nargs, "bn_backward", "rrrrrddbwwwnnnb", bn_backward_counts, &a) < 0)
        return NULL;
    void **p = a.data;
    int relu = (int)a.num[7];
    Py_ssize_t nb = SIZE(a, 11), n = SIZE(a, 12), d = SIZE(a, 13);
    Py_BEGIN_ALLOW_THREADS
    if (IS_DOUBLE(a))
        bn_backward_f64(p[0], p[1], p[2], p[3], p[4], a.num[5], a.num[6], relu, p[8], p[9],
                        p[10], nb, n, d);
    else
        bn_backward_f32(p[0], p[1], p[2], p[3], p[4], (float)a.num[5], (float)a.num[6], relu,
                        p[8], p[9], p[10], nb, n, d);
    Py_END_ALLOW_THREADS
    release(&a.held);
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
