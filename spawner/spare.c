/* The spare: a process in fresh namespaces that waits for the request making it a builder.
 *
 * The spawner starts this program (posix_spawn, so nothing of the spawner is copied) with
 * fd 3 the spare's end of its control socket, fd 4 the write end of its status pipe and
 * fd 1 a pipe for its pid:
 *
 *     weft-spare SKELETON NETWORK [CGROUP_FD]
 *
 * NETWORK says which network namespace the spare gets: "host" the host's (fixed-output
 * builds); "own" a new one it makes with its user namespace (a daemon that is not root);
 * "new" a new one this program makes first, as root, with lo up and no TIME_WAIT sockets
 * kept, which the spawner keeps for later builds; "join=FD" that one, kept from an earlier
 * build whose processes are all gone (a new network namespace costs more than the rest of
 * the spare together).
 *
 * It clones the spare into new user, mount, pid, ipc and uts namespaces (and network, for
 * "own"), and with CGROUP_FD (an open cgroup v2 directory) right into that
 * cgroup: a clone into a cgroup takes none of the locks that moving a process there later
 * takes, whose wait for other CPUs sometimes lasts milliseconds.  It writes the spare's
 * pid and exits: the spare, orphaned, becomes the child of the nearest subreaper, the
 * daemon, whose process monitor reaps it.  The spare mounts what every sandbox has
 * (settle), then waits on fd 3 for one request and the log pipe (SCM_RIGHTS); it binds
 * the slot's store dir, the inputs and /build, pivots into the skeleton, drops to the
 * build user and execs the builder.  In C, so that a spare costs no copy of a Python
 * process and its exec no teardown of one.
 * spawner/sandbox.py describes the sandbox; this mirrors it step by step.
 *
 * The request is a list of NUL-terminated strings:
 *     "weft-spare-1" builder build_dir slot_store store_dir
 *     N_ARGS args... N_ENV "k=v"... N_BINDS paths...
 * A failure is written to the status pipe as a msgpack map {status, step, errno, path,
 * message} before exiting 127; the pipe is close-on-exec, so EOF with no data means the
 * builder's exec happened.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <sched.h>

#define BUILD_UID 1000
#define BUILD_GID 100
#define MAX_REQUEST (1 << 20)
#define MAGIC "weft-spare-1"
#define CTL_FD 3
#define STATUS_FD 4
#define CLONE_INTO_CGROUP_FLAG 0x200000000ULL

/* clone3's arguments (linux/sched.h, which clashes with sched.h). */
struct clone3_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

static int status_fd = STATUS_FD;
static char skeleton[4096];

static void put_str(unsigned char **p, const char *s) {
    size_t n = strlen(s);
    if (n > 4000)
        n = 4000;
    if (n < 32) {
        *(*p)++ = 0xa0 | n;
    } else if (n < 256) {
        *(*p)++ = 0xd9;
        *(*p)++ = n;
    } else {
        *(*p)++ = 0xda;
        *(*p)++ = n >> 8;
        *(*p)++ = n & 0xff;
    }
    memcpy(*p, s, n);
    *p += n;
}

/* Say which step failed, with errno and path, and exit. */
static void __attribute__((noreturn)) fail(const char *step, int err, const char *path) {
    unsigned char buf[9000], *p = buf;
    *p++ = 0x85;
    put_str(&p, "status");
    put_str(&p, "error");
    put_str(&p, "step");
    put_str(&p, step);
    put_str(&p, "errno");
    *p++ = 0xd2;
    for (int shift = 24; shift >= 0; shift -= 8)
        *p++ = ((uint32_t)err >> shift) & 0xff;
    put_str(&p, "path");
    put_str(&p, path ? path : "");
    put_str(&p, "message");
    put_str(&p, strerror(err));
    if (write(status_fd, buf, p - buf) < 0) {
        /* Nobody to tell. */
    }
    _exit(127);
}

/* `path` inside the skeleton. */
static const char *inside(const char *path, char *out, size_t size) {
    while (*path == '/')
        path++;
    if ((size_t)snprintf(out, size, "%s/%s", skeleton, path) >= size)
        fail("bind mount", ENAMETOOLONG, path);
    return out;
}

