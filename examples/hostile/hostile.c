/*
 * The hostile build's attack tool: one static binary (the suite compiles it with
 * `gcc -static -O2` and adds it to the build context), run by the Dockerfile's RUN steps inside
 * the builder VM. Every subcommand prints result lines `NAME blocked|REACHED detail` on stdout
 * and exits 0 unless its own arguments are wrong: the build must succeed whatever the outcome, so
 * that its image (with /hostile/results.txt) is uploaded and read from the outside.
 *
 *   hostile probe TIMEOUT_S NAME=ADDR:PORT[/PATH]...
 *       TCP connects to every target at once; a target that accepts gets `GET /PATH` (default
 *       `/NAME`) and the first line of its answer is recorded. REACHED = a connection was
 *       established (whatever answered); blocked = timeout, refused, unreachable.
 *   hostile http NAME METHOD ADDR:PORT PATH BODY_FILE|- [HEADER...]
 *       one HTTP/1.0 request; prints `NAME status=CODE` or `NAME error=...` (no verdict: the
 *       caller decides what an answer means).
 *   hostile flood NAME ADDR:PORT COUNT CONTROL_ADDR:PORT MAX_HOLD_S
 *       opens COUNT TCP connections to ADDR:PORT (in as many processes as the open-file limit
 *       needs), tells the control server `GET /flood-started?opened=N`, holds them until
 *       `GET /release/flood` answers 200 (or MAX_HOLD_S), opening again every 5 s those the
 *       peer closed, then counts how many the peer kept open. REACHED when the peer kept more
 *       than half of COUNT open at the end of the hold.
 *   hostile wait-release CONTROL_ADDR:PORT NAME MAX_S
 *       polls `GET /release/NAME` until it answers 200 (the slow build's sleep).
 *   hostile io-uring
 *       io_uring_setup(8, &params) (syscall 425 on x86_64): REACHED when it returns a ring.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "hostile: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(64);
}

/* ADDR:PORT (numeric IPv4) into sa; 0 on success. */
static int parse_addr(const char *text, struct sockaddr_in *sa) {
	char host[64];
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof host)
		return -1;
	memcpy(host, text, (size_t)(colon - text));
	host[colon - text] = 0;
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
		return -1;
	long port = strtol(colon + 1, NULL, 10);
	if (port <= 0 || port > 65535)
		return -1;
	sa->sin_port = htons((unsigned short)port);
	return 0;
}

static const char *errno_word(int e) {
	switch (e) {
	case ETIMEDOUT: return "timeout";
	case ECONNREFUSED: return "refused";
	case EHOSTUNREACH: return "host-unreachable";
	case ENETUNREACH: return "net-unreachable";
	case EACCES: return "EACCES";
	case EPERM: return "EPERM";
	case ECONNRESET: return "reset";
	case ENOSYS: return "ENOSYS";
	case EMFILE: return "EMFILE";
	case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
	default: return strerror(e);
	}
}

/* A non-blocking connect; returns the socket (connect in progress or done) or -errno. */
static int start_connect(const struct sockaddr_in *sa) {
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

/* Waits until fd is connected or timeout; 0 when connected, else the errno. */
static int finish_connect(int fd, double timeout_s) {
	struct pollfd p = {.fd = fd, .events = POLLOUT};
	int r = poll(&p, 1, (int)(timeout_s * 1000));
	if (r == 0)
		return ETIMEDOUT;
	if (r < 0)
		return errno;
	int err = 0;
	socklen_t len = sizeof err;
	getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
	return err;
}

/* Reads the answer's first line into line (up to cap-1 bytes) within timeout; its length, or -1. */
static int read_first_line(int fd, char *line, size_t cap, double timeout_s) {
	size_t n = 0;
	double deadline = now_s() + timeout_s;
	while (n + 1 < cap) {
		double left = deadline - now_s();
		if (left <= 0)
			break;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, (int)(left * 1000) + 1) <= 0)
			break;
		ssize_t r = recv(fd, line + n, cap - 1 - n, 0);
		if (r <= 0)
			break;
		n += (size_t)r;
		if (memchr(line, '\n', n))
			break;
	}
	line[n] = 0;
	char *end = strpbrk(line, "\r\n");
	if (end)
		*end = 0;
	return n ? (int)strlen(line) : -1;
}

static void send_all(int fd, const char *data, size_t len) {
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	while (len > 0) {
		ssize_t w = send(fd, data, len, MSG_NOSIGNAL);
		if (w <= 0)
			return;
		data += w;
		len -= (size_t)w;
	}
	fcntl(fd, F_SETFL, flags);
}

/* ---- probe ---------------------------------------------------------------------------------- */

