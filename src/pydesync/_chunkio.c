/*
 * Per-chunk work in one call each, without the GIL: hashing the chunks of a block, and turning a
 * stored chunk into verified bytes at its places in the output (read, decompress, hash, write).
 *
 * Why: the work itself (SHA512/256, zstd) already runs outside the GIL when Python calls it, but a
 * GiB is 16,000 chunks, and the Python around each call (slicing, objects, hand-offs between
 * threads) cost as much as a third of a core. Here that is one call per block or per chunk.
 *
 * Only the common, well-formed case is done here. Anything unusual (a missing file, another
 * compression, a chunk that does not decode to its size or does not hash to its id) returns
 * DEFER, and the caller does the chunk again the ordinary way, which names the chunk and the
 * problem precisely. So this code never has to word an error, and never decides one on its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <zstd.h>

#define DIGEST_SIZE 32
#define WRITTEN 0
#define ABSENT 1
#define DEFER 2

enum { SHA512_256 = 0, SHA256 = 1, NO_VERIFY = -1 };

static const EVP_MD *digests[2];
static pthread_key_t dctx_key;  /* each thread's zstd decompression context, freed with the thread */

static const unsigned char ZSTD_MAGIC[4] = {0x28, 0xb5, 0x2f, 0xfd};

static int hash(int kind, const unsigned char *data, size_t size, unsigned char *out)
{
    unsigned int length = 0;
    return EVP_Digest(data, size, out, &length, digests[kind], NULL) == 1 && length == DIGEST_SIZE;
}

static int all_zero(const unsigned char *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static int check_kind(int kind, int allow_none)
{
    if ((kind == SHA512_256 || kind == SHA256) || (allow_none && kind == NO_VERIFY))
        return 1;
    PyErr_SetString(PyExc_ValueError, "unknown digest kind");
    return 0;
}

/* ---- hashing a block's chunks --------------------------------------------------------------- */

PyDoc_STRVAR(hash_chunks_doc,
"hash_chunks(buffer, start, cuts, kind, zero_size, zero_digest) -> bytes\n\n"
"The digests of buffer[start:cuts[0]], buffer[cuts[0]:cuts[1]], ..., 32 bytes each, concatenated.\n"
"A chunk of exactly zero_size bytes that are all zero gets zero_digest without being hashed.");

static PyObject *hash_chunks(PyObject *self, PyObject *args)
{
    Py_buffer view, zero;
    Py_ssize_t start, zero_size;
    PyObject *cuts_list;
    int kind;
    if (!PyArg_ParseTuple(args, "y*nO!iny*", &view, &start, &PyList_Type, &cuts_list, &kind, &zero_size,
                          &zero))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t *cuts = NULL;
    Py_ssize_t count = PyList_GET_SIZE(cuts_list);
    if (!check_kind(kind, 0) || zero.len != DIGEST_SIZE) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "zero_digest must be 32 bytes");
        goto done;
    }
    cuts = PyMem_RawMalloc((count ? count : 1) * sizeof *cuts);
    if (cuts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t previous = start;
    for (Py_ssize_t i = 0; i < count; i++) {
        cuts[i] = PyLong_AsSsize_t(PyList_GET_ITEM(cuts_list, i));
        if (cuts[i] == -1 && PyErr_Occurred())
            goto done;
        if (cuts[i] < previous || cuts[i] > view.len) {
            PyErr_SetString(PyExc_ValueError, "cuts must ascend within the buffer");
            goto done;
        }
        previous = cuts[i];
    }
    result = PyBytes_FromStringAndSize(NULL, count * DIGEST_SIZE);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *data = view.buf;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    previous = start;
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        size_t size = (size_t)(cuts[i] - previous);
        unsigned char *digest = out + i * DIGEST_SIZE;
        if ((Py_ssize_t)size == zero_size && all_zero(data + previous, size))
            memcpy(digest, zero.buf, DIGEST_SIZE);
        else
            ok = hash(kind, data + previous, size, digest);
        previous = cuts[i];
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not hash a chunk");
    }
done:
    PyMem_RawFree(cuts);
    PyBuffer_Release(&view);
    PyBuffer_Release(&zero);
    return result;
}

/* ---- a stored chunk to its places in the output --------------------------------------------- */

typedef struct {
    const unsigned char *stored;  /* the chunk as stored (compressed or not) */
    size_t stored_size;
    int compressed;
    int kind;                     /* digest kind, or NO_VERIFY */
    const unsigned char *id;
    size_t size;                  /* what the index says the chunk decodes to */
    int fd;
    const long long *offsets;
    Py_ssize_t places;
    int write_errno;              /* set when a write failed: that is the caller's error to raise */
} job_t;

