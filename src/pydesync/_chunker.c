/*
 * The content-defined chunkers: casync's buzhash (the hot loop of pydesync) and, at the end,
 * CAFS's rolling sum (remotesync's CAFS mode). Both are byte-by-byte scans that need C speed.
 *
 * The buzhash scan is stateless: a chunk's cut depends only on the chunk's own bytes
 * (the 48-byte window never crosses a cut), so the caller hands in a buffer
 * and the offset where the current chunk starts, and gets back every cut that
 * can be decided inside that buffer. Undecided tails are rescanned by the
 * caller once more data has arrived, which keeps boundaries independent of
 * read sizes. The GIL is released while scanning.
 *
 * Cut rule (casync's shall_break in cachunker.c): with L the chunk length after appending a byte,
 * cut after it iff L >= max, or L >= max(min, 48) and
 * H(last 48 bytes) mod d == d - 1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_buzhash_table.h"

#define WINDOW 48

/* buzhash_table rotated left by 48 mod 32 = 16: the term of the byte leaving. */
static uint32_t buzhash_out[256];

static inline uint32_t rol32(uint32_t x, unsigned n)
{
    n &= 31;
    return n ? (x << n) | (x >> (32 - n)) : x;
}

/* From-scratch hash of the window ending just before p. */
static uint32_t hash_window(const uint8_t *p)
{
    uint32_t h = 0;
    for (int i = 0; i < WINDOW; i++)
        h ^= rol32(buzhash_table[p[i - WINDOW]], (unsigned)(WINDOW - 1 - i));
    return h;
}

typedef struct {
    Py_ssize_t min, max;
    uint32_t d;        /* discriminator, already clamped */
    uint64_t d_magic;  /* Lemire's divisibility constant: ceil(2^64 / d) */
} params_t;

/*
 * Fast filter for h mod d == d - 1, i.e. d divides h + 1 (Lemire, Kaser, Kurz:
 * "Faster remainder by direct computation"): n * c <= c - 1 exactly when d | n,
 * for every 32-bit n. n = h + 1 can be 2^32, where the filter may say yes
 * wrongly (never wrongly no), so every yes is confirmed with a real modulo.
 */
static inline int maybe_cut(uint32_t h, const params_t *pr)
{
    return ((uint64_t)h + 1) * pr->d_magic <= pr->d_magic - 1;
}

static inline int is_cut(uint32_t h, const params_t *pr)
{
    return maybe_cut(h, pr) && h % pr->d == pr->d - 1;
}

static inline uint32_t roll(uint32_t h, const uint8_t *b, Py_ssize_t p)
{
    return rol32(h, 1) ^ buzhash_out[b[p - WINDOW]] ^ buzhash_table[b[p]];
}

/*
 * Find the first cut in (p, limit] for a chunk whose window [p-48, p) hashes to h
 * (testing p itself first). Returns -1 if there is none. Eight bytes per
 * iteration with one branch: the filter results are OR-ed and only a block
 * that may hold a cut is looked at byte by byte.
 */
static Py_ssize_t first_cut(const uint8_t *b, Py_ssize_t p, Py_ssize_t limit, uint32_t h,
                            const params_t *pr)
{
    if (is_cut(h, pr))
        return p;
    while (limit - p >= 8) {
        uint32_t hv[8];
        int any = 0;
#define STEP(j) h = roll(h, b, p + (j)); hv[j] = h; any |= maybe_cut(h, pr);
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
#undef STEP
        if (__builtin_expect(any, 0)) {
            for (int j = 0; j < 8; j++)
                if (is_cut(hv[j], pr))
                    return p + j + 1;
        }
        p += 8;
    }
    while (p < limit) {
        h = roll(h, b, p);
        p++;
        if (is_cut(h, pr))
            return p;
    }
    return -1;
}

/*
 * Scan b[s:end). Appends absolute cut offsets to cuts[] and returns how many.
 * Stops when the rest cannot be decided without more data (unless final).
 */
static Py_ssize_t scan(const uint8_t *b, Py_ssize_t s, Py_ssize_t end, const params_t *pr,
                       int final, Py_ssize_t *cuts)
{
    Py_ssize_t n = 0;
    const Py_ssize_t first_test = pr->min > WINDOW ? pr->min : WINDOW;
    const int hashless = first_test >= pr->max; /* fixed size, or max too small to hash */

    while (s < end) {
        Py_ssize_t avail = end - s;
        if (hashless) {
            if (avail >= pr->max) {
                s += pr->max;
            } else if (final) {
                s = end;
            } else {
                break;
            }
            cuts[n++] = s;
            continue;
        }
        Py_ssize_t limit = avail >= pr->max ? s + pr->max : end;
        Py_ssize_t p = s + first_test;
        if (p > limit) {
            if (!final)
                break;
            s = end;
            cuts[n++] = s;
            continue;
        }
        Py_ssize_t cut = first_cut(b, p, limit, hash_window(b + p), pr);
        if (cut < 0) {
            if (limit == s + pr->max || final)
                cut = limit;
            else
                break;
        }
        s = cut;
        cuts[n++] = s;
    }
    return n;
}

PyDoc_STRVAR(find_cuts_doc,
"find_cuts(buffer, start, end, min, max, discriminator, final) -> list[int]\n\n"
"Return the end offsets (relative to buffer) of every chunk that starts at\n"
"`start` or at a later cut and can be decided within buffer[:end]. With\n"
"final=True the remainder becomes the last chunk.");

