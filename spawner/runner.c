/* The session runner: the first process of a build whose derivation has environments.
 *
 * A mode of the spare program (spare.c), so that no second program has to be visible in
 * the sandbox, where only the input closure is (and no Python): once the sandbox is set
 * up, the spare becomes this runner instead of exec'ing the builder.  It is pid 1 of the
 * build's pid namespace, running as the build user.  It runs the session the daemon
 * planned (store/buildenv.py's `session_steps`; docs/environments.md): the enter steps in
 * order, then the build step, then the exit steps in reverse for every environment entered
 * or attempted, also after a failure or a stop.  It only executes: what runs, in what
 * order, with which labels and timeouts, all comes in the request.
 *
 * Each step is a process group of its own, started with the builder's environment plus
 * the variables of every environment entered so far (its own included) and what earlier
 * enter steps printed on stdout (`weft_env: K=V`, `weft_unset_env: K`; within one step an
 * unset wins).  An enter step's stdout comes through this process, which scans it and
 * passes it on to the log.  A hook (a wrapper's `wrap_env_enter`, `wrap_build`,
 * `wrap_env_exit`) runs as `HOOK ARGS... -e K=V ... -- CMD ARGS...` (the pairs: what the
 * derivation, the environments and weft_env lines set, sorted by name) with the same
 * description in a JSON file, /build/.weft-wrap-N.json, named by WEFT_WRAP_JSON.
 *
 * An action's timeout: SIGTERM to its process group, the grace, SIGKILL; time the sandbox
 * spends paused (frozen, or stopped by signals) does not count, so a paused build's
 * actions do not time out for it.  SIGTERM from the daemon (a build's timeout, its
 * silence, a cancellation; a SIGTERM sent from inside the sandbox is ignored): the running
 * step gets SIGTERM and half the grace, then SIGKILL; the exit steps due run in what is
 * left of the grace, the last of them killed before the daemon's SIGKILL would come.
 *
 * The log gets `weft: <label>` before each step and `weft: <label> done` or `weft: <label>
 * failed: ...` after it (an exit step the grace left no time for: `weft: <label> skipped:
 * the grace is over`).  The daemon learns how the session ended on the report pipe, a
 * descriptor only this process holds (close-on-exec, and the process not dumpable, so no
 * step can reach it through /proc): one line at the end,
 *
 *     weft-runner-1 STEP END CODE STOPPED STOP_STEP
 *
 * STEP the index (in the plan) of the step that decided the outcome (-1: none), END one of
 * none, ok, exit (CODE its exit code), signal (CODE the signal), timeout (CODE its exit
 * code, or minus the signal that ended it), exec (it could not be started: CODE the errno);
 * STOPPED 1 if the daemon stopped the session, STOP_STEP the step running then (-1: none).
 * Exit code 0 if every step succeeded, 1 otherwise.
 *
 * The plan, after the rest of the request (spare.c), NUL-terminated strings:
 *     "plan" GRACE_MS N_DECLARED names... N_ENVS (name N_VARS "k=v"...)...
 *     N_STEPS (kind env label command N_ARGS args... timeout
 *              hook wrapped_command N_WARGS wrapped_args... wrapped_timeout)...
 * kind enter, build or exit; env the environment's index (-1 for the build); timeouts in
 * seconds as JSON numbers, "" for none; hook "" (and no wrapped action) when unwrapped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"

#define REPORT_MAGIC "weft-runner-1"
#define LOG_FD 1
/* Polls wake at least this often, and a wake-up counts for at most TICK_MS + SLACK_MS of
 * an action's time: a longer gap is the sandbox paused (frozen by the daemon's scheduler,
 * or stopped), which must not time its actions out. */
#define TICK_MS 1000
#define SLACK_MS 500
/* The last exit step is killed this long (at most a tenth of the grace) before the grace
 * ends, so that the report is written before the daemon's SIGKILL. */
#define STOP_MARGIN_MS 1000
/* The longest weft_env line read: a variable longer than execve's limit on one string
 * (MAX_ARG_STRLEN, 128 KiB) could reach no later step. */
