/*
 * sessionscope._speedups: the guard's entry check in C.
 *
 * Every call of a guarded session (and of its connection, transactions and results) first asks
 * its SessionGuard whether the running unit may enter. In Python that check is a wrapper frame
 * and about a dozen attribute reads around the real call; on a light request it was most of
 * what the guard costs. This module implements the very same wrapper as a method descriptor
 * (`CheckedMethod`) whose fast paths run in C and whose slow path calls the same Python
 * `SessionGuard.admit()`, so behaviour and messages are the Python wrapper's
 * (`sessionscope._guard._checks` holds that wrapper, used when this module is not built or
 * SESSIONSCOPE_NO_EXTENSIONS is set; the test suite runs both).
 *
 * Kinds of wrapper (what the Python factories in _checks.py make):
 *   KIND_PLAIN     a checked method: nested calls pass, the owner takes the slot, others admit()
 *   KIND_RETURNING the same, and what the call returns is handed to `hook(result, guard)`
 *   KIND_FETCH     a result's fetch: plain data (a soft-closed result, an ended guard) passes
 *   KIND_LAZY_LOAD a relationship's loader, called with the object's state: the guard is that of
 *                  the state's session (none: the load runs unchecked), admitted with its class
 *   KIND_REWATCH   a plain checked method that makes the session a new identity map
 *                  (`expunge_all()`, which `close()` calls): the new map's flagging is checked
 *   KIND_WRITE     a method of SQLAlchemy's attribute implementations that writes, called as
 *                  `method(impl, state, ...)`: `check_write(state, impl.key, name)` first (not
 *                  a session's method: the guard is that of the state's session, if any)
 *
 * The guard is found as `self._sessionscope_guard` (an instance attribute, or a property for
 * engine transactions); None (a guarded session's class default, while its `__init__` runs)
 * means not guarded yet: the call runs unchecked. SessionGuard derives from GuardState below, so
 * the fields every check reads are C fields here and plain attributes in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_fields.h"

#ifndef Py_TPFLAGS_HAVE_VECTORCALL
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

enum {
    KIND_PLAIN = 0,
    KIND_RETURNING = 1,
    KIND_FETCH = 2,
    KIND_LAZY_LOAD = 3,
    KIND_WRITE = 4,
    KIND_REWATCH = 5
};

static PyObject *guard_of_state(PyObject *state);
static int check_write_of(PyObject *state, PyObject *key, PyObject *prefix);
static int watch_flagging(PyObject *identity_map, PyObject *guard);

/* configured once by configure(): what the Python fast path reads from its module globals */
static PyObject *getcurrent_func = NULL;   /* greenlet.getcurrent */
static PyObject *work_var = NULL;          /* sessionscope._work.work_var */
static PyObject *running_loop_func = NULL; /* asyncio.events._get_running_loop */
static PyObject *task_of_loop_func = NULL; /* _units._asyncio.current_task_of_loop */
static PyObject *modules_dict = NULL;      /* sys.modules */
static PyObject *ended_state = NULL;       /* _ownership.ENDED */
static PyObject *inside_slots = NULL;      /* _state.INSIDE: {guard: the unit inside its session} */
static int configured = 0;                 /* configure() was called: the above are set */

static int
not_configured(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "sessionscope._speedups is used before configure() (sessionscope._guard."
                    "_state calls it on import)");
    return -1;
}
static PyObject *live_sessions = NULL; /* SQLAlchemy's sessions by id (weak references) */
static PyObject *recheck_func = NULL;      /* _results._recheck */

/* interned attribute names, and 0 (the slot's key) */
static PyObject *s_identity_map, *s__modified, *s_impl_key, *s_guard, *s_admit, *s_session_id,
    *s_class, *s_check_write, *s_run_after_leave, *s_trio, *s_soft_closed, *s_task, *s_thread,
    *s__loop;

typedef struct {
    PyObject_HEAD
    PyObject *method; /* the unguarded function */
    PyObject *name;   /* the operation, for admit() and its messages */
    PyObject *hook;   /* KIND_RETURNING: called with (result, guard) */
    PyObject *dict;   /* __wrapped__, __name__, __doc__, ... (functools.update_wrapper) */
    int kind;
    vectorcallfunc vectorcall;
} CheckedMethod;

/* The hot part of a SessionGuard: what every check reads and writes, as C fields. The Python
 * class SessionGuard derives from it (sessionscope._guard._state picks this type, or a Python
 * class with the same slots when the module is not built); Python code reads and writes these
 * as plain attributes. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t depth;      /* calls of the unit inside, nested */
    PyObject *entered;     /* the greenlet whose call took the slot, or None */
    PyObject *fast_key;    /* returns what the owner's context holds (a weak reference) */
    PyObject *state;       /* "owned", "handed off", "shared", "ended" */
    PyObject *after_leave; /* a close deferred until the unit inside leaves, or None */
    /* Read rarely (its set-up, the end, slow paths, messages), but kept here as C numbers and
     * bytes: as Python slots they were 8 bytes each per live session (issue 14's memory). */
    int generation;        /* the fork generation it was (last) owned in */
    int length;            /* as a lineage link: the chain's length from it; 0: never a link */
    int rebuild_at;        /* as a lineage link: the length at which the chain is pruned */
    char of_async;         /* guards an AsyncSession's sync session */
    char owned_by_job;     /* the (last) owner was a thread's or pool job's own work */
} GuardState;

static PyTypeObject GuardStateType;

/* a call inside a call of the session (by the unit inside: nothing else runs in its greenlet) */
static inline int
is_nested(GuardState *guard, PyObject *current)
{
    return guard->depth && guard->entered == current;
}

/* A unit of work's fields the checks read (configure_work(WorkUnit)): at their offsets. */
static PyTypeObject *work_class = NULL;
static Field f_work_task, f_work_thread, f_work_generation;

#if PY_VERSION_HEX < 0x030C0000
/* On CPython 3.10 and 3.11 asyncio's _get_running_loop() makes a getpid() system call whenever a
 * loop runs in the thread (to ignore a loop inherited through fork()), most of what a task's
 * check would cost. A work opened by an asyncio task is recognised without it: this is the thread
 * that opened the work (where its task's loop runs) and the task is the current one of its own
 * loop (one loop runs in a thread at a time). 1: it is (``*running`` is the task, a new
 * reference); 0: not known here, owner_unit() looks as on newer versions; -1: error. */
static int
running_task_of_work(PyObject *work, PyObject **running)
{
    PyObject *work_task = get_field(work, work_class, &f_work_task);
    if (work_task == NULL)
        return -1;
    int known = 0;
    if (work_task == Py_None)
        goto done;
    PyObject *thread = get_field(work, work_class, &f_work_thread);
    if (thread == NULL)
        goto error;
    unsigned long opened_in = PyLong_AsUnsignedLong(thread);
    Py_DECREF(thread);
    if (opened_in == (unsigned long)-1 && PyErr_Occurred())
        goto error;
    if (opened_in != PyThread_get_thread_ident())
        goto done;
    PyObject *loop = PyObject_GetAttr(work_task, s__loop);
    if (loop == NULL) { /* not an asyncio task (trio's) */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto error;
        PyErr_Clear();
        goto done;
    }
    PyObject *current_task = PyObject_CallOneArg(task_of_loop_func, loop);
    Py_DECREF(loop);
    if (current_task == NULL)
        goto error;
    known = current_task == work_task;
    Py_DECREF(current_task);
    if (known) {
        *running = work_task; /* (our reference passes to the caller) */
        return 1;
    }
done:
    Py_DECREF(work_task);
    return known;
error:
    Py_DECREF(work_task);
    return -1;
}
#endif

/* Who holds the slot when the running code is the owner's unit itself (SessionGuard.admit()'s
 * fast path): in a thread or greenlet (no asyncio loop runs here, trio is not imported), the
 * current greenlet; in an asyncio task, the running task, if it is the one that opened ``work``
 * (a child task is a unit of its own). 1: ``*running`` is set (a new reference); 0: not the fast
 * path (trio, a task that did not open the work); -1: error. */
static int
owner_unit(PyObject *work, PyObject *current, PyObject **running)
{
#if PY_VERSION_HEX < 0x030C0000
    int known = running_task_of_work(work, running);
    if (known != 0)
        return known;
#endif
    PyObject *loop = PyObject_CallNoArgs(running_loop_func);
    if (loop == NULL)
        return -1;
    if (loop == Py_None) {
        Py_DECREF(loop);
        int trio = PyDict_Check(modules_dict) ? PyDict_Contains(modules_dict, s_trio)
                                              : PySequence_Contains(modules_dict, s_trio);
        if (trio)
            return trio < 0 ? -1 : 0;
        *running = Py_NewRef(current);
        return 1;
    }
    PyObject *task = PyObject_CallOneArg(task_of_loop_func, loop);
    Py_DECREF(loop);
    if (task == NULL)
        return -1;
    PyObject *work_task = get_field(work, work_class, &f_work_task);
    if (work_task == NULL) {
        Py_DECREF(task);
        return -1;
    }
    int opened_it = task == work_task;
    Py_DECREF(work_task);
    if (!opened_it) {
        Py_DECREF(task);
        return 0;
    }
    *running = task;
    return 1;
}

