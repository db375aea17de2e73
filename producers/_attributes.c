/* Attribute values at C speed: their flattening on the agent's thread, their check and their encoding on the
 * producer's thread. Framework-shaped spans (nested values, numbers) have several times the attribute entries of
 * all-string spans of the same size; in Python each entry cost about 0.5 us over these three steps.
 *
 * flatten: nested attribute values (producers.redaction._flatten).
 *
 * A framework hands over attribute values such as a tool call's parsed arguments: a dict of numbers, booleans,
 * strings, nested dicts and lists. Each leaf becomes a key "prefix.sub" (a list's items by index) and the leaf
 * itself when it is a wire scalar (str, float, bool, or an int of 64 bits), else its JSON text (to_text). In
 * Python that walk costs about 0.2 us a leaf, which made such spans cost twice what all-string spans do; here
 * it is a few tens of nanoseconds.
 *
 * Exactly the Python function's result, bounds included (MAX_FLATTEN_DEPTH, MAX_FLATTENED_KEYS: past either
 * the caller keeps the value whole as JSON text); tests/test_typed_attributes.py compares the two on many
 * shapes. The key strings come from the same cache (_flat_keys: for each prefix, its sub-keys' full names), so
 * a framework's repeated shapes reuse one string object per key. Mappings that are not dicts go through their
 * items() method, as in Python.
 *
 * Two more functions of the same hot path live here: strings_if_wire_scalars, the producer's check of a batch's
 * attribute values, and encode_attributes, a span's attributes as Avro (producers.span_encoder, whose Python
 * loop it replaces; tests/test_span_encoder.py compares both with fastavro).
 *
 * The extension is optional (an install without a C compiler goes on without it): redaction.py then runs the
 * Python functions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *key_cache;      /* dict: prefix -> {sub: full name} (redaction._flat_keys) */
static PyObject *to_text;        /* redaction.to_text */
static PyObject *mapping_type;   /* collections.abc.Mapping */
static Py_ssize_t max_depth, max_items, max_prefixes, max_subkeys;

static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *cache, *text, *mapping;
    Py_ssize_t depth, keys, prefixes, subkeys;
    if (!PyArg_ParseTuple(args, "O!OOnnnn", &PyDict_Type, &cache, &text, &mapping, &depth, &keys, &prefixes,
                          &subkeys)) {
        return NULL;
    }
    Py_INCREF(cache);
    Py_INCREF(text);
    Py_INCREF(mapping);
    Py_XSETREF(key_cache, cache);
    Py_XSETREF(to_text, text);
    Py_XSETREF(mapping_type, mapping);
    max_depth = depth;
    max_items = 2 * keys;
    max_prefixes = prefixes;
    max_subkeys = subkeys;
    Py_RETURN_NONE;
}

