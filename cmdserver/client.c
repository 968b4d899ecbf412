/* The thin client of the command server (cmdserver/): installed as `store-build`, it hands
 * its command to the user's server, whose imports are done, instead of starting Python.
 *
 * Why C: a Python client would pay the interpreter's start (10 ms) that the server exists
 * to save.  What it does, in order:
 *   1. WEFT_COMMAND_SERVER=0, or no usable socket directory: run the command directly.
 *   2. Connect to $XDG_RUNTIME_DIR/weft/cmd-<root>.sock (else /tmp/weft-<uid>/...); when
 *      nobody serves it, start a server in the background for the next command, and run
 *      this one directly.
 *   3. Send the request (cmdserver/wire.py): name, cwd, umask, argv, environment, resource
 *      limits, and our stdin, stdout and stderr as file descriptors.
 *   4. Learn the command's pid, forward the signals a terminal or a supervisor sends us to
 *      it, and leave with its exit status, or die of its signal.
 * The server may decline (its code changed on disk, a different PYTHON* environment, too
 * many commands at once): the command then runs directly, as it does without a server.
 *
 * "Directly" is the Python command itself: WEFT_PYTHON running WEFT_ROOT/bin/<name>, both
 * fixed when install.sh compiles this file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef WEFT_PYTHON
#error "WEFT_PYTHON: the interpreter that runs the commands (install.sh passes it)"
#endif
#ifndef WEFT_ROOT
#error "WEFT_ROOT: the checkout holding bin/ and cmdserver/ (install.sh passes it)"
#endif

/* The wire's constants, as cmdserver/wire.py has them. */
#define MAGIC 0x31434657u /* "WFC1" */
#define REPLY_PID 1
#define REPLY_EXIT 2
#define REPLY_SIGNALED 3
#define REPLY_DECLINED 4
#define DECLINED_STALE 1
/* How long to wait for the server to fork the command: it does nothing slow before, so a
 * server that does not answer in this time is wedged, and the command runs directly. */
#define FIRST_REPLY_MS 5000

static volatile sig_atomic_t child_pid = 0;
static volatile sig_atomic_t pending[NSIG];
static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
                                SIGWINCH, SIGTSTP, SIGCONT};

struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + n) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            perror("store-build: out of memory");
            exit(1);
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void put_str(struct buf *b, const char *s) { put(b, s, strlen(s) + 1); }

static void put_num(struct buf *b, long long n) {
    char text[32];
    snprintf(text, sizeof text, "%lld", n);
    put_str(b, text);
}

static const char *command_name(const char *argv0) {
    const char *slash = strrchr(argv0, '/');
    return slash ? slash + 1 : argv0;
}

/* The command run by the interpreter itself, with our argv; never returns. */
static void run_directly(const char *name, int argc, char **argv) {
    char script[4096];
    snprintf(script, sizeof script, "%s/bin/%s", WEFT_ROOT, name);
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (!args) {
        perror("store-build: out of memory");
        exit(1);
    }
    args[0] = WEFT_PYTHON;
    args[1] = script;
    for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
    execv(WEFT_PYTHON, args);
    fprintf(stderr, "%s: cannot run %s: %s\n", name, WEFT_PYTHON, strerror(errno));
    exit(127);
}

/* The socket's directory, made if missing, and used only if it is ours alone. */
static int socket_path(char *out, size_t size) {
    char dir[4096];
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && xdg[0] == '/')
        snprintf(dir, sizeof dir, "%s/weft", xdg);
    else
        snprintf(dir, sizeof dir, "/tmp/weft-%u", (unsigned)getuid());
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) return -1;
    struct stat st;
    if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077))
        return -1;
    /* One server per checkout: FNV-1a of its root names the socket. */
    uint64_t h = 1469598103934665603ull;
    for (const char *p = WEFT_ROOT; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
    int n = snprintf(out, size, "%s/cmd-%016llx.sock", dir, (unsigned long long)h);
    return n > 0 && (size_t)n < size ? 0 : -1;
}

/* A server for the next command, detached from us (its own session, no terminal, our
 * environment, `<socket>.log` for its output), started by a grandchild so that init
 * reaps it. */
static void start_server(const char *path) {
    char log[4096];
    snprintf(log, sizeof log, "%s.log", path);
    pid_t pid = fork();
    if (pid < 0) return;
    if (pid > 0) {
        waitpid(pid, NULL, 0);
        return;
    }
    setsid();
    if (fork() != 0) _exit(0);
    /* Not the first client's directory, which it would otherwise hold busy for as long
     * as it lives (an unmount would fail on it). */
    if (chdir("/") < 0) _exit(127);
    /* Nothing to read; what it says (a traceback, if it ever fails) goes to a log beside
     * its socket, begun again by each server. */
    int null = open("/dev/null", O_RDONLY);
    int out = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0600);
    if (null < 0 || out < 0) _exit(127);
    dup2(null, 0);
    dup2(out, 1);
    dup2(out, 2);
    /* The server's descriptors are its own: nothing of ours (a pipe a caller waits on
     * to close, say) may live on in it. */
    if (syscall(SYS_close_range, 3, ~0u, 0) < 0)
        for (int i = 3; i < 1024; i++) close(i);
    execl(WEFT_PYTHON, WEFT_PYTHON, "-m", "cmdserver", path, (char *)NULL);
    _exit(127);
}

