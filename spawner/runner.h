/* The session runner, a mode of the spare program (spare.c): what the spare becomes,
 * instead of exec'ing the builder, when the derivation has build environments.  runner.c
 * says what it does; its parts, one job each:
 *     runner.c        the session: its start, the order of its steps, its report
 *     runner_plan.c   the plan, parsed from the request
 *     runner_steps.c  a step's process: starting it, its timeout, killing and reaping it
 *     runner_io.c     the log (never waited on) and the scanning of weft_env lines
 *     runner_env.c    the variables each step gets, and a hook's argv and JSON file
 * These declarations are theirs to share, nobody else's. */
#ifndef WEFT_RUNNER_H
#define WEFT_RUNNER_H

#include <stddef.h>
#include <sys/types.h>

struct plan;

/* The plan section at the end of a spare's request (runner.c says its format), parsed in
 * place; NULL, errno set, if it is malformed. */
struct plan *read_plan(char **cursor, char *end);

/* Run the session the plan describes, as the build's first process (pid 1 of its pid
 * namespace), with `env` the builder's environment and `report_fd` the report pipe; its
 * stdout and stderr are the log.  Never returns. */
void run_session(struct plan *plan, char **env, int report_fd) __attribute__((noreturn));

/* spare.c's: every signal's default, none blocked, as every builder starts. */
void default_signals(void);

/* ---- Shared by the runner's parts ---- */

/* Polls wake at least this often, and a wake-up counts for at most TICK_MS + SLACK_MS of
 * an action's time: a longer gap is the sandbox paused (frozen by the daemon's scheduler,
 * or stopped), which must not time its actions out. */
#define TICK_MS 1000
#define SLACK_MS 500
/* Bounds on the plan, far above what store/buildenv.py lets through (16 environments). */
#define MAX_ENVS 1024
#define MAX_STEPS 4096

enum kind { ENTER, BUILD, EXIT };
enum end { END_NONE, END_OK, END_EXIT, END_SIGNAL, END_TIMEOUT, END_EXEC };

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
    double timeout;       /* the same, in seconds */
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

struct buf {
    char *data;
    size_t len, cap;
};

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

/* An enter step's stdout, on its way to the log through the runner. */
struct forward {
    int fd; /* -1: none */
    int step;
    int overlong;
    struct buf line;
};

struct run {
    int step;
    pid_t pid;
    int exited, status;
    long long started; /* on the active clock */
    long long kill_at; /* monotonic ms; -1: none */
    int timed_out, termed, killed;
};

struct session {
    struct plan *plan;
    struct vars base;
    struct changes *changes; /* per environment: what its enter step printed */
    int sigfd, report_fd;
    struct forward forward; /* the running enter step's stdout */
    struct run run;         /* the step running, if run.step >= 0 */
    long long last, active; /* the monotonic clock's last reading; the active clock */
    int stopping, stop_step;
    long long stop_deadline;
};

/* runner.c */
extern struct session *current;
void out_of_memory(void) __attribute__((noreturn));
void request_stop(struct session *s);
void stop_running(struct session *s);
long long now_ms(void);

/* runner_io.c */
int write_all(int fd, const char *data, size_t n);
void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
void put(struct buf *b, const char *s, size_t n);
void open_log(void);
int log_fd(void);
size_t log_backlog(void);
int log_has_room(void);
void flush_log(void);
void drop_log(void);
void forward(struct session *s);
void end_forward(struct session *s);
const char *signal_name(int sig, char *buf, size_t size);

/* runner_env.c */
void *grow(void *array, int n, size_t size);
size_t name_len(const char *kv);
void set_var(struct vars *v, char *kv, int declared);
int valid_name(const char *s, size_t n);
struct vars compose(struct session *s, int upto);
char **terminated(struct vars *v);
char **command_line(struct session *s, int index, struct vars *env);

/* runner_steps.c */
void tick(struct session *s);
void signal_step(const struct run *r, int sig);
void pump(struct session *s, long long wait_ms);
void settle_log(struct session *s);
enum end run_step(struct session *s, int index, int upto, int *code);

#endif
