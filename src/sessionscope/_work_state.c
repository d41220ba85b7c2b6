/*
 * sessionscope._work_state: a unit of work's fields, its start and its end, in C.
 *
 * Every request, job and implicit unit (a task, a greenlet, a thread that takes a session) makes
 * one WorkUnit and ends it. In Python that is a class call (`type.__call__`, `__init__`'s frame:
 * some 60 bytecodes) and an `end()` of about 70 more, a quarter of the Python a request's
 * boundary runs on top of a hand-written session (issue 14). `WorkState` is the base of
 * `sessionscope._work.WorkUnit` when this module is built: the same fields (members the Python
 * code reads and writes as attributes, and `_guard_setup` reads by offset), the same start
 * (`WorkState(root, task, explicit, parent=None, lends=False)`), the same `end(*, collected=False)`
 * and the same `__del__`. `sessionscope._work.PythonWorkState` is the reference, used when this
 * module is not built or SESSIONSCOPE_NO_EXTENSIONS is set; tests/test_work_state.py compares the
 * two.
 *
 * What the end runs (the registries' end hooks, the guards' `owner_ended`, the logging of their
 * failures) stays Python, called from here with the same arguments in the same order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* configured once by configure() */
static PyObject *fork_globals = NULL;   /* sessionscope._fork's globals: "generation" */
static PyObject *per_thread = NULL;     /* _units._thread.per_thread: its "ident" */
static PyObject *thread_ident = NULL;   /* _units._thread.thread_ident */
static PyTypeObject *greenlet_type = NULL;
static PyObject *holding_values = NULL; /* _work.holding_values: {weakref.ref(work): None} */
static PyObject *end_hooks = NULL;      /* _work._end_hooks: {key: ref(owner)} */
static PyObject *hook_failed = NULL;    /* _work._hook_failed(work, collected, error) */
static PyObject *interpreter = NULL;    /* _units._thread.INTERPRETER: {"shutting_down": bool} */

static int min_prune = 0;               /* _work._MIN_PRUNE */
static PyObject *s_generation, *s_ident, *s_work_ended, *s_owner_ended, *s_shutting_down,
    *s_collected, *s_forking_pid, *s_abandon_if_parents;

typedef struct {
    PyObject_HEAD
    PyObject *value_key;      /* the key of the value in `value` (None: no value there) */
    PyObject *value;
    PyObject *values;         /* the values of other keys (a dict), or None */
    PyObject *task;           /* the asyncio or trio task that opened the work, or None */
    PyObject *root;           /* the unit that opened it (a greenlet held weakly) */
    PyObject *generation;     /* the fork generation it was opened in */
    PyObject *owned;          /* the lineage link of the session it owns (its guard), a list */
    PyObject *parent;         /* the work this one runs inside, or None */
    PyObject *via;            /* what a pool job's context holds instead (a weak proxy), or None */
    PyObject *thread;         /* the ident of the thread that opened it */
    PyObject *weakreflist;
    /* Flags, a byte each (Python reads and writes them as bools), and a C int: four object
     * fields were 24 bytes more of every live unit of work (issue 14's memory per unit). */
    int prune_owned_at; /* the length at which `owned` is next pruned */
    char ended;         /* the work has ended */
    char explicit;      /* opened by a boundary (1) or implicitly (0) */
    char lends;         /* whether asyncio tasks of the opening thread may take it over */
} WorkState;

#define FIELDS(apply)                                                                          \
    apply(value_key) apply(value) apply(values) apply(task) apply(root) apply(generation)     \
        apply(owned) apply(parent) apply(via) apply(thread)

static int
not_configured(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "sessionscope._work_state is used before configure() (sessionscope._work "
                    "configures it as it loads it)");
    return -1;
}

/* The running thread's ident, one int object per thread (per_thread.ident, or thread_ident()). */
static PyObject *
opening_thread(void)
{
    PyObject *ident = PyObject_GetAttr(per_thread, s_ident);
    if (ident == NULL)
        return NULL;
    if (ident != Py_None)
        return ident;
    Py_DECREF(ident);
    return PyObject_CallNoArgs(thread_ident);
}

