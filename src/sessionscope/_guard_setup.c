/*
 * sessionscope._guard_setup: a new session's guard, set up in one C call.
 *
 * Every session a registry or a scope makes is guarded as it is made: a SessionGuard owned by
 * the running unit of work, the guard itself pushed on the context's lineage, the session switched
 * to carry it, its identity map's flagging watched, its id registered for write checks. In
 * Python that is five functions (`_install.install`, `SessionGuard.__init__`, `own`,
 * `_lineage.lend_from_here`, `_writes.register`) and about 250 bytecodes, a third of what a
 * `with Session.scope():` request pays on top of a hand-written session (issue 14). This module
 * does the same steps, in the same order, for the usual case only:
 *
 *   - the session is of a guarded class already (made by a born-guarded maker), or is an
 *     AsyncSession whose sync_session is;
 *   - the mode is "raise" or "warn", the session has no guard yet and no transaction;
 *   - the caller has the running unit of work at hand, and it is not a pool job's (`via`).
 *
 * Anything else returns None before any side effect, and the caller runs the Python code, which
 * stays the reference: every value set here is the one it sets (tests/test_guard_setup.py
 * compares the two field by field). What changes at run time (the fork generation, the writes'
 * registration, the last bind remembered) is read from those modules' globals at each call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_fields.h"

static PyObject *guard_type = NULL;          /* _ownership.SessionGuard */
static PyObject *lineage_var = NULL;         /* _lineage.current_lineage */
static PyObject *lineage_globals = NULL;     /* _lineage: _drop_dead, _MIN_REBUILD */
static PyObject *writes_globals = NULL;      /* _writes: _installed, _install */
static PyObject *fork_globals = NULL;        /* _fork: generation */
static PyObject *pools_globals = NULL;       /* _fork_pools: _last_bind, remember_session */
static PyObject *application_site = NULL;    /* _site.application_site */
static PyObject *frame_walk = NULL;          /* _site._frame_walk (_frames' C walk), or None */
static PyObject *file_kinds = NULL;          /* _site._kinds */
static PyObject *judge_file = NULL;          /* _site._kind */
static PyObject *watch_flagging = NULL;      /* _handles.watch_flagging */
static PyObject *owned_state = NULL;         /* _state.OWNED */
static PyTypeObject *async_session_type = NULL;
static PyObject *empty_tuple = NULL;
static PyObject *itself = NULL;             /* _lineage_node.ITSELF */
static PyObject *live_session_refs = NULL;  /* _lineage_node._live_session_refs */
static Py_ssize_t min_prune = 16;           /* _work._MIN_PRUNE */

static PyObject *s_unguarded_class, *s_guard, *s_sync_session, *s_via, *s_transaction, *s_bind,
    *s_binds, *s_private_binds, *s_name, *s_hash_key, *s_mode, *s_label, *s_created_at,
    *s_on_hand_off, *s_session_key, *s_of_async, *s_owner_ref, *s_fast_key, *s_owned_by_job,
    *s_explicit, *s_task, *s_generation, *s_token, *s_length, *s_rebuild_at, *s_parent,
    *s_owned, *s_owns, *s_state, *s_identity_map, *s_installed, *s_install,
    *s_last_bind, *s_remember_session,
    *s_min_rebuild, *s_raise, *s_warn, *s_prune_owned_at;

/* ---- fields by offset (_fields.h) ----------------------------------------------------- */

static PyTypeObject *guard_class = NULL, *token_class = NULL, *work_class = NULL;
static Field f_mode, f_label, f_created_at, f_on_hand_off, f_session_key, f_of_async, f_owner_ref,
    f_fast_key, f_owned_by_job, f_guard_generation, f_guard_token, f_state, f_token_parent,
    f_token_length, f_token_rebuild_at, f_guard_parent, f_guard_length, f_guard_rebuild_at,
    f_work_explicit, f_work_task, f_work_owned,
    f_work_via, f_work_prune_owned_at;

/* type(obj).__name__ (a new reference): a class's own name, without a lookup on its metaclass
 * when that is `type` itself (which answers a heap type's name from the type). */
static PyObject *
class_name(PyTypeObject *cls)
{
    if (Py_IS_TYPE(cls, &PyType_Type) && (cls->tp_flags & Py_TPFLAGS_HEAPTYPE))
        return Py_NewRef(((PyHeapTypeObject *)cls)->ht_name);
    return PyObject_GetAttr((PyObject *)cls, s_name);
}

