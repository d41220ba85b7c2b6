/*
 * sessionscope._frames: where the application stands, without making frame objects.
 *
 * Every guarded session records the application's line that made it ("created at ..." in the
 * guard's messages), so every session made walks the stack. In Python that walk is
 * sys._getframe() and f_back, and since Python 3.11 each frame they reach is *materialized*: a
 * frame object (about 190 bytes) is made for it and lives as long as the frame runs. The frame
 * found is the application's, which runs as long as its unit of work (a request's endpoint, a
 * task's coroutine): one frame object more per live unit, and some 250 ns per session.
 *
 * This module takes the same steps over the interpreter's own frames, which exist anyway, and
 * makes only the (file, line, function) tuple, shared by the sessions made at the same line
 * (see recent_sites). It reads CPython's internal frame structure
 * (as greenlet and Cython do), so it is built for CPython 3.11 to 3.13 only; elsewhere it
 * defines nothing and `sessionscope._guard._site` walks frame objects in Python (on 3.10, frame
 * objects are the frames: there is nothing to save). Which frames count, and the line of each,
 * are those sys._getframe() and f_back give (the same internal helpers): the test suite compares
 * both walks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(PYPY_VERSION) || PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030E0000
#define SITES_FROM_FRAMES 0
#else
#define SITES_FROM_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif

#if SITES_FROM_FRAMES

static _PyInterpreterFrame *
current_frame(void)
{
    PyThreadState *thread = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    return thread->current_frame;
#else
    return thread->cframe->current_frame;
#endif
}

/* The frame itself or the first one below it that Python code sees (as f_back does). */
static _PyInterpreterFrame *
complete(_PyInterpreterFrame *frame)
{
    while (frame != NULL && _PyFrame_IsIncomplete(frame))
        frame = frame->previous;
    return frame;
}

static PyCodeObject *
code_of(_PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    return (PyCodeObject *)frame->f_executable;
#else
    return frame->f_code;
#endif
}

/*
 * The sites made lately, shared: a guarded session keeps its site for as long as it lives (its
 * unit's life), and an application makes its sessions at a handful of lines, so one tuple per
 * line serves them all. A tuple of its own was 64 bytes per live session, and 32 more for a line
 * number above 256 (Python caches smaller ints); sharing also saves making them.
 *
 * A direct-mapped table keyed by (code object, instruction offset): a hit neither computes the
 * line (a walk of the code's line table, some 400 instructions a session) nor makes a tuple. A
 * slot holds strong references to its code object and its tuple, at most SITE_SLOTS of each, so
 * a code object in the table is never freed and no other can be made at its address: the key is
 * exact. (Two calls on one line have two offsets, and share nothing: equal tuples.) It relies on
 * the GIL (the free-threaded build does not use it).
 */
#define SITE_SLOTS 256

typedef struct {
    PyObject *code; /* the code object (a strong reference), or NULL */
    int lasti;      /* the frame's instruction offset in it */
    PyObject *site; /* (filename, line, function), or NULL */
} SiteSlot;

#ifndef Py_GIL_DISABLED
static SiteSlot recent_sites[SITE_SLOTS];
#endif

static PyObject *
make_site(PyCodeObject *code, int line)
{
    PyObject *number = PyLong_FromLong(line);
    if (number == NULL)
        return NULL;
    PyObject *site = PyTuple_Pack(3, code->co_filename, number, code->co_name);
    Py_DECREF(number);
    return site;
}

static int
line_of(_PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyUnstable_InterpreterFrame_GetLine(frame);
#else
    return PyCode_Addr2Line(code_of(frame),
                            _PyInterpreterFrame_LASTI(frame) * sizeof(_Py_CODEUNIT));
#endif
}