struct target {
	char name[96];
	char addr[64];
	char path[256];
	struct sockaddr_in sa;
	int fd;
	int err;
	int done;
};

static int cmd_probe(int argc, char **argv) {
	if (argc < 2)
		die("usage: probe TIMEOUT_S NAME=ADDR:PORT[/PATH]...");
	double timeout = atof(argv[0]);
	int n = argc - 1;
	struct target *t = calloc((size_t)n, sizeof *t);
	for (int i = 0; i < n; i++) {
		const char *spec = argv[i + 1];
		const char *eq = strchr(spec, '=');
		if (!eq || (size_t)(eq - spec) >= sizeof t[i].name)
			die("probe: bad target %s", spec);
		memcpy(t[i].name, spec, (size_t)(eq - spec));
		const char *slash = strchr(eq + 1, '/');
		size_t alen = slash ? (size_t)(slash - eq - 1) : strlen(eq + 1);
		if (alen >= sizeof t[i].addr)
			die("probe: bad address in %s", spec);
		memcpy(t[i].addr, eq + 1, alen);
		snprintf(t[i].path, sizeof t[i].path, "%s", slash ? slash : "");
		if (!slash)
			snprintf(t[i].path, sizeof t[i].path, "/%s", t[i].name);
		if (parse_addr(t[i].addr, &t[i].sa) != 0)
			die("probe: bad address in %s", spec);
		t[i].fd = start_connect(&t[i].sa);
		if (t[i].fd < 0) {
			t[i].err = -t[i].fd;
			t[i].done = 1;
		}
	}
	/* Wait for every connect at once. */
	double deadline = now_s() + timeout;
	for (;;) {
		struct pollfd *p = calloc((size_t)n, sizeof *p);
		int waiting = 0;
		for (int i = 0; i < n; i++) {
			p[i].fd = t[i].done ? -1 : t[i].fd;
			p[i].events = POLLOUT;
			waiting += !t[i].done;
		}
		double left = deadline - now_s();
		if (!waiting || left <= 0) {
			free(p);
			break;
		}
		if (poll(p, (nfds_t)n, (int)(left * 1000) + 1) > 0) {
			for (int i = 0; i < n; i++) {
				if (t[i].done || !p[i].revents)
					continue;
				int err = 0;
				socklen_t len = sizeof err;
				getsockopt(t[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
				t[i].err = err;
				t[i].done = 1;
			}
		}
		free(p);
	}
	for (int i = 0; i < n; i++) {
		if (!t[i].done) {
			t[i].err = ETIMEDOUT;
			t[i].done = 1;
		}
		if (t[i].err) {
			printf("%s blocked %s connect: %s\n", t[i].name, t[i].addr, errno_word(t[i].err));
			if (t[i].fd >= 0)
				close(t[i].fd);
			continue;
		}
		char req[512], line[256];
		int len = snprintf(req, sizeof req,
		                   "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: hostile-build\r\n\r\n",
		                   t[i].path, t[i].addr);
		send_all(t[i].fd, req, (size_t)len);
		if (read_first_line(t[i].fd, line, sizeof line, 3) > 0)
			printf("%s REACHED %s connected, answered: %s\n", t[i].name, t[i].addr, line);
		else
			printf("%s REACHED %s connected (no answer)\n", t[i].name, t[i].addr);
		close(t[i].fd);
	}
	fflush(stdout);
	return 0;
}

/* ---- one HTTP request ------------------------------------------------------------------------ */

/* Sends an HTTP/1.0 request; the status code, or -errno. */
static int http_request(const char *addr, const char *method, const char *path, const char *body,
                        size_t body_len, char **headers, int nheaders, double timeout) {
	struct sockaddr_in sa;
	if (parse_addr(addr, &sa) != 0)
		return -EINVAL;
	int fd = start_connect(&sa);
	if (fd < 0)
		return fd;
	int err = finish_connect(fd, timeout);
	if (err) {
		close(fd);
		return -err;
	}
	size_t cap = 4096 + body_len;
	char *req = malloc(cap);
	int len = snprintf(req, cap, "%s %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: hostile-build\r\n",
	                   method, path, addr);
	for (int i = 0; i < nheaders; i++)
		len += snprintf(req + len, cap - (size_t)len, "%s\r\n", headers[i]);
	if (body)
		len += snprintf(req + len, cap - (size_t)len,
		                "Content-Type: application/json\r\nContent-Length: %zu\r\n", body_len);
	len += snprintf(req + len, cap - (size_t)len, "\r\n");
	if (body) {
		memcpy(req + len, body, body_len);
		len += (int)body_len;
	}
	send_all(fd, req, (size_t)len);
	free(req);
	char line[256];
	int got = read_first_line(fd, line, sizeof line, timeout);
	close(fd);
	if (got <= 0)
		return -ECONNRESET;
	int code = 0;
	if (sscanf(line, "HTTP/%*s %d", &code) != 1)
		return -EPROTO;
	return code;
}

static int cmd_http(int argc, char **argv) {
	if (argc < 5)
		die("usage: http NAME METHOD ADDR:PORT PATH BODY_FILE|- [HEADER...]");
	char *body = NULL;
	size_t body_len = 0;
	if (strcmp(argv[4], "-") != 0) {
		FILE *f = fopen(argv[4], "rb");
		if (!f)
			die("http: cannot read %s", argv[4]);
		body = malloc(1 << 20);
		body_len = fread(body, 1, 1 << 20, f);
		fclose(f);
	}
	int code = http_request(argv[2], argv[1], argv[3], body, body_len, argv + 5, argc - 5, 10);
	if (code > 0)
		printf("%s status=%d\n", argv[0], code);
	else
		printf("%s error=%s\n", argv[0], errno_word(-code));
	fflush(stdout);
	return 0;
}

/* ---- flood ----------------------------------------------------------------------------------- */

/* Whether fd is a connected socket the peer has not closed. */
static int still_open(int fd) {
	struct sockaddr_in peer;
	socklen_t len = sizeof peer;
	if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0)
		return 0;
	char b;
	ssize_t r = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
	return (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) || r > 0;
}

/* Opens up to count connections; writes "opened failed first_error" to out_fd, then holds them
 * until stop_fd is readable, reopening every few seconds those the peer closed; then writes
 * "still_open reopened". Runs in a child process. */
static void flood_child(const struct sockaddr_in *sa, int count, int out_fd, int stop_fd) {
	int *fds = calloc((size_t)count, sizeof *fds);
	int opened = 0, failed = 0, first_err = 0;
	for (int i = 0; i < count; i++) {
		int fd = start_connect(sa);
		int err = fd < 0 ? -fd : finish_connect(fd, 5);
		if (err) {
			if (fd >= 0)
				close(fd);
			failed++;
			if (!first_err)
				first_err = err;
			/* The peer or the path refuses: do not spin for minutes on timeouts. */
			if (failed >= 50 && err == ETIMEDOUT)
				break;
			continue;
		}
		fds[opened++] = fd;
	}
	dprintf(out_fd, "%d %d %d\n", opened, failed, first_err);
	long reopened = 0;
	for (;;) {
		struct pollfd p = {.fd = stop_fd, .events = POLLIN};
		if (poll(&p, 1, 5000) != 0)
			break;
		for (int i = 0; i < opened; i++) {
			if (still_open(fds[i]))
				continue;
			/* A connect still in progress is left alone; a closed one is opened again. */
			int err = 0;
			socklen_t len = sizeof err;
			getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &len);
			struct pollfd w = {.fd = fds[i], .events = POLLOUT};
			if (!err && poll(&w, 1, 0) == 0)
				continue;
			close(fds[i]);
			int fd = start_connect(sa);
			fds[i] = fd >= 0 ? fd : socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
			reopened++;
		}
	}
	sleep(2);
	int open_now = 0;
	for (int i = 0; i < opened; i++)
		open_now += still_open(fds[i]);
	dprintf(out_fd, "%d %ld\n", open_now, reopened);
	_exit(0);
}