/* A global of one of the configured modules (a borrowed reference), or NULL with an error. */
static PyObject *
global_of(PyObject *globals, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(globals, name);
    if (value == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_RuntimeError, "sessionscope._guard_setup: %U is gone", name);
    return value;
}

/* An attribute, None when it is missing (getattr(obj, name, None)); a new reference. */
static PyObject *
attribute_or_none(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return value;
}

static int
is_guarded_class(PyTypeObject *cls)
{
    if (!(cls->tp_flags & Py_TPFLAGS_HEAPTYPE) || cls->tp_dict == NULL)
        return 0;
    return PyDict_Contains(cls->tp_dict, s_unguarded_class);
}

/* _fork_pools.remember_session(sync), skipped as it skips itself: a session bound like the last
 * one remembered (the same bind, no per-mapper binds) was remembered already. */
static int
remember_session(PyObject *sync)
{
    PyObject *bind = attribute_or_none(sync, s_bind);
    if (bind == NULL)
        return -1;
    PyObject *per_key = attribute_or_none(sync, s_binds); /* SQLAlchemy 2.1 */
    if (per_key == Py_None) {
        Py_DECREF(per_key);
        per_key = attribute_or_none(sync, s_private_binds); /* 2.0 */
    }
    if (per_key == NULL) {
        Py_DECREF(bind);
        return -1;
    }
    int known = 0;
    PyObject *last = global_of(pools_globals, s_last_bind);
    if (last == NULL)
        goto error;
    int has_binds = PyObject_IsTrue(per_key);
    if (has_binds < 0)
        goto error;
    if (bind != Py_None && last != Py_None && !has_binds) {
        PyObject *last_bind = PyObject_CallNoArgs(last); /* a weak reference */
        if (last_bind == NULL)
            goto error;
        known = last_bind == bind;
        Py_DECREF(last_bind);
    }
    Py_DECREF(bind);
    Py_DECREF(per_key);
    if (known)
        return 0;
    PyObject *remember = global_of(pools_globals, s_remember_session);
    if (remember == NULL)
        return -1;
    PyObject *done = PyObject_CallOneArg(remember, sync);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
error:
    Py_DECREF(bind);
    Py_DECREF(per_key);
    return -1;
}

/* The field `which` of a lineage link: a BorrowToken's, or a guard's (a guard is its own link,
 * see sessionscope._lineage_node); `*cls` is the class it is found at by offset. */
enum { LINK_PARENT, LINK_LENGTH, LINK_REBUILD_AT };

static Field *
link_field(PyObject *link, int which, PyTypeObject **cls)
{
    if (Py_TYPE(link) == token_class) {
        *cls = token_class;
        return which == LINK_PARENT   ? &f_token_parent
               : which == LINK_LENGTH ? &f_token_length
                                      : &f_token_rebuild_at;
    }
    *cls = guard_class; /* (get_field and set_field go by name for any other class) */
    return which == LINK_PARENT ? &f_guard_parent
           : which == LINK_LENGTH ? &f_guard_length
                                  : &f_guard_rebuild_at;
}

static PyObject *
get_link_field(PyObject *link, int which)
{
    PyTypeObject *cls;
    Field *field = link_field(link, which, &cls);
    return get_field(link, cls, field);
}

static int
set_link_field(PyObject *link, int which, PyObject *value)
{
    PyTypeObject *cls;
    Field *field = link_field(link, which, &cls);
    return set_field(link, cls, field, value);
}

/* A lineage's head link's `length` and `rebuild_at` (new references): 0, or -1 with both NULL. */
static int
read_chain(PyObject *head, PyObject **length, PyObject **rebuild_at)
{
    *length = get_link_field(head, LINK_LENGTH);
    *rebuild_at = *length == NULL ? NULL : get_link_field(head, LINK_REBUILD_AT);
    if (*rebuild_at == NULL) {
        Py_CLEAR(*length);
        return -1;
    }
    return 0;
}

/* The referent of weak reference `ref` (a new reference), NULL when it is dead; -1 on error. */
static int
referent_of(PyObject *ref, PyObject **object)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyWeakref_GetRef(ref, object) < 0 ? -1 : 0;
#else
    PyObject *found = PyWeakref_GetObject(ref); /* borrowed */
    if (found == NULL)
        return -1;
    *object = found == Py_None ? NULL : Py_NewRef(found);
    return 0;
