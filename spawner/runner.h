/* The session runner (runner.c), a mode of the spare program (spare.c): what the spare
 * becomes, instead of exec'ing the builder, when the derivation has build environments. */
#ifndef WEFT_RUNNER_H
#define WEFT_RUNNER_H

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

#endif