/* The running context's unit of work, when it is the one that owns ``guard`` (what its
 * ``fast_key`` returns). 1: ``*work`` is set (a new reference); 0: it is not (or none); -1: error. */
static int
owners_work(GuardState *guard, PyObject **work)
{
    PyObject *found;
    if (PyContextVar_Get(work_var, Py_None, &found) < 0)
        return -1;
    if (found == Py_None || guard->fast_key == NULL) {
        Py_DECREF(found);
        return 0;
    }
    int same;
#ifndef Py_GIL_DISABLED
    /* the usual key, a weak reference to the owner's work: its referent read, not called (when
     * it is `found`, it is alive: we hold a reference) */
    if (PyWeakref_CheckRefExact(guard->fast_key))
        same = ((PyWeakReference *)guard->fast_key)->wr_object == found;
    else
#endif
    {
        PyObject *fast_key = Py_NewRef(guard->fast_key); /* (a Python callable could replace it) */
        PyObject *key = PyObject_CallNoArgs(fast_key);
        Py_DECREF(fast_key);
        if (key == NULL) {
            Py_DECREF(found);
            return -1;
        }
        same = key == found;
        Py_DECREF(key);
    }
    if (!same) {
        Py_DECREF(found);
        return 0;
    }
    *work = found;
    return 1;
}

/* SessionGuard.admit()'s fast path: the owner's work, run by its own unit (a thread, a greenlet,
 * or the task that opened it), and the slot free or its own. 1: entered (depth taken); 0: not
 * the fast path. */
static int
enter_as_owner(GuardState *guard, PyObject *current)
{
    PyObject *work = NULL;
    int owned = owners_work(guard, &work);
    if (owned <= 0)
        return owned;
    int result = 0;
    PyObject *running = NULL;
    int owners = owner_unit(work, current, &running);
    if (owners <= 0) {
        if (owners < 0)
            goto error;
        goto done;
    }
    PyObject *holder = PyDict_SetDefault(inside_slots, (PyObject *)guard, running); /* borrowed */
    Py_DECREF(running); /* (the slot holds it while it is inside) */
    if (holder == NULL)
        goto error;
    if (holder != running)
        goto done;
    if (!guard->depth) { /* before depth: who sees depth > 0 sees who entered */
        Py_INCREF(current);
        Py_XSETREF(guard->entered, current);
    }
    guard->depth++;
    result = 1;
done:
    Py_DECREF(work);
    return result;
error:
    Py_DECREF(work);
    return -1;
}

/* SessionGuard.leave(): the finally block of the Python wrapper */
static int
leave(GuardState *guard)
{
    guard->depth--;
    if (guard->depth)
        return 0;
    Py_INCREF(Py_None);
    Py_XSETREF(guard->entered, Py_None); /* first: a greenlet keeping its session keeps no cycle */
    if (PyDict_DelItem(inside_slots, (PyObject *)guard) < 0) { /* INSIDE.pop(guard, None) */
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return -1;
        PyErr_Clear();
    }
    PyObject *after_leave = guard->after_leave;
    if (after_leave == NULL || after_leave == Py_None)
        return 0;
    int pending = PyObject_IsTrue(after_leave);
    if (pending <= 0)
        return pending;
    PyObject *ran = PyObject_CallMethodNoArgs((PyObject *)guard, s_run_after_leave);
    if (ran == NULL)
        return -1;
    Py_DECREF(ran);
    return 0;
}

/* KIND_FETCH: a soft-closed result, or a session whose unit of work ended, is plain data */
static int
is_plain_data(PyObject *result, GuardState *guard)
{
    PyObject *soft_closed = PyObject_GetAttr(result, s_soft_closed);
    if (soft_closed == NULL)
        return -1;
    int closed = PyObject_IsTrue(soft_closed);
    Py_DECREF(soft_closed);
    if (closed != 0)
        return closed;
    if (guard->state == NULL)
        return 0;
    if (guard->state == ended_state) /* (the interned state itself, as a rule) */
        return 1;
    return PyObject_RichCompareBool(guard->state, ended_state, Py_EQ);
}

static PyObject *guard_handle(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
static PyObject *guard_handle_function = NULL; /* this module's guard_handle, as an object */

static PyObject *
handed_out(CheckedMethod *self, PyObject *result, PyObject *guard)
{
    if (result == NULL || self->kind != KIND_RETURNING)
        return result;
    PyObject *args[2] = {result, guard};
    PyObject *done = self->hook == guard_handle_function
                         ? guard_handle(NULL, args, 2) /* (ours: without a call's dispatch) */
                         : PyObject_Vectorcall(self->hook, args, 2, NULL);
    if (done == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    Py_DECREF(done);
    return result;
}

static PyObject *cleaning_up_var = NULL; /* _lineage._cleaning_up */
static PyObject *fork_globals = NULL;    /* sessionscope._fork.__dict__ (its generation) */
static PyObject *s_generation;

/* SessionGuard._admit_slow()'s first answer: sessionscope's own cleanup (``_lineage.cleanup()``)
 * closing the session of a unit of work that ended, in the fork generation that made it. Every
 * implicit session is closed so as its unit ends, from a context that is not the unit's: the
 * call runs unchecked, as admit() would let it. 1: it is; 0: not (or not configured); -1. */
static int
cleanup_of_ended(GuardState *guard, PyObject *found)
{
    if (cleaning_up_var == NULL || guard->state != ended_state)
        return 0;
    PyObject *flag;
    if (PyContextVar_Get(cleaning_up_var, NULL, &flag) < 0)
        return -1;
    int cleaning = flag == Py_True;
    Py_XDECREF(flag);
    if (!cleaning)
        return 0;
    PyObject *now = PyDict_GetItemWithError(fork_globals, s_generation);
    if (now == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *generation = PyObject_GetAttr(found, s_generation);
    if (generation == NULL)
        return -1;
    int same = PyObject_RichCompareBool(generation, now, Py_EQ);
    Py_DECREF(generation);
    return same;
}

static PyObject *
checked_call(CheckedMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!configured && not_configured() < 0)
        return NULL;
    if (nargs < 1) /* called on the class without an instance: the function's own error */
        return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    if (self->kind == KIND_WRITE) {
        if (nargs < 2) /* not called as SQLAlchemy calls it: the method's own error */
            return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
        PyObject *key = PyObject_GetAttr(args[0], s_impl_key);
        if (key == NULL)
            return NULL;
        int checked_ok = check_write_of(args[1], key, self->name);
        Py_DECREF(key);
        if (checked_ok < 0)
            return NULL;
        return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    }
    PyObject *found;
    if (self->kind == KIND_LAZY_LOAD) {
        found = guard_of_state(args[0]);
        if (found == NULL) {
            if (PyErr_Occurred())
                return NULL;
            return PyObject_Vectorcall(self->method, args, nargsf, kwnames); /* unguarded */
        }
    }
    else if ((found = PyObject_GetAttr(args[0], s_guard)) == NULL)
        return NULL;
    if (found == Py_None) { /* a guarded class's session whose guard is not set yet */
        Py_DECREF(found);
        return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    }
    if (!PyObject_TypeCheck(found, &GuardStateType)) {
        PyErr_Format(PyExc_TypeError, "%R carries %R, not a SessionGuard", args[0], found);
        Py_DECREF(found);
        return NULL;
    }
    GuardState *guard = (GuardState *)found;
    PyObject *result = NULL;
    PyObject *current = PyObject_CallNoArgs(getcurrent_func);
    if (current == NULL)
        goto finish;
    if (is_nested(guard, current)) {
        /* the session's own call, inside a call of its unit: what it hands out stays inside */
        result = PyObject_Vectorcall(self->method, args, nargsf, kwnames);
        goto finish;
    }
    if (self->kind == KIND_FETCH) {
        int plain = is_plain_data(args[0], guard);
        if (plain < 0)
            goto finish;
        if (plain) {
            result = PyObject_Vectorcall(self->method, args, nargsf, kwnames);
            goto finish;
        }
    }
    int entered = enter_as_owner(guard, current);
    if (entered < 0)
        goto finish;
    if (!entered) {
        int cleanup = cleanup_of_ended(guard, found);
        if (cleanup < 0)
            goto finish;
        if (cleanup) { /* what admit() answers (False) without its two Python frames */
            result = handed_out(self, PyObject_Vectorcall(self->method, args, nargsf, kwnames),
                                found);
            goto finish;
        }
        PyObject *admitted;
        if (self->kind == KIND_LAZY_LOAD) {
            PyObject *of_class = PyObject_GetAttr(args[0], s_class);
            if (of_class == NULL)
                goto finish;
            admitted = PyObject_CallMethodObjArgs(found, s_admit, self->name, of_class, NULL);
            Py_DECREF(of_class);
        }
        else
            admitted = PyObject_CallMethodOneArg(found, s_admit, self->name);
        if (admitted == NULL)
            goto finish;
        entered = PyObject_IsTrue(admitted);
        Py_DECREF(admitted);
        if (entered < 0)
            goto finish;
        if (!entered) { /* "warn"/"off", sessionscope's own cleanup: the call, unchecked */
            result = handed_out(self, PyObject_Vectorcall(self->method, args, nargsf, kwnames),
                                found);
            goto finish;
        }
    }
    result = PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    if (result != NULL) { /* finally: leave (no exception to keep) */
        if (leave(guard) < 0)
            Py_CLEAR(result);
        result = handed_out(self, result, found);
        goto finish;
    }
    /* finally: leave, keeping the call's exception unless leaving raises one of its own */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (leave(guard) < 0) {
        Py_CLEAR(result);
        if (type != NULL) { /* as Python chains an exception raised in a finally block */
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL)
                PyException_SetTraceback(value, traceback);
            PyObject *type2, *value2, *traceback2;
            PyErr_Fetch(&type2, &value2, &traceback2);
            PyErr_NormalizeException(&type2, &value2, &traceback2);
            PyException_SetContext(value2, value); /* steals value */
            PyErr_Restore(type2, value2, traceback2);
            Py_DECREF(type);
            Py_XDECREF(traceback);
        }
    }
    else {
        PyErr_Restore(type, value, traceback);
    }
    result = handed_out(self, result, found);
finish:
    Py_XDECREF(current);
    Py_DECREF(found);
    return result;
}

/* KIND_REWATCH, after the call: the session's identity map is new, its flagging checked (what
 * _handles._watching_new_maps does in Python). 0, or -1 with an error. */
static int
watch_new_map(PyObject *session)
{
    PyObject *guard = PyObject_GetAttr(session, s_guard);
    if (guard == NULL)
        return -1;
    int rc = 0;
    if (guard != Py_None) {
        PyObject *identity_map = PyObject_GetAttr(session, s_identity_map);
        rc = identity_map == NULL ? -1 : watch_flagging(identity_map, guard);
        Py_XDECREF(identity_map);
    }
    Py_DECREF(guard);
    return rc;
}

static PyObject *
checked_vectorcall(CheckedMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *result = checked_call(self, args, nargsf, kwnames);
    if (self->kind == KIND_REWATCH && result != NULL && PyVectorcall_NARGS(nargsf) >= 1 &&
        watch_new_map(args[0]) < 0)
        Py_CLEAR(result);
    return result;
}

static PyObject *
checked_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *
checked_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"name", "method", "kind", "hook", NULL};
    PyObject *name, *method, *hook = Py_None;
    int kind = KIND_PLAIN;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UO|iO:CheckedMethod", keywords, &name, &method,
                                     &kind, &hook))
        return NULL;
    if (kind < KIND_PLAIN || kind > KIND_REWATCH) {
        PyErr_SetString(PyExc_ValueError, "CheckedMethod: kind is 0 to 5");
        return NULL;
    }
    if (kind == KIND_RETURNING && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "CheckedMethod: a returning method needs a hook");
        return NULL;
    }
    CheckedMethod *self = (CheckedMethod *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(name);
    self->name = name;
    Py_INCREF(method);
    self->method = method;
    Py_INCREF(hook);
    self->hook = hook;
    self->kind = kind;
    self->vectorcall = (vectorcallfunc)checked_vectorcall;
    return (PyObject *)self;
}

