/* The session runner's plan (runner.h): the last section of a spare's request, as the
 * daemon wrote it (daemon/wire/spawner.py), parsed in place and checked, so that the
 * rest of the runner can trust its indexes.  Its format is in runner.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "runner.h"

static char *take(char **cursor, char *end) {
    if (*cursor >= end)
        return NULL;
    char *s = *cursor;
    *cursor += strlen(s) + 1;
    return s;
}

static int take_number(char **cursor, char *end, long low, long high, long *value) {
    char *s = take(cursor, end), *rest;
    if (!s || !*s)
        return -1;
    errno = 0;
    long v = strtol(s, &rest, 10);
    if (errno || *rest || v < low || v > high)
        return -1;
    *value = v;
    return 0;
}

static char **take_list(char **cursor, char *end, int *count) {
    long n;
    /* Each string takes at least its NUL. */
    if (take_number(cursor, end, 0, end - *cursor, &n))
        return NULL;
    char **list = calloc(n + 1, sizeof *list);
    if (!list)
        return NULL;
    for (long i = 0; i < n; i++)
        if (!(list[i] = take(cursor, end)))
            return NULL;
    *count = (int)n;
    return list;
}

static int take_action(char **cursor, char *end, struct action *a) {
    a->command = take(cursor, end);
    if (!a->command || !(a->args = take_list(cursor, end, &a->n_args)))
        return -1;
    a->timeout = take(cursor, end);
    return a->timeout ? 0 : -1;
}

/* A timeout in seconds (a JSON number), and in milliseconds rounded up; -1 for "". */
static int timeout_ms(const char *text, double *seconds, long long *ms) {
    char *rest;
    if (!*text) {
        *ms = -1;
        return 0;
    }
    errno = 0;
    double t = strtod(text, &rest);
    if (errno || *rest || !(t > 0) || t > 1e9)
        return -1;
    long long v = (long long)(t * 1000);
    *ms = v < t * 1000 || v == 0 ? v + 1 : v;
    *seconds = t;
    return 0;
}

static int take_step(char **cursor, char *end, struct plan *p, int index) {
    struct step *s = &p->steps[index];
    char *kind = take(cursor, end);
    long env;
    if (!kind || take_number(cursor, end, -1, p->n_envs - 1, &env))
        return -1;
    s->env = (int)env;
    if (strcmp(kind, "enter") == 0)
        s->kind = ENTER;
    else if (strcmp(kind, "exit") == 0)
        s->kind = EXIT;
    else if (strcmp(kind, "build") == 0)
        s->kind = BUILD;
    else
        return -1;
    if ((s->kind == BUILD) != (env < 0) || !(s->label = take(cursor, end)) ||
        take_action(cursor, end, &s->run) || !(s->hook = take(cursor, end)) ||
        take_action(cursor, end, &s->wrapped) || !*s->run.command ||
        !*s->hook != !*s->wrapped.command)
        return -1;
    int *slot = s->kind == BUILD ? &p->build
                : s->kind == ENTER ? &p->envs[env].enter
                                   : &p->envs[env].exit;
    if (*slot >= 0)
        return -1;
    *slot = index;
    long long own, wrapped;
    double own_s = 0, wrapped_s = 0;
    if (timeout_ms(s->run.timeout, &own_s, &own) ||
        timeout_ms(s->wrapped.timeout, &wrapped_s, &wrapped))
        return -1;
    s->timeout_ms = own;
    s->timeout = own_s;
    if (wrapped >= 0 && (own < 0 || wrapped < own)) {
        s->timeout_ms = wrapped;
        s->timeout = wrapped_s;
    }
    return 0;
}

struct plan *read_plan(char **cursor, char *end) {
    struct plan *p = calloc(1, sizeof *p);
    char *word = take(cursor, end);
    long n;
    if (!p || !word || strcmp(word, "plan") != 0 || take_number(cursor, end, 0, 1L << 40, &n))
        goto bad;
    p->grace_ms = n;
    if (!(p->declared = take_list(cursor, end, &p->n_declared)) ||
        take_number(cursor, end, 1, MAX_ENVS, &n) || !(p->envs = calloc(n, sizeof *p->envs)))
        goto bad;
    p->n_envs = (int)n;
    for (int i = 0; i < p->n_envs; i++) {
        struct environment *e = &p->envs[i];
        e->enter = e->exit = -1;
        if (!(e->name = take(cursor, end)) ||
            !(e->variables = take_list(cursor, end, &e->n_variables)))
            goto bad;
        for (int v = 0; v < e->n_variables; v++)
            if (!strchr(e->variables[v], '='))
                goto bad;
    }
    if (take_number(cursor, end, 1, MAX_STEPS, &n) || !(p->steps = calloc(n, sizeof *p->steps)))
        goto bad;
    p->n_steps = (int)n;
    p->build = -1;
    for (int i = 0; i < p->n_steps; i++)
        if (take_step(cursor, end, p, i))
            goto bad;
    if (p->build < 0 || *cursor != end)
        goto bad;
    return p;
bad:
    errno = EINVAL;
    return NULL;
}