/* The cached names of a prefix's sub-keys (a new reference), created empty when missing. */
static PyObject *names_of(PyObject *prefix) {
    PyObject *names = PyDict_GetItemWithError(key_cache, prefix);
    if (names != NULL) {
        Py_INCREF(names);
        return names;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (PyDict_GET_SIZE(key_cache) >= max_prefixes) {
        PyDict_Clear(key_cache);
    }
    names = PyDict_New();
    if (names != NULL && PyDict_SetItem(key_cache, prefix, names) < 0) {
        Py_CLEAR(names);
    }
    return names;
}

/* "prefix.sub" (a new reference), from the cache when sub is an exact str or int. */
static PyObject *name_of(PyObject *names, PyObject *prefix, PyObject *sub) {
    int cacheable = PyUnicode_CheckExact(sub) || PyLong_CheckExact(sub);
    if (cacheable) {
        PyObject *name = PyDict_GetItemWithError(names, sub);
        if (name != NULL) {
            Py_INCREF(name);
            return name;
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *text = PyObject_Format(sub, NULL); /* what f"{sub}" writes */
    if (text == NULL) {
        return NULL;
    }
    PyObject *name = PyUnicode_FromFormat("%U.%U", prefix, text);
    Py_DECREF(text);
    if (name != NULL && cacheable) {
        if (PyDict_GET_SIZE(names) >= max_subkeys) {
            PyDict_Clear(names);
        }
        if (PyDict_SetItem(names, sub, name) < 0) {
            Py_CLEAR(name);
        }
    }
    return name;
}

/* 1: a wire scalar; 0: not one. */
static int is_wire_scalar(PyObject *item) {
    if (PyUnicode_CheckExact(item) || PyFloat_CheckExact(item) || PyBool_Check(item)) {
        return 1;
    }
    if (PyLong_CheckExact(item)) {
        int overflow;
        PyLong_AsLongLongAndOverflow(item, &overflow);
        return overflow == 0;
    }
    return 0;
}

/* 1: a non-empty dict, list, tuple or Mapping (flattened); 0: not one; -1: error. */
static int is_nested(PyObject *item) {
    if (PyDict_CheckExact(item) || PyList_CheckExact(item) || PyTuple_CheckExact(item)) {
        return PyObject_Length(item) > 0;
    }
    int mapping = PyObject_IsInstance(item, mapping_type);
    if (mapping <= 0) {
        return mapping;
    }
    return PyObject_IsTrue(item);
}

static int walk(PyObject *prefix, PyObject *value, Py_ssize_t depth, PyObject *flat, Py_ssize_t base);

/* One (sub, item) of a container: 1 go on, 0 a bound was passed, -1 error. */
static int leaf(PyObject *names, PyObject *prefix, PyObject *sub, PyObject *item, Py_ssize_t depth, PyObject *flat,
                Py_ssize_t base) {
    PyObject *name = name_of(names, prefix, sub);
    if (name == NULL) {
        return -1;
    }
    int result = 1;
    if (is_wire_scalar(item)) {
        result = (PyList_Append(flat, name) < 0 || PyList_Append(flat, item) < 0) ? -1 : 1;
    } else {
        int nested = is_nested(item);
        if (nested < 0) {
            result = -1;
        } else if (nested) {
            result = walk(name, item, depth + 1, flat, base);
        } else {
            PyObject *text = PyObject_CallOneArg(to_text, item);
            result = (text == NULL || PyList_Append(flat, name) < 0 || PyList_Append(flat, text) < 0) ? -1 : 1;
            Py_XDECREF(text);
        }
    }
    Py_DECREF(name);
    if (result == 1 && PyList_GET_SIZE(flat) - base > max_items) {
        return 0;
    }
    return result;
}

static int walk(PyObject *prefix, PyObject *value, Py_ssize_t depth, PyObject *flat, Py_ssize_t base) {
    if (depth >= max_depth) {
        return 0;
    }
    PyObject *names = names_of(prefix);
    if (names == NULL) {
        return -1;
    }
    int result = 1;
    if (PyList_CheckExact(value) || PyTuple_CheckExact(value)) {
        PyObject *items = PySequence_Fast(value, "");  /* a list may change under a to_text call: a fixed copy */
        if (items == NULL) {
            Py_DECREF(names);
            return -1;
        }
        Py_ssize_t size = PySequence_Fast_GET_SIZE(items);
        for (Py_ssize_t i = 0; i < size && result == 1; i++) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) {
                result = -1;
                break;
            }
            PyObject *item = PySequence_Fast_GET_ITEM(items, i);
            Py_INCREF(item);
            result = leaf(names, prefix, index, item, depth, flat, base);
            Py_DECREF(item);
            Py_DECREF(index);
        }
        Py_DECREF(items);
    } else if (PyDict_CheckExact(value)) {
        Py_ssize_t at = 0;
        PyObject *sub, *item;
        while (result == 1 && PyDict_Next(value, &at, &sub, &item)) {
            Py_INCREF(sub); /* a to_text call may change the dict: hold what is being read */
            Py_INCREF(item);
            result = leaf(names, prefix, sub, item, depth, flat, base);
            Py_DECREF(item);
            Py_DECREF(sub);
        }
    } else {
        PyObject *pairs = PyObject_CallMethod(value, "items", NULL);
        PyObject *iterator = pairs == NULL ? NULL : PyObject_GetIter(pairs);
        Py_XDECREF(pairs);
        if (iterator == NULL) {
            Py_DECREF(names);
            return -1;
        }
        PyObject *pair;
        while (result == 1 && (pair = PyIter_Next(iterator)) != NULL) {
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_TypeError, "items() must give (key, value) pairs");
                result = -1;
            } else {
                result = leaf(names, prefix, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1), depth, flat, base);
            }
            Py_DECREF(pair);
        }
        Py_DECREF(iterator);
        if (result == 1 && PyErr_Occurred()) {
            result = -1;
        }
    }
    Py_DECREF(names);
    return result;
}