#endif
}

/* _lineage_node.still_lendable(link): its guard still owns by it (a token: the guard's `token`
 * is it; the guard itself: its `token` is ITSELF) and its session is alive (in SQLAlchemy's
 * registry of live sessions). 1, 0, -1. */
static int
still_lendable(PyObject *link)
{
    PyObject *guard, *expected;
    if (PyWeakref_Check(link)) {
        if (referent_of(link, &guard) < 0)
            return -1;
        if (guard == NULL) /* dead */
            return 0;
        expected = link;
    }
    else {
        guard = Py_NewRef(link);
        expected = itself;
    }
    int lendable = 0;
    PyObject *owning = get_field(guard, guard_class, &f_guard_token);
    if (owning == NULL)
        goto error;
    int same = owning == expected;
    Py_DECREF(owning);
    if (same) {
        PyObject *key = get_field(guard, guard_class, &f_session_key);
        if (key == NULL)
            goto error;
        PyObject *ref = PyDict_GetItemWithError(live_session_refs, key); /* borrowed */
        Py_DECREF(key);
        if (ref == NULL) {
            if (PyErr_Occurred())
                goto error;
        }
        else if (PyWeakref_Check(ref)) {
            PyObject *session;
            if (referent_of(ref, &session) < 0)
                goto error;
            lendable = session != NULL;
            Py_XDECREF(session);
        }
    }
    Py_DECREF(guard);
    return lendable;
error:
    Py_DECREF(guard);
    return -1;
}

/* _lineage._drop_dead(head): the chain from `head` linked past the links that can no longer be
 * lent (see still_lendable), lengths and rebuild point renewed; its newest live link or None (a
 * new reference), NULL with an error. The Python function is the reference
 * (tests/test_guard_setup.py compares both on the same chains). */
static PyObject *
drop_dead(PyObject *head)
{
    PyObject *live = PyList_New(0); /* newest first */
    if (live == NULL)
        return NULL;
    PyObject *node = Py_NewRef(head);
    while (node != Py_None) {
        int lendable = still_lendable(node);
        if (lendable < 0 || (lendable && PyList_Append(live, node) < 0))
            goto error;
        Py_SETREF(node, get_link_field(node, LINK_PARENT));
        if (node == NULL)
            goto error;
    }
    Py_DECREF(node);
    node = NULL;
    PyObject *min_rebuild = global_of(lineage_globals, s_min_rebuild);
    if (min_rebuild == NULL)
        goto error;
    Py_ssize_t count = PyList_GET_SIZE(live);
    Py_ssize_t minimum = PyLong_AsSsize_t(min_rebuild);
    if (minimum == -1 && PyErr_Occurred())
        goto error;
    PyObject *rebuild_at = PyLong_FromSsize_t(2 * count > minimum ? 2 * count : minimum);
    if (rebuild_at == NULL)
        goto error;
    PyObject *parent = Py_None; /* borrowed: from the list, or None */
    for (Py_ssize_t i = count - 1; i >= 0; i--) { /* oldest first: its length is 1 */
        PyObject *link = PyList_GET_ITEM(live, i);
        PyObject *length = PyLong_FromSsize_t(count - i);
        int failed = length == NULL || set_link_field(link, LINK_PARENT, parent) < 0 ||
                     set_link_field(link, LINK_LENGTH, length) < 0 ||
                     set_link_field(link, LINK_REBUILD_AT, rebuild_at) < 0;
        Py_XDECREF(length);
        if (failed) {
            Py_DECREF(rebuild_at);
            goto error;
        }
        parent = link;
    }
    Py_DECREF(rebuild_at);
    Py_INCREF(parent);
    Py_DECREF(live);
    return parent;
error:
    Py_XDECREF(node);
    Py_DECREF(live);
    return NULL;
}

static PyObject *
drop_dead_py(PyObject *module, PyObject *head)
{
    if (guard_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._guard_setup is not configured");
        return NULL;
    }
    if (head == Py_None)
        Py_RETURN_NONE;
    return drop_dead(head);
}

/* Take `ref`, a weak reference without a callback, out of the garbage collector's lists. The
 * guard's weak reference to its unit of work lives as long as the unit, and with 100,000 units
 * alive at once what a unit costs grows with the tracked objects it keeps (docs/design.md, "A
 * unit's memory"). Such a reference holds nothing strongly, so it can be in no reference cycle;
 * the collector still clears it when its referent dies in a collection (it finds it through the
 * referent), and without a callback there is nothing it would have to queue (a reference *with*
 * a callback is moved between the collector's lists then). CPython shares one callback-less reference per object: this is the one `weakref.ref(work)`
 * returns anywhere, and it is as acyclic there. */
