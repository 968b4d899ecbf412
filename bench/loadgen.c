/* A closed-loop load generator for daemons that answer one request at a time per
 * connection: weft's and Nix's, measured the same way.
 *
 * Python (bench/loadgen.py) opens the connections, does each protocol's handshake and
 * learns the exact bytes of each connection's reply; this program inherits the
 * connections and only sends each its request, waits for the reply's known bytes, checks
 * them, and sends again: no pipelining, one request in flight per connection.  In C it
 * costs the two cores it shares with the daemon a few microseconds a request; the Python
 * loop it replaces spent about 15, a third of a core at the rate the goal needs.
 *
 * Every connection keeps asking for the whole run, and only requests sent within the
 * measured window are timed; the run ends once all of those are answered.  A fixed
 * number of requests per connection would favour an unfair daemon: the connections it
 * serves first finish first, and the others' last requests then meet less competition.
 *
 * usage: loadgen FIRST_FD COUNT WARMUP_SECONDS SECONDS SCRIPT_FILE OUT_FILE
 * The connections are fds FIRST_FD .. FIRST_FD+COUNT-1.  SCRIPT_FILE holds, for each in
 * turn, its request and its reply, each as a 32-bit native length and the bytes.  The
 * window opens WARMUP_SECONDS after the start and lasts SECONDS.  OUT_FILE gets each
 * timed latency in seconds as a native double; stdout, the requests answered in all.
 * Exit 0, or 1 with the reason on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

/* A daemon that stops answering for this long has failed the run, rather than hung it. */
#define STALL_MS 60000
#define EVENTS 1024

struct conn {
	int fd;
	unsigned got;      /* bytes of the current reply read */
	int timed;         /* the current request was sent within the window */
	double sent;       /* when the current request went out */
	const unsigned char *req, *reply;
	uint32_t req_len, reply_len;
	unsigned char *buf;
};

static unsigned char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		perror(path);
		exit(1);
	}
	size_t cap = 4096, n = 0;
	unsigned char *data = malloc(cap);
	size_t r;
	while ((r = fread(data + n, 1, cap - n, f)) > 0) {
		n += r;
		if (n == cap)
			data = realloc(data, cap *= 2);
	}
	fclose(f);
	*len = n;
	return data;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void send_request(struct conn *c, double window_start, double window_end)
{
	c->sent = now();
	c->timed = c->sent >= window_start && c->sent < window_end;
	/* A request is far smaller than the socket's buffer, which nothing else fills. */
	if (write(c->fd, c->req, c->req_len) != (ssize_t)c->req_len) {
		perror("write");
		exit(1);
	}
}

/* The next length-prefixed piece of the script at *pos, or exit if it runs short. */
static const unsigned char *piece(const unsigned char *script, size_t len, size_t *pos,
				  uint32_t *piece_len)
{
	if (len - *pos < sizeof *piece_len) {
		fprintf(stderr, "the script is short\n");
		exit(1);
	}
	memcpy(piece_len, script + *pos, sizeof *piece_len);
	*pos += sizeof *piece_len;
	if (len - *pos < *piece_len) {
		fprintf(stderr, "the script is short\n");
		exit(1);
	}
	*pos += *piece_len;
	return script + *pos - *piece_len;
}

/* Read what `c` has; 1 when its reply is whole (and checked). */
static int read_reply(struct conn *c)
{
	ssize_t r = read(c->fd, c->buf + c->got, c->reply_len - c->got);
	if (r <= 0) {
		fprintf(stderr, "fd %d: %s\n", c->fd, r ? strerror(errno) : "closed");
		exit(1);
	}
	c->got += (unsigned)r;
	if (c->got < c->reply_len)
		return 0;
	if (memcmp(c->buf, c->reply, c->reply_len) != 0) {
		fprintf(stderr, "fd %d: a reply unlike the one expected\n", c->fd);
		exit(1);
	}
	c->got = 0;
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s FIRST_FD COUNT WARMUP SECONDS SCRIPT OUT\n", argv[0]);
		return 1;
	}
	int first = atoi(argv[1]), count = atoi(argv[2]);
	double window_start = now() + atof(argv[3]);
	double window_end = window_start + atof(argv[4]);
	size_t script_len, pos = 0;
	unsigned char *script = slurp(argv[5], &script_len);
	FILE *out = fopen(argv[6], "wb");
	if (!out) {
		perror(argv[6]);
		return 1;
	}
	struct conn *conns = calloc((size_t)count, sizeof *conns);
	size_t cap = 1 << 16, nlat = 0, answered = 0;
	double *lat = malloc(sizeof(double) * cap);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	for (int i = 0; i < count; i++) {
		struct conn *c = &conns[i];
		c->fd = first + i;
		c->req = piece(script, script_len, &pos, &c->req_len);
		c->reply = piece(script, script_len, &pos, &c->reply_len);
		c->buf = malloc(c->reply_len);
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
			perror("epoll_ctl");
			return 1;
		}
	}
	/* Timed requests not answered yet: until none is, every connection goes on asking. */
	size_t timed_out = 0;
	for (int i = 0; i < count; i++) {
		send_request(&conns[i], window_start, window_end);
		timed_out += (size_t)conns[i].timed;
	}
	int live = count;
	struct epoll_event events[EVENTS];
	while (live) {
		int n = epoll_wait(ep, events, EVENTS, STALL_MS);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "no reply for %d ms\n", STALL_MS);
			return 1;
		}
		double t = now();
		for (int k = 0; k < n; k++) {
			struct conn *c = &conns[events[k].data.u32];
			if (!read_reply(c))
				continue;
			answered++;
			if (c->timed) {
				if (nlat == cap)
					lat = realloc(lat, sizeof(double) * (cap *= 2));
				lat[nlat++] = t - c->sent;
				timed_out--;
			}
			if (t < window_end || timed_out) {
				send_request(c, window_start, window_end);
				timed_out += (size_t)c->timed;
			} else {
				live--;
			}
		}
	}
	if (fwrite(lat, sizeof(double), nlat, out) != nlat || fclose(out) != 0) {
		perror(argv[6]);
		return 1;
	}
	printf("%zu\n", answered);
	return 0;
}