static PyObject *flatten(PyObject *self, PyObject *args) {
    PyObject *prefix, *value, *flat;
    if (!PyArg_ParseTuple(args, "UOO!", &prefix, &value, &PyList_Type, &flat)) {
        return NULL;
    }
    if (key_cache == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_attributes.setup() was not called");
        return NULL;
    }
    int result = walk(prefix, value, 0, flat, PyList_GET_SIZE(flat)); /* bounds count from what is there */
    if (result < 0) {
        return NULL;
    }
    return PyBool_FromLong(result);
}

/* The str items of a list when every item is a wire scalar (the producer's check of a batch's attribute values),
 * else None: redaction.strings_if_wire_scalars in one pass at C speed. */
static PyObject *strings_if_wire_scalars(PyObject *self, PyObject *values) {
    if (!PyList_CheckExact(values)) {
        PyErr_SetString(PyExc_TypeError, "strings_if_wire_scalars() takes a list");
        return NULL;
    }
    Py_ssize_t size = PyList_GET_SIZE(values), strings = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PyList_GET_ITEM(values, i);
        if (PyUnicode_CheckExact(item)) {
            strings++;
        } else if (!is_wire_scalar(item)) {
            Py_RETURN_NONE;
        }
    }
    PyObject *result = PyList_New(strings);
    if (result == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0, at = 0; i < size; i++) {
        PyObject *item = PyList_GET_ITEM(values, i);
        if (PyUnicode_CheckExact(item)) {
            Py_INCREF(item);
            PyList_SET_ITEM(result, at++, item);
        }
    }
    return result;
}

/* -- a span's attributes as Avro (producers.span_encoder) ------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t size, capacity;
} Buffer;

static int reserve(Buffer *buffer, Py_ssize_t more) {
    if (buffer->size + more <= buffer->capacity) {
        return 0;
    }
    Py_ssize_t capacity = (buffer->size + more) * 2;
    char *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

/* Avro's long: zig-zag, then 7 bits a byte, low group first. */
static int put_long(Buffer *buffer, long long value) {
    if (reserve(buffer, 10) < 0) {
        return -1;
    }
    unsigned long long zigzag = ((unsigned long long)value << 1) ^ (unsigned long long)(value >> 63);
    while (zigzag > 0x7F) {
        buffer->data[buffer->size++] = (char)((zigzag & 0x7F) | 0x80);
        zigzag >>= 7;
    }
    buffer->data[buffer->size++] = (char)zigzag;
    return 0;
}

static int put_bytes(Buffer *buffer, const char *data, Py_ssize_t size) {
    if (reserve(buffer, size) < 0) {
        return -1;
    }
    memcpy(buffer->data + buffer->size, data, size);
    buffer->size += size;
    return 0;
}

/* Avro's string: its UTF-8 length as a long, then the bytes. */
static int put_string(Buffer *buffer, PyObject *text) {
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &size);
    if (utf8 == NULL) {
        return -1;
    }
    return put_long(buffer, size) < 0 ? -1 : put_bytes(buffer, utf8, size);
}