#define MAX_SCANNED_LINE (128 * 1024 + 64)
/* One read of an enter step's stdout: a pipe's capacity. */
#define CHUNK 65536
/* Room for a log line of this program's (a label, a program's path, an error). */
#define SAY_MAX 8192
/* Bounds on the plan, far above what store/buildenv.py lets through (16 environments). */
#define MAX_ENVS 1024
#define MAX_STEPS 4096

enum kind { ENTER, BUILD, EXIT };
enum end { END_NONE, END_OK, END_EXIT, END_SIGNAL, END_TIMEOUT, END_EXEC };
static const char *const END_NAMES[] = {"none", "ok", "exit", "signal", "timeout", "exec"};
static const char *const KIND_NAMES[] = {"enter", "build", "exit"};

struct action {
    char *command;
    char **args;
    int n_args;
    char *timeout; /* as the request has it: "" for none */
};

struct step {
    enum kind kind;
    int env; /* -1 for the build */
    char *label;
    struct action run; /* what runs: the action, or the hook */
    char *hook;        /* "" when unwrapped */
    struct action wrapped;
    long long timeout_ms; /* the nearer of the hook's and the wrapped action's; -1: none */
    double timeout; /* the same, in seconds */
};

struct environment {
    char *name;
    char **variables;
    int n_variables;
    int enter, exit; /* step indexes, -1 for none */
};

struct plan {
    long long grace_ms;
    char **declared; /* names of the builder's environment the derivation set */
    int n_declared;
    struct environment *envs;
    int n_envs;
    struct step *steps;
    int n_steps;
    int build;
};

/* ---- The plan ---- */

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

/* ---- Output ---- */

/* 0, or -1 with errno (for the log, nobody to tell: it is gone). */
static int write_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t done = write(fd, data, n);
        if (done < 0 && errno == EINTR)
            continue;
        if (done < 0)
            return -1;
        if (done == 0) {
            errno = EIO;
            return -1;
        }
        data += done;
        n -= done;
    }
    return 0;
}

static void say(const char *format, ...) {
    char line[SAY_MAX];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line - 1, format, args);
    va_end(args);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    write_all(LOG_FD, line, n);
}

struct buf {
    char *data;
    size_t len, cap;
};

static void __attribute__((noreturn)) out_of_memory(void);

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *data = realloc(b->data, cap);
        if (!data)
            out_of_memory();
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void put_s(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* A JSON string: bytes other than quotes, backslashes and controls as they are. */
static void put_json(struct buf *b, const char *s, size_t n) {
    char escape[8];
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            escape[0] = '\\';
            escape[1] = c;
            put(b, escape, 2);
        } else if (c < 0x20) {
            snprintf(escape, sizeof escape, "\\u%04x", c);
            put(b, escape, 6);
        } else {
            put(b, s + i, 1);
        }
    }
    put(b, "\"", 1);
}

static const char *signal_name(int sig, char *buf, size_t size) {
    static const char *const names[] = {
        [SIGHUP] = "SIGHUP",   [SIGINT] = "SIGINT",       [SIGQUIT] = "SIGQUIT",
        [SIGILL] = "SIGILL",   [SIGTRAP] = "SIGTRAP",     [SIGABRT] = "SIGABRT",
        [SIGBUS] = "SIGBUS",   [SIGFPE] = "SIGFPE",       [SIGKILL] = "SIGKILL",
        [SIGUSR1] = "SIGUSR1", [SIGSEGV] = "SIGSEGV",     [SIGUSR2] = "SIGUSR2",
        [SIGPIPE] = "SIGPIPE", [SIGALRM] = "SIGALRM",     [SIGTERM] = "SIGTERM",
        [SIGSTKFLT] = "SIGSTKFLT", [SIGCHLD] = "SIGCHLD", [SIGCONT] = "SIGCONT",
        [SIGSTOP] = "SIGSTOP", [SIGTSTP] = "SIGTSTP",     [SIGTTIN] = "SIGTTIN",
        [SIGTTOU] = "SIGTTOU", [SIGURG] = "SIGURG",       [SIGXCPU] = "SIGXCPU",
        [SIGXFSZ] = "SIGXFSZ", [SIGVTALRM] = "SIGVTALRM", [SIGPROF] = "SIGPROF",
        [SIGWINCH] = "SIGWINCH", [SIGIO] = "SIGIO",       [SIGPWR] = "SIGPWR",
        [SIGSYS] = "SIGSYS",
    };
    if (sig > 0 && sig < (int)(sizeof names / sizeof *names) && names[sig])
        return names[sig];
    snprintf(buf, size, "signal %d", sig);
    return buf;
}

