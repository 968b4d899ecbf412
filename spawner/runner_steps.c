/* A session runner's steps (runner.h): each a process group of its own, started, held to
 * its timeout (SIGTERM, the grace, SIGKILL; on the active clock, which a paused sandbox
 * does not advance), and ended: once its first process has exited, whatever is left of
 * its group is killed and reaped before the next step starts, so that nothing a step left
 * running goes on into the next (a builder's leftover writing into $out during the exit
 * steps).  A process that left the group (setsid) lives until the runner exits, which
 * takes the whole pid namespace along. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runner.h"

/* Advance the active clock by the time since the last reading, but by no more than a
 * wake-up's worth: a longer gap was a pause. */
void tick(struct session *s) {
    long long now = now_ms(), gap = now - s->last;
    s->last = now;
    if (gap > TICK_MS + SLACK_MS)
        gap = TICK_MS + SLACK_MS;
    if (gap > 0)
        s->active += gap;
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
void signal_step(const struct run *r, int sig) {
    kill(-r->pid, sig);
    kill(r->pid, sig);
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

static long long nearer(long long wait, long long until) {
    return until < wait ? (until < 0 ? 0 : until) : wait;
}

/* One wait for anything: signals, the log pipe's room for what waits for it, the running
 * enter step's output (while there is room for it), the next deadline (within
 * `wait_ms`). */
void pump(struct session *s, long long wait_ms) {
    struct pollfd fds[3];
    int n = 0, out = -1, in = -1;
    fds[n++] = (struct pollfd){s->sigfd, POLLIN, 0};
    if (log_backlog()) {
        out = n;
        fds[n++] = (struct pollfd){log_fd(), POLLOUT, 0};
    }
    if (s->forward.fd >= 0 && log_has_room()) {
        in = n;
        fds[n++] = (struct pollfd){s->forward.fd, POLLIN, 0};
    }
    /* A failed poll (EINTR; ENOMEM) is one more turn: the deadlines are checked anyway. */
    poll(fds, n, (int)wait_ms);
    tick(s);
    take_signals(s);
    if (out >= 0 && fds[out].revents)
        flush_log();
    if (in >= 0 && fds[in].revents)
        forward(s);
}

/* Until the log has all that waits for it (the daemon reads it), as the next step's own
 * output would come after it; after the grace of a stop, what is left is dropped. */
void settle_log(struct session *s) {
    while (log_backlog()) {
        long long wait = TICK_MS;
        if (s->stopping && (wait = nearer(wait, s->stop_deadline - now_ms())) == 0) {
            drop_log();
            return;
        }
        pump(s, wait);
    }
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
}

/* Kill what is left of a step's process group, its first process reaped, and reap it all:
 * its members are this process's children by then (reparented to pid 1) or die with
 * their parents. */
static void bury(struct session *s, pid_t group) {
    for (;;) {
        kill(-group, SIGKILL);
        pid_t pid = waitpid(-group, NULL, WNOHANG);
        if (pid > 0 || (pid < 0 && errno == EINTR))
            continue;
        if (pid < 0)
            return; /* ECHILD: none left */
        pump(s, TICK_MS);
    }
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

/* Run step `index` of environment `upto` (the build: the last) to its end, its whole
 * process group. */
enum end run_step(struct session *s, int index, int upto, int *code) {
    struct step *step = &s->plan->steps[index];
    struct vars env = compose(s, upto);
    int out[2] = {-1, -1}, err = 0;
    say("weft: %s", step->label);
    settle_log(s);
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
        s->forward = (struct forward){out[0], index, 0, {0}};
    }
    tick(s);
    s->run = (struct run){index, pid, 0, 0, s->active, -1, 0, 0, 0};
    if (s->stopping)
        stop_running(s); /* the stop came while the log settled */
    await_step(s);
    end_forward(s);
    bury(s, pid);
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