static void
untrack_acyclic(PyObject *ref)
{
    if (((PyWeakReference *)ref)->wr_callback == NULL && PyObject_GC_IsTracked(ref))
        PyObject_GC_UnTrack(ref);
}

/* _lineage.lend_from_here(guard) for a new guard (its first ownership): the guard is its own
 * link (sessionscope._lineage_node), pushed on the running context's lineage; 0, or -1 with an
 * error. The caller sets the guard's `token` to ITSELF. */
static int
lend_itself(PyObject *guard)
{
    PyObject *head = NULL, *length = NULL, *rebuild_at = NULL;
    if (PyContextVar_Get(lineage_var, Py_None, &head) < 0)
        goto error;
    if (head != Py_None) {
        if (read_chain(head, &length, &rebuild_at) < 0)
            goto error;
        int full = PyObject_RichCompareBool(length, rebuild_at, Py_GE);
        if (full < 0)
            goto error;
        if (full) { /* the chain has grown to twice its live length: drop the dead links */
            Py_SETREF(head, drop_dead(head));
            Py_CLEAR(length);
            Py_CLEAR(rebuild_at);
            if (head == NULL)
                goto error;
            if (head != Py_None && read_chain(head, &length, &rebuild_at) < 0)
                goto error;
        }
    }
    if (head == Py_None) {
        PyObject *min_rebuild = global_of(lineage_globals, s_min_rebuild);
        if (min_rebuild == NULL)
            goto error;
        length = PyLong_FromLong(1);
        if (length == NULL)
            goto error;
        Py_INCREF(min_rebuild);
        rebuild_at = min_rebuild;
    }
    else {
        PyObject *one = PyLong_FromLong(1);
        if (one == NULL)
            goto error;
        Py_SETREF(length, PyNumber_Add(length, one));
        Py_DECREF(one);
        if (length == NULL)
            goto error;
    }
    if (set_field(guard, guard_class, &f_guard_parent, head) < 0 ||
        set_field(guard, guard_class, &f_guard_length, length) < 0 ||
        set_field(guard, guard_class, &f_guard_rebuild_at, rebuild_at) < 0)
        goto error;
    PyObject *context_token = PyContextVar_Set(lineage_var, guard);
    if (context_token == NULL)
        goto error;
    Py_DECREF(context_token);
    Py_DECREF(head);
    Py_DECREF(length);
    Py_DECREF(rebuild_at);
    return 0;
error:
    Py_XDECREF(head);
    Py_XDECREF(length);
    Py_XDECREF(rebuild_at);
    return -1;
}

/* WorkUnit.owns() when a long-lived work's list of owned links is due to be pruned: the links
 * that can no longer be lent dropped in place (still_lendable; a thread making session after
 * session keeps only the live ones), the next prune point set at twice what is left. In C
 * because a thread's `Session()` + `remove()` pays it: in Python it was about 1,000 CPU
 * instructions a session (issue 14's 1.2x bar). 0, or -1 with an error. */
static int
prune_owned(PyObject *work, PyObject *owned)
{
    PyObject *kept = PyList_New(0);
    if (kept == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(owned); i++) {
        PyObject *link = PyList_GET_ITEM(owned, i);
        Py_INCREF(link);
        int lendable = still_lendable(link);
        int failed = lendable < 0 || (lendable && PyList_Append(kept, link) < 0);
        Py_DECREF(link);
        if (failed)
            goto error;
    }
    Py_ssize_t count = PyList_GET_SIZE(kept);
    PyObject *prune_at = PyLong_FromSsize_t(2 * count > min_prune ? 2 * count : min_prune);
    if (prune_at == NULL || PyList_SetSlice(owned, 0, PyList_GET_SIZE(owned), kept) < 0) {
        Py_XDECREF(prune_at);
        goto error;
    }
    Py_DECREF(kept);
    int rc = set_field(work, work_class, &f_work_prune_owned_at, prune_at);
    Py_DECREF(prune_at);
    return rc;
error:
    Py_DECREF(kept);
    return -1;
}