static int
checked_traverse(CheckedMethod *self, visitproc visit, void *arg)
{
    Py_VISIT(self->method);
    Py_VISIT(self->name);
    Py_VISIT(self->hook);
    Py_VISIT(self->dict);
    return 0;
}

static int
checked_clear(CheckedMethod *self)
{
    Py_CLEAR(self->method);
    Py_CLEAR(self->name);
    Py_CLEAR(self->hook);
    Py_CLEAR(self->dict);
    return 0;
}

static void
checked_dealloc(CheckedMethod *self)
{
    PyObject_GC_UnTrack(self);
    checked_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
checked_repr(CheckedMethod *self)
{
    return PyUnicode_FromFormat("<checked %R>", self->method);
}

static PyMemberDef checked_members[] = {
    {"operation", T_OBJECT, offsetof(CheckedMethod, name), READONLY},
    {NULL},
};

static PyGetSetDef checked_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict},
    {NULL},
};

static PyTypeObject CheckedMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._speedups.CheckedMethod",
    .tp_doc = "A guarded session's method: the guard's entry check, then the method.",
    .tp_basicsize = sizeof(CheckedMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_METHOD_DESCRIPTOR |
                Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = checked_new,
    .tp_dealloc = (destructor)checked_dealloc,
    .tp_traverse = (traverseproc)checked_traverse,
    .tp_clear = (inquiry)checked_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CheckedMethod, vectorcall),
    .tp_descr_get = checked_descr_get,
    .tp_dictoffset = offsetof(CheckedMethod, dict),
    .tp_members = checked_members,
    .tp_getset = checked_getset,
    .tp_repr = (reprfunc)checked_repr,
};

/* CheckedAttribute: one assignment-checked attribute of a guarded session class (`info`,
 * `autoflush`, `expire_on_commit`), a data descriptor keeping the value in another instance
 * attribute (`shadow`). Reads take the value as it is; an assignment is first handed to
 * `check(guard, name)` once the session has a guard (None: its __init__ runs). A descriptor per
 * name, not a class `__setattr__`: CPython specializes an attribute store only on a class whose
 * `__setattr__` is object's, and SQLAlchemy's own code stores attributes of the session some
 * twenty times in a session's life (see sessionscope._guard._handles, `_CheckedAttributeInPython`,
 * the same in Python). */
typedef struct {
    PyObject_HEAD
    PyObject *name;   /* the attribute's name, for messages */
    PyObject *shadow; /* the instance attribute that holds the value */
    PyObject *check;  /* check(guard, name): raises when the running unit may not assign */
    int memoized;     /* no value yet: a new dict, kept (SQLAlchemy's memoized `info`) */
} CheckedAttribute;

static PyObject *
attribute_missing(CheckedAttribute *self, PyObject *obj)
{
    PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'",
                 Py_TYPE(obj)->tp_name, self->name);
    return NULL;
}

static PyObject *
attribute_get(CheckedAttribute *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    PyObject *value = PyObject_GenericGetAttr(obj, self->shadow);
    if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return value;
    PyErr_Clear();
    if (!self->memoized)
        return attribute_missing(self, obj);
    value = PyDict_New();
    if (value != NULL && PyObject_GenericSetAttr(obj, self->shadow, value) < 0)
        Py_CLEAR(value);
    return value;
}

static int
attribute_set(CheckedAttribute *self, PyObject *obj, PyObject *value)
{
    if (value == NULL) { /* del session.info: as of an instance attribute */
        if (PyObject_GenericSetAttr(obj, self->shadow, NULL) == 0)
            return 0;
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            attribute_missing(self, obj);
        }
        return -1;
    }
    PyObject *guard = PyObject_GetAttr(obj, s_guard);
    if (guard == NULL)
        return -1;
    if (guard != Py_None) {
        PyObject *done = PyObject_CallFunctionObjArgs(self->check, guard, self->name, NULL);
        Py_DECREF(guard);
        if (done == NULL)
            return -1;
        Py_DECREF(done);
    }
    else
        Py_DECREF(guard);
    return PyObject_GenericSetAttr(obj, self->shadow, value);
}

static PyObject *
attribute_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"name", "shadow", "check", "memoized", NULL};
    PyObject *name, *shadow, *check;
    int memoized = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UUO|p:CheckedAttribute", keywords, &name,
                                     &shadow, &check, &memoized))
        return NULL;
    CheckedAttribute *self = (CheckedAttribute *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->name = Py_NewRef(name);
    Py_INCREF(shadow);
    PyUnicode_InternInPlace(&shadow); /* (looked up on every read) */
    self->shadow = shadow;
    self->check = Py_NewRef(check);
    self->memoized = memoized;
    return (PyObject *)self;
}

static int
attribute_traverse(CheckedAttribute *self, visitproc visit, void *arg)
{
    Py_VISIT(self->check);
    return 0;
}

static int
attribute_clear(CheckedAttribute *self)
{
    Py_CLEAR(self->check);
    return 0;
}

