/* The environment of each step of a session (runner.h), and what a hook is handed: the
 * builder's environment, the variables of the environments entered so far and what their
 * enter steps printed (docs/environments.md); a hook's argv (`HOOK ARGS... -e K=V ... --
 * CMD ARGS...`) and its JSON file.
 *
 * The JSON file is valid UTF-8 whatever the variables hold (a weft_env line's value is
 * any bytes but NUL and newline): a byte that is not part of a valid UTF-8 sequence is
 * written as the code point of the same number, \u0080 to \u00ff, so that a hook that
 * wants the bytes back encodes such a string as Latin-1 where it is not UTF-8 (the argv
 * has the bytes as they are). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runner.h"

static const char *const KIND_NAMES[] = {"enter", "build", "exit"};


void *grow(void *array, int n, size_t size) {
    void *more = realloc(array, (size_t)(n + 1) * size);
    if (!more)
        out_of_memory();
    return more;
}

size_t name_len(const char *kv) {
    const char *eq = strchr(kv, '=');
    return eq ? (size_t)(eq - kv) : strlen(kv);
}

static int find_var(const struct vars *v, const char *name, size_t len) {
    for (int i = 0; i < v->n; i++)
        if (name_len(v->kv[i]) == len && memcmp(v->kv[i], name, len) == 0)
            return i;
    return -1;
}

void set_var(struct vars *v, char *kv, int declared) {
    int i = find_var(v, kv, name_len(kv));
    if (i < 0) {
        if (v->n == v->cap) {
            v->cap = v->cap ? v->cap * 2 : 64;
            v->kv = grow(v->kv, v->cap, sizeof *v->kv);
            v->declared = grow(v->declared, v->cap, 1);
        }
        i = v->n++;
    }
    v->kv[i] = kv;
    v->declared[i] = (char)declared;
}

/* As execve takes it: ended by NULL. */
char **terminated(struct vars *v) {
    v->kv = grow(v->kv, v->n, sizeof *v->kv);
    v->kv[v->n] = NULL;
    return v->kv;
}

static void unset_var(struct vars *v, const char *name) {
    int i = find_var(v, name, strlen(name));
    if (i < 0)
        return;
    v->n--;
    memmove(v->kv + i, v->kv + i + 1, (v->n - i) * sizeof *v->kv);
    memmove(v->declared + i, v->declared + i + 1, v->n - i);
}

int valid_name(const char *s, size_t n) {
    if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9')))
            return 0;
    }
    return 1;
}

/* ---- The session ---- */


/* The environment of a step of environment `upto` (entered, with all before it). */
struct vars compose(struct session *s, int upto) {
    struct vars v = {0};
    for (int i = 0; i < s->base.n; i++)
        set_var(&v, s->base.kv[i], s->base.declared[i]);
    for (int j = 0; j <= upto; j++) {
        struct environment *e = &s->plan->envs[j];
        struct changes *c = &s->changes[j];
        for (int i = 0; i < e->n_variables; i++)
            set_var(&v, e->variables[i], 1);
        /* Sets first, then unsets: within one action's output an unset wins. */
        for (int i = 0; i < c->n_sets; i++)
            set_var(&v, c->sets[i], 1);
        for (int i = 0; i < c->n_unsets; i++)
            unset_var(&v, c->unsets[i]);
    }
    return v;
}

static int by_name(const void *a, const void *b) {
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    size_t nx = name_len(x), ny = name_len(y);
    int c = memcmp(x, y, nx < ny ? nx : ny);
    return c ? c : (nx > ny) - (nx < ny);
}

/* The declared variables, sorted by name: what a hook is told the wrapped action gets. */
static char **declared(const struct vars *v, int *n) {
    char **list = grow(NULL, v->n, sizeof *list);
    *n = 0;
    for (int i = 0; i < v->n; i++)
        if (v->declared[i])
            list[(*n)++] = v->kv[i];
    qsort(list, *n, sizeof *list, by_name);
    return list;
}