/* SessionGuard.own(work) for a work that is not a pool job's: 0, or -1 with an error. */
static int
own(PyObject *guard, PyObject *work)
{
    PyObject *owner_ref = PyWeakref_NewRef(work, NULL);
    if (owner_ref == NULL)
        return -1;
    untrack_acyclic(owner_ref);
    int rc = -1;
    PyObject *explicit = NULL, *task = NULL, *link = NULL, *owned = NULL, *prune_at;
    if (set_field(guard, guard_class, &f_owner_ref, owner_ref) < 0 ||
        set_field(guard, guard_class, &f_fast_key, owner_ref) < 0)
        goto done;
    explicit = get_field(work, work_class, &f_work_explicit);
    task = explicit == NULL ? NULL : get_field(work, work_class, &f_work_task);
    if (task == NULL)
        goto done;
    int is_explicit = PyObject_IsTrue(explicit);
    if (is_explicit < 0)
        goto done;
    if (set_field(guard, guard_class, &f_owned_by_job,
                  !is_explicit && task == Py_None ? Py_True : Py_False) < 0)
        goto done;
    PyObject *generation = global_of(fork_globals, s_generation);
    if (generation == NULL || set_field(guard, guard_class, &f_guard_generation, generation) < 0)
        goto done;
    if (lend_itself(guard) < 0 || set_field(guard, guard_class, &f_guard_token, itself) < 0)
        goto done;
    link = Py_NewRef(guard); /* what the work keeps (WorkUnit.owns) */
    owned = get_field(work, work_class, &f_work_owned);
    if (owned == NULL)
        goto done;
    if (owned == Py_None) { /* WorkUnit.owns(), its first session */
        if (set_field(work, work_class, &f_work_owned, link) < 0)
            goto done;
    }
    else if (PyList_CheckExact(owned) &&
             (prune_at = get_field(work, work_class, &f_work_prune_owned_at))) {
        /* WorkUnit.owns(), a long-lived work's next session: appended, if no prune is due */
        Py_ssize_t limit = PyLong_AsSsize_t(prune_at);
        Py_DECREF(prune_at);
        if (limit == -1 && PyErr_Occurred())
            goto done;
        if (PyList_GET_SIZE(owned) + 1 >= limit && prune_owned(work, owned) < 0)
            goto done;
        if (PyList_Append(owned, link) < 0)
            goto done;
    }
    else if (PyErr_Occurred())
        goto done;
    else {
        PyObject *added = PyObject_CallMethodOneArg(work, s_owns, link);
        if (added == NULL)
            goto done;
        Py_DECREF(added);
    }
    rc = set_field(guard, guard_class, &f_state, owned_state);
done:
    Py_DECREF(owner_ref);
    Py_XDECREF(explicit);
    Py_XDECREF(task);
    Py_XDECREF(link);
    Py_XDECREF(owned);
    return rc;
}

/* _writes.register(): the write checks installed, once */
static int
register_writes(void)
{
    PyObject *installed = global_of(writes_globals, s_installed);
    if (installed == NULL)
        return -1;
    int is_installed = PyObject_IsTrue(installed);
    if (is_installed < 0)
        return -1;
    if (!is_installed) {
        PyObject *install = global_of(writes_globals, s_install);
        PyObject *done = install == NULL ? NULL : PyObject_CallNoArgs(install);
        if (done == NULL)
            return -1;
        Py_DECREF(done);
    }
    return 0;
}

/* 1: the usual case (see the top of this file), with `*sync` set (a new reference); 0: not it;
 * -1: an error. Nothing is changed. */
static int
usual_case(PyObject *session, PyObject *mode, PyObject *work, PyObject **sync, int *of_async)
{
    if (!PyUnicode_Check(mode) ||
        (PyUnicode_Compare(mode, s_raise) != 0 && PyUnicode_Compare(mode, s_warn) != 0))
        return PyErr_Occurred() ? -1 : 0;
    if (work == Py_None)
        return 0;
    PyObject *candidate;
    int guarded = is_guarded_class(Py_TYPE(session));
    if (guarded < 0)
        return -1;
    if (guarded) {
        Py_INCREF(session);
        candidate = session;
        *of_async = 0;
    }
    else if (PyObject_TypeCheck(session, async_session_type)) {
        candidate = PyObject_GetAttr(session, s_sync_session);
        if (candidate == NULL)
            return -1;
        guarded = is_guarded_class(Py_TYPE(candidate));
        if (guarded <= 0) {
            Py_DECREF(candidate);
            return guarded;
        }
        *of_async = 1;
    }
    else
        return 0;
    int usual = 0;
    PyObject *existing = attribute_or_none(candidate, s_guard);
    PyObject *via = existing == NULL ? NULL : get_field(work, work_class, &f_work_via);
    PyObject *transaction = via == NULL ? NULL : PyObject_GetAttr(candidate, s_transaction);
    if (transaction == NULL)
        usual = -1;
    else
        usual = existing == Py_None && via == Py_None && transaction == Py_None;
    Py_XDECREF(existing);
    Py_XDECREF(via);
    Py_XDECREF(transaction);
    if (usual == 1)
        *sync = candidate;
    else
        Py_DECREF(candidate);
    return usual;
}