static void
attribute_dealloc(CheckedAttribute *self)
{
    PyObject_GC_UnTrack(self);
    attribute_clear(self);
    Py_CLEAR(self->name);
    Py_CLEAR(self->shadow);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
attribute_repr(CheckedAttribute *self)
{
    return PyUnicode_FromFormat("<checked attribute %R>", self->name);
}

static PyMemberDef attribute_members[] = {
    {"__name__", T_OBJECT, offsetof(CheckedAttribute, name), READONLY},
    {"shadow", T_OBJECT, offsetof(CheckedAttribute, shadow), READONLY},
    {NULL},
};

static PyTypeObject CheckedAttributeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._speedups.CheckedAttribute",
    .tp_doc = "An assignment-checked attribute of a guarded session class.",
    .tp_basicsize = sizeof(CheckedAttribute),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = attribute_new,
    .tp_dealloc = (destructor)attribute_dealloc,
    .tp_traverse = (traverseproc)attribute_traverse,
    .tp_clear = (inquiry)attribute_clear,
    .tp_descr_get = (descrgetfunc)attribute_get,
    .tp_descr_set = (descrsetfunc)attribute_set,
    .tp_members = attribute_members,
    .tp_repr = (reprfunc)attribute_repr,
};

static PyObject *
state_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    GuardState *self = (GuardState *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->depth = 0;
    Py_INCREF(Py_None);
    self->entered = Py_None;
    Py_INCREF(Py_None);
    self->after_leave = Py_None;
    return (PyObject *)self;
}

static int
state_traverse(GuardState *self, visitproc visit, void *arg)
{
    Py_VISIT(self->entered);
    Py_VISIT(self->fast_key);
    Py_VISIT(self->state);
    Py_VISIT(self->after_leave);
    /* Not Py_TYPE(self): this static type's instances are made through a heap subclass
     * (SessionGuard, WorkUnit), whose subtype_traverse visits the type itself before calling
     * this; a second visit took one reference too many off the class in every collection,
     * which drove the collector's count for it below zero and corrupted its lists (a crash
     * in the test suite, tests/test_gc_traversal.py). */
    return 0;
}

static int
state_clear(GuardState *self)
{
    Py_CLEAR(self->entered);
    Py_CLEAR(self->fast_key);
    Py_CLEAR(self->state);
    Py_CLEAR(self->after_leave);
    return 0;
}

