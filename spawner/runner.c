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
 * Once a step's first process has exited, what is left of its process group is killed
 * (runner_steps.c).  The runner holds no capability while it runs the session (it parses
 * what steps print): it drops every one its user namespace gave it before the first step.
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
#include <linux/capability.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"

#define REPORT_MAGIC "weft-runner-1"
/* The last exit step is killed this long (at most a tenth of the grace) before the grace
 * ends, so that the report is written before the daemon's SIGKILL. */
#define STOP_MARGIN_MS 1000

static const char *const END_NAMES[] = {"none", "ok", "exit", "signal", "timeout", "exec"};

struct session *current;

long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void report(struct session *s, int step, enum end end, int code) {
    char line[128];
    int n = snprintf(line, sizeof line, REPORT_MAGIC " %d %s %d %d %d\n", step, END_NAMES[end],
                     code, s->stopping, s->stop_step);
    write_all(s->report_fd, line, n);
}

void out_of_memory(void) {
    struct session *s = current;
    static const char line[] = "weft: the session runner ran out of memory\n";
    write_all(1, line, sizeof line - 1);
    if (s) {
        if (s->run.step >= 0 && !s->run.exited)
            kill(-s->run.pid, SIGKILL);
        report(s, s->run.step, END_EXEC, ENOMEM);
    }
    _exit(1);
}

/* The daemon's stop: the running step, unless an exit step (what the grace is for), gets
 * SIGTERM and half the grace. */
void stop_running(struct session *s) {
    struct plan *p = s->plan;
    if (s->run.step < 0 || s->run.exited || p->steps[s->run.step].kind == EXIT)
        return;
    if (s->stop_step < 0)
        s->stop_step = s->run.step;
    signal_step(&s->run, SIGTERM);
    s->run.termed = 1;
    long long at = now_ms() + p->grace_ms / 2;
    if (s->run.kill_at < 0 || at < s->run.kill_at)
        s->run.kill_at = at;
}

void request_stop(struct session *s) {
    if (s->stopping)
        return;
    struct plan *p = s->plan;
    long long margin = p->grace_ms / 10;
    s->stopping = 1;
    s->stop_deadline =
        now_ms() + p->grace_ms - (margin < STOP_MARGIN_MS ? margin : STOP_MARGIN_MS);
    s->stop_step = s->run.step >= 0 && !s->run.exited ? s->run.step : -1;
    stop_running(s);
}

/* None of the capabilities the sandbox's user namespace gave: the steps need none from
 * the runner (each exec as the build user drops them anyway), and the runner reads what
 * they print. */
static int drop_capabilities(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct none[_LINUX_CAPABILITY_U32S_3] = {{0, 0, 0}};
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        return -1;
    if (syscall(SYS_capset, &header, none) != 0)
        return -1;
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

static void start(struct session *s, struct plan *plan, char **env, int report_fd) {
    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    s->report_fd = report_fd;
    s->run.step = -1;
    s->stop_step = -1;
    s->forward.fd = -1;
    /* Blocked before any child exists: a SIGCHLD that came unblocked would be lost. */
    if (drop_capabilities() != 0 || sigprocmask(SIG_BLOCK, &handled, NULL) != 0 ||
        (s->sigfd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        int e = errno;
        dprintf(1, "weft: the session runner could not start: %s\n", strerror(e));
        report(s, -1, END_EXEC, e);
        _exit(1);
    }
    signal(SIGPIPE, SIG_IGN);
    open_log();
    /* Not dumpable: no step (the same user) can open the report pipe through /proc/1/fd
     * or trace this process.  Set after the last change of ids, which resets it; an exec
     * resets it for the steps. */
    prctl(PR_SET_DUMPABLE, 0);
    s->plan = plan;
    s->last = now_ms();
    s->changes = calloc(plan->n_envs, sizeof *s->changes);
    if (!s->changes)
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
    settle_log(s);
    _exit(end == END_OK && !s->stopping ? 0 : 1);
}