static int cmd_flood(int argc, char **argv) {
	if (argc < 5)
		die("usage: flood NAME ADDR:PORT COUNT CONTROL_ADDR:PORT MAX_HOLD_S");
	const char *name = argv[0];
	struct sockaddr_in sa;
	if (parse_addr(argv[1], &sa) != 0)
		die("flood: bad address %s", argv[1]);
	int count = atoi(argv[2]);
	const char *control = argv[3];
	double max_hold = atof(argv[4]);
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	getrlimit(RLIMIT_NOFILE, &rl);
	int per = rl.rlim_cur > 64 ? (int)(rl.rlim_cur - 32) : 32;
	if (per > 4000)
		per = 4000;
	int children = (count + per - 1) / per;
	int stop[2];
	if (pipe(stop) != 0)
		die("pipe");
	int *outs = calloc((size_t)children, sizeof *outs);
	pid_t *pids = calloc((size_t)children, sizeof *pids);
	double t0 = now_s();
	for (int c = 0; c < children; c++) {
		int out[2];
		if (pipe(out) != 0)
			die("pipe");
		int n = c == children - 1 ? count - per * c : per;
		pids[c] = fork();
		if (pids[c] == 0) {
			close(stop[1]);
			close(out[0]);
			flood_child(&sa, n, out[1], stop[0]);
		}
		close(out[1]);
		outs[c] = out[0];
	}
	close(stop[0]);
	int opened = 0, failed = 0, first_err = 0;
	for (int c = 0; c < children; c++) {
		char buf[128] = {0};
		FILE *f = fdopen(dup(outs[c]), "r");
		int o = 0, fl = 0, e = 0;
		if (f && fgets(buf, sizeof buf, f) && sscanf(buf, "%d %d %d", &o, &fl, &e) == 3) {
			opened += o;
			failed += fl;
			if (!first_err)
				first_err = e;
		}
		if (f)
			fclose(f);
	}
	double open_s = now_s() - t0;
	fprintf(stderr, "hostile flood: %d of %d connections open after %.1f s (%d failed%s%s)\n",
	        opened, count, open_s, failed, first_err ? ", first: " : "",
	        first_err ? errno_word(first_err) : "");
	char path[128];
	snprintf(path, sizeof path, "/flood-started?opened=%d&failed=%d", opened, failed);
	http_request(control, "GET", path, NULL, 0, NULL, 0, 10);
	double hold_start = now_s();
	int released = 0;
	while (now_s() - hold_start < max_hold) {
		if (http_request(control, "GET", "/release/flood", NULL, 0, NULL, 0, 10) == 200) {
			released = 1;
			break;
		}
		sleep(3);
	}
	double held_s = now_s() - hold_start;
	if (write(stop[1], "x", 1) < 0) {
		/* children see EOF when we close */
	}
	close(stop[1]);
	int open_now = 0;
	long reopened = 0;
	for (int c = 0; c < children; c++) {
		ssize_t r;
		size_t n = 0;
		/* The first line was read through the dup'd stream; the last one is "open reopened". */
		char all[256] = {0};
		while ((r = read(outs[c], all + n, sizeof all - 1 - n)) > 0)
			n += (size_t)r;
		all[n] = 0;
		char *last = NULL, *save = NULL;
		for (char *tok = strtok_r(all, "\n", &save); tok; tok = strtok_r(NULL, "\n", &save))
			last = tok;
		int o = 0;
		long ro = 0;
		if (last && sscanf(last, "%d %ld", &o, &ro) == 2) {
			open_now += o;
			reopened += ro;
		}
		waitpid(pids[c], NULL, 0);
	}
	printf("%s %s opened=%d/%d failed=%d%s%s open_s=%.1f held_s=%.0f%s reopened=%ld "
	       "still_open=%d\n",
	       name, open_now > count / 2 ? "REACHED" : "blocked", opened, count, failed,
	       first_err ? " first_error=" : "", first_err ? errno_word(first_err) : "", open_s,
	       held_s, released ? " released" : " not-released", reopened, open_now);
	fflush(stdout);
	return 0;
}