static void
state_dealloc(GuardState *self)
{
    PyObject_GC_UnTrack(self);
    state_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef state_members[] = {
    {"depth", T_PYSSIZET, offsetof(GuardState, depth), 0, "calls of the unit inside, nested"},
    {"entered", T_OBJECT, offsetof(GuardState, entered), 0, "the greenlet that took the slot"},
    {"fast_key", T_OBJECT_EX, offsetof(GuardState, fast_key), 0, "the owner's context's key"},
    {"state", T_OBJECT_EX, offsetof(GuardState, state), 0, "owned, handed off, shared, ended"},
    {"after_leave", T_OBJECT, offsetof(GuardState, after_leave), 0, "a deferred close"},
    {"generation", T_INT, offsetof(GuardState, generation), 0, "the fork generation it owns in"},
    {"length", T_INT, offsetof(GuardState, length), 0, "as a lineage link: its chain's length"},
    {"rebuild_at", T_INT, offsetof(GuardState, rebuild_at), 0, "as a link: when it is pruned"},
    {"of_async", T_BOOL, offsetof(GuardState, of_async), 0, "guards an AsyncSession's session"},
    {"owned_by_job", T_BOOL, offsetof(GuardState, owned_by_job), 0, "owned by a thread's work"},
    {NULL},
};

static PyTypeObject GuardStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._speedups.GuardState",
    .tp_doc = "The fields of a SessionGuard that every check reads (SessionGuard's base).",
    .tp_basicsize = sizeof(GuardState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = state_new,
    .tp_dealloc = (destructor)state_dealloc,
    .tp_traverse = (traverseproc)state_traverse,
    .tp_clear = (inquiry)state_clear,
    .tp_members = state_members,
};

/* ---- writes to attributes of attached objects (sessionscope._guard._writes._check) ---------- */

/* The guard of the session ``state``'s object is attached to (a new reference), or NULL with no
 * error when there is none (no session, an unguarded one, a guard that is gone). The session is
 * found in SQLAlchemy's own registry of sessions by id (the dict under its WeakValueDictionary),
 * its guard as its attribute: a guarded session's class has one (None until it is guarded), an
 * unguarded session's class none, which costs a type-cache lookup and no exception. */
static PyObject *
guard_of_state(PyObject *state)
{
    if (!configured && not_configured() < 0)
        return NULL;
    if (live_sessions == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._speedups: configure_writes() first");
        return NULL;
    }
    PyObject *session_id = PyObject_GetAttr(state, s_session_id);
    if (session_id == NULL)
        return NULL;
    if (session_id == Py_None) {
        Py_DECREF(session_id);
        return NULL;
    }
    PyObject *ref = PyDict_GetItemWithError(live_sessions, session_id); /* borrowed */
    Py_DECREF(session_id);
    if (ref == NULL)
        return NULL;
    Py_INCREF(ref);
    PyObject *session = PyObject_CallNoArgs(ref);
    Py_DECREF(ref);
    if (session == NULL)
        return NULL;
    PyObject *found = NULL;
    if (session != Py_None && _PyType_Lookup(Py_TYPE(session), s_guard) != NULL)
        found = PyObject_GetAttr(session, s_guard);
    Py_DECREF(session);
    if (found == NULL)
        return NULL;
    if (found == Py_None || !PyObject_TypeCheck(found, &GuardStateType)) {
        Py_DECREF(found);
        return NULL;
    }
    return found;
}

/* SessionGuard.check_write()'s first steps: SQLAlchemy's own writes inside a call of the session,
 * and the owner's writes by its own unit (a thread, a greenlet, the task that opened its work)
 * while nobody is inside. 1: the write passes here; 0: the full check must run. */
static int
write_passes(GuardState *guard)
{
    PyObject *current = PyObject_CallNoArgs(getcurrent_func);
    if (current == NULL)
        return -1;
    if (is_nested(guard, current)) {
        Py_DECREF(current);
        return 1;
    }
    PyObject *work = NULL;
    int pass = owners_work(guard, &work);
    if (pass <= 0) {
        Py_DECREF(current);
        return pass;
    }
    PyObject *holder = PyDict_GetItemWithError(inside_slots, (PyObject *)guard); /* borrowed */
    if (holder == NULL && PyErr_Occurred())
        goto error;
    pass = holder == NULL || holder == Py_None;
    if (pass) {
        PyObject *running = NULL;
        pass = owner_unit(work, current, &running);
        Py_XDECREF(running);
    }
    Py_DECREF(work);
    Py_DECREF(current);
    return pass;
error:
    Py_DECREF(work);
    Py_DECREF(current);
    return -1;
}

/* SessionGuard.check_write(operation, state.class_): the full check (a refusal raises) */
static PyObject *
full_write_check(PyObject *guard, PyObject *operation, PyObject *state)
{
    PyObject *of_class = PyObject_GetAttr(state, s_class);
    if (of_class == NULL)
        return NULL;
    PyObject *checked = PyObject_CallMethodObjArgs(guard, s_check_write, operation, of_class, NULL);
    Py_DECREF(of_class);
    if (checked == NULL)
        return NULL;
    Py_DECREF(checked);
    Py_RETURN_NONE;
}

/* check_write(state, key[, prefix]): the check of a write to the mapped attribute ``key`` of
 * ``state``'s object (``prefix + key`` names the operation in a refusal: set_committed_value's).
 * Nothing for an object of no session or of an unguarded one. */
static int
check_write_of(PyObject *state, PyObject *key, PyObject *prefix)
{
    PyObject *guard = guard_of_state(state);
    if (guard == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int outcome = write_passes((GuardState *)guard);
    if (outcome > 0)
        outcome = 0;
    else if (outcome == 0) {
        int prefixed = prefix != NULL && PyUnicode_GET_LENGTH(prefix) > 0;
        PyObject *operation = prefixed ? PyUnicode_Concat(prefix, key) : key;
        if (operation == NULL)
            outcome = -1;
        else {
            PyObject *result = full_write_check(guard, operation, state);
            outcome = result == NULL ? -1 : 0;
            Py_XDECREF(result);
            if (prefixed)
                Py_DECREF(operation);
        }
    }
    Py_DECREF(guard);
    return outcome;
}

static PyObject *
check_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "check_write(state, key[, prefix])");
        return NULL;
    }
    if (nargs == 3 && !PyUnicode_Check(args[2])) { /* check_write_of reads its length */
        PyErr_SetString(PyExc_TypeError, "check_write: the prefix is a str");
        return NULL;
    }
    if (check_write_of(args[0], args[1], nargs == 3 ? args[2] : NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- an identity map's set of modified states (sessionscope._guard._handles) ------------ */

/* A set whose add() checks the unit flagging an object as modified: SQLAlchemy adds a state the
 * first time it changes, which is also all that flag_dirty() does (it fires no attribute event).
 * A refused flag changes nothing: SQLAlchemy set state.modified just before adding it here. */
typedef struct {
    PySetObject set;
    PyObject *guard;
} FlaggingChecked;

static PyObject *s_flag_dirty, *s_modified;

static PyObject *
flagging_add(FlaggingChecked *self, PyObject *state)
{
    if (!configured && not_configured() < 0)
        return NULL;
    PyObject *guard = self->guard;
    if (guard == NULL || !PyObject_TypeCheck(guard, &GuardStateType)) {
        PyErr_SetString(PyExc_TypeError, "FlaggingChecked.guard is not a SessionGuard");
        return NULL;
    }
    Py_INCREF(guard);
    int pass = write_passes((GuardState *)guard);
    if (pass == 0) {
        PyObject *checked = full_write_check(guard, s_flag_dirty, state);
        pass = checked == NULL ? -1 : 1;
        Py_XDECREF(checked);
    }
    Py_DECREF(guard);
    if (pass < 0) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        int contains = PySet_Contains((PyObject *)self, state);
        if (contains == 0 && PyObject_SetAttr(state, s_modified, Py_False) < 0)
            contains = -1;
        if (contains < 0) { /* (the refusal stays the error raised) */
            PyErr_Clear();
        }
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    if (PySet_Add((PyObject *)self, state) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyTypeObject FlaggingCheckedType;

/* _handles.watch_flagging(identity_map, guard): the map's set of modified states, checked */
static int
watch_flagging(PyObject *identity_map, PyObject *guard)
{
    PyObject *modified = PyObject_GetAttr(identity_map, s__modified);
    if (modified == NULL)
        return -1;
    if (Py_IS_TYPE(modified, &FlaggingCheckedType)) {
        Py_DECREF(modified);
        return 0;
    }
    PyObject *watched;
    if (PyAnySet_CheckExact(modified) && PySet_GET_SIZE(modified) == 0) {
        /* a new map's set (every session made, every close()): an empty one of our type, made
         * by set's own __new__ without a call of the type and its __init__ */
        PyObject *no_arguments = PyTuple_New(0);
        watched = no_arguments == NULL
                      ? NULL
                      : PySet_Type.tp_new(&FlaggingCheckedType, no_arguments, NULL);
        Py_XDECREF(no_arguments);
    }
    else
        watched = PyObject_CallOneArg((PyObject *)&FlaggingCheckedType, modified);
    Py_DECREF(modified);
    if (watched == NULL)
        return -1;
    Py_INCREF(guard);
    Py_XSETREF(((FlaggingChecked *)watched)->guard, guard);
    int rc = PyObject_SetAttr(identity_map, s__modified, watched);
    Py_DECREF(watched);
    return rc;
}

static PyObject *
watch_flagging_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "watch_flagging(identity_map, guard)");
        return NULL;
    }
    if (watch_flagging(args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
flagging_traverse(FlaggingChecked *self, visitproc visit, void *arg)
{
    Py_VISIT(self->guard);
    return PySet_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int
flagging_clear(FlaggingChecked *self)
{
    Py_CLEAR(self->guard);
    return PySet_Type.tp_clear((PyObject *)self);
}

static void
flagging_dealloc(FlaggingChecked *self)
{
    Py_CLEAR(self->guard);
    PySet_Type.tp_dealloc((PyObject *)self);
}

static PyMethodDef flagging_methods[] = {
    {"add", (PyCFunction)flagging_add, METH_O, "Add a modified state, checked (flag_dirty)."},
    {NULL},
};

static PyMemberDef flagging_members[] = {
    {"guard", T_OBJECT, offsetof(FlaggingChecked, guard), 0, "the session's SessionGuard"},
    {NULL},
};

static PyTypeObject FlaggingCheckedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._speedups.FlaggingChecked",
    .tp_doc = "An identity map's set of modified states, checking the unit that flags one.",
    .tp_basicsize = sizeof(FlaggingChecked),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)flagging_dealloc,
    .tp_traverse = (traverseproc)flagging_traverse,
    .tp_clear = (inquiry)flagging_clear,
    .tp_methods = flagging_methods,
    .tp_members = flagging_members,
};

/* ---- a result's rows, checked again when another unit resumes the iteration ----------------- */

typedef struct {
    PyObject_HEAD
    PyObject *rows;     /* SQLAlchemy's row iterator */
    PyObject *guard;
    PyObject *greenlet; /* who fetched last: its greenlet, loop and task */
    PyObject *loop;
    PyObject *task;
} RowsCheckedOnResume;

static PyObject *
rows_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *rows, *guard, *greenlet, *loop, *task;
    if (!PyArg_ParseTuple(args, "OOOOO:RowsCheckedOnResume", &rows, &guard, &greenlet, &loop,
                          &task))
        return NULL;
    if (!PyIter_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "RowsCheckedOnResume: rows is an iterator");
        return NULL;
    }
    RowsCheckedOnResume *self = (RowsCheckedOnResume *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(rows);
    self->rows = rows;
    Py_INCREF(guard);
    self->guard = guard;
    Py_INCREF(greenlet);
    self->greenlet = greenlet;
    Py_INCREF(loop);
    self->loop = loop;
    Py_INCREF(task);
    self->task = task;
    return (PyObject *)self;
}

/* who is iterating now is who iterated before: a few pointer comparisons a row */
static int
same_unit_as_before(RowsCheckedOnResume *self)
{
    PyObject *current = PyObject_CallNoArgs(getcurrent_func);
    if (current == NULL)
        return -1;
    int same = current == self->greenlet;
    Py_DECREF(current);
    if (!same)
        return 0;
    PyObject *loop = PyObject_CallNoArgs(running_loop_func);
    if (loop == NULL)
        return -1;
    same = loop == self->loop;
    Py_DECREF(loop);
    if (!same || self->task == Py_None)
        return same;
    PyObject *task = PyObject_CallOneArg(task_of_loop_func, self->loop);
    if (task == NULL)
        return -1;
    same = task == self->task;
    Py_DECREF(task);
    return same;
}

static PyObject *
rows_next(RowsCheckedOnResume *self)
{
    if (!configured && not_configured() < 0)
        return NULL;
    int same = same_unit_as_before(self);
    if (same < 0)
        return NULL;
    if (!same) { /* the full check (raises for another unit); then remember who it is */
        PyObject *who = PyObject_CallOneArg(recheck_func, self->guard);
        if (who == NULL)
            return NULL;
        if (!PyTuple_Check(who) || PyTuple_GET_SIZE(who) != 3) {
            Py_DECREF(who);
            PyErr_SetString(PyExc_TypeError, "_recheck() returns (greenlet, loop, task)");
            return NULL;
        }
        Py_INCREF(PyTuple_GET_ITEM(who, 0));
        Py_XSETREF(self->greenlet, PyTuple_GET_ITEM(who, 0));
        Py_INCREF(PyTuple_GET_ITEM(who, 1));
        Py_XSETREF(self->loop, PyTuple_GET_ITEM(who, 1));
        Py_INCREF(PyTuple_GET_ITEM(who, 2));
        Py_XSETREF(self->task, PyTuple_GET_ITEM(who, 2));
        Py_DECREF(who);
    }
    return (*Py_TYPE(self->rows)->tp_iternext)(self->rows);
}

static int
rows_traverse(RowsCheckedOnResume *self, visitproc visit, void *arg)
{
    Py_VISIT(self->rows);
    Py_VISIT(self->guard);
    Py_VISIT(self->greenlet);
    Py_VISIT(self->loop);
    Py_VISIT(self->task);
    return 0;
}

static int
rows_clear(RowsCheckedOnResume *self)
{
    Py_CLEAR(self->rows);
    Py_CLEAR(self->guard);
    Py_CLEAR(self->greenlet);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->task);
    return 0;
}

static void
rows_dealloc(RowsCheckedOnResume *self)
{
    PyObject_GC_UnTrack(self);
    rows_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RowsCheckedOnResumeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sessionscope._speedups.RowsCheckedOnResume",
    .tp_doc = "A result's rows, checked again before a fetch by another unit than the last.",
    .tp_basicsize = sizeof(RowsCheckedOnResume),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = rows_new,
    .tp_dealloc = (destructor)rows_dealloc,
    .tp_traverse = (traverseproc)rows_traverse,
    .tp_clear = (inquiry)rows_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)rows_next,
};

