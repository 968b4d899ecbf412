/* The spare: a process in fresh namespaces that waits for the request making it a builder.
 *
 * The spawner starts this program (posix_spawn, so nothing of the spawner is copied) with
 * fd 3 the spare's end of its control socket, fd 4 the write end of its status pipe and
 * fd 1 a pipe for its pid:
 *
 *     weft-spare SKELETON NETWORK [CGROUP_FD]
 *
 * or, to run a helper of the spawner's (pasta) that must not outlive it:
 *
 *     weft-spare --die-with PPID PROGRAM ARGS...
 *
 * NETWORK says which network namespace the spare gets (never the host's): "own" a new one
 * it makes with its user namespace (fixed-output builds, then connected by pasta; and
 * every build of a daemon that is not root);
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
 * the slot's tmp dir if the request names one (over settle's tmpfs, which it hides),
 * /build, the slot's store dir and the inputs, pivots into the skeleton, drops to the
 * build user, asks for SIGKILL when its parent (the daemon, by adoption) dies, and execs
 * the builder.  In C, so that a spare costs no copy of a Python process and its exec no
 * teardown of one.
 * spawner/sandbox.py describes the sandbox; this mirrors it step by step.
 *
 * The request is a list of NUL-terminated strings:
 *     "weft-spare-2" builder build_dir slot_store store_dir parent_pid
 *     N_ARGS args... N_ENV "k=v"... N_BINDS paths... ["tmp" tmp_dir] [plan...]
 * in the packet, or past a packet's size in a memfd: the packet is then 0xc1 and the
 * request's length (8 bytes, little-endian), the memfd the last descriptor
 * (daemon/wire/packets.py).  The descriptors: the log pipe, then, with a plan, the report
 * pipe.  A request with a plan (a derivation with build environments) makes the spare the
 * session runner (runner.c) instead of the builder: everything up to the exec is the same.
 * A failure is written to the status pipe as a msgpack map {status, step, errno, path,
 * message} before exiting 127; the pipe is close-on-exec, so EOF with no data means the
 * builder's exec happened (or, for a runner, that it closed the pipe where the exec would
 * be).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <sched.h>

#include "runner.h"

#define BUILD_UID 1000
#define BUILD_GID 100
/* The largest request the spare reads from the packet itself: above what the spawner
 * sends inline (daemon/wire/packets.py MAX_INLINE, 128 KiB), so any packet it sends fits;
 * larger requests come in a memfd, of at most MAX_SPILLED bytes. */
#define MAX_REQUEST (1 << 20)
#define MAX_SPILLED (64 << 20)
#define SPILL 0xc1
#define SPILL_HEADER 9
#define MAGIC "weft-spare-2"
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

/* A mount point at `target` for `source` where the spawner could make none beforehand:
 * in a file system this process mounted (the sandbox's /tmp, when the store dir lies under
 * /tmp), or in the slot's tmp dir bound there (a directory of the daemon's, mode 1777).
 * Made as the build user, the one user mapped here (a file of an unmapped user cannot be
 * made), by a child, so that this process keeps its ids, which reach host
 * directories only root may enter; the child starts from the deepest directory there is,
 * entered here, so it needs to enter none of them. */
