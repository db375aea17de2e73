/* The redactor's cheap pre-test (producers.redaction.Redactor.may_hold_secret) in one pass over UTF-8 bytes.
 *
 * It answers "may a detector of the catalogue (producers.redaction.CATALOGUE) match here?" and must never say
 * no when one does (a superset test): the regular expressions run only when it says yes. A detector needs one of
 *   - an assignment: a key word, then quotes, backticks or backslashes, spaces, and ':' or '=': secret(s),
 *     password(s), passwd, pwd, passphrase, token, auth, credential(s), cookie(s), authorization, sig, signature,
 *     or key after '?', '&' or a qualifier (api, access, secret, private, account, storage, signing, encryption,
 *     master, client, subscription, ssh, deploy) and maybe one separator ('-', '.', ' ') (secret-named keys,
 *     passwords, Authorization and Cookie headers, secret query parameters);
 *   - a token prefix: a dash or underscore right after a whole word sk, rk, hf, whsec, xapp, xox? (one of
 *     abeoprs), gh? (one of pousr), gl and 2 to 5 letters, or after "github_pat" (OpenAI-style, Anthropic,
 *     Stripe, Hugging Face, Slack, GitHub and GitLab tokens); a word starts after a byte that is no letter or
 *     digit, or after "\n", "\r" or "\t" (escaped in a JSON string);
 *   - "-----begin" (PEM private keys);
 *   - "://" and then, before a space, '/', '?' or '#', a ':' and after it an '@' (passwords in URLs);
 *   - the word "bearer" or "basic" (any case);
 *   - case-sensitive: "AKIA", "ASIA", "ABIA", "ACCA" (AWS key ids), "AIza" (Google keys), "eyJ" (JWTs),
 *     a digit and "Q~" (Azure AD client secrets).
 * Letters are compared ASCII-lower-cased, '=' as ':' and '_' as '-', except in the case-sensitive marks. Text
 * with non-ASCII characters is scanned twice by the caller: folded (Python's lower() plus the characters the
 * regexes equate with ASCII ones) and as it is (for the case-sensitive marks).
 *
 * Pure Python needs several passes over the text (translate, reverse, searches); this pass tests 16 bytes at a
 * time for the few bytes where a mark can start and checks those one by one: about 0.35 us for 1 KB of prose.
 *
 * The extension is optional (an install without a C compiler goes on without it): redaction.py then runs
 * _scan_bytes_in_python, which must give the same answer for any bytes; tests/test_redaction.py compares them.
 * A change to what this scan looks for is a change to both, and to the list above.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static unsigned char fold[256];   /* ASCII lower case, '=' as ':', '_' as '-' */
static unsigned char starts[256]; /* the bytes where a check starts */

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        fold[c] = (unsigned char)((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
    }
    fold['='] = ':';
    fold['_'] = '-';
    for (const char *c = ":=-_bBAe~"; *c; c++) {
        starts[(unsigned char)*c] = 1;
    }
}

/* A word and its length, so that a comparison needs no strlen. */
typedef struct {
    const char *text;
    Py_ssize_t length;
} word_t;
#define WORD(literal) {literal, sizeof(literal) - 1}
#define TEXT(literal) ((word_t)WORD(literal)) /* a string literal as a word_t, in an expression */

/* True when the folded bytes ending just before `end` spell `word` (compared from the end, where most differ). */
static int ends_with(const unsigned char *data, Py_ssize_t end, word_t word) {
    if (end < word.length) {
        return 0;
    }
    for (Py_ssize_t i = 1; i <= word.length; i++) {
        if (fold[data[end - i]] != (unsigned char)word.text[word.length - i]) {
            return 0;
        }
    }
    return 1;
}

/* True when the folded bytes starting at `at` spell `word`. */
static int starts_with(const unsigned char *data, Py_ssize_t size, Py_ssize_t at, word_t word) {
    return size - at >= word.length && ends_with(data, at + word.length, word);
}