static PyObject *
configure_writes(PyObject *module, PyObject *sessions)
{
    if (!PyDict_Check(sessions)) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_writes: the dict of SQLAlchemy's sessions by id (weakly)");
        return NULL;
    }
    Py_INCREF(sessions);
    Py_XSETREF(live_sessions, sessions);
    Py_RETURN_NONE;
}

static PyObject *
configure_results(PyObject *module, PyObject *args)
{
    PyObject *recheck;
    if (!PyArg_ParseTuple(args, "O:configure_results", &recheck))
        return NULL;
    Py_INCREF(recheck);
    Py_XSETREF(recheck_func, recheck);
    Py_RETURN_NONE;
}

/* ---- handing out a guarded session's results (_handles.guard_handle) -------------------- */

/* guard_handle(handle, guard): _handles.guard_handle for the handles a session call hands out
 * most (a Result, or a ScalarResult/MappingResult over one), once their classes have their
 * checked subclasses: the same class switches and the same guard entry in the result's
 * __dict__, without a Python frame and its isinstance() calls (about 80 bytecodes a request
 * that reads rows). Anything else (a connection, a transaction, the first result of a class) is
 * handed to the Python function (configure_handles), which does the same again idempotently. */
static PyObject *filter_result_class = NULL, *result_class = NULL, *guard_handle_fallback = NULL;
static PyObject *s_real_result, *s_dunder_class, *s_result_classes, *s_filter_classes,
    *s_unguarded_class;

enum { HANDLED = 1, IN_PYTHON = 2 };

/* The cached checked subclass of obj's class set as its class. HANDLED: switched, or the class is
 * a checked one already; IN_PYTHON: no subclass made yet; -1. */
static int
switch_to_checked(PyObject *obj, PyObject *cache)
{
    PyObject *type_dict = Py_TYPE(obj)->tp_dict;
    PyObject *checked = PyDict_GetItemWithError(type_dict, cache);
    if (checked != NULL)
        return PyObject_SetAttr(obj, s_dunder_class, checked) < 0 ? -1 : HANDLED;
    if (PyErr_Occurred())
        return -1;
    int already = PyDict_Contains(type_dict, s_unguarded_class);
    return already < 0 ? -1 : already ? HANDLED : IN_PYTHON;
}

/* A Result: switched and given its guard unless it has one (its __dict__ holds it). */
static int
guard_result(PyObject *result, PyObject *guard)
{
    PyObject *dict = PyObject_GenericGetDict(result, NULL);
    if (dict == NULL)
        return -1;
    int rc = PyDict_Contains(dict, s_guard);
    if (rc == 0) {
        rc = switch_to_checked(result, s_result_classes);
        if (rc == HANDLED && PyDict_SetItem(dict, s_guard, guard) < 0)
            rc = -1;
    }
    Py_DECREF(dict);
    return rc; /* (1 from PyDict_Contains: guarded already, HANDLED) */
}

static PyObject *
guard_handle(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "guard_handle(handle, guard)");
        return NULL;
    }
    if (guard_handle_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._speedups: configure_handles() first");
        return NULL;
    }
    PyObject *handle = args[0], *guard = args[1];
    int rc = IN_PYTHON;
    if (PyObject_TypeCheck(handle, (PyTypeObject *)filter_result_class)) {
        PyObject *real = PyObject_GetAttr(handle, s_real_result);
        if (real == NULL)
            return NULL;
        rc = PyObject_TypeCheck(real, (PyTypeObject *)result_class) ? guard_result(real, guard)
                                                                    : HANDLED;
        Py_DECREF(real);
        if (rc == HANDLED)
            rc = switch_to_checked(handle, s_filter_classes);
    }
    else if (PyObject_TypeCheck(handle, (PyTypeObject *)result_class))
        rc = guard_result(handle, guard);
    if (rc < 0)
        return NULL;
    if (rc == IN_PYTHON)
        return PyObject_Vectorcall(guard_handle_fallback, args, 2, NULL);
    Py_RETURN_NONE;
}

static PyObject *
configure_handles(PyObject *module, PyObject *args)
{
    PyObject *filter_result, *result, *fallback;
    if (!PyArg_ParseTuple(args, "O!O!O:configure_handles", &PyType_Type, &filter_result,
                          &PyType_Type, &result, &fallback))
        return NULL;
    if (!PyType_CheckExact(Py_TYPE(filter_result)) || !PyType_CheckExact(Py_TYPE(result))) {
        /* (a metaclass could answer isinstance() otherwise than the C type check) */
        PyErr_SetString(PyExc_TypeError, "configure_handles: classes whose metaclass is type");
        return NULL;
    }
    PyObject *in_c = PyObject_GetAttrString(module, "guard_handle"); /* (handed_out calls it) */
    if (in_c == NULL)
        return NULL;
    Py_XSETREF(guard_handle_function, in_c);
    Py_XSETREF(filter_result_class, Py_NewRef(filter_result));
    Py_XSETREF(result_class, Py_NewRef(result));
    Py_XSETREF(guard_handle_fallback, Py_NewRef(fallback));
    Py_RETURN_NONE;
}

/* ---- the registries' lookup (sessionscope._registry.unit_session) ----------------------- */

static PyObject *s_scope_var, *s_key, *s_session_for_use, *s_values, *s_value_key, *s_value, *s_miss,
    *s_ended, *s_session;

/* Whether the error set is one the lookup treats as "not here": no session under the key, or a
 * pool job's ended work (held by a weak proxy). Cleared if so. */
static int
clear_miss_error(void)
{
    if (PyErr_ExceptionMatches(PyExc_KeyError) || PyErr_ExceptionMatches(PyExc_ReferenceError)) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

/* WorkUnit.get_value(key), with KeyError for a missing value: the first value in the work's
 * slots, the others in its dict (None until a second key). */
static PyObject *
work_value(PyObject *work, PyObject *key)
{
    PyObject *first = PyObject_GetAttr(work, s_value_key);
    if (first == NULL)
        return NULL;
    int same = first == key;
    if (!same && PyUnicode_Check(first) && PyUnicode_Check(key))
        same = PyUnicode_Compare(first, key) == 0;
    Py_DECREF(first);
    if (same)
        return PyObject_GetAttr(work, s_value);
    PyObject *values = PyObject_GetAttr(work, s_values);
    if (values == NULL)
        return NULL;
    PyObject *found = NULL;
    if (PyDict_CheckExact(values)) {
        found = PyDict_GetItemWithError(values, key); /* borrowed */
        if (found != NULL)
            Py_INCREF(found);
        else if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
    }
    else if (values == Py_None)
        PyErr_SetObject(PyExc_KeyError, key);
    else
        found = PyObject_GetItem(values, key);
    Py_DECREF(values);
    return found;
}

/* Whether `work` was opened in this process's fork generation: 1, 0 (a parent's, or unknown
 * yet), -1. A forked child empties only its greenlets' works (they are the ones kept in
 * `_work.holding_values`); a thread's or task's work of the parent keeps its values until its
 * end abandons them, and is never this process's answer. */
static int
of_this_process(PyObject *work)
{
    if (fork_globals == NULL)
        return 0;
    PyObject *now = PyDict_GetItemWithError(fork_globals, s_generation); /* borrowed */
    if (now == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *generation = get_field(work, work_class, &f_work_generation);
    if (generation == NULL)
        return clear_miss_error() ? 0 : -1;
    int same = generation == now ? 1 : PyObject_RichCompareBool(generation, now, Py_EQ);
    Py_DECREF(generation);
    return same;
}

/* The current unit's session: the hot path under every proxied call, as unit_session() in
 * _registry.py (which says why each step is there); anything unusual goes to holder._miss(). */
static PyObject *
lookup(PyObject *holder)
{
    if (!configured && not_configured() < 0)
        return NULL;
    PyObject *scope_var = PyObject_GetAttr(holder, s_scope_var);
    if (scope_var == NULL)
        return NULL;
    if (!PyContextVar_CheckExact(scope_var)) {
        Py_DECREF(scope_var);
        PyErr_SetString(PyExc_TypeError, "unit_session: _scope_var is a ContextVar");
        return NULL;
    }
    PyObject *scope;
    int got = PyContextVar_Get(scope_var, Py_None, &scope);
    Py_DECREF(scope_var);
    if (got < 0)
        return NULL;
    if (scope != Py_None) {
        /* ScopeState.session_for_use()'s hot path, without its frame: a scope not ended yet
         * answers its session (every proxied call inside a request's scope comes here) */
        PyObject *ended = PyObject_GetAttr(scope, s_ended);
        if (ended == Py_False) {
            Py_DECREF(ended);
            PyObject *session = PyObject_GetAttr(scope, s_session);
            Py_DECREF(scope);
            return session;
        }
        if (ended == NULL && !clear_miss_error()) {
            Py_DECREF(scope);
            return NULL;
        }
        Py_XDECREF(ended);
        PyObject *session = PyObject_CallMethodNoArgs(scope, s_session_for_use);
        Py_DECREF(scope);
        return session;
    }
    Py_DECREF(scope);
    PyObject *work;
    if (PyContextVar_Get(work_var, Py_None, &work) < 0)
        return NULL;
    if (work != Py_None) {
        PyObject *loop = PyObject_CallNoArgs(running_loop_func);
        if (loop == NULL)
            goto error;
        int here = 0;
        if (loop == Py_None) { /* a thread or greenlet: in the work of its context */
            int trio = PyDict_Check(modules_dict) ? PyDict_Contains(modules_dict, s_trio)
                                                  : PySequence_Contains(modules_dict, s_trio);
            here = trio < 0 ? -1 : !trio;
        }
        else { /* only the task that opened the work */
            PyObject *task = PyObject_CallOneArg(task_of_loop_func, loop);
            if (task == NULL)
                here = -1;
            else {
                PyObject *work_task = get_field(work, work_class, &f_work_task);
                if (work_task == NULL)
                    here = clear_miss_error() ? 0 : -1;
                else {
                    here = task == work_task;
                    Py_DECREF(work_task);
                }
                Py_DECREF(task);
            }
        }
        Py_DECREF(loop);
        if (here > 0)
            here = of_this_process(work);
        if (here < 0)
            goto error;
        if (here) {
            PyObject *found = NULL;
            PyObject *key = PyObject_GetAttr(holder, s_key);
            if (key != NULL) {
                found = work_value(work, key);
                Py_DECREF(key);
            }
            if (found != NULL) {
                Py_DECREF(work);
                return found;
            }
            if (!clear_miss_error())
                goto error;
        }
    }
    Py_DECREF(work);
    return PyObject_CallMethodNoArgs(holder, s_miss);
error:
    Py_DECREF(work);
    return NULL;
}

static PyObject *
unit_session(PyObject *module, PyObject *holder)
{
    return lookup(holder);
}

static PyObject *
unit_session_method(PyObject *self, PyObject *unused)
{
    return lookup(self);
}

static PyMethodDef unit_session_method_def = {
    "__call__", unit_session_method, METH_NOARGS,
    "Return the current unit's session (the registry's lookup, in C).",
};

/* `def` as a method of `cls`, a method descriptor: it binds, and a call through the instance
 * (`registry()`, `Session()`, `Session.remove()`) makes no bound method. `who` names the caller
 * in the error for anything but a class. */
static PyObject *
method_of(PyObject *cls, PyMethodDef *def, const char *who)
{
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "%s(cls): a class", who);
        return NULL;
    }
    return PyDescr_NewMethod((PyTypeObject *)cls, def);
}