static PyObject *
work_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"root", "task", "explicit", "parent", "lends", NULL};
    PyObject *root, *task, *parent = Py_None;
    int explicit_flag, lends_flag = 0;
    if (fork_globals == NULL && not_configured() < 0)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOp|Op:WorkUnit", keywords, &root, &task,
                                     &explicit_flag, &parent, &lends_flag))
        return NULL;
    /* a greenlet is held weakly: the work lives in the greenlet's own context */
    PyObject *held = PyObject_TypeCheck(root, greenlet_type) ? PyWeakref_NewRef(root, NULL)
                                                              : Py_NewRef(root);
    if (held == NULL)
        return NULL;
    PyObject *generation = PyDict_GetItemWithError(fork_globals, s_generation); /* borrowed */
    if (generation == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "sessionscope._fork has no generation");
        Py_DECREF(held);
        return NULL;
    }
    PyObject *thread = opening_thread();
    if (thread == NULL) {
        Py_DECREF(held);
        return NULL;
    }
    WorkState *self = (WorkState *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(held);
        Py_DECREF(thread);
        return NULL;
    }
    self->value_key = Py_NewRef(Py_None);
    self->value = Py_NewRef(Py_None);
    self->values = Py_NewRef(Py_None);
    self->task = Py_NewRef(task);
    self->root = held;
    self->ended = 0;
    self->generation = Py_NewRef(generation);
    self->explicit = (char)explicit_flag;
    self->owned = Py_NewRef(Py_None);
    self->prune_owned_at = min_prune;
    self->parent = Py_NewRef(parent);
    self->lends = (char)lends_flag;
    self->via = Py_NewRef(Py_None);
    self->thread = thread;
    return (PyObject *)self;
}

/* A hook's failure: an Exception is logged (_hook_failed) and the end goes on (0); anything
 * else (KeyboardInterrupt, SystemExit) propagates (-1), as the Python `except Exception` does. */
static int
hook_failure(WorkState *self, PyObject *collected)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *error = PyErr_GetRaisedException();
#else
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    if (error != NULL && traceback != NULL)
        PyException_SetTraceback(error, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    if (error == NULL)
        return 0;
#endif
    PyObject *logged = PyObject_CallFunctionObjArgs(hook_failed, (PyObject *)self, collected,
                                                    error, NULL);
    Py_DECREF(error);
    if (logged == NULL)
        return -1;
    Py_DECREF(logged);
    return 0;
}

/* What a hook's call returned (`done`, NULL if it raised): dropped, or the failure handled. */
static int
hook_returned(WorkState *self, PyObject *done, PyObject *collected)
{
    if (done == NULL)
        return hook_failure(self, collected);
    Py_DECREF(done);
    return 0;
}

/* What the referent of weak reference `ref` is (a new reference), or NULL without an error. */
static PyObject *
referent(PyObject *ref)
{
    if (!PyWeakref_Check(ref))
        return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *object;
    if (PyWeakref_GetRef(ref, &object) <= 0) {
        PyErr_Clear();
        return NULL;
    }
    return object;
#else
    PyObject *object = PyWeakref_GET_OBJECT(ref);
    return object == Py_None ? NULL : Py_NewRef(object);
#endif
}

/* The registries' end hooks for the values the work held: owner.work_ended(work, value). */
static int
end_values(WorkState *self, PyObject *items, PyObject *collected)
{
    Py_ssize_t count = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(items, i); /* (key, value) */
        PyObject *ref = PyDict_GetItemWithError(end_hooks, PyTuple_GET_ITEM(item, 0));
        if (ref == NULL) {
            if (PyErr_Occurred())
                return -1;
            continue;
        }
        PyObject *hook = referent(ref);
        if (hook == NULL)
            continue;
        PyObject *done = PyObject_CallMethodObjArgs(hook, s_work_ended, (PyObject *)self,
                                                    PyTuple_GET_ITEM(item, 1), NULL);
        Py_DECREF(hook);
        if (hook_returned(self, done, collected) < 0)
            return -1;
    }
    return 0;
}

/* The guards of the sessions the work owned: guard.owner_ended(work). What it keeps of each is
 * its lineage link: the guard itself, or a weak reference to it (a BorrowToken: a guard owned
 * anew; see sessionscope._lineage_node). */
