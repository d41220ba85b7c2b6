/* sessionscope's C extensions: an object's fields read and written at their slots' offsets.
 *
 * Included by _guard_setup.c and _speedups.c (each compiles it into itself: nothing is shared
 * at run time).
 */
#ifndef SESSIONSCOPE_FIELDS_H
#define SESSIONSCOPE_FIELDS_H

#include <Python.h>
#include <structmember.h>

/* The guard, its borrow token and the unit of work keep their fields in __slots__ (or, for the
 * guard's hot part, C members). PyObject_SetAttr and PyObject_GetAttr find such a field through
 * the class: a type attribute cache lookup (and, when that entry has been evicted by another
 * class's, a walk of the MRO's dicts) and a descriptor call, some 150-200 instructions each:
 * about thirty times per session made (_guard_setup), and per checked call of a session
 * (_speedups). The field's offset is read once from its member descriptor (when the module is
 * configured), and an object of exactly that class is read and written there. An object of
 * another class (a subclass may add a property of the same name) goes the usual way. */

enum { FIELD_OBJECT = 0, FIELD_FLAG = 1, FIELD_INT = 2 };

typedef struct {
    PyObject *name;     /* the attribute (interned) */
    Py_ssize_t offset;  /* its slot in an object of the configured class, or -1: the usual way */
    int raise_if_unset; /* T_OBJECT_EX: reading an unset slot is an AttributeError */
    int kind;           /* FIELD_OBJECT, or FIELD_FLAG (T_BOOL: a byte, True or False), or
                           FIELD_INT (T_INT: a C int, read and written as a Python int) */
} Field;

/* `field` of class `cls`: its offset if it is a writable object slot (a member descriptor). */
static int
find_field(Field *field, PyTypeObject *cls, PyObject *name)
{
    field->name = name;
    field->offset = -1;
    field->raise_if_unset = 1;
    field->kind = FIELD_OBJECT;
    PyObject *descriptor = PyObject_GetAttr((PyObject *)cls, name);
    if (descriptor == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    if (Py_IS_TYPE(descriptor, &PyMemberDescr_Type) &&
        PyType_IsSubtype(cls, PyDescr_TYPE(descriptor))) {
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        int type = member->type;
        if ((type == T_OBJECT_EX || type == T_OBJECT || type == T_BOOL || type == T_INT) &&
            !(member->flags & READONLY)) {
            field->offset = member->offset;
            field->raise_if_unset = type == T_OBJECT_EX;
            field->kind = type == T_BOOL ? FIELD_FLAG : type == T_INT ? FIELD_INT : FIELD_OBJECT;
        }
    }
    Py_DECREF(descriptor);
    return 0;
}

/* obj.<field> = value (obj of class `cls`, or any other: then PyObject_SetAttr) */
static inline int
set_field(PyObject *obj, PyTypeObject *cls, Field *field, PyObject *value)
{
    if (field->offset < 0 || Py_TYPE(obj) != cls || field->kind == FIELD_INT ||
        (field->kind == FIELD_FLAG && !PyBool_Check(value)))
        return PyObject_SetAttr(obj, field->name, value); /* (the member's own conversion) */
    if (field->kind == FIELD_FLAG) {
        *((char *)obj + field->offset) = value == Py_True;
        return 0;
    }
    PyObject **slot = (PyObject **)((char *)obj + field->offset);
    PyObject *old = *slot;
    *slot = Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

/* obj.<field>, a new reference (NULL with an error, as PyObject_GetAttr) */
static inline PyObject *
get_field(PyObject *obj, PyTypeObject *cls, Field *field)
{
    if (field->offset < 0 || Py_TYPE(obj) != cls)
        return PyObject_GetAttr(obj, field->name);
    if (field->kind == FIELD_FLAG)
        return Py_NewRef(*((char *)obj + field->offset) ? Py_True : Py_False);
    if (field->kind == FIELD_INT)
        return PyLong_FromLong(*(int *)((char *)obj + field->offset));
    PyObject *value = *(PyObject **)((char *)obj + field->offset);
    if (value != NULL)
        return Py_NewRef(value);
    if (field->raise_if_unset) {
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'",
                     Py_TYPE(obj)->tp_name, field->name);
        return NULL;
    }
    Py_RETURN_NONE;
}

#endif /* SESSIONSCOPE_FIELDS_H */