/* guard_new_session(session, mode, site, on_hand_off, work, depth) */
static PyObject *
guard_new_session(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "guard_new_session(session, mode, site, on_hand_off, work, depth)");
        return NULL;
    }
    if (guard_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sessionscope._guard_setup is not configured");
        return NULL;
    }
    PyObject *session = args[0], *mode = args[1], *site = args[2], *on_hand_off = args[3],
             *work = args[4], *depth = args[5];
    PyObject *sync = NULL;
    int of_async = 0;
    int usual = usual_case(session, mode, work, &sync, &of_async);
    if (usual <= 0)
        return usual < 0 ? NULL : Py_NewRef(Py_None);

    PyObject *label = NULL, *key = NULL, *guard = NULL, *identity_map = NULL, *watched = NULL;
    PyObject *result = NULL;
    if (remember_session(sync) < 0)
        goto done;
    key = PyObject_GetAttr(sync, s_hash_key);
    label = key == NULL ? NULL : class_name(Py_TYPE(session));
    if (label == NULL)
        goto done;
    if (site == Py_None) { /* application_site(depth + 1), as if from the caller's frame */
        PyObject *one = PyLong_FromLong(1);
        PyObject *below = one == NULL ? NULL : PyNumber_Add(depth, one);
        Py_XDECREF(one);
        if (below == NULL)
            goto done;
        if (frame_walk != Py_None) {
            /* what application_site() calls, without its frame: the walk's depth 1 is then
             * our caller's frame, where application_site's frame would have been depth 1 */
            PyObject *walk_args[3] = {below, file_kinds, judge_file};
            site = PyObject_Vectorcall(frame_walk, walk_args, 3, NULL);
        }
        else
            site = PyObject_CallOneArg(application_site, below);
        Py_DECREF(below);
        if (site == NULL)
            goto done;
    }
    else
        Py_INCREF(site);
    guard = ((PyTypeObject *)guard_type)->tp_new((PyTypeObject *)guard_type, empty_tuple, NULL);
    PyTypeObject *cls = guard_class;
    int failed = guard == NULL || set_field(guard, cls, &f_mode, mode) < 0 ||
                 set_field(guard, cls, &f_label, label) < 0 ||
                 set_field(guard, cls, &f_created_at, site) < 0 ||
                 set_field(guard, cls, &f_on_hand_off, on_hand_off) < 0 ||
                 set_field(guard, cls, &f_session_key, key) < 0 ||
                 set_field(guard, cls, &f_of_async, of_async ? Py_True : Py_False) < 0;
    Py_DECREF(site);
    if (failed || own(guard, work) < 0)
        goto done;
    identity_map = PyObject_SetAttr(sync, s_guard, guard) < 0
                       ? NULL
                       : PyObject_GetAttr(sync, s_identity_map);
    watched = identity_map == NULL
                  ? NULL
                  : PyObject_CallFunctionObjArgs(watch_flagging, identity_map, guard, NULL);
    if (watched != NULL && register_writes() == 0)
        result = Py_NewRef(session);
done:
    Py_DECREF(sync);
    Py_XDECREF(label);
    Py_XDECREF(key);
    Py_XDECREF(guard);
    Py_XDECREF(identity_map);
    Py_XDECREF(watched);
    return result;
}

static int
module_dict_of(PyObject *module, PyObject **slot)
{
    PyObject *globals = PyModule_GetDict(module); /* borrowed */
    if (globals == NULL)
        return -1;
    Py_INCREF(globals);
    Py_XSETREF(*slot, globals);
    return 0;
}