static int cmd_wait_release(int argc, char **argv) {
	if (argc < 3)
		die("usage: wait-release CONTROL_ADDR:PORT NAME MAX_S");
	char path[128];
	snprintf(path, sizeof path, "/release/%s", argv[1]);
	double start = now_s(), max = atof(argv[2]);
	while (now_s() - start < max) {
		if (http_request(argv[0], "GET", path, NULL, 0, NULL, 0, 10) == 200) {
			printf("released after %.0f s\n", now_s() - start);
			return 0;
		}
		sleep(3);
	}
	printf("not released after %.0f s\n", max);
	return 0;
}

/* ---- io_uring -------------------------------------------------------------------------------- */

static int cmd_io_uring(void) {
	unsigned char params[120]; /* struct io_uring_params */
	memset(params, 0, sizeof params);
	long fd = syscall(425 /* __NR_io_uring_setup on x86_64 */, 8, params);
	if (fd >= 0) {
		printf("io-uring REACHED io_uring_setup returned a ring (fd %ld)\n", fd);
		close((int)fd);
	} else {
		printf("io-uring blocked io_uring_setup: %s (errno %d)\n", errno_word(errno), errno);
	}
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv) {
	signal(SIGPIPE, SIG_IGN);
	if (argc < 2)
		die("usage: hostile probe|http|flood|wait-release|io-uring ...");
	const char *cmd = argv[1];
	if (!strcmp(cmd, "probe"))
		return cmd_probe(argc - 2, argv + 2);
	if (!strcmp(cmd, "http"))
		return cmd_http(argc - 2, argv + 2);
	if (!strcmp(cmd, "flood"))
		return cmd_flood(argc - 2, argv + 2);
	if (!strcmp(cmd, "wait-release"))
		return cmd_wait_release(argc - 2, argv + 2);
	if (!strcmp(cmd, "io-uring"))
		return cmd_io_uring();
	die("unknown command %s", cmd);
	return 64;
}