/* lookup_method(cls): unit_session as a method of ``cls`` */
static PyObject *
lookup_method(PyObject *module, PyObject *cls)
{
    return method_of(cls, &unit_session_method_def, "lookup_method");
}

/* scoped_session.__call__ (sessionscope._scoping): with no arguments the lookup, then the
 * deprecation warning SQLAlchemy's __call__ gives for an AsyncSession of a sync registry;
 * with any, `with_arguments(self, *args, **kw)` (the Python method, which SQLAlchemy's own
 * __call__ serves). Every `Session()` runs it: a Python frame was about half of its time. */
static PyObject *call_with_arguments = NULL; /* _scoping.scoped_session._call_in_python */
static PyObject *warn_asyncio_func = NULL;   /* _scoping._warn_asyncio */
static PyObject *s_is_asyncio, *s_support_async;

static PyObject *
with_arguments(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t given = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject **all = PyMem_Malloc((given + 1) * sizeof(PyObject *));
    if (all == NULL)
        return PyErr_NoMemory();
    all[0] = self;
    for (Py_ssize_t i = 0; i < given; i++)
        all[i + 1] = args[i];
    PyObject *result = PyObject_Vectorcall(call_with_arguments, all, nargs + 1, kwnames);
    PyMem_Free(all);
    return result;
}

static PyObject *
registry_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (call_with_arguments == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._speedups: configure_call() first");
        return NULL;
    }
    if (nargs != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)))
        return with_arguments(self, args, nargs, kwnames);
    PyObject *session = lookup(self);
    if (session == NULL)
        return NULL;
    PyObject *is_asyncio = PyObject_GetAttr(session, s_is_asyncio);
    if (is_asyncio == NULL) { /* not a session: left alone (SQLAlchemy's __call__ would fail) */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto error;
        PyErr_Clear();
        return session;
    }
    int asyncio_session = PyObject_IsTrue(is_asyncio);
    Py_DECREF(is_asyncio);
    if (asyncio_session <= 0) {
        if (asyncio_session < 0)
            goto error;
        return session;
    }
    PyObject *support = PyObject_GetAttr(self, s_support_async);
    int supported = support == NULL ? -1 : PyObject_IsTrue(support);
    Py_XDECREF(support);
    if (supported < 0)
        goto error;
    if (!supported) {
        PyObject *warned = PyObject_CallNoArgs(warn_asyncio_func);
        if (warned == NULL)
            goto error;
        Py_DECREF(warned);
    }
    return session;
error:
    Py_DECREF(session);
    return NULL;
}

static PyMethodDef registry_call_def = {
    "__call__", (PyCFunction)(void (*)(void))registry_call, METH_FASTCALL | METH_KEYWORDS,
    "Return the current unit's session, creating it if needed (as SQLAlchemy's).\n\n"
    "With keyword arguments and no session yet, a session is made with them; if one exists,\n"
    "SQLAlchemy's \"Scoped session is already present\" error is raised.",
};

/* call_method(cls): registry_call as the __call__ of ``cls`` (a method descriptor) */
static PyObject *
call_method(PyObject *module, PyObject *cls)
{
    return method_of(cls, &registry_call_def, "call_method");
}

/* scoped_session.remove (sessionscope._scoping): a UnitRegistry's `close_implicit(close)`, else
 * the Python method (another registry). Every `remove()` runs it. */
static PyObject *remove_in_python = NULL;   /* _scoping.scoped_session._remove_in_python */
static PyObject *unit_registry_class = NULL; /* _registry.UnitRegistry */
static PyObject *close_session = NULL;       /* _scoping._close */
static PyObject *s_registry, *s_close_implicit;

static PyObject *
registry_remove(PyObject *self, PyObject *unused)
{
    if (remove_in_python == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._speedups: configure_call() first");
        return NULL;
    }
    PyObject *registry = PyObject_GetAttr(self, s_registry);
    if (registry == NULL)
        return NULL;
    PyObject *done;
    if ((PyObject *)Py_TYPE(registry) == unit_registry_class)
        done = PyObject_CallMethodOneArg(registry, s_close_implicit, close_session);
    else
        done = PyObject_CallOneArg(remove_in_python, self);
    Py_DECREF(registry);
    return done;
}

static PyMethodDef registry_remove_def = {
    "remove", registry_remove, METH_NOARGS,
    "Close and discard the current unit's implicit session, if any.\n\n"
    "Inside ``Session.scope()`` the scope's session is left alone: the block owns it and closes\n"
    "it when it ends.",
};

/* remove_method(cls): registry_remove as the remove() of ``cls`` (a method descriptor) */
static PyObject *
remove_method(PyObject *module, PyObject *cls)
{
    return method_of(cls, &registry_remove_def, "remove_method");
}

static PyObject *
configure_call(PyObject *module, PyObject *args)
{
    PyObject *with_arguments, *warn, *remove, *unit_registry, *close;
    if (!PyArg_ParseTuple(args, "OOOOO:configure_call", &with_arguments, &warn, &remove,
                          &unit_registry, &close))
        return NULL;
    Py_XSETREF(warn_asyncio_func, Py_NewRef(warn));
    Py_XSETREF(unit_registry_class, Py_NewRef(unit_registry));
    Py_XSETREF(close_session, Py_NewRef(close));
    Py_XSETREF(remove_in_python, Py_NewRef(remove));
    Py_XSETREF(call_with_arguments, Py_NewRef(with_arguments));
    Py_RETURN_NONE;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *getcurrent, *var, *loop, *task_of_loop, *modules, *ended, *inside;
    if (!PyArg_ParseTuple(args, "OOOOOOO:configure", &getcurrent, &var, &loop, &task_of_loop,
                          &modules, &ended, &inside))
        return NULL;
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "configure: work_var is a ContextVar");
        return NULL;
    }
    if (!PyDict_CheckExact(inside)) {
        PyErr_SetString(PyExc_TypeError, "configure: inside is the table of slots, a dict");
        return NULL;
    }
    Py_INCREF(inside);
    Py_XSETREF(inside_slots, inside);
    Py_INCREF(getcurrent);
    Py_XSETREF(getcurrent_func, getcurrent);
    Py_INCREF(var);
    Py_XSETREF(work_var, var);
    Py_INCREF(loop);
    Py_XSETREF(running_loop_func, loop);
    Py_INCREF(task_of_loop);
    Py_XSETREF(task_of_loop_func, task_of_loop);
    Py_INCREF(modules);
    Py_XSETREF(modules_dict, modules);
    Py_INCREF(ended);
    Py_XSETREF(ended_state, ended);
    configured = 1;
    Py_RETURN_NONE;
}