/* A read-only remount in a user namespace must keep the source's locked flags. */
static unsigned long locked_flags(const char *target, const char *source) {
    struct statvfs st;
    if (statvfs(target, &st) != 0)
        fail("bind mount", errno, source);
    static const struct {
        unsigned long st, ms;
    } locked[] = {
        {ST_NOSUID, MS_NOSUID},     {ST_NODEV, MS_NODEV},           {ST_NOEXEC, MS_NOEXEC},
        {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
    };
    unsigned long flags = 0;
    for (size_t i = 0; i < sizeof locked / sizeof *locked; i++)
        if (st.f_flag & locked[i].st)
            flags |= locked[i].ms;
    return flags;
}

static void bind_mount(const char *source, const char *target, int read_only, int recursive) {
    if (mount(source, target, NULL, MS_BIND | (recursive ? MS_REC : 0), NULL) != 0)
        fail("bind mount", errno, source);
    if (read_only) {
        unsigned long flags = MS_BIND | MS_REMOUNT | MS_RDONLY | locked_flags(target, source);
        if (mount(NULL, target, NULL, flags, NULL) != 0)
            fail("bind mount", errno, source);
    }
}

/* Bring lo up in the current network namespace. */
static void loopback_up(void) {
    struct ifreq req;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        fail("loopback", errno, "");
    memset(&req, 0, sizeof req);
    strcpy(req.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &req) != 0)
        fail("loopback", errno, "");
    req.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &req) != 0)
        fail("loopback", errno, "");
    close(s);
}

/* A network namespace of its own for this process, to be lent to build after build: lo
 * up, and no TCP connection lingering in TIME_WAIT once its sockets are closed, so that
 * a build finds none of an earlier one's ports taken. */
static void new_network(void) {
    if (unshare(CLONE_NEWNET) != 0)
        fail("network namespace", errno, "");
    loopback_up();
    int fd = open("/proc/sys/net/ipv4/tcp_max_tw_buckets", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0\n", 2) != 2)
        fail("network namespace", errno, "tcp_max_tw_buckets");
    close(fd);
}

/* What every sandbox has, before any request. */
static void settle(int own_network) {
    static const char *devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    static const struct {
        const char *source, *fstype, *where, *step, *data;
        unsigned long flags;
    } mounts[] = {
        {"tmpfs", "tmpfs", "tmp", "mount /tmp", "mode=1777", MS_NOSUID | MS_NODEV},
        {"shm", "tmpfs", "dev/shm", "mount /dev/shm", "mode=1777", MS_NOSUID | MS_NODEV},
        {"devpts", "devpts", "dev/pts", "mount /dev/pts", "newinstance,ptmxmode=0666,mode=0620",
         MS_NOSUID | MS_NOEXEC},
        {"proc", "proc", "proc", "mount /proc", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC},
    };
    char host[64], rel[64], target[4200];

    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        fail("make / private", errno, "");
    /* A mount of its own (pivot_root needs one), read-only. */
    bind_mount(skeleton, skeleton, 1, 0);
    for (size_t i = 0; i < sizeof devices / sizeof *devices; i++) {
        snprintf(host, sizeof host, "/dev/%s", devices[i]);
        snprintf(rel, sizeof rel, "dev/%s", devices[i]);
        bind_mount(host, inside(rel, target, sizeof target), 0, 0);
    }
    for (size_t i = 0; i < sizeof mounts / sizeof *mounts; i++) {
        inside(mounts[i].where, target, sizeof target);
        if (mount(mounts[i].source, target, mounts[i].fstype, mounts[i].flags, mounts[i].data))
            fail(mounts[i].step, errno, target);
    }
    if (sethostname("localhost", 9) != 0)
        fail("hostname", errno, "");
    if (own_network)
        loopback_up();
}

/* The request and its one descriptor, the log pipe; exits quietly on EOF (the spawner
 * dropped this spare). */
static size_t receive(int ctl, char *buf, int *log_fd) {
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {buf, MAX_REQUEST};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do
        n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        fail("request", errno, "");
    *log_fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
            c->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(log_fd, CMSG_DATA(c), sizeof(int));
    if (n == 0 && *log_fd < 0)
        _exit(0);
    if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || *log_fd < 0 || n == 0 || buf[n - 1])
        fail("request", EINVAL, "");
    return (size_t)n;
}

/* The next string of the request; fails past its end. */
static char *next(char **cursor, char *end) {
    if (*cursor >= end)
        fail("request", EINVAL, "");
    char *s = *cursor;
    *cursor += strlen(s) + 1;
    return s;
}

static char **strings(char **cursor, char *end, char *first) {
    long n = strtol(next(cursor, end), NULL, 10);
    if (n < 0 || n > MAX_REQUEST / 2)
        fail("request", EINVAL, "");
    char **list = calloc(n + 2, sizeof *list);
    if (!list)
        fail("request", ENOMEM, "");
    int i = 0;
    if (first)
        list[i++] = first;
    while (n--)
        list[i++] = next(cursor, end);
    return list;
}