static void make_mount_point(const char *source, const char *target) {
    struct stat st;
    char dir[4200];
    if (stat(source, &st) != 0)
        fail("bind mount", errno, source);
    snprintf(dir, sizeof dir, "%s", target);
    do {
        char *slash = strrchr(dir, '/');
        if (slash == NULL || slash == dir)
            fail("mount point", ENOENT, target);
        *slash = 0;
    } while (access(dir, F_OK) != 0);
    const char *rest = target + strlen(dir) + 1;
    if (chdir(dir) != 0)
        fail("mount point", errno, dir);
    pid_t pid = fork();
    if (pid < 0)
        fail("mount point", errno, target);
    if (pid == 0) {
        char part[4200];
        snprintf(part, sizeof part, "%s", rest);
        setfsgid(BUILD_GID);
        setfsuid(BUILD_UID);
        for (char *p = part; (p = strchr(p, '/')) != NULL; *p++ = '/') {
            *p = 0;
            if (mkdir(part, 0755) != 0 && errno != EEXIST)
                fail("mount point", errno, target);
        }
        int made = S_ISDIR(st.st_mode) ? mkdir(part, 0755)
                                       : open(part, O_WRONLY | O_CREAT | O_CLOEXEC, 0444);
        if (made < 0)
            fail("mount point", errno, target);
        _exit(0);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            fail("mount point", errno, target);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
        _exit(127); /* the child said why */
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("mount point", ECHILD, target);
}

/* `source` bound at `target`, then remounted with `restrictions` (MS_RDONLY, MS_NOSUID...:
 * a bind takes none of them in the same call), if any. */
static void bind_mount(const char *source, const char *target, unsigned long restrictions,
                       int recursive) {
    unsigned long flags = MS_BIND | (recursive ? MS_REC : 0);
    struct stat st;
    if (mount(source, target, NULL, flags, NULL) != 0) {
        int err = errno;
        if (err == ENOENT && lstat(target, &st) != 0) {
            make_mount_point(source, target);
            err = mount(source, target, NULL, flags, NULL) == 0 ? 0 : errno;
        }
        if (err)
            fail("bind mount", err, source);
    }
    if (restrictions) {
        unsigned long remount = MS_BIND | MS_REMOUNT | restrictions | locked_flags(target, source);
        if (mount(NULL, target, NULL, remount, NULL) != 0)
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
    bind_mount(skeleton, skeleton, MS_RDONLY, 0);
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

/* A request too large for a packet, from the memfd that brought it (then closed). */
static size_t read_spilled(const char *header, int memfd, char **request) {
    uint64_t length = 0;
    struct stat st;
    for (int i = SPILL_HEADER - 1; i > 0; i--)
        length = length << 8 | (unsigned char)header[i];
    if (length == 0 || length > MAX_SPILLED || fstat(memfd, &st) != 0 ||
        (uint64_t)st.st_size != length || !(*request = malloc(length)))
        fail("request", EINVAL, "");
    for (size_t done = 0; done < length;) {
        ssize_t n = pread(memfd, *request + done, length - done, done);
        if (n <= 0)
            fail("request", n < 0 ? errno : EIO, "");
        done += n;
    }
    close(memfd);
    return length;
}

/* The request, the log pipe, the report pipe if it has a plan (and a memfd holding the
 * request, past a packet's size); exits quietly on EOF (the spawner dropped this spare). */
static size_t receive(int ctl, char *buf, char **request, int *log_fd, int *report_fd) {
    char control[CMSG_SPACE(3 * sizeof(int))];
    int fds[3] = {-1, -1, -1}, n_fds = 0;
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
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
            c->cmsg_len <= CMSG_LEN(sizeof fds)) {
            n_fds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            memcpy(fds, CMSG_DATA(c), n_fds * sizeof(int));
        }
    if (n == 0 && n_fds == 0)
        _exit(0);
    if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || n_fds == 0 || n == 0)
        fail("request", EINVAL, "");
    *request = buf;
    if (n == SPILL_HEADER && (unsigned char)buf[0] == SPILL && n_fds > 1) {
        int memfd = fds[--n_fds];
        fds[n_fds] = -1;
        n = read_spilled(buf, memfd, request);
    }
    if (n_fds > 2)
        fail("request", EINVAL, "");
    *log_fd = fds[0];
    *report_fd = fds[1];
    if ((*request)[n - 1])
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
    /* Each string takes at least its NUL. */
    if (n < 0 || n > end - *cursor)
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
void default_signals(void) {
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

/* SIGKILL when the parent dies: the daemon, which adopted this process (a subreaper), so
 * that no builder outlives it.  Asked for after the last change of ids, which clears it;
 * `parent` is the parent the spawner saw, and if this process has another one now, that
 * one died before the asking and the builder must not start.  `stat_fd` is the host's
 * /proc/self/stat, opened before the pivot: the sandbox's /proc counts from its own pid
 * namespace, where the parent has no pid. */
static void die_with_parent(int stat_fd, long parent) {
    char buf[1024], state;
    long ppid;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        fail("parent", errno, "");
    ssize_t n = pread(stat_fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        fail("parent", n < 0 ? errno : EIO, "/proc/self/stat");
    buf[n] = 0;
    char *end_of_name = strrchr(buf, ')');
    if (!end_of_name || sscanf(end_of_name + 1, " %c %ld", &state, &ppid) != 2)
        fail("parent", EIO, "/proc/self/stat");
    if (ppid != parent)
        fail("parent", ESRCH, "");
}

/* Close every descriptor from 3 on but `keep` and `also` (-1: none). */
static void close_all_but(int keep, int also) {
    int low = keep < also ? keep : also, high = keep < also ? also : keep;
    if (low < 0)
        low = high;
    if (syscall(SYS_close_range, 3, low - 1, 0) == 0 &&
        (high - low < 2 || syscall(SYS_close_range, low + 1, high - 1, 0) == 0) &&
        syscall(SYS_close_range, high + 1, ~0U, 0) == 0)
        return;
    for (int fd = 3; fd < 1 << 16; fd++)
        if (fd != keep && fd != also)
            close(fd);
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "--die-with") == 0) {
        /* Its parent's death kills it; if that came already, the parent is another.  With
         * every signal's default: pasta refuses to start with SIGPIPE ignored, as Python
         * leaves it. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != atol(argv[2]))
            return 126;
        default_signals();
        execv(argv[3], argv + 3);
        return 127;
    }
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
    } else if (!own_network) {
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
    int log_fd, report_fd;
    char *request;
    size_t n = receive(ctl, buf, &request, &log_fd, &report_fd);
    char *cursor = request, *end = request + n;
    if (strcmp(next(&cursor, end), MAGIC) != 0)
        fail("request", EPROTO, "");
    char *builder = next(&cursor, end);
    char *build_dir = next(&cursor, end);
    char *slot_store = next(&cursor, end);
    char *store_dir = next(&cursor, end);
    long parent = strtol(next(&cursor, end), NULL, 10);
    char **args = strings(&cursor, end, builder);
    char **env = strings(&cursor, end, NULL);
    char **binds = strings(&cursor, end, NULL);
    char *tmp_dir = NULL;
    if (cursor < end && strcmp(cursor, "tmp") == 0) {
        next(&cursor, end);
        tmp_dir = next(&cursor, end);
        if (*tmp_dir != '/')
            fail("request", EINVAL, "tmp");
    }
    /* A plan comes with the report pipe, and only with it. */
    struct plan *plan = cursor < end ? read_plan(&cursor, end) : NULL;
    if ((cursor < end || report_fd >= 0) && !plan)
        fail("request", EINVAL, "plan");
    if (plan && report_fd < 0)
        fail("request", EINVAL, "report pipe");
    int stat_fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (stat_fd < 0)
        fail("parent", errno, "/proc/self/stat");

    /* /tmp first, then /build: a store dir under either (a state dir there) is then
     * bound in it.  The slot's tmp dir goes over the tmpfs settle mounted, left empty
     * beneath: unmounting it would put an expedited RCU grace period (every CPU
     * interrupted; 30 us on an idle VM) on the way to the exec, for nothing. */
    char target[4200];
    if (tmp_dir)
        bind_mount(tmp_dir, inside("tmp", target, sizeof target), MS_NOSUID | MS_NODEV, 0);
    bind_mount(build_dir, inside("build", target, sizeof target), 0, 1);
    bind_mount(slot_store, inside(store_dir, target, sizeof target), 0, 1);
    for (char **p = binds; *p; p++)
        bind_mount(*p, inside(*p, target, sizeof target), MS_RDONLY, 1);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves nothing
     * of the host reachable, and needs no directory to put it in. */
    if (chdir(skeleton) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 ||
        umount2(".", MNT_DETACH) != 0 || chdir("/") != 0)
        fail("pivot_root", errno, skeleton);
    struct rlimit no_core = {0, 0};
    if (setgid(BUILD_GID) != 0 || setuid(BUILD_UID) != 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail("drop privileges", errno, "");
    die_with_parent(stat_fd, parent);
    forbid_setuid_chmod();
    if (setrlimit(RLIMIT_CORE, &no_core) != 0 || chdir("/build") != 0)
        fail("drop privileges", errno, "");
    umask(022);
    /* Standard input is /dev/null already. */
    if (dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
        fail("set up stdio", errno, "");
    /* The spawner waits for this exec on the status pipe, with its end of the socket open:
     * if it has died, nobody would tell the daemon of this builder, which must not start. */
    struct pollfd spawner = {ctl, POLLIN, 0};
    if (poll(&spawner, 1, 0) != 0)
        fail("spawner", ECONNRESET, "");
    close_all_but(status_fd, report_fd);
    if (plan) {
        /* The runner is started: nothing more to say on the status pipe. */
        close(status_fd);
        run_session(plan, env, report_fd);
    }
    execve(builder, args, env);
    fail("exec", errno, builder);
}