static PyObject *
configure_work(PyObject *module, PyObject *args)
{
    PyObject *cls, *fork;
    if (!PyArg_ParseTuple(args, "OO:configure_work", &cls, &fork))
        return NULL;
    if (!PyType_Check(cls) || !PyModule_Check(fork)) {
        PyErr_SetString(PyExc_TypeError, "configure_work(WorkUnit, _fork): a class and a module");
        return NULL;
    }
    if (find_field(&f_work_task, (PyTypeObject *)cls, s_task) < 0 ||
        find_field(&f_work_thread, (PyTypeObject *)cls, s_thread) < 0 ||
        find_field(&f_work_generation, (PyTypeObject *)cls, s_generation) < 0)
        return NULL;
    PyObject *globals = PyModule_GetDict(fork);
    if (globals == NULL)
        return NULL;
    Py_INCREF(globals);
    Py_XSETREF(fork_globals, globals);
    Py_INCREF(cls);
    Py_XSETREF(work_class, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static PyObject *
configure_cleanup(PyObject *module, PyObject *args)
{
    PyObject *var, *fork;
    if (!PyArg_ParseTuple(args, "OO:configure_cleanup", &var, &fork))
        return NULL;
    if (!PyContextVar_CheckExact(var) || !PyModule_Check(fork)) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_cleanup(cleaning_up, fork): a ContextVar and a module");
        return NULL;
    }
    PyObject *globals = PyModule_GetDict(fork);
    if (globals == NULL)
        return NULL;
    Py_INCREF(globals);
    Py_XSETREF(fork_globals, globals);
    Py_INCREF(var);
    Py_XSETREF(cleaning_up_var, var);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure_work", configure_work, METH_VARARGS,
     "configure_work(WorkUnit, _fork): the class whose fields the checks read at their offsets, "
     "and the module of the fork generation the lookup compares a work's with."},
    {"configure_cleanup", configure_cleanup, METH_VARARGS,
     "configure_cleanup(cleaning_up, fork): what a check reads to let sessionscope's own cleanup "
     "of an ended unit's session through (_lineage._cleaning_up, sessionscope._fork)."},
    {"configure", configure, METH_VARARGS,
     "configure(getcurrent, work_var, get_running_loop, current_task_of_loop, modules, ended): "
     "what the checks and the registries' lookup read."},
    {"unit_session", unit_session, METH_O,
     "unit_session(holder): the current unit's session (sessionscope._registry.unit_session)."},
    {"call_method", call_method, METH_O,
     "call_method(cls): sessionscope.scoped_session.__call__ in C, as a method of cls."},
    {"remove_method", remove_method, METH_O,
     "remove_method(cls): sessionscope.scoped_session.remove in C, as a method of cls."},
    {"configure_call", configure_call, METH_VARARGS,
     "configure_call(with_arguments, warn_asyncio, remove_in_python, UnitRegistry, close): "
     "what the C __call__ and remove() call."},
    {"lookup_method", lookup_method, METH_O,
     "lookup_method(cls): unit_session as a method of cls, for its __call__."},
    {"configure_writes", configure_writes, METH_O,
     "configure_writes(sessions): SQLAlchemy's sessions by id (weak references), where "
     "check_write() finds the session of a written object."},
    {"configure_results", configure_results, METH_VARARGS,
     "configure_results(recheck): what a result's rows check calls."},
    {"configure_handles", configure_handles, METH_VARARGS,
     "configure_handles(FilterResult, Result, guard_handle): the classes guard_handle() serves "
     "itself, and the Python function it hands the others to."},
    {"guard_handle", (PyCFunction)(void (*)(void))guard_handle, METH_FASTCALL,
     "guard_handle(handle, guard): _handles.guard_handle, a result's usual case in C."},
    {"check_write", (PyCFunction)(void (*)(void))check_write, METH_FASTCALL,
     "check_write(state, key[, prefix]): the check of a write to a mapped attribute."},
    {"watch_flagging", (PyCFunction)(void (*)(void))watch_flagging_py, METH_FASTCALL,
     "watch_flagging(identity_map, guard): the map's set of modified states, checked."},
    {NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "sessionscope._speedups",
    "The guard's entry check in C (see sessionscope._guard._checks).", -1, module_methods,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s_guard, "_sessionscope_guard");
    INTERN(s_real_result, "_real_result");
    INTERN(s_dunder_class, "__class__");
    INTERN(s_result_classes, "_sessionscope_guarded_result_class");
    INTERN(s_filter_classes, "_sessionscope_guarded_filter_class");
    INTERN(s_unguarded_class, "_sessionscope_unguarded_class");
    INTERN(s_is_asyncio, "_is_asyncio");
    INTERN(s_registry, "registry");
    INTERN(s_close_implicit, "close_implicit");
    INTERN(s_support_async, "_support_async");
    INTERN(s_generation, "generation");
    INTERN(s_impl_key, "key");
    INTERN(s_identity_map, "identity_map");
    INTERN(s__modified, "_modified");
    INTERN(s_admit, "admit");
    INTERN(s_run_after_leave, "run_after_leave");
    INTERN(s_trio, "trio");
    INTERN(s_soft_closed, "_soft_closed");
    INTERN(s_session_id, "session_id");
    INTERN(s_class, "class_");
    INTERN(s_check_write, "check_write");
    INTERN(s_scope_var, "_scope_var");
    INTERN(s_key, "_key");
    INTERN(s_session_for_use, "session_for_use");
    INTERN(s_ended, "ended");
    INTERN(s_session, "session");
    INTERN(s_values, "values");
    INTERN(s_value_key, "value_key");
    INTERN(s_value, "value");
    INTERN(s_task, "task");
    INTERN(s_thread, "thread");
    INTERN(s__loop, "_loop");
    /* read the usual way until configure_work() finds their offsets */
    f_work_task = (Field){s_task, -1, 1, FIELD_OBJECT};
    f_work_thread = (Field){s_thread, -1, 1, FIELD_OBJECT};
    f_work_generation = (Field){s_generation, -1, 1, FIELD_OBJECT};
    INTERN(s_miss, "_miss");
    INTERN(s_flag_dirty, "(flag_dirty)");
    INTERN(s_modified, "modified");
    FlaggingCheckedType.tp_base = &PySet_Type;
    if (PyType_Ready(&CheckedMethodType) < 0 || PyType_Ready(&GuardStateType) < 0 ||
        PyType_Ready(&RowsCheckedOnResumeType) < 0 || PyType_Ready(&FlaggingCheckedType) < 0 ||
        PyType_Ready(&CheckedAttributeType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&CheckedMethodType);
    if (PyModule_AddObject(module, "CheckedMethod", (PyObject *)&CheckedMethodType) < 0) {
        Py_DECREF(&CheckedMethodType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&GuardStateType);
    if (PyModule_AddObject(module, "GuardState", (PyObject *)&GuardStateType) < 0) {
        Py_DECREF(&GuardStateType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RowsCheckedOnResumeType);
    if (PyModule_AddObject(module, "RowsCheckedOnResume", (PyObject *)&RowsCheckedOnResumeType) <
        0) {
        Py_DECREF(&RowsCheckedOnResumeType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&FlaggingCheckedType);
    if (PyModule_AddObject(module, "FlaggingChecked", (PyObject *)&FlaggingCheckedType) < 0) {
        Py_DECREF(&FlaggingCheckedType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&CheckedAttributeType);
    if (PyModule_AddObject(module, "CheckedAttribute", (PyObject *)&CheckedAttributeType) < 0) {
        Py_DECREF(&CheckedAttributeType);
        Py_DECREF(module);
        return NULL;
    }
    PyModule_AddIntConstant(module, "KIND_PLAIN", KIND_PLAIN);
    PyModule_AddIntConstant(module, "KIND_RETURNING", KIND_RETURNING);
    PyModule_AddIntConstant(module, "KIND_FETCH", KIND_FETCH);
    PyModule_AddIntConstant(module, "KIND_LAZY_LOAD", KIND_LAZY_LOAD);
    PyModule_AddIntConstant(module, "KIND_WRITE", KIND_WRITE);
    PyModule_AddIntConstant(module, "KIND_REWATCH", KIND_REWATCH);
    return module;
}