static ZSTD_DCtx *thread_dctx(void)
{
    ZSTD_DCtx *dctx = pthread_getspecific(dctx_key);
    if (dctx == NULL) {
        dctx = ZSTD_createDCtx();
        if (dctx != NULL && pthread_setspecific(dctx_key, dctx) != 0) {
            ZSTD_freeDCtx(dctx);
            dctx = NULL;
        }
    }
    return dctx;
}

/* The chunk's bytes (in *buffer if they had to be decompressed), or NULL to defer. */
static const unsigned char *decoded(const job_t *job, unsigned char **buffer)
{
    if (!job->compressed)
        return job->stored_size == job->size ? job->stored : NULL;
    if (job->stored_size < 4 || memcmp(job->stored, ZSTD_MAGIC, 4) != 0)
        return NULL;  /* xz, gzip or garbage: the ordinary path knows them */
    /* One frame and nothing after it, decoding to exactly the size the index gives. */
    if (ZSTD_findFrameCompressedSize(job->stored, job->stored_size) != job->stored_size)
        return NULL;
    unsigned long long declared = ZSTD_getFrameContentSize(job->stored, job->stored_size);
    if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != job->size)
        return NULL;
    ZSTD_DCtx *dctx = thread_dctx();
    *buffer = malloc(job->size ? job->size : 1);
    if (dctx == NULL || *buffer == NULL)
        return NULL;
    /* A frame without a declared size that decodes to more stops at the buffer's end: an error. */
    size_t n = ZSTD_decompressDCtx(dctx, *buffer, job->size, job->stored, job->stored_size);
    return !ZSTD_isError(n) && n == job->size ? *buffer : NULL;
}

static int write_all(int fd, const unsigned char *data, size_t size, long long offset)
{
    while (size > 0) {
        ssize_t n = pwrite(fd, data, size, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        data += n;
        size -= (size_t)n;
        offset += n;
    }
    return 0;
}

static int place(job_t *job)
{
    unsigned char *buffer = NULL;
    const unsigned char *data = decoded(job, &buffer);
    int status = DEFER;
    if (data != NULL) {
        unsigned char digest[DIGEST_SIZE];
        if (job->kind == NO_VERIFY
            || (hash(job->kind, data, job->size, digest) && memcmp(digest, job->id, DIGEST_SIZE) == 0)) {
            status = WRITTEN;
            for (Py_ssize_t i = 0; i < job->places && !job->write_errno; i++)
                job->write_errno = write_all(job->fd, data, job->size, job->offsets[i]);
        }
    }
    free(buffer);
    return status;
}

/* Reads a chunk file whole; ABSENT when there is none (a symlink marks a known-missing chunk). */
static int read_chunk_file(const char *path, unsigned char **data, size_t *size, size_t limit)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ELOOP ? ABSENT : DEFER;
    struct stat st;
    int status = DEFER;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (size_t)st.st_size <= limit) {
        *size = (size_t)st.st_size;
        *data = malloc(*size ? *size : 1);
        size_t got = 0;
        while (*data != NULL && got < *size) {
            ssize_t n = read(fd, *data + got, *size - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        if (*data != NULL && got == *size)
            status = WRITTEN;
    }
    close(fd);
    return status;
}

/* Parses (kind, id, size, fd, offsets) shared by write_stored and write_file into job. */
static int parse_job(job_t *job, int kind, Py_buffer *id, Py_ssize_t size, int fd, PyObject *offsets,
                     long long **offsets_out)
{
    if (!check_kind(kind, 1))
        return 0;
    if (id->len != DIGEST_SIZE || size < 0) {
        PyErr_SetString(PyExc_ValueError, "a chunk id is 32 bytes and a size is not negative");
        return 0;
    }
    Py_ssize_t places = PyList_GET_SIZE(offsets);
    long long *at = PyMem_RawMalloc((places ? places : 1) * sizeof *at);
    if (at == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t i = 0; i < places; i++) {
        at[i] = PyLong_AsLongLong(PyList_GET_ITEM(offsets, i));
        if ((at[i] == -1 && PyErr_Occurred()) || at[i] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "offsets are not negative");
            PyMem_RawFree(at);
            return 0;
        }
    }
    *offsets_out = at;
    job->kind = kind;
    job->id = id->buf;
    job->size = (size_t)size;
    job->fd = fd;
    job->offsets = at;
    job->places = places;
    job->write_errno = 0;
    return 1;
}