/* True when the folded bytes ending just before `end` spell one of `words`. */
static int ends_with_one_of(const unsigned char *data, Py_ssize_t end, const word_t *words, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (ends_with(data, end, words[i])) {
            return 1;
        }
    }
    return 0;
}

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static int is_word(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

static int is_letter(unsigned char c) { return c >= 'a' && c <= 'z'; }

static int one_of(unsigned char c, const char *letters) { return c != 0 && strchr(letters, c) != NULL; }

/* At an assignment sign: a key word, then quotes, backticks or backslashes and spaces, right before it. "key"
 * counts after a qualifier (api, access ... and maybe a separator: api_key, SecretAccessKey) or '?' or '&'. */
static int assigned(const unsigned char *data, Py_ssize_t at) {
    static const word_t words[] = {
        WORD("secret"), WORD("secrets"),    WORD("password"),    WORD("passwords"), WORD("passwd"),
        WORD("pwd"),    WORD("passphrase"), WORD("token"),       WORD("auth"),      WORD("credential"),
        WORD("credentials"), WORD("cookie"), WORD("cookies"),    WORD("authorization"), WORD("sig"),
        WORD("signature"),
    };
    static const word_t qualifiers[] = {
        WORD("api"),     WORD("access"),     WORD("secret"), WORD("private"), WORD("account"),
        WORD("storage"), WORD("signing"),    WORD("encryption"), WORD("master"), WORD("client"),
        WORD("subscription"), WORD("ssh"),   WORD("deploy"),
    };
    Py_ssize_t end = at;
    while (end > 0 && is_space(data[end - 1])) {
        end--;
    }
    while (end > 0 && one_of(data[end - 1], "\"'`\\")) {
        end--;
    }
    if (ends_with_one_of(data, end, words, sizeof(words) / sizeof(words[0]))) {
        return 1;
    }
    if (!ends_with(data, end, TEXT("key"))) {
        return 0;
    }
    Py_ssize_t before = end - 3; /* where "key" starts */
    if (before > 0 && one_of(data[before - 1], "?&")) {
        return 1;
    }
    if (before > 0 && one_of(fold[data[before - 1]], "-. ")) {
        before--;
    }
    return ends_with_one_of(data, before, qualifiers, sizeof(qualifiers) / sizeof(qualifiers[0]));
}

/* Whether a word may start at data[pos]: at the start, after a byte that is no letter or digit, or after an
 * escaped line break or tab ("\n", "\r", "\t" inside a JSON string). */
static int starts_word(const unsigned char *data, Py_ssize_t pos) {
    return pos == 0 || !is_word(fold[data[pos - 1]]) ||
           (pos >= 2 && data[pos - 2] == '\\' && one_of(fold[data[pos - 1]], "nrt"));
}

/* Whether data[start..at) is a token prefix: sk, rk, hf, whsec, xapp, xox?, gh?, gl and 2 to 5 letters, or pat
 * after "github-". */
static int token_prefix(const unsigned char *data, Py_ssize_t start, Py_ssize_t at) {
    const unsigned char *word = data + start;
    Py_ssize_t length = at - start;
    switch (length) {
    case 2:
        return ends_with(data, at, TEXT("sk")) || ends_with(data, at, TEXT("rk")) || ends_with(data, at, TEXT("hf"));
    case 3:
        return (ends_with(data, at - 1, TEXT("gh")) && one_of(fold[word[2]], "pousr")) ||
               (ends_with(data, at, TEXT("pat")) && ends_with(data, start, TEXT("github-")) &&
                starts_word(data, start - 7));
    case 4:
        if (ends_with(data, at, TEXT("xapp")) ||
            (ends_with(data, at - 1, TEXT("xox")) && one_of(fold[word[3]], "abeoprs"))) {
            return 1;
        }
        break;
    case 5:
        if (ends_with(data, at, TEXT("whsec"))) {
            return 1;
        }
        break;
    }
    if (length < 4 || length > 7 || fold[word[0]] != 'g' || fold[word[1]] != 'l') {
        return 0;
    }
    for (Py_ssize_t i = 2; i < length; i++) { /* GitLab */
        if (!is_letter(fold[word[i]])) {
            return 0;
        }
    }
    return 1;
}

/* At a dash (or underscore): a token prefix, a whole word before it (after an escape letter, maybe). */
static int dashed(const unsigned char *data, Py_ssize_t at) {
    Py_ssize_t start = at;
    while (start > 0 && at - start < 8 && is_word(fold[data[start - 1]])) {
        start--;
    }
    for (Py_ssize_t from = start; from <= start + 1 && from < at; from++) {
        if (starts_word(data, from) && token_prefix(data, from, at)) {
            return 1;
        }
    }
    return 0;
}

/* At the ':' of "://": a ':' and then an '@' before a space, '/', '?' or '#' (scheme://user:password@). */
static int userinfo(const unsigned char *data, Py_ssize_t size, Py_ssize_t at) {
    if (size - at < 3 || data[at + 1] != '/' || data[at + 2] != '/') {
        return 0;
    }
    int colon = 0;
    for (Py_ssize_t i = at + 3; i < size && !is_space(data[i]) && !one_of(data[i], "/?#"); i++) {
        if (fold[data[i]] == ':') {
            colon = 1;
        } else if (data[i] == '@' && colon) {
            return 1;
        }
    }
    return 0;
}

/* True when a check starting at data[at] finds a mark. */
static int check(const unsigned char *data, Py_ssize_t size, Py_ssize_t at) {
    switch (data[at]) {
    case ':':
    case '=':
        return assigned(data, at) || userinfo(data, size, at);
    case '-':
    case '_':
        return dashed(data, at) || starts_with(data, size, at, TEXT("-----begin"));
    case 'b':
    case 'B':
        return starts_with(data, size, at, TEXT("bearer")) || starts_with(data, size, at, TEXT("basic"));
    case 'A':
        return size - at >= 4 &&
               (((data[at + 1] == 'K' || data[at + 1] == 'S' || data[at + 1] == 'B') && data[at + 2] == 'I' &&
                 data[at + 3] == 'A') ||
                (data[at + 1] == 'C' && data[at + 2] == 'C' && data[at + 3] == 'A') ||
                (data[at + 1] == 'I' && data[at + 2] == 'z' && data[at + 3] == 'a'));
    case 'e':
        return size - at >= 3 && data[at + 1] == 'y' && data[at + 2] == 'J';
    default: /* '~' */
        return at >= 2 && data[at - 1] == 'Q' && data[at - 2] >= '0' && data[at - 2] <= '9';
    }
}

/* 16 bytes at a time (GCC/Clang vector extensions: SSE2 on x86-64, NEON on ARM). */
typedef unsigned char bytes16 __attribute__((vector_size(16)));
typedef signed char mask16 __attribute__((vector_size(16)));

static bytes16 load16(const unsigned char *p) {
    bytes16 v;
    memcpy(&v, p, 16);
    return v;
}

/* Whether a check may succeed at one of the 16 bytes at p (reads 5 bytes beyond them): one of the rare signs,
 * an 'A' or '~', or letters of "bearer" (offsets 0, 1, 3, 5), "basic" (0, 1, 2, 4) or "eyJ" (a plain 'b' or
 * 'e' is too common). */
static int block_may_match(const unsigned char *p) {
    bytes16 v = load16(p), lower = v | 0x20;
    bytes16 next1 = load16(p + 1), next2 = load16(p + 2);
    mask16 hits = (v == ':') | (v == '=') | (v == '-') | (v == '_') | (v == 'A') | (v == '~') |
                  ((lower == 'b') & ((next1 | 0x20) == 'e') & ((load16(p + 3) | 0x20) == 'r') &
                   ((load16(p + 5) | 0x20) == 'r')) |
                  ((lower == 'b') & ((next1 | 0x20) == 'a') & ((next2 | 0x20) == 's') &
                   ((load16(p + 4) | 0x20) == 'c')) |
                  ((v == 'e') & (next1 == 'y') & (next2 == 'J'));
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
     "may_hold_secret(data: bytes) -> bool: False when no detector of the catalogue can match in the UTF-8 bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {PyModuleDef_HEAD_INIT, "_secret_scan", NULL, 0, methods};

PyMODINIT_FUNC PyInit__secret_scan(void) {
    init_tables();
    return PyModule_Create(&scan_module);
}