static void put_s(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* The length of the valid UTF-8 sequence at `s` (at most `n` bytes), 0 if there is none
 * there: no overlong forms, no surrogates, nothing past U+10FFFF. */
static size_t utf8_sequence(const unsigned char *s, size_t n) {
    size_t len = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : 2;
    unsigned char low = 0x80, high = 0xbf; /* the second byte's range */
    if (s[0] < 0xc2 || s[0] > 0xf4 || len > n)
        return 0;
    if (s[0] == 0xe0)
        low = 0xa0;
    else if (s[0] == 0xed)
        high = 0x9f;
    else if (s[0] == 0xf0)
        low = 0x90;
    else if (s[0] == 0xf4)
        high = 0x8f;
    if (s[1] < low || s[1] > high)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return len;
}

/* A JSON string: quotes, backslashes and controls escaped, a byte of no valid UTF-8
 * sequence as \u00XX (the module's docstring says why), the rest as it is. */
static void put_json(struct buf *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    char escape[8];
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        size_t len = u[i] >= 0x80 ? utf8_sequence(u + i, n - i) : 1;
        if (u[i] == '"' || u[i] == '\\') {
            escape[0] = '\\';
            escape[1] = s[i];
            put(b, escape, 2);
        } else if (u[i] < 0x20 || len == 0) {
            snprintf(escape, sizeof escape, "\\u%04x", u[i]);
            put(b, escape, 6);
        } else {
            put(b, s + i, len);
            i += len - 1;
        }
    }
    put(b, "\"", 1);
}

static void json_action(struct buf *b, const struct step *step, const char *env_name,
                        char **pairs, int n) {
    const struct action *w = &step->wrapped;
    put_s(b, "{\"command\": ");
    put_json(b, w->command, strlen(w->command));
    put_s(b, ", \"args\": [");
    for (int i = 0; i < w->n_args; i++) {
        put_s(b, i ? ", " : "");
        put_json(b, w->args[i], strlen(w->args[i]));
    }
    put_s(b, "], \"environment\": {");
    for (int i = 0; i < n; i++) {
        size_t len = name_len(pairs[i]);
        put_s(b, i ? ", " : "");
        put_json(b, pairs[i], len);
        put_s(b, ": ");
        put_json(b, pairs[i] + len + 1, strlen(pairs[i] + len + 1));
    }
    put_s(b, "}, \"timeout\": ");
    put_s(b, *w->timeout ? w->timeout : "null");
    put_s(b, ", \"wraps\": {\"kind\": \"");
    put_s(b, KIND_NAMES[step->kind]);
    put_s(b, "\", \"environment\": ");
    if (env_name)
        put_json(b, env_name, strlen(env_name));
    else
        put_s(b, "null");
    put_s(b, "}}\n");
}

/* The hook's JSON file, in /build (the working directory), at `path`: 0, or -1 and
 * errno. */
static int write_json(struct session *s, int index, char **pairs, int n, const char *path) {
    const struct step *step = &s->plan->steps[index];
    struct buf b = {0};
    json_action(&b, step, step->env < 0 ? NULL : s->plan->envs[step->env].name, pairs, n);
    /* Whatever an earlier step left there goes; a link or a FIFO is not followed. */
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    int written = write_all(fd, b.data, b.len), err = errno;
    free(b.data);
    if (close(fd) != 0 || written != 0) {
        errno = written ? err : errno;
        return -1;
    }
    return 0;
}

/* argv and envp of step `index`; NULL with errno if the hook's file cannot be written. */
char **command_line(struct session *s, int index, struct vars *env) {
    const struct step *step = &s->plan->steps[index];
    const struct action *run = &step->run;
    int n_pairs = 0;
    char **pairs = *step->hook ? declared(env, &n_pairs) : NULL;
    int n = 1 + run->n_args + (*step->hook ? 2 * n_pairs + 2 + step->wrapped.n_args : 0);
    char **argv = grow(NULL, n + 1, sizeof *argv), **a = argv;
    *a++ = run->command;
    for (int i = 0; i < run->n_args; i++)
        *a++ = run->args[i];
    if (*step->hook) {
        static char path[64], var[96];
        for (int i = 0; i < n_pairs; i++) {
            *a++ = "-e";
            *a++ = pairs[i];
        }
        *a++ = "--";
        *a++ = step->wrapped.command;
        for (int i = 0; i < step->wrapped.n_args; i++)
            *a++ = step->wrapped.args[i];
        snprintf(path, sizeof path, "/build/.weft-wrap-%d.json", index);
        if (write_json(s, index, pairs, n_pairs, path) != 0)
            return NULL;
        snprintf(var, sizeof var, "WEFT_WRAP_JSON=%s", path);
        set_var(env, var, 0);
        free(pairs);
    }
    *a = NULL;
    return argv;
}