/* The offsets of the fields set and read here, in the configured classes (which are kept). */
static int
find_fields(PyTypeObject *guard, PyTypeObject *token, PyTypeObject *work)
{
    struct {
        Field *field;
        PyTypeObject *cls;
        PyObject *name;
    } wanted[] = {
        {&f_mode, guard, s_mode},
        {&f_label, guard, s_label},
        {&f_created_at, guard, s_created_at},
        {&f_on_hand_off, guard, s_on_hand_off},
        {&f_session_key, guard, s_session_key},
        {&f_of_async, guard, s_of_async},
        {&f_owner_ref, guard, s_owner_ref},
        {&f_fast_key, guard, s_fast_key},
        {&f_owned_by_job, guard, s_owned_by_job},
        {&f_guard_generation, guard, s_generation},
        {&f_guard_token, guard, s_token},
        {&f_state, guard, s_state},
        {&f_guard_parent, guard, s_parent},
        {&f_guard_length, guard, s_length},
        {&f_guard_rebuild_at, guard, s_rebuild_at},
        {&f_token_parent, token, s_parent},
        {&f_token_length, token, s_length},
        {&f_token_rebuild_at, token, s_rebuild_at},
        {&f_work_explicit, work, s_explicit},
        {&f_work_task, work, s_task},
        {&f_work_owned, work, s_owned},
        {&f_work_via, work, s_via},
        {&f_work_prune_owned_at, work, s_prune_owned_at},
    };
    for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
        if (find_field(wanted[i].field, wanted[i].cls, wanted[i].name) < 0)
            return -1;
    Py_XSETREF(guard_class, (PyTypeObject *)Py_NewRef(guard));
    Py_XSETREF(token_class, (PyTypeObject *)Py_NewRef(token));
    Py_XSETREF(work_class, (PyTypeObject *)Py_NewRef(work));
    return 0;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *guard, *token, *lineage, *writes, *fork, *pools, *site, *watch, *owned, *async_type,
        *work;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO:configure", &guard, &token, &lineage, &writes, &fork,
                          &pools, &site, &watch, &owned, &async_type, &work))
        return NULL;
    if (!PyType_Check(guard) || !PyType_Check(token) || !PyType_Check(async_type) ||
        !PyType_Check(work)) {
        PyErr_SetString(PyExc_TypeError, "configure(): SessionGuard, BorrowToken, AsyncSession "
                                         "and WorkUnit must be classes");
        return NULL;
    }
    if (find_fields((PyTypeObject *)guard, (PyTypeObject *)token, (PyTypeObject *)work) < 0)
        return NULL;
    PyObject *var = PyObject_GetAttrString(lineage, "current_lineage");
    if (var == NULL)
        return NULL;
    if (!PyContextVar_CheckExact(var)) {
        Py_DECREF(var);
        PyErr_SetString(PyExc_TypeError, "configure(): _lineage.current_lineage is no ContextVar");
        return NULL;
    }
    if (module_dict_of(lineage, &lineage_globals) < 0 || module_dict_of(writes, &writes_globals) < 0 ||
        module_dict_of(fork, &fork_globals) < 0 || module_dict_of(pools, &pools_globals) < 0) {
        Py_DECREF(var);
        return NULL;
    }
    PyObject *node_module = PyImport_ImportModule("sessionscope._lineage_node");
    PyObject *node_itself = node_module == NULL ? NULL : PyObject_GetAttrString(node_module, "ITSELF");
    PyObject *refs = node_itself == NULL
                         ? NULL
                         : PyObject_GetAttrString(node_module, "_live_session_refs");
    Py_XDECREF(node_module);
    if (refs == NULL || !PyDict_Check(refs)) {
        if (refs != NULL)
            PyErr_SetString(PyExc_TypeError, "configure(): _live_session_refs is no dict");
        Py_XDECREF(node_itself);
        Py_XDECREF(refs);
        Py_DECREF(var);
        return NULL;
    }
    PyObject *work_module = PyImport_ImportModule("sessionscope._work");
    PyObject *least = work_module == NULL ? NULL : PyObject_GetAttrString(work_module, "_MIN_PRUNE");
    Py_XDECREF(work_module);
    Py_ssize_t least_prune = least == NULL ? -1 : PyLong_AsSsize_t(least);
    Py_XDECREF(least);
    if (least_prune < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "configure(): _work._MIN_PRUNE must be positive");
        Py_XDECREF(node_itself);
        Py_XDECREF(refs);
        Py_DECREF(var);
        return NULL;
    }
    min_prune = least_prune;
    Py_XSETREF(itself, node_itself);
    Py_XSETREF(live_session_refs, refs);
    Py_XSETREF(lineage_var, var);
    PyObject *walk = PyObject_GetAttrString(site, "_frame_walk");
    PyObject *kinds = walk == NULL ? NULL : PyObject_GetAttrString(site, "_kinds");
    PyObject *judge = kinds == NULL ? NULL : PyObject_GetAttrString(site, "_kind");
    PyObject *python_walk = judge == NULL ? NULL : PyObject_GetAttrString(site, "application_site");
    if (python_walk == NULL || !PyDict_Check(kinds)) {
        if (python_walk != NULL)
            PyErr_SetString(PyExc_TypeError, "configure(): _site._kinds is no dict");
        Py_XDECREF(walk);
        Py_XDECREF(kinds);
        Py_XDECREF(judge);
        Py_XDECREF(python_walk);
        Py_DECREF(var);
        return NULL;
    }
    Py_XSETREF(frame_walk, walk);
    Py_XSETREF(file_kinds, kinds);
    Py_XSETREF(judge_file, judge);
    Py_XSETREF(application_site, python_walk);
    Py_XSETREF(watch_flagging, Py_NewRef(watch));
    Py_XSETREF(owned_state, Py_NewRef(owned));
    Py_XSETREF(async_session_type, (PyTypeObject *)Py_NewRef(async_type));
    Py_XSETREF(guard_type, Py_NewRef(guard)); /* last: what says it is configured */
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(SessionGuard, BorrowToken, _lineage, _writes, _fork, _fork_pools, "
     "_site, watch_flagging, OWNED, AsyncSession, WorkUnit): what the set-up reads."},
    {"drop_dead", drop_dead_py, METH_O,
     "drop_dead(head): _lineage._drop_dead(head) in C, what the set-up calls (for tests)."},
    {"guard_new_session", (PyCFunction)(void (*)(void))guard_new_session, METH_FASTCALL,
     "guard_new_session(session, mode, site, on_hand_off, work, depth): the session, guarded "
     "and owned by work; None (nothing done) when it is not the usual case."},
    {NULL},
};