/* ---- Variables ---- */

struct vars {
    char **kv; /* "K=V", not owned */
    char *declared;
    int n, cap;
};

struct changes {
    char **sets;   /* "K=V" */
    char **unsets; /* "K" */
    int n_sets, n_unsets;
};

static void *grow(void *array, int n, size_t size) {
    void *more = realloc(array, (size_t)(n + 1) * size);
    if (!more)
        out_of_memory();
    return more;
}

static size_t name_len(const char *kv) {
    const char *eq = strchr(kv, '=');
    return eq ? (size_t)(eq - kv) : strlen(kv);
}

static int find_var(const struct vars *v, const char *name, size_t len) {
    for (int i = 0; i < v->n; i++)
        if (name_len(v->kv[i]) == len && memcmp(v->kv[i], name, len) == 0)
            return i;
    return -1;
}

static void set_var(struct vars *v, char *kv, int declared) {
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
static char **terminated(struct vars *v) {
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

static int valid_name(const char *s, size_t n) {
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

struct forward {
    int fd;
    int scan; /* its lines are scanned for weft_env, into its step's environment's changes */
    int step;
    int overlong;
    struct buf line;
};

struct run {
    int step;
    pid_t pid;
    int exited, status;
    long long started;   /* on the active clock */
    long long kill_at;   /* monotonic ms; -1: none */
    int timed_out, termed, killed;
};

struct session {
    struct plan *plan;
    struct vars base;
    struct changes *changes; /* per environment: what its enter step printed */
    int sigfd, report_fd;
    struct forward *forwards;
    int n_forwards;
    struct run run; /* the step running, if run.step >= 0 */
    long long last, active; /* the monotonic clock's last reading; the active clock */
    int stopping, stop_step;
    long long stop_deadline;
};

static struct session *current;

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Advance the active clock by the time since the last reading, but by no more than a
 * wake-up's worth: a longer gap was a pause. */
static void tick(struct session *s) {
    long long now = now_ms(), gap = now - s->last;
    s->last = now;
    if (gap > TICK_MS + SLACK_MS)
        gap = TICK_MS + SLACK_MS;
    if (gap > 0)
        s->active += gap;
}

static void report(struct session *s, int step, enum end end, int code) {
    char line[128];
    int n = snprintf(line, sizeof line, REPORT_MAGIC " %d %s %d %d %d\n", step, END_NAMES[end],
                     code, s->stopping, s->stop_step);
    write_all(s->report_fd, line, n);
}

static void __attribute__((noreturn)) out_of_memory(void) {
    struct session *s = current;
    say("weft: the session runner ran out of memory");
    if (s) {
        if (s->run.step >= 0 && !s->run.exited)
            kill(-s->run.pid, SIGKILL);
        report(s, s->run.step, END_EXEC, ENOMEM);
    }
    _exit(1);
}

static void reap(struct session *s) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        if (s->run.step >= 0 && pid == s->run.pid) {
            s->run.exited = 1;
            s->run.status = status;
        }
}

/* Signal a step: its process group, and its first process itself in case that left the
 * group (a step may make groups of its own: those the runner's exit takes along). */
static void signal_step(const struct run *r, int sig) {
    kill(-r->pid, sig);
    kill(r->pid, sig);
}

static void request_stop(struct session *s) {
    if (s->stopping)
        return;
    struct plan *p = s->plan;
    long long now = now_ms(), margin = p->grace_ms / 10;
    s->stopping = 1;
    s->stop_deadline = now + p->grace_ms - (margin < STOP_MARGIN_MS ? margin : STOP_MARGIN_MS);
    s->stop_step = s->run.step >= 0 && !s->run.exited ? s->run.step : -1;
    /* Exit steps are what the grace is for. */
    if (s->stop_step < 0 || p->steps[s->stop_step].kind == EXIT)
        return;
    signal_step(&s->run, SIGTERM);
    s->run.termed = 1;
    long long at = now + p->grace_ms / 2;
    if (s->run.kill_at < 0 || at < s->run.kill_at)
        s->run.kill_at = at;
}

static void take_signals(struct session *s) {
    struct signalfd_siginfo si;
    while (read(s->sigfd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGCHLD)
            reap(s);
        else if (si.ssi_signo == SIGTERM && si.ssi_code == SI_USER && si.ssi_pid == 0)
            /* Sent from outside the sandbox's pid namespace, where only the daemon (or root)
             * can reach this process: a step's `kill 1` is no stop. */
            request_stop(s);
    }
}

static void take_line(struct session *s, int step, char *line, size_t len) {
    static const char set[] = "weft_env: ", unset[] = "weft_unset_env: ";
    const char *label = s->plan->steps[step].label;
    struct changes *c = &s->changes[s->plan->steps[step].env];
    if (len && line[len - 1] == '\r')
        len--;
    if (len >= sizeof set - 1 && memcmp(line, set, sizeof set - 1) == 0) {
        char *kv = line + sizeof set - 1, *eq = memchr(kv, '=', line + len - kv);
        if (!eq || memchr(kv, 0, line + len - kv) || !valid_name(kv, eq - kv)) {
            say("weft: %s: a malformed weft_env line ignored", label);
            return;
        }
        c->sets = grow(c->sets, c->n_sets, sizeof *c->sets);
        if (!(c->sets[c->n_sets++] = strndup(kv, line + len - kv)))
            out_of_memory();
    } else if (len >= sizeof unset - 1 && memcmp(line, unset, sizeof unset - 1) == 0) {
        char *name = line + sizeof unset - 1;
        if (!valid_name(name, line + len - name)) {
            say("weft: %s: a malformed weft_unset_env line ignored", label);
            return;
        }
        c->unsets = grow(c->unsets, c->n_unsets, sizeof *c->unsets);
        if (!(c->unsets[c->n_unsets++] = strndup(name, line + len - name)))
            out_of_memory();
    }
}

static void end_line(struct session *s, struct forward *f) {
    if (!f->overlong && f->line.len)
        take_line(s, f->step, f->line.data, f->line.len);
    f->line.len = 0;
    f->overlong = 0;
}

static void scan(struct session *s, struct forward *f, const char *data, size_t n) {
    while (n) {
        const char *nl = memchr(data, '\n', n);
        size_t part = nl ? (size_t)(nl - data) : n;
        if (f->overlong || f->line.len + part > MAX_SCANNED_LINE) {
            f->overlong = 1;
            f->line.len = 0;
        } else {
            put(&f->line, data, part);
        }
        if (!nl)
            return;
        end_line(s, f);
        data = nl + 1;
        n -= part + 1;
    }
}

/* Pass what a step wrote on its stdout pipe on to the log: 1 if it had something, 0 if
 * nothing for now, -1 at its end (then closed, and dropped from the forwards). */
static int forward(struct session *s, int i) {
    static char chunk[CHUNK];
    struct forward *f = &s->forwards[i];
    ssize_t n = read(f->fd, chunk, sizeof chunk);
    if (n > 0) {
        write_all(LOG_FD, chunk, n);
        if (f->scan)
            scan(s, f, chunk, n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (f->scan)
        end_line(s, f);
    close(f->fd);
    free(f->line.data);
    s->forwards[i] = s->forwards[--s->n_forwards];
    return -1;
}

/* The end of a step's scanning: what it wrote before it exited is in the pipe, scanned
 * now; what it left running may write on, to the log only. */
static void end_scan(struct session *s, int fd) {
    for (int i = 0; i < s->n_forwards; i++) {
        if (s->forwards[i].fd != fd)
            continue;
        int got;
        while ((got = forward(s, i)) > 0) {
        }
        if (got == 0) {
            end_line(s, &s->forwards[i]);
            s->forwards[i].scan = 0;
        }
        return;
    }
}

/* One wait for anything: signals, output, the next deadline (within `wait_ms`). */
static void pump(struct session *s, long long wait_ms) {
    struct pollfd fds[1 + MAX_STEPS];
    int n = 0;
    fds[n++] = (struct pollfd){s->sigfd, POLLIN, 0};
    for (int i = 0; i < s->n_forwards; i++)
        fds[n++] = (struct pollfd){s->forwards[i].fd, POLLIN, 0};
    /* A failed poll (EINTR; ENOMEM) is one more turn: the deadlines are checked anyway. */
    poll(fds, n, (int)wait_ms);
    tick(s);
    take_signals(s);
    for (int i = s->n_forwards; i-- > 0;)
        if (fds[1 + i].revents)
            forward(s, i);
}

static long long nearer(long long wait, long long until) {
    return until < wait ? (until < 0 ? 0 : until) : wait;
}

/* Until the running step's first process has exited, timing it out or killing it when
 * its time, or the session's, is up. */
static void await_step(struct session *s) {
    struct run *r = &s->run;
    struct step *step = &s->plan->steps[r->step];
    while (!r->exited) {
        long long now = now_ms(), wait = TICK_MS;
        if (step->timeout_ms >= 0 && !r->timed_out)
            wait = nearer(wait, r->started + step->timeout_ms - s->active);
        if (r->kill_at >= 0 && !r->killed)
            wait = nearer(wait, r->kill_at - now);
        if (s->stopping && !r->killed)
            wait = nearer(wait, s->stop_deadline - now);
        pump(s, wait);
        if (r->exited)
            break;
        now = now_ms();
        if (step->timeout_ms >= 0 && !r->timed_out &&
            s->active - r->started >= step->timeout_ms) {
            r->timed_out = 1;
            signal_step(r, SIGTERM);
            if (r->kill_at < 0 || now + s->plan->grace_ms < r->kill_at)
                r->kill_at = now + s->plan->grace_ms;
        }
        if (!r->killed && ((r->kill_at >= 0 && now >= r->kill_at) ||
                           (s->stopping && now >= s->stop_deadline))) {
            signal_step(r, SIGKILL);
            r->killed = 1;
        }
    }
    if (r->timed_out || r->termed || r->killed)
        kill(-r->pid, SIGKILL); /* what is left of its group */
}

/* A step's first process, forked into a process group of its own and exec'd, its stdout
 * `out` (-1: the log's): its pid, or -1 with `err` the errno of what failed (the exec's
 * too, which the child sends back on a close-on-exec pipe). */
static pid_t start_child(char **argv, char **envp, int out, int *err) {
    int ends[2];
    if (pipe2(ends, O_CLOEXEC) != 0) {
        *err = errno;
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        default_signals();
        if (out < 0 || dup2(out, 1) >= 0)
            execve(argv[0], argv, envp);
        int e = errno;
        write_all(ends[1], (char *)&e, sizeof e);
        _exit(127);
    }
    int e = errno, n = -1;
    close(ends[1]);
    if (pid > 0) {
        /* Its own group before it runs anything (it did the same: whichever is first). */
        setpgid(pid, pid);
        do
            n = read(ends[0], &e, sizeof e);
        while (n < 0 && errno == EINTR);
    }
    close(ends[0]);
    if (pid > 0 && n != (int)sizeof e)
        return pid; /* EOF: the exec happened */
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
    *err = e;
    return -1;
}

/* The environment of a step of environment `upto` (entered, with all before it). */
static struct vars compose(struct session *s, int upto) {
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
static char **command_line(struct session *s, int index, struct vars *env) {
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

static void say_end(const struct step *step, enum end end, int code) {
    char buf[32];
    switch (end) {
    case END_OK:
        say("weft: %s done", step->label);
        break;
    case END_EXIT:
        say("weft: %s failed: exit code %d", step->label, code);
        break;
    case END_SIGNAL:
        say("weft: %s failed: killed by signal %s", step->label,
            signal_name(code, buf, sizeof buf));
        break;
    case END_TIMEOUT:
        say("weft: %s failed: timed out after %g s", step->label, step->timeout);
        break;
    case END_EXEC:
        say("weft: %s failed: the %s %s could not be started: %s", step->label,
            *step->hook ? "hook" : "program", step->run.command, strerror(code));
        break;
    case END_NONE:
        break;
    }
}

/* Run step `index` of environment `upto` (the build: the last) to its end. */
static enum end run_step(struct session *s, int index, int upto, int *code) {
    struct step *step = &s->plan->steps[index];
    struct vars env = compose(s, upto);
    int out[2] = {-1, -1}, err = 0;
    say("weft: %s", step->label);
    char **argv = command_line(s, index, &env);
    pid_t pid = -1;
    if (!argv)
        err = errno;
    else if (step->kind == ENTER && pipe2(out, O_CLOEXEC) != 0)
        err = errno;
    else
        pid = start_child(argv, terminated(&env), out[1], &err);
    free(argv);
    free(env.kv);
    free(env.declared);
    if (out[1] >= 0)
        close(out[1]);
    if (pid < 0) {
        if (out[0] >= 0)
            close(out[0]);
        say_end(step, END_EXEC, *code = err);
        return END_EXEC;
    }
    if (out[0] >= 0) {
        fcntl(out[0], F_SETFL, O_NONBLOCK);
        s->forwards[s->n_forwards++] = (struct forward){out[0], 1, index, 0, {0}};
    }
    tick(s);
    s->run = (struct run){index, pid, 0, 0, s->active, -1, 0, 0, 0};
    await_step(s);
    if (out[0] >= 0)
        end_scan(s, out[0]);
    int status = s->run.status;
    s->run.step = -1;
    enum end end;
    *code = WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status);
    if (s->run.timed_out) {
        end = END_TIMEOUT;
        *code = WIFEXITED(status) ? *code : -*code;
    } else {
        end = WIFEXITED(status) ? (*code ? END_EXIT : END_OK) : END_SIGNAL;
    }
    say_end(step, end, *code);
    return end;
}

static void start(struct session *s, struct plan *plan, char **env, int report_fd) {
    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    /* Blocked before any child exists: a SIGCHLD that came unblocked would be lost. */
    if (sigprocmask(SIG_BLOCK, &handled, NULL) != 0 ||
        (s->sigfd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        say("weft: the session runner could not start: %s", strerror(errno));
        report(s, -1, END_EXEC, errno);
        _exit(1);
    }
    signal(SIGPIPE, SIG_IGN);
    /* Not dumpable: no step (the same user) can open the report pipe through /proc/1/fd
     * or trace this process.  Set after the last change of ids, which resets it; an exec
     * resets it for the steps. */
    prctl(PR_SET_DUMPABLE, 0);
    s->plan = plan;
    s->report_fd = report_fd;
    s->run.step = -1;
    s->stop_step = -1;
    s->last = now_ms();
    s->changes = calloc(plan->n_envs, sizeof *s->changes);
    s->forwards = calloc(plan->n_steps, sizeof *s->forwards);
    if (!s->changes || !s->forwards)
        out_of_memory();
    for (char **e = env; *e; e++) {
        size_t len = name_len(*e);
        int mine = 0;
        for (int i = 0; i < plan->n_declared && !mine; i++)
            mine = strlen(plan->declared[i]) == len && memcmp(plan->declared[i], *e, len) == 0;
        set_var(&s->base, *e, mine);
    }
}

void run_session(struct plan *plan, char **env, int report_fd) {
    static struct session session;
    struct session *s = current = &session;
    start(s, plan, env, report_fd);
    int decided = -1, code = 0, entered = 0;
    enum end end = END_NONE;
    for (int i = 0; i < plan->n_envs; i++) {
        int step = plan->envs[i].enter;
        pump(s, 0);
        if (s->stopping)
            break;
        entered = i + 1;
        if (step >= 0 && (end = run_step(s, step, i, &code)) != END_OK) {
            decided = step;
            break;
        }
        end = END_NONE;
    }
    if (decided < 0 && !s->stopping) {
        pump(s, 0);
        if (!s->stopping) {
            decided = plan->build;
            end = run_step(s, decided, plan->n_envs - 1, &code);
        }
    }
    for (int i = entered; i-- > 0;) {
        int step = plan->envs[i].exit, exit_code;
        if (step < 0)
            continue;
        if (s->stopping && now_ms() >= s->stop_deadline) {
            say("weft: %s skipped: the grace is over", plan->steps[step].label);
            continue;
        }
        enum end exit_end = run_step(s, step, i, &exit_code);
        if (exit_end != END_OK && (end == END_OK || end == END_NONE)) {
            decided = step;
            end = exit_end;
            code = exit_code;
        }
    }
    report(s, decided, end, code);
    _exit(end == END_OK && !s->stopping ? 0 : 1);
}