static PyObject *find_cuts(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, min, max, disc;
    int final;
    if (!PyArg_ParseTuple(args, "y*nnnnnp", &view, &start, &end, &min, &max, &disc, &final))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t *cuts = NULL;
    if (start < 0 || end < start || end > view.len) {
        PyErr_SetString(PyExc_ValueError, "find_cuts: start/end out of range");
        goto done;
    }
    if (min < 1 || max < min || disc < 1 || disc > 0xffffffffLL) {
        PyErr_SetString(PyExc_ValueError, "find_cuts: invalid chunk size parameters");
        goto done;
    }
    params_t pr;
    pr.min = min;
    pr.max = max;
    pr.d = (uint32_t)disc;
    pr.d_magic = UINT64_C(0xFFFFFFFFFFFFFFFF) / pr.d + 1;
    Py_ssize_t step = min > WINDOW ? min : WINDOW;
    if (step > max)
        step = max;
    Py_ssize_t cap = (end - start) / step + 2;
    cuts = PyMem_RawMalloc((size_t)cap * sizeof(Py_ssize_t));
    if (!cuts) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = scan((const uint8_t *)view.buf, start, end, &pr, final, cuts);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (!result)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromSsize_t(cuts[i]);
        if (!v) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, v);
    }
done:
    PyMem_RawFree(cuts);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(buzhash_doc, "buzhash(window) -> int\n\nHash of a 48-byte window (for tests).");

static PyObject *buzhash(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    if (view.len != WINDOW) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buzhash: window must be 48 bytes");
        return NULL;
    }
    uint32_t h = hash_window((const uint8_t *)view.buf + WINDOW);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(h);
}

PyDoc_STRVAR(is_zero_doc, "is_zero(buffer) -> bool\n\nWhether every byte is zero (finds all-zero chunks).");

static PyObject *is_zero(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    const uint8_t *p = view.buf;
    Py_ssize_t n = view.len;
    int zero = n == 0 || (p[0] == 0 && memcmp(p, p + 1, (size_t)n - 1) == 0);
    PyBuffer_Release(&view);
    return PyBool_FromLong(zero);
}

/* ---- CAFS's chunker (remotesync's CAFS mode) ----------------------------------------------------
 * An Adler-32 style rolling sum over a 48-byte window: s1 = 1 + sum of the window's bytes, s2 =
 * the sum of the running s1 values, both mod 65521; the checksum is s2 << 16 | s1. Each chunk
 * starts from a fresh state with its first byte. Once a chunk has 48 bytes, every further byte
 * rolls the oldest one out; the chunk ends *before* that byte when, with it counted, the chunk
 * would exceed 128 bytes and the checksum mod 8191 is 4159, or would exceed 128 KiB.
 */
#define CAFS_MOD 65521u
#define CAFS_WINDOW 48
#define CAFS_MIN 128
#define CAFS_MAX 131072

PyDoc_STRVAR(cafs_cuts_doc,
"cafs_cuts(buffer, start) -> list of chunk end offsets\n\n"
"Every chunk boundary CAFS's chunker finds in buffer for chunks starting at `start` (each\n"
"chunk is scanned from a fresh state, so boundaries do not depend on how the data is split).\n"
"Bytes after the last offset are undecided until more data (or the end) is known.");

static PyObject *cafs_cuts(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "y*n", &view, &start))
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t len = view.len, cap = 64, count = 0;
    Py_ssize_t *cuts = PyMem_RawMalloc(cap * sizeof *cuts);
    if (cuts == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t chunk = start;
    while (chunk < len && !failed) {
        uint32_t s1 = 1, s2 = 0;
        Py_ssize_t limit = len - chunk, j, cut = -1;
        Py_ssize_t fill = limit < CAFS_WINDOW ? limit : CAFS_WINDOW;
        const unsigned char *c = data + chunk;
        for (j = 0; j < fill; j++) {
            s1 = (s1 + c[j]) % CAFS_MOD;
            s2 = (s2 + s1) % CAFS_MOD;
        }
        for (; j < limit; j++) {
            uint32_t out = c[j - CAFS_WINDOW];
            s1 = (s1 + CAFS_MOD - out) % CAFS_MOD;
            s2 = (s2 + 2 * CAFS_MOD * CAFS_WINDOW - CAFS_WINDOW * out - 1) % CAFS_MOD;
            s1 = (s1 + c[j]) % CAFS_MOD;
            s2 = (s2 + s1) % CAFS_MOD;
            Py_ssize_t n = j + 1;
            if ((n > CAFS_MIN && ((s2 << 16) | s1) % 8191u == 4159u) || n > CAFS_MAX) {
                cut = j;  /* the chunk is c[0:j]; c[j] starts the next */
                break;
            }
        }
        if (cut < 0)
            break;
        if (count == cap) {
            cap *= 2;
            Py_ssize_t *more = PyMem_RawRealloc(cuts, cap * sizeof *cuts);
            if (more == NULL) {
                failed = 1;
                break;
            }
            cuts = more;
        }
        chunk += cut;
        cuts[count++] = chunk;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (failed) {
        PyMem_RawFree(cuts);
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New(count);
    for (Py_ssize_t i = 0; list != NULL && i < count; i++)
        PyList_SET_ITEM(list, i, PyLong_FromSsize_t(cuts[i]));
    PyMem_RawFree(cuts);
    return list;
}

static PyMethodDef methods[] = {
    {"cafs_cuts", cafs_cuts, METH_VARARGS, cafs_cuts_doc},
    {"is_zero", is_zero, METH_VARARGS, is_zero_doc},
    {"find_cuts", find_cuts, METH_VARARGS, find_cuts_doc},
    {"buzhash", buzhash, METH_VARARGS, buzhash_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pydesync._chunker", "Content-defined chunkers: casync's buzhash and CAFS's.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__chunker(void)
{
    for (int i = 0; i < 256; i++)
        buzhash_out[i] = rol32(buzhash_table[i], WINDOW);
    return PyModule_Create(&module);
}