/* Builders get every signal's default, whatever this process inherited. */
static void default_signals(void) {
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Refuse chmod and friends when the new mode has the setuid or setgid bit. */
static void forbid_setuid_chmod(void) {
#if defined(__x86_64__)
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 11),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 90, 4, 0),  /* chmod(path, mode) */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 91, 3, 0),  /* fchmod(fd, mode) */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 268, 4, 0), /* fchmodat(dirfd, path, mode) */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 452, 3, 0), /* fchmodat2(dirfd, path, mode, flags) */
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, S_ISUID | S_ISGID, 2, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, S_ISUID | S_ISGID, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {sizeof filter / sizeof *filter, filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) != 0)
        fail("drop privileges", errno, "");
#endif
}

static void close_all_but(int keep) {
    if (syscall(SYS_close_range, 3, keep - 1, 0) == 0 &&
        syscall(SYS_close_range, keep + 1, ~0U, 0) == 0)
        return;
    for (int fd = 3; fd < 1 << 16; fd++)
        if (fd != keep)
            close(fd);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4)
        return 2;
    if (fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) != 0 || fcntl(CTL_FD, F_SETFD, FD_CLOEXEC) != 0)
        fail("start spare", errno, "");
    if (snprintf(skeleton, sizeof skeleton, "%s", argv[1]) >= (int)sizeof skeleton)
        fail("start spare", ENAMETOOLONG, argv[1]);
    const char *network = argv[2];
    int own_network = strcmp(network, "own") == 0;
    if (strcmp(network, "new") == 0) {
        new_network();
    } else if (strncmp(network, "join=", 5) == 0) {
        if (setns(atoi(network + 5), CLONE_NEWNET) != 0)
            fail("network namespace", errno, network);
    } else if (!own_network && strcmp(network, "host") != 0) {
        fail("start spare", EINVAL, network);
    }
    struct clone3_args how = {
        .flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS |
                 (own_network ? CLONE_NEWNET : 0),
        .exit_signal = SIGCHLD,
    };
    if (argc == 4) {
        how.flags |= CLONE_INTO_CGROUP_FLAG;
        how.cgroup = (uint64_t)atoi(argv[3]);
    }
    long pid = syscall(SYS_clone3, &how, sizeof how);
    if (pid < 0 && errno == ENOSYS && argc == 3)
        /* Some container runtimes' seccomp filters refuse clone3 this way. */
        pid = syscall(SYS_clone, how.flags | SIGCHLD, 0, 0, 0, 0);
    if (pid < 0)
        fail("clone", errno, argc == 4 ? "cgroup" : "");
    if (pid > 0) {
        dprintf(1, "%ld\n", pid);
        _exit(0);
    }
    /* The spare, pid 1 of its namespaces. */
    setsid();
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
        fail("start spare", errno, "/dev/null");
    if (syscall(SYS_close_range, STATUS_FD + 1, ~0U, 0) != 0)
        for (int fd = STATUS_FD + 1; fd < 1 << 16; fd++)
            close(fd);
    default_signals();
    settle(own_network);

    int ctl = CTL_FD;
    char *buf = malloc(MAX_REQUEST);
    if (!buf)
        fail("request", ENOMEM, "");
    int log_fd;
    size_t n = receive(ctl, buf, &log_fd);
    char *cursor = buf, *end = buf + n;
    if (strcmp(next(&cursor, end), MAGIC) != 0)
        fail("request", EPROTO, "");
    char *builder = next(&cursor, end);
    char *build_dir = next(&cursor, end);
    char *slot_store = next(&cursor, end);
    char *store_dir = next(&cursor, end);
    char **args = strings(&cursor, end, builder);
    char **env = strings(&cursor, end, NULL);
    char **binds = strings(&cursor, end, NULL);

    char target[4200];
    bind_mount(slot_store, inside(store_dir, target, sizeof target), 0, 1);
    for (char **p = binds; *p; p++)
        bind_mount(*p, inside(*p, target, sizeof target), 1, 1);
    bind_mount(build_dir, inside("build", target, sizeof target), 0, 1);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves nothing
     * of the host reachable, and needs no directory to put it in. */
    if (chdir(skeleton) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 ||
        umount2(".", MNT_DETACH) != 0 || chdir("/") != 0)
        fail("pivot_root", errno, skeleton);
    struct rlimit no_core = {0, 0};
    if (setgid(BUILD_GID) != 0 || setuid(BUILD_UID) != 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail("drop privileges", errno, "");
    forbid_setuid_chmod();
    if (setrlimit(RLIMIT_CORE, &no_core) != 0 || chdir("/build") != 0)
        fail("drop privileges", errno, "");
    umask(022);
    /* Standard input is /dev/null already. */
    if (dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
        fail("set up stdio", errno, "");
    close_all_but(status_fd);
    execve(builder, args, env);
    fail("exec", errno, builder);
}