static PyObject *
site_of(_PyInterpreterFrame *frame)
{
    PyCodeObject *code = code_of(frame);
#ifdef Py_GIL_DISABLED
    return make_site(code, line_of(frame));
#else
    int lasti = _PyInterpreterFrame_LASTI(frame);
    size_t hash = ((size_t)code >> 4) ^ ((size_t)lasti * 0x9E3779B1u);
    SiteSlot *slot = &recent_sites[(hash ^ (hash >> 8)) % SITE_SLOTS];
    if (slot->site != NULL && slot->code == (PyObject *)code && slot->lasti == lasti)
        return Py_NewRef(slot->site);
    PyObject *site = make_site(code, line_of(frame));
    if (site == NULL)
        return NULL;
    PyObject *old_code = slot->code, *old_site = slot->site;
    slot->code = Py_NewRef((PyObject *)code);
    slot->lasti = lasti;
    slot->site = Py_NewRef(site);
    /* last: freeing them may run no code of ours, but the slot is set */
    Py_XDECREF(old_site);
    Py_XDECREF(old_code);
    return site;
#endif
}

/* The kind of a frame's file: 0 the application's, 1 a library's (stepped over), 2 the standard
 * library's (stepped over unless nothing else is left); -1 with an exception set. */
static int
kind_of(PyObject *kinds, PyObject *judge, PyObject *filename)
{
    PyObject *kind = PyDict_GetItemWithError(kinds, filename); /* borrowed */
    if (kind == NULL) {
        if (PyErr_Occurred())
            return -1;
        kind = PyObject_CallOneArg(judge, filename); /* (it fills `kinds`) */
        if (kind == NULL)
            return -1;
        long value = PyLong_AsLong(kind);
        Py_DECREF(kind);
        return value == -1 && PyErr_Occurred() ? -1 : (int)value;
    }
    long value = PyLong_AsLong(kind);
    return value == -1 && PyErr_Occurred() ? -1 : (int)value;
}

PyDoc_STRVAR(application_site_doc,
             "application_site(depth, kinds, judge) -> (file, line, function) or None\n\n"
             "_site.application_site() over the interpreter's frames: ``depth`` 1 is the\n"
             "caller's frame; ``kinds`` maps a filename to its kind, ``judge(filename)`` tells\n"
             "(and records) the kind of one it does not hold.");

static PyObject *
application_site(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "application_site(depth: int, kinds: dict, judge)");
        return NULL;
    }
    Py_ssize_t depth = PyLong_AsSsize_t(args[0]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    /* this function has no frame of its own: the current one is its caller's (depth 1) */
    _PyInterpreterFrame *caller = complete(current_frame());
    _PyInterpreterFrame *frame = caller;
    for (Py_ssize_t i = 1; i < depth && frame != NULL; i++)
        frame = complete(frame->previous);
    if (frame == NULL) /* a shallower stack than the caller expected: walk it all */
        frame = caller;
    _PyInterpreterFrame *first = NULL; /* the innermost frame that is not a library's */
    while (frame != NULL) {
        PyCodeObject *code = code_of(frame);
        if (!PyCode_Check(code)) { /* (not a frame Python code sees) */
            frame = complete(frame->previous);
            continue;
        }
        /* `judge` runs Python code: the frames walked are its callers', they stay put */
        int kind = kind_of(args[1], args[2], code->co_filename);
        if (kind < 0)
            return NULL;
        if (kind == 0)
            return site_of(frame);
        if (kind != 1 && first == NULL)
            first = frame;
        frame = complete(frame->previous);
    }
    if (first == NULL)
        Py_RETURN_NONE;
    return site_of(first);
}

static PyMethodDef methods[] = {
    {"application_site", (PyCFunction)(void (*)(void))application_site, METH_FASTCALL,
     application_site_doc},
    {NULL, NULL, 0, NULL},
};

#else

static PyMethodDef methods[] = {
    {NULL, NULL, 0, NULL},
};

#endif

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "sessionscope._frames",
    "The application's site from the interpreter's frames, without frame objects (CPython "
    "3.11-3.13; elsewhere empty).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__frames(void)
{
    return PyModule_Create(&module_def);
}