static int
end_owned(WorkState *self, PyObject *owned, PyObject *collected)
{
    int many = PyList_Check(owned);
    for (Py_ssize_t i = 0; i < (many ? PyList_GET_SIZE(owned) : 1); i++) {
        PyObject *link = many ? PyList_GET_ITEM(owned, i) : owned;
        PyObject *guard = PyWeakref_Check(link) ? referent(link) : Py_NewRef(link);
        if (guard == NULL)
            continue;
        PyObject *done = PyObject_CallMethodOneArg(guard, s_owner_ended, (PyObject *)self);
        Py_DECREF(guard);
        if (hook_returned(self, done, collected) < 0)
            return -1;
    }
    return 0;
}

/* The values held, as a new list of (key, value), forgotten here (WorkUnit.take_values). */
static PyObject *
take_values(WorkState *self)
{
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return NULL;
    if (self->value_key != Py_None) {
        PyObject *pair = PyTuple_Pack(2, self->value_key, self->value);
        if (pair == NULL || PyList_Append(items, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(pair);
    }
    if (PyDict_Check(self->values) && PyDict_GET_SIZE(self->values)) {
        PyObject *more = PyDict_Items(self->values);
        if (more == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        int failed = PyList_SetSlice(items, PyList_GET_SIZE(items), PyList_GET_SIZE(items), more);
        Py_DECREF(more);
        if (failed < 0) {
            Py_DECREF(items);
            return NULL;
        }
    }
    Py_SETREF(self->value_key, Py_NewRef(Py_None));
    Py_SETREF(self->value, Py_NewRef(Py_None));
    Py_SETREF(self->values, Py_NewRef(Py_None));
    return items;
}

/* 1 if the work was a parent process's, ending in a forked child, and _fork abandoned what it
 * holds (nothing of it is touched: see _fork.forking_pid); 0 if not; -1 with an exception. The
 * usual end only reads _fork's generation and forking_pid. */
static int
abandoned_in_child(WorkState *self)
{
    PyObject *generation = PyDict_GetItemWithError(fork_globals, s_generation); /* borrowed */
    PyObject *forking = generation == NULL
                            ? NULL
                            : PyDict_GetItemWithError(fork_globals, s_forking_pid); /* borrowed */
    if (forking == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "sessionscope._fork has no generation or "
                                                "forking_pid");
        return -1;
    }
    int maybe = generation != self->generation;
    if (maybe) {
        int equal = PyObject_RichCompareBool(generation, self->generation, Py_EQ);
        if (equal < 0)
            return -1;
        maybe = !equal;
    }
    if (!maybe) {
        maybe = PyObject_IsTrue(forking);
        if (maybe <= 0)
            return maybe;
    }
    PyObject *abandon = PyDict_GetItemWithError(fork_globals, s_abandon_if_parents); /* borrowed */
    if (abandon == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "sessionscope._fork has no abandon_if_parents");
        return -1;
    }
    PyObject *done = PyObject_CallOneArg(abandon, (PyObject *)self);
    if (done == NULL)
        return -1;
    int abandoned = PyObject_IsTrue(done);
    Py_DECREF(done);
    return abandoned;
}

/* WorkUnit.end(collected): its sessions closed (rolled back if uncommitted), once. */
static int
end_work(WorkState *self, PyObject *collected)
{
    if (self->ended)
        return 0;
    self->ended = 1;
    if (PyDict_GET_SIZE(holding_values) && PyWeakref_CheckRefExact(self->root)) {
        /* a greenlet's work (only those are kept there): its weak reference (CPython's one
         * callback-less reference per object, the one in the set), discarded */
        PyObject *ref = PyWeakref_NewRef((PyObject *)self, NULL);
        if (ref == NULL)
            return -1;
        int held = PyDict_Contains(holding_values, ref);
        int failed = held < 0 || (held && PyDict_DelItem(holding_values, ref) < 0);
        Py_DECREF(ref);
        if (failed)
            return -1;
    }
    int abandoned = abandoned_in_child(self);
    if (abandoned != 0)
        return abandoned < 0 ? -1 : 0;
    PyObject *items = NULL;
    if (self->value_key != Py_None ||
        (PyDict_Check(self->values) && PyDict_GET_SIZE(self->values))) {
        if ((items = take_values(self)) == NULL)
            return -1;
    }
    PyObject *task = self->task; /* a task's context holds its work: no cycle left */
    self->task = Py_NewRef(Py_None);
    PyObject *owned = self->owned;
    self->owned = Py_NewRef(Py_None);
    int failed = (items != NULL && end_values(self, items, collected) < 0) ||
                 (owned != Py_None && end_owned(self, owned, collected) < 0);
    Py_XDECREF(items);
    Py_DECREF(owned);
    if (!failed && task != Py_None && self->root == task) {
        /* A task's context holds its work, and the work its task: a cycle the collector alone
         * could free. Held weakly now the work has ended, the task is freed by reference
         * counting as the loop drops it (a trio task cannot be held weakly: it holds no cycle
         * to its work). */
        PyObject *weak = PyWeakref_NewRef(task, NULL);
        if (weak == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                PyErr_Clear();
            else
                failed = 1;
        }
        else
            Py_SETREF(self->root, weak);
    }
    Py_DECREF(task);
    return failed ? -1 : 0;
}

static PyObject *
work_end(WorkState *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *collected = Py_False;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs != 0 || nkw > 1 ||
        (nkw == 1 && PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), s_collected) != 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "end() takes only the keyword argument 'collected'");
        return NULL;
    }
    if (nkw == 1)
        collected = PyObject_IsTrue(args[0]) ? Py_True : Py_False;
    if (end_work(self, collected) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* __del__: freed with the last context holding it (a thread's, a pool job's), unless it ended;
 * nothing runs at interpreter shutdown (module globals may be gone already). */
/* end_work(self, collected=True) in a context of its own. A finalizer can run inside any
 * allocation, also one CPython makes while it sets a context variable (copying the context's
 * mapping), and the end sets some (closing a session is _lineage.cleanup()): set in that same
 * context, they replaced the mapping the interrupted set was still copying (a crash;
 * tests/test_gc_traversal.py). The Python __del__ does the same. */
static int
end_collected(WorkState *self)
{
    PyObject *context = PyContext_New();
    if (context == NULL)
        return -1;
    if (PyContext_Enter(context) < 0) {
        Py_DECREF(context);
        return -1;
    }
    int rc = end_work(self, Py_True);
    /* (leaving it cannot fail: it was entered here, and what ran inside left it current) */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *failure = PyErr_GetRaisedException();
    if (PyContext_Exit(context) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    PyErr_SetRaisedException(failure);
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (PyContext_Exit(context) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    PyErr_Restore(type, value, traceback);
#endif
    Py_DECREF(context);
    return rc;
}

static void
work_finalize(WorkState *self)
{
    if (self->ended || self->value_key == NULL || interpreter == NULL)
        return;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *saved = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
#endif
    PyObject *shutting_down = PyDict_GetItemWithError(interpreter, s_shutting_down);
    if (shutting_down == NULL && PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)self);
    else if (shutting_down != Py_True && end_collected(self) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(saved);
#else
    PyErr_Restore(type, value, traceback);
#endif
}

static int
work_traverse(WorkState *self, visitproc visit, void *arg)
{
#define VISIT(field) Py_VISIT(self->field);
    FIELDS(VISIT)
#undef VISIT
    /* Not Py_TYPE(self): this static type's instances are made through a heap subclass
     * (SessionGuard, WorkUnit), whose subtype_traverse visits the type itself before calling
     * this; a second visit took one reference too many off the class in every collection,
     * which drove the collector's count for it below zero and corrupted its lists (a crash
     * in the test suite, tests/test_gc_traversal.py). */
    return 0;
}

static int
work_clear(WorkState *self)
{
#define CLEAR(field) Py_CLEAR(self->field);
    FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
work_dealloc(WorkState *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    work_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef work_members[] = {
#define MEMBER(field) {#field, T_OBJECT_EX, offsetof(WorkState, field), 0, NULL},
    FIELDS(MEMBER)
#undef MEMBER
    {"ended", T_BOOL, offsetof(WorkState, ended), 0, NULL},
    {"explicit", T_BOOL, offsetof(WorkState, explicit), 0, NULL},
    {"lends", T_BOOL, offsetof(WorkState, lends), 0, NULL},
    {"prune_owned_at", T_INT, offsetof(WorkState, prune_owned_at), 0, NULL},
    {NULL},
};

static PyMethodDef work_methods[] = {
    {"end", (PyCFunction)(void (*)(void))work_end, METH_FASTCALL | METH_KEYWORDS,
     "end(*, collected=False): end the work: its sessions are closed (rolled back if "
     "uncommitted), once."},
    {NULL},
};

static PyTypeObject WorkStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._work_state.WorkState",
    .tp_doc = "A unit of work's fields, start and end (sessionscope._work.WorkUnit's base).",
    .tp_basicsize = sizeof(WorkState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = work_new,
    .tp_dealloc = (destructor)work_dealloc,
    .tp_finalize = (destructor)work_finalize,
    .tp_traverse = (traverseproc)work_traverse,
    .tp_clear = (inquiry)work_clear,
    .tp_weaklistoffset = offsetof(WorkState, weakreflist),
    .tp_members = work_members,
    .tp_methods = work_methods,
};

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *fork, *thread_state, *ident, *greenlet, *holding, *hooks, *failed, *shutdown,
        *prune;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO:configure", &fork, &thread_state, &ident, &greenlet,
                          &holding, &hooks, &failed, &shutdown, &prune))
        return NULL;
    if (!PyModule_Check(fork) || !PyType_Check(greenlet) || !PyDict_Check(holding) ||
        !PyDict_Check(hooks) || !PyDict_Check(shutdown) || !PyLong_Check(prune)) {
        PyErr_SetString(PyExc_TypeError, "configure(_fork, per_thread, thread_ident, greenlet, "
                                         "holding_values, _end_hooks, _hook_failed, "
                                         "INTERPRETER, _MIN_PRUNE): a module, a class, three "
                                         "dicts and an int");
        return NULL;
    }
    PyObject *globals = PyModule_GetDict(fork); /* borrowed */
    if (globals == NULL)
        return NULL;
    Py_XSETREF(per_thread, Py_NewRef(thread_state));
    Py_XSETREF(thread_ident, Py_NewRef(ident));
    Py_XSETREF(greenlet_type, (PyTypeObject *)Py_NewRef(greenlet));
    Py_XSETREF(holding_values, Py_NewRef(holding));
    Py_XSETREF(end_hooks, Py_NewRef(hooks));
    Py_XSETREF(hook_failed, Py_NewRef(failed));
    Py_XSETREF(interpreter, Py_NewRef(shutdown));
    long prune_at = PyLong_AsLong(prune);
    if (prune_at == -1 && PyErr_Occurred())
        return NULL;
    if (prune_at < 1 || prune_at > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "configure(): _MIN_PRUNE is a positive int");
        return NULL;
    }
    min_prune = (int)prune_at;
    Py_XSETREF(fork_globals, Py_NewRef(globals)); /* last: what says it is configured */
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(_fork, per_thread, thread_ident, greenlet, holding_values, _end_hooks, "
     "_hook_failed, INTERPRETER, _MIN_PRUNE): what a work's start and end read."},
    {NULL},
};

static struct PyModuleDef work_state_module = {
    PyModuleDef_HEAD_INIT, "sessionscope._work_state",
    "A unit of work's fields, start and end in C (see sessionscope._work).", -1, module_methods,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC
PyInit__work_state(void)
{
    INTERN(s_generation, "generation");
    INTERN(s_ident, "ident");
    INTERN(s_work_ended, "work_ended");
    INTERN(s_owner_ended, "owner_ended");
    INTERN(s_shutting_down, "shutting_down");
    INTERN(s_collected, "collected");
    INTERN(s_forking_pid, "forking_pid");
    INTERN(s_abandon_if_parents, "abandon_if_parents");
    if (PyType_Ready(&WorkStateType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&work_state_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "WorkState", (PyObject *)&WorkStateType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
