/* The redactor's cheap pre-test (producers.redaction.Redactor.may_hold_secret) in one pass over UTF-8 bytes.
 *
 * It answers "may a built-in secret shape match here?" and must never say no when one does (a superset
 * test): the regular expressions run only when it says yes. A secret shape needs one of
 *   - an assignment: a key word, an optional quote, spaces, then ':' or '='  (api key, authorization,
 *     secret, password, access/refresh token);
 *   - a dash or underscore right after "sk", "xox?" or "gh?" at the start of a word (OpenAI, Slack, GitHub);
 *   - the word "bearer" (any case);
 *   - "AKIA" or "ASIA" (AWS key ids, case-sensitive).
 * Letters are compared ASCII-lower-cased, '=' as ':' and '_' as '-'. Text with non-ASCII characters is
 * folded by the caller first (Python's lower() plus the characters the regexes equate with ASCII ones).
 *
 * Pure Python needed six passes over the text (translate, reverse, four searches): 1.9 us of each 1 KB span
 * on the SpanProducer's thread, the largest share of its work. This pass tests 16 bytes at a time for the
 * few bytes where a shape can start and checks those one by one: about 0.2 us a span.
 *
 * The extension is optional (an install without a C compiler goes on without it): redaction.py then runs
 * _scan_bytes_in_python, which must give the same answer for any bytes; tests/test_redaction.py compares them.
 * A change to what this scan looks for is a change to both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static unsigned char fold[256];   /* ASCII lower case, '=' as ':', '_' as '-' */
static unsigned char starts[256]; /* the bytes where a check starts: ':', '=', '-', '_', 'b', 'B', 'A' */

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        fold[c] = (unsigned char)((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
    }
    fold['='] = ':';
    fold['_'] = '-';
    for (const char *c = ":=-_bBA"; *c; c++) {
        starts[(unsigned char)*c] = 1;
    }
}

/* True when the folded bytes ending just before `end` spell `word`. */
static int ends_with(const unsigned char *data, Py_ssize_t end, const char *word) {
    Py_ssize_t length = (Py_ssize_t)strlen(word);
    if (end < length) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < length; i++) {
        if (fold[data[end - length + i]] != (unsigned char)word[i]) {
            return 0;
        }
    }
    return 1;
}

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static int is_word(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

static int one_of(unsigned char c, const char *letters) { return c != 0 && strchr(letters, c) != NULL; }

/* At an assignment sign: a key word, then an optional quote and spaces, right before it. */
static int assigned(const unsigned char *data, Py_ssize_t at) {
    static const char *words[] = {"key", "authorization", "secret", "passwd", "password", "token"};
    Py_ssize_t end = at;
    while (end > 0 && is_space(data[end - 1])) {
        end--;
    }
    if (end > 0 && (data[end - 1] == '"' || data[end - 1] == '\'')) {
        end--;
    }
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        if (ends_with(data, end, words[i])) {
            return 1;
        }
    }
    return 0;
}

/* At a dash (or underscore): "sk", "xox[abprs]" or "gh[pousr]" right before it, at the start of a word. */
static int dashed(const unsigned char *data, Py_ssize_t at) {
    Py_ssize_t start = -1;
    if (ends_with(data, at, "sk")) {
        start = at - 2;
    } else if (at >= 4 && ends_with(data, at - 1, "xox") && one_of(fold[data[at - 1]], "abprs")) {
        start = at - 4;
    } else if (at >= 3 && ends_with(data, at - 1, "gh") && one_of(fold[data[at - 1]], "pousr")) {
        start = at - 3;
    }
    return start >= 0 && (start == 0 || !is_word(fold[data[start - 1]]));
}

/* True when a check starting at data[at] finds a secret shape. */
static int check(const unsigned char *data, Py_ssize_t size, Py_ssize_t at) {
    unsigned char c = fold[data[at]];
    if (c == ':') {
        return assigned(data, at);
    }
    if (c == '-') {
        return dashed(data, at);
    }
    if (c == 'b') {
        return size - at >= 6 && fold[data[at + 5]] == 'r' && ends_with(data, at + 6, "bearer");
    }
    /* 'A' */
    return size - at >= 4 && (data[at + 1] == 'K' || data[at + 1] == 'S') && data[at + 2] == 'I' && data[at + 3] == 'A';
}

/* 16 bytes at a time (GCC/Clang vector extensions: SSE2 on x86-64, NEON on ARM). */
typedef unsigned char bytes16 __attribute__((vector_size(16)));
typedef signed char mask16 __attribute__((vector_size(16)));

static bytes16 load16(const unsigned char *p) {
    bytes16 v;
    memcpy(&v, p, 16);
    return v;
}

/* Whether a check may succeed at one of the 16 bytes at p (reads 5 bytes beyond them): one of the rare
 * signs, an 'A', or the letters of "bearer" at offsets 0, 1, 3 and 5 (a plain 'b' is too common). */
static int block_may_match(const unsigned char *p) {
    bytes16 v = load16(p);
    mask16 hits = (v == ':') | (v == '=') | (v == '-') | (v == '_') | (v == 'A') |
                  (((v | 0x20) == 'b') & ((load16(p + 1) | 0x20) == 'e') & ((load16(p + 3) | 0x20) == 'r') &
                   ((load16(p + 5) | 0x20) == 'r'));
    uint64_t low, high;
    memcpy(&low, &hits, 8);
    memcpy(&high, (const unsigned char *)&hits + 8, 8);
    return (low | high) != 0;
}

static PyObject *may_hold_secret(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, at = 0;
    int found = 0;
    for (; at + 21 <= size && !found; at += 16) {
        if (block_may_match(data + at)) {
            for (Py_ssize_t i = at; i < at + 16 && !found; i++) {
                found = starts[data[i]] && check(data, size, i);
            }
        }
    }
    for (; at < size && !found; at++) {
        found = starts[data[at]] && check(data, size, at);
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"may_hold_secret", may_hold_secret, METH_O,
     "may_hold_secret(data: bytes) -> bool: False when no built-in secret shape can match in the UTF-8 bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {PyModuleDef_HEAD_INIT, "_secret_scan", NULL, 0, methods};

PyMODINIT_FUNC PyInit__secret_scan(void) {
    init_tables();
    return PyModule_Create(&scan_module);
}