static int connect_to(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

extern char **environ;

static void build_request(struct buf *b, const char *name, int argc, char **argv) {
    uint32_t head[2] = {MAGIC, 0};
    put(b, head, sizeof head);
    put_str(b, name);
    char cwd[8192];
    put_str(b, getcwd(cwd, sizeof cwd) ? cwd : "");
    mode_t mask = umask(0);
    umask(mask);
    put_num(b, mask);
    put_num(b, argc - 1);
    for (int i = 1; i < argc; i++) put_str(b, argv[i]);
    size_t envc = 0;
    for (char **e = environ; *e; e++) envc++;
    put_num(b, (long long)envc);
    for (char **e = environ; *e; e++) put_str(b, *e);
    put_num(b, RLIMIT_NLIMITS);
    for (int r = 0; r < RLIMIT_NLIMITS; r++) {
        struct rlimit lim = {RLIM_INFINITY, RLIM_INFINITY};
        getrlimit(r, &lim);
        put_num(b, lim.rlim_cur == RLIM_INFINITY ? -1 : (long long)lim.rlim_cur);
        put_num(b, lim.rlim_max == RLIM_INFINITY ? -1 : (long long)lim.rlim_max);
    }
    uint32_t body = (uint32_t)(b->len - sizeof head);
    memcpy(b->data + sizeof(uint32_t), &body, sizeof body);
}

/* The request, with our stdin, stdout and stderr riding on its first bytes. */
static int send_request(int fd, const struct buf *b) {
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = b->data, .iov_len = b->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) return -1;
    for (size_t sent = (size_t)n; sent < b->len; sent += (size_t)n) {
        n = send(fd, b->data + sent, b->len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EINTR) return -1;
        if (n < 0) n = 0;
    }
    return 0;
}

static void on_signal(int sig) {
    if (child_pid > 0) {
        /* The command is not in our terminal's session: a stop request would be lost on
         * it (an orphaned process group), so it is stopped outright, and so are we. */
        kill(child_pid, sig == SIGTSTP ? SIGSTOP : sig);
        if (sig == SIGTSTP) raise(SIGSTOP);
    } else {
        pending[sig] = 1;
    }
}

static void forward_pending(void) {
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
        int sig = forwarded[i];
        if (pending[sig]) {
            pending[sig] = 0;
            on_signal(sig);
        }
    }
}

/* One reply record; 0 on end of stream, -1 on error or (for the first) timeout. */
static int read_reply(int fd, int32_t reply[2], int timeout_ms) {
    size_t got = 0;
    while (got < 2 * sizeof(int32_t)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        ssize_t n = recv(fd, (char *)reply + got, 2 * sizeof(int32_t) - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return got == 0 ? 0 : -1;
        got += (size_t)n;
    }
    return 1;
}

static void die_of(int sig) {
    signal(sig, SIG_DFL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, sig);
    sigprocmask(SIG_UNBLOCK, &only, NULL);
    raise(sig);
    exit(128 + sig);
}

int main(int argc, char **argv) {
    const char *name = command_name(argv[0]);
    const char *off = getenv("WEFT_COMMAND_SERVER");
    char path[4096];
    if ((off && strcmp(off, "0") == 0) || socket_path(path, sizeof path) < 0)
        run_directly(name, argc, argv);
    int fd = connect_to(path);
    if (fd < 0) {
        start_server(path);
        run_directly(name, argc, argv);
    }
    struct buf request = {0};
    build_request(&request, name, argc, argv);
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaction(forwarded[i], &sa, NULL);
    int32_t reply[2];
    if (send_request(fd, &request) < 0 || read_reply(fd, reply, FIRST_REPLY_MS) <= 0) {
        close(fd); /* the server kills whatever it started for us when we go */
        run_directly(name, argc, argv);
    }
    if (reply[0] == REPLY_DECLINED) {
        close(fd);
        if (reply[1] == DECLINED_STALE) start_server(path);
        run_directly(name, argc, argv);
    }
    if (reply[0] != REPLY_PID) {
        fprintf(stderr, "%s: the command server answered %d\n", name, reply[0]);
        return 1;
    }
    child_pid = reply[1];
    forward_pending();
    for (;;) {
        int r = read_reply(fd, reply, -1);
        if (r <= 0) {
            fprintf(stderr, "%s: the command server went away during the command\n", name);
            return 1;
        }
        if (reply[0] == REPLY_EXIT) return reply[1];
        if (reply[0] == REPLY_SIGNALED) die_of(reply[1]);
    }
}
