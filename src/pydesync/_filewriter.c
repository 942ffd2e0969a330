/*
 * untar's file writer (catar/filewriter.py): creates, fills, stamps and renames a batch of new
 * regular files with the GIL released once, so a writer thread overlaps the decoder.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

PyDoc_STRVAR(write_new_files_doc,
"write_new_files(items, umask) -> None or (index, errno)\n\n"
"items: a sequence of (dir_fd, temp, name, data, mode, mtime_ns). For each in order, create\n"
"`temp` in dir_fd (O_EXCL, never following symlinks), write data, set the mode and\n"
"(mtime_ns >= 0) the modification time, and rename it to `name`: the common case of untar,\n"
"a whole batch with the GIL released once, so a writer thread overlaps the decoder. `umask`\n"
"is the process umask (files whose mode it keeps are created with it). Stops at\n"
"the first failure, removes that temporary file and returns its index and errno.");

struct new_file {
    int dir_fd;
    const char *temp, *name;
    Py_buffer data;
    unsigned int mode, umask;
    long long mtime_ns;
};

/* One file: 0 or an errno. */
static int write_one_file(const struct new_file *f)
{
    int err = 0;
    /* Created with its final permission bits when the umask keeps them all (most files), else
     * 0600 and a fchmod: one system call fewer in the common case. */
    int exact = (f->mode & ~0777u) == 0 && (f->mode & f->umask) == 0;
    int fd = openat(f->dir_fd, f->temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY,
                    exact ? (mode_t)f->mode : 0600);
    if (fd < 0)
        return errno;
    const char *p = f->data.buf;
    Py_ssize_t left = f->data.len;
    while (left > 0 && !err) {
        ssize_t n = write(fd, p, (size_t)left);
        if (n < 0) {
            if (errno != EINTR)
                err = errno;
        } else {
            p += n;
            left -= n;
        }
    }
    if (!err && !exact && fchmod(fd, (mode_t)f->mode) < 0)
        err = errno;
    if (!err && f->mtime_ns >= 0) {
        struct timespec ts[2];
        ts[0].tv_sec = 0;
        ts[0].tv_nsec = UTIME_OMIT;
        ts[1].tv_sec = (time_t)(f->mtime_ns / 1000000000LL);
        ts[1].tv_nsec = (long)(f->mtime_ns % 1000000000LL);
        if (futimens(fd, ts) < 0)
            err = errno;
    }
    if (close(fd) < 0 && !err)
        err = errno;
    if (!err && renameat(f->dir_fd, f->temp, f->dir_fd, f->name) < 0)
        err = errno;
    if (err)
        unlinkat(f->dir_fd, f->temp, 0);
    return err;
}

static PyObject *write_new_files(PyObject *self, PyObject *args)
{
    PyObject *items;
    unsigned int umask_bits;
    if (!PyArg_ParseTuple(args, "OI", &items, &umask_bits))
        return NULL;
    PyObject *seq = PySequence_Fast(items, "write_new_files() takes a sequence of tuples");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq), parsed = 0;
    struct new_file *files = PyMem_Calloc(count ? (size_t)count : 1, sizeof *files);
    PyObject *result = NULL;
    if (files == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* "y": bytes without NUL inside, NUL-terminated; the tuples (held by seq) keep them alive. */
    for (; parsed < count; parsed++) {
        struct new_file *f = &files[parsed];
        f->umask = umask_bits;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, parsed), "iyyy*IL", &f->dir_fd, &f->temp,
                              &f->name, &f->data, &f->mode, &f->mtime_ns))
            goto done;
    }
    Py_ssize_t failed = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        err = write_one_file(&files[i]);
        if (err) {
            failed = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed < 0) {
        Py_INCREF(Py_None);
        result = Py_None;
    } else {
        result = Py_BuildValue("(ni)", failed, err);
    }
done:
    for (Py_ssize_t i = 0; i < parsed; i++)
        PyBuffer_Release(&files[i].data);
    PyMem_Free(files);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"write_new_files", write_new_files, METH_VARARGS, write_new_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pydesync._filewriter", "untar's batched writer of new regular files.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__filewriter(void)
{
    return PyModule_Create(&module);
}