static PyObject *finish(job_t *job, int status)
{
    if (job->write_errno) {
        errno = job->write_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(status);
}

PyDoc_STRVAR(write_stored_doc,
"write_stored(stored, compressed, kind, id, size, fd, offsets) -> int\n\n"
"Decode a chunk as stored (zstd when compressed), check that it is `size` bytes hashing to `id`\n"
"(kind -1: not checked) and pwrite it at each offset in fd. Returns 0 (written) or 2 (deferred:\n"
"do it the ordinary way, which names what is wrong); a failed write raises OSError.");

static PyObject *write_stored(PyObject *self, PyObject *args)
{
    Py_buffer stored, id;
    int compressed, kind, fd;
    Py_ssize_t size;
    PyObject *offsets;
    if (!PyArg_ParseTuple(args, "y*piy*niO!", &stored, &compressed, &kind, &id, &size, &fd, &PyList_Type,
                          &offsets))
        return NULL;
    job_t job = {.stored = stored.buf, .stored_size = (size_t)stored.len, .compressed = compressed};
    long long *at = NULL;
    PyObject *result = NULL;
    if (parse_job(&job, kind, &id, size, fd, offsets, &at)) {
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = place(&job);
        Py_END_ALLOW_THREADS
        result = finish(&job, status);
    }
    PyMem_RawFree(at);
    PyBuffer_Release(&stored);
    PyBuffer_Release(&id);
    return result;
}

PyDoc_STRVAR(write_file_doc,
"write_file(path, limit, compressed, kind, id, size, fd, offsets) -> int\n\n"
"write_stored() of the chunk file at path (at most `limit` bytes): returns 0 (written), 1 (no such\n"
"file, or a symlink) or 2 (deferred).");

static PyObject *write_file(PyObject *self, PyObject *args)
{
    PyObject *path;
    Py_buffer id;
    int compressed, kind, fd;
    Py_ssize_t size, limit;
    PyObject *offsets;
    if (!PyArg_ParseTuple(args, "O&npiy*niO!", PyUnicode_FSConverter, &path, &limit, &compressed, &kind, &id,
                          &size, &fd, &PyList_Type, &offsets))
        return NULL;
    job_t job = {.compressed = compressed};
    long long *at = NULL;
    PyObject *result = NULL;
    if (parse_job(&job, kind, &id, size, fd, offsets, &at)) {
        const char *name = PyBytes_AS_STRING(path);
        int status;
        Py_BEGIN_ALLOW_THREADS
        unsigned char *data = NULL;
        size_t stored_size = 0;
        status = read_chunk_file(name, &data, &stored_size, limit < 0 ? 0 : (size_t)limit);
        if (status == WRITTEN) {
            job.stored = data;
            job.stored_size = stored_size;
            status = place(&job);
        }
        free(data);
        Py_END_ALLOW_THREADS
        result = finish(&job, status);
    }
    PyMem_RawFree(at);
    Py_DECREF(path);
    PyBuffer_Release(&id);
    return result;
}

static PyMethodDef methods[] = {
    {"hash_chunks", hash_chunks, METH_VARARGS, hash_chunks_doc},
    {"write_stored", write_stored, METH_VARARGS, write_stored_doc},
    {"write_file", write_file, METH_VARARGS, write_file_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pydesync._chunkio",
    "Per-chunk work in one call without the GIL: hashing, and decode-verify-write of stored chunks.", -1,
    methods,
};

static void free_dctx(void *dctx)
{
    ZSTD_freeDCtx(dctx);
}

PyMODINIT_FUNC PyInit__chunkio(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* Fetched once: a digest named per call is looked up in the providers each time. */
    digests[SHA512_256] = EVP_MD_fetch(NULL, "SHA512-256", NULL);
    digests[SHA256] = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    digests[SHA512_256] = EVP_sha512_256();
    digests[SHA256] = EVP_sha256();
#endif
    if (digests[SHA512_256] == NULL || digests[SHA256] == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL offers no SHA512/256 or SHA256");
        return NULL;
    }
    if (pthread_key_create(&dctx_key, free_dctx) != 0) {
        PyErr_SetString(PyExc_ImportError, "no thread-local key for zstd contexts");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "WRITTEN", WRITTEN) || PyModule_AddIntConstant(m, "ABSENT", ABSENT)
                      || PyModule_AddIntConstant(m, "DEFER", DEFER))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