static struct PyModuleDef guard_setup_module = {
    PyModuleDef_HEAD_INIT, "sessionscope._guard_setup",
    "A new session's guard, set up in one call (see sessionscope._guard._install).", -1,
    module_methods,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC
PyInit__guard_setup(void)
{
    INTERN(s_unguarded_class, "_sessionscope_unguarded_class");
    INTERN(s_guard, "_sessionscope_guard");
    INTERN(s_sync_session, "sync_session");
    INTERN(s_via, "via");
    INTERN(s_transaction, "_transaction");
    INTERN(s_bind, "bind");
    INTERN(s_binds, "binds");
    INTERN(s_private_binds, "_Session__binds");
    INTERN(s_name, "__name__");
    INTERN(s_hash_key, "hash_key");
    INTERN(s_mode, "mode");
    INTERN(s_label, "label");
    INTERN(s_created_at, "created_at");
    INTERN(s_on_hand_off, "on_hand_off");
    INTERN(s_session_key, "session_key");
    INTERN(s_of_async, "of_async");
    INTERN(s_owner_ref, "owner_ref");
    INTERN(s_fast_key, "fast_key");
    INTERN(s_owned_by_job, "owned_by_job");
    INTERN(s_explicit, "explicit");
    INTERN(s_task, "task");
    INTERN(s_generation, "generation");
    INTERN(s_token, "token");
    INTERN(s_length, "length");
    INTERN(s_rebuild_at, "rebuild_at");
    INTERN(s_parent, "parent");
    INTERN(s_owned, "owned");
    INTERN(s_owns, "owns");
    INTERN(s_state, "state");
    INTERN(s_identity_map, "identity_map");
    INTERN(s_installed, "_installed");
    INTERN(s_install, "_install");
    INTERN(s_last_bind, "_last_bind");
    INTERN(s_remember_session, "remember_session");
    INTERN(s_min_rebuild, "_MIN_REBUILD");
    INTERN(s_raise, "raise");
    INTERN(s_warn, "warn");
    INTERN(s_prune_owned_at, "prune_owned_at");
    if ((empty_tuple = PyTuple_New(0)) == NULL)
        return NULL;
    return PyModule_Create(&guard_setup_module);
}