/* The key as an Avro string, from the encoder's cache of repeated strings (bounded like span_encoder._label). */
static int put_key(Buffer *buffer, PyObject *key, PyObject *labels) {
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "attribute key of type %.100s: not a string", Py_TYPE(key)->tp_name);
        return -1;
    }
    PyObject *encoded = PyDict_GetItemWithError(labels, key);
    if (encoded == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        Buffer own = {NULL, 0, 0};
        if (put_string(&own, key) < 0) {
            PyMem_Free(own.data);
            return -1;
        }
        encoded = PyBytes_FromStringAndSize(own.data, own.size);
        PyMem_Free(own.data);
        if (encoded == NULL) {
            return -1;
        }
        if (PyDict_GET_SIZE(labels) >= 4096) {
            PyDict_Clear(labels);
        }
        int stored = PyDict_SetItem(labels, key, encoded);
        Py_DECREF(encoded); /* the dict holds it now */
        if (stored < 0) {
            return -1;
        }
    }
    return put_bytes(buffer, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
}

/* An attribute value: the union's branch (0 string, 1 long, 2 double, 3 boolean), then the value. */
static int put_value(Buffer *buffer, PyObject *value) {
    if (PyUnicode_CheckExact(value)) {
        return put_bytes(buffer, "\x00", 1) < 0 ? -1 : put_string(buffer, value);
    }
    if (PyBool_Check(value)) {
        return put_bytes(buffer, value == Py_True ? "\x06\x01" : "\x06\x00", 2);
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_ValueError, "attribute value beyond 64 bits");
            return -1;
        }
        if (number == -1 && PyErr_Occurred()) {
            return -1;
        }
        return put_bytes(buffer, "\x02", 1) < 0 ? -1 : put_long(buffer, number);
    }
    if (PyFloat_CheckExact(value)) {
        if (reserve(buffer, 9) < 0) {
            return -1;
        }
        buffer->data[buffer->size++] = '\x04';
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), buffer->data + buffer->size, 1) < 0) {
            return -1;
        }
        buffer->size += 8;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "attribute value of type %.100s: not a string, int, float or bool",
                 Py_TYPE(value)->tp_name);
    return -1;
}

/* The attributes key, value, ... from ``start`` of a pending span: the map's block count and its entries (the
 * caller appends the closing 0). */
static PyObject *encode_attributes(PyObject *self, PyObject *args) {
    PyObject *span, *labels;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!nO!", &PyTuple_Type, &span, &start, &PyDict_Type, &labels)) {
        return NULL;
    }
    Py_ssize_t size = PyTuple_GET_SIZE(span);
    if (start > size || (size - start) % 2) {
        PyErr_SetString(PyExc_ValueError, "an attribute key without its value");
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    int failed = put_long(&buffer, (size - start) / 2) < 0;
    for (Py_ssize_t i = start; i < size && !failed; i += 2) {
        failed = put_key(&buffer, PyTuple_GET_ITEM(span, i), labels) < 0 ||
                 put_value(&buffer, PyTuple_GET_ITEM(span, i + 1)) < 0;
    }
    PyObject *result = failed ? NULL : PyBytes_FromStringAndSize(buffer.data, buffer.size);
    PyMem_Free(buffer.data);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_attributes", encode_attributes, METH_VARARGS,
     "encode_attributes(span: tuple, start: int, labels: dict) -> bytes: the span's attributes from start, as "
     "span_encoder writes them (count and entries, without the closing 0)."},
    {"strings_if_wire_scalars", strings_if_wire_scalars, METH_O,
     "strings_if_wire_scalars(values: list) -> list | None: the str items if every item is a wire scalar, else None."},
    {"setup", setup, METH_VARARGS,
     "setup(key_cache, to_text, Mapping, max_depth, max_keys, max_prefixes, max_subkeys): what flatten() uses."},
    {"flatten", flatten, METH_VARARGS,
     "flatten(prefix, value, flat) -> bool: append value's leaves under prefix to flat; False past a bound "
     "(then what it appended is void)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef attributes_module = {PyModuleDef_HEAD_INIT, "_attributes", NULL, 0, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__attributes(void) { return PyModule_Create(&attributes_module); }
