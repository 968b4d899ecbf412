/* The session runner's output (runner.h): the log, and an enter step's stdout, scanned
 * for weft_env lines on its way there.
 *
 * The runner never waits on the log: it writes through a descriptor of its own on the
 * log pipe, non-blocking (the builder's, shared by every step, stays as it is), and what
 * the pipe has no room for waits in a queue, written as the daemon reads; while the
 * queue is full, an enter step's output is not read (the step waits, not the runner).
 * The runner's time limits, its stop and its reaping go on meanwhile.
 *
 * An enter step's stdout is read until its first process has exited; then only what the
 * pipe holds at that moment (FIONREAD) is read, and the pipe closed: a process the step
 * left running (outside its process group, which is killed) that still writes gets EPIPE
 * instead of holding the runner in an endless read. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "runner.h"

#define LOG_FD 1
/* The longest weft_env line read: a variable longer than execve's limit on one string
 * (MAX_ARG_STRLEN, 128 KiB) could reach no later step. */
#define MAX_SCANNED_LINE (128 * 1024 + 64)
/* One read of an enter step's stdout: a pipe's capacity. */
#define CHUNK 65536
/* The queue above which an enter step's output is left in its pipe: a few pipes' worth,
 * so that a daemon reading in bursts never finds the queue empty. */
#define LOG_QUEUE_CAP (4 * CHUNK)
/* Room for a log line of this program's (a label, a program's path, an error). */
#define SAY_MAX 8192

static int log_out = LOG_FD;
static struct buf queue; /* what the log pipe had no room for yet, from `sent` on */
static size_t sent;

/* 0, or -1 with errno (for the log, nobody to tell: it is gone). */
int write_all(int fd, const char *data, size_t n) {
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

void put(struct buf *b, const char *s, size_t n) {
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

/* A non-blocking description of the log pipe of the runner's own (opening a pipe
 * through /proc makes a new one); if there is none, the shared one, blocking. */
void open_log(void) {
    int fd = open("/proc/self/fd/1", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0)
        log_out = fd;
}

int log_fd(void) { return log_out; }

size_t log_backlog(void) { return queue.len - sent; }

void drop_log(void) { queue.len = sent = 0; }

/* Write what the pipe takes now. */
void flush_log(void) {
    while (sent < queue.len) {
        ssize_t n = write(log_out, queue.data + sent, queue.len - sent);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) {
            drop_log(); /* the daemon is gone: nobody reads */
            return;
        }
        sent += n;
    }
    if (sent == queue.len) {
        drop_log();
    } else if (sent > queue.len / 2) {
        memmove(queue.data, queue.data + sent, queue.len - sent);
        queue.len -= sent;
        sent = 0;
    }
}

static void to_log(const char *data, size_t n) {
    put(&queue, data, n);
    flush_log();
}

void say(const char *format, ...) {
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
    to_log(line, n);
}

const char *signal_name(int sig, char *buf, size_t size) {
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

/* ---- weft_env lines ---- */

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

static void close_forward(struct session *s) {
    struct forward *f = &s->forward;
    end_line(s, f);
    close(f->fd);
    free(f->line.data);
    *f = (struct forward){.fd = -1};
}

/* One read of at most `want` bytes of the step's stdout into the log, scanned: its
 * size, 0 if nothing for now, -1 at its end. */
static ssize_t take_output(struct session *s, size_t want) {
    static char chunk[CHUNK];
    struct forward *f = &s->forward;
    ssize_t n = read(f->fd, chunk, want < sizeof chunk ? want : sizeof chunk);
    if (n > 0) {
        to_log(chunk, n);
        scan(s, f, chunk, n);
        return n;
    }
    return n < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -1;
}

/* What the running enter step wrote (the pipe polled readable); at its end, closed. */
void forward(struct session *s) {
    if (take_output(s, CHUNK) < 0)
        close_forward(s);
}

/* The step's first process has exited: what its pipe holds now is the step's output,
 * read and scanned; whatever comes later is a leftover's, refused. */
void end_forward(struct session *s) {
    struct forward *f = &s->forward;
    if (f->fd < 0)
        return;
    int left = 0;
    if (ioctl(f->fd, FIONREAD, &left) != 0)
        left = 0;
    ssize_t n;
    while (left > 0 && (n = take_output(s, (size_t)left)) > 0)
        left -= n;
    close_forward(s);
}

/* Whether to read more of the step's output: not while the log's queue is full. */
int log_has_room(void) { return log_backlog() < LOG_QUEUE_CAP; }
