/*
 * SipHash-2-4 (Aumasson & Bernstein), 64-bit output: the hash of entry names in catar goodbye
 * tables (catar/format.py). In C because every directory entry of every archive is hashed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define SIPROUND                                                    \
    do {                                                            \
        v0 += v1; v1 = rol64(v1, 13); v1 ^= v0; v0 = rol64(v0, 32); \
        v2 += v3; v3 = rol64(v3, 16); v3 ^= v2;                     \
        v0 += v3; v3 = rol64(v3, 21); v3 ^= v0;                     \
        v2 += v1; v1 = rol64(v1, 17); v1 ^= v2; v2 = rol64(v2, 32); \
    } while (0)

static inline uint64_t rol64(uint64_t x, unsigned n) { return (x << n) | (x >> (64 - n)); }

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t siphash24_impl(const uint8_t key[16], const uint8_t *data, size_t len)
{
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
    uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575), v1 = k1 ^ UINT64_C(0x646f72616e646f6d);
    uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261), v3 = k1 ^ UINT64_C(0x7465646279746573);
    size_t full = len - len % 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = load_le64(data + i);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t last = (uint64_t)len << 56;
    for (size_t i = 0; i < len % 8; i++)
        last |= (uint64_t)data[full + i] << (8 * i);
    v3 ^= last;
    SIPROUND;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

PyDoc_STRVAR(siphash24_doc, "siphash24(key, data) -> int\n\nSipHash-2-4 of data with a 16-byte key.");

static PyObject *siphash24(PyObject *self, PyObject *args)
{
    Py_buffer key, data;
    if (!PyArg_ParseTuple(args, "y*y*", &key, &data))
        return NULL;
    PyObject *result = NULL;
    if (key.len != 16)
        PyErr_SetString(PyExc_ValueError, "siphash24: key must be 16 bytes");
    else
        result = PyLong_FromUnsignedLongLong(
            siphash24_impl((const uint8_t *)key.buf, (const uint8_t *)data.buf, (size_t)data.len));
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"siphash24", siphash24, METH_VARARGS, siphash24_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pydesync._siphash", "SipHash-2-4 for catar goodbye tables.", -1, methods,
};

PyMODINIT_FUNC PyInit__siphash(void)
{
    return PyModule_Create(&module);
}
