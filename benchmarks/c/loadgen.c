/* loadgen: N fake MaxwellLink drivers in one process, for measuring hubs.
 *
 *   loadgen (--unix PATH | --host HOST --port PORT) -n N [--timeout SECONDS]
 *
 * Opens N connections to a hub and answers like a driver that does no physics:
 * STATUS -> NEEDINIT before INIT, READY after it (HAVEDATA between FIELDDATA and
 * GETSOURCE); INIT is accepted; each FIELDDATA + GETSOURCE gets a 124-byte SOURCEREADY
 * whose dmu/dt is the field just received and whose extras are empty, so the hub can
 * check what came back. STOP is answered with BYE, then the connection closes; EXIT and
 * EOF close it. The process exits when every connection is closed.
 *
 * One thread, epoll, non-blocking sockets. Messages may arrive split at any byte or
 * several in one read; replies that do not fit in the socket buffer wait for EPOLLOUT.
 * The wire is little-endian (x86 and arm64 are), so fields are copied, not converted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 12
#define REPLY 124
#define MAX_INIT (1 << 20)

typedef struct {
    int fd;
    int inited, have_field, closing;
    double field[3];
    unsigned char *in;  /* bytes received, not yet a complete message */
    size_t in_len, in_cap;
    unsigned char *out; /* bytes to send that the socket did not take yet */
    size_t out_len, out_cap;
    int want_out;
} conn_t;

static int epfd;
static long live;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *grow(void *p, size_t *cap, size_t need) {
    if (need <= *cap) return p;
    size_t c = *cap ? *cap : 512;
    while (c < need) c *= 2;
    p = realloc(p, c);
    if (!p) die("realloc");
    *cap = c;
    return p;
}

static void set_events(conn_t *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = want_out;
}

static void close_conn(conn_t *c) {
    if (c->fd < 0) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    live--;
}

/* Write what is queued; returns 0, or -1 if the connection died. */
static int flush_out(conn_t *c) {
    size_t done = 0;
    while (done < c->out_len) {
        ssize_t k = send(c->fd, c->out + done, c->out_len - done, MSG_NOSIGNAL);
        if (k > 0) {
            done += (size_t)k;
        } else if (k < 0 && errno == EINTR) {
            continue;
        } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            close_conn(c);
            return -1;
        }
    }
    memmove(c->out, c->out + done, c->out_len - done);
    c->out_len -= done;
    set_events(c, c->out_len > 0);
    if (c->out_len == 0 && c->closing) close_conn(c);
    return 0;
}

static void queue(conn_t *c, const void *p, size_t n) {
    c->out = grow(c->out, &c->out_cap, c->out_len + n);
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void queue_header(conn_t *c, const char *name) {
    char h[HDR];
    memset(h, ' ', HDR);
    memcpy(h, name, strlen(name));
    queue(c, h, HDR);
}

static void queue_source_ready(conn_t *c) {
    unsigned char r[REPLY];
    memset(r, 0, REPLY);
    memcpy(r, "FORCEREADY  ", HDR);
    int32_t one = 1;
    memcpy(r + 20, &one, 4);           /* nat = 1; energy (12:20) stays 0.0 */
    memcpy(r + 24, c->field, 24);      /* dmu/dt = the field */
    /* virial (48:120) zeros, extras length (120:124) zero */
    queue(c, r, REPLY);
}

static int is(const unsigned char *h, const char *name) {
    char want[HDR];
    memset(want, ' ', HDR);
    memcpy(want, name, strlen(name));
    return memcmp(h, want, HDR) == 0;
}

/* Parse one message at p (avail bytes). Returns bytes used, 0 if incomplete, -1 on error. */
static long parse_one(conn_t *c, const unsigned char *p, size_t avail) {
    if (avail < HDR) return 0;
    if (is(p, "STATUS")) {
        queue_header(c, !c->inited ? "NEEDINIT" : c->have_field ? "HAVEDATA" : "READY");
        return HDR;
    }
    if (is(p, "GETFORCE")) {
        queue_source_ready(c);
        c->have_field = 0;
        return HDR;
    }
    if (is(p, "POSDATA")) {
        if (avail < 160) return 0;
        int32_t nat;
        memcpy(&nat, p + 156, 4);
        if (nat < 1 || nat > 1000000) return -1;
        size_t total = 160 + 24 * (size_t)nat;
        if (avail < total) return 0;
        memcpy(c->field, p + 160, 24);
        c->have_field = 1;
        return (long)total;
    }
    if (is(p, "INIT")) {
        if (avail < 20) return 0;
        int32_t n;
        memcpy(&n, p + 16, 4);
        if (n < 0 || n > MAX_INIT) return -1;
        if (avail < 20 + (size_t)n) return 0;
        c->inited = 1;
        return 20 + n;
    }
    if (is(p, "STOP")) {
        queue_header(c, "BYE");
        c->closing = 1;
        return HDR;
    }
    if (is(p, "EXIT")) {
        c->closing = 1;
        return HDR;
    }
    return -1;
}

static void on_readable(conn_t *c) {
    for (;;) {
        c->in = grow(c->in, &c->in_cap, c->in_len + 4096);
        size_t room = c->in_cap - c->in_len;
        ssize_t k = recv(c->fd, c->in + c->in_len, room, 0);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            close_conn(c);  /* EOF or reset: the hub is gone */
            return;
        }
        if (k < 0) {
            if (errno == EINTR) continue;
            break;
        }
        c->in_len += (size_t)k;
        if ((size_t)k < room) break;  /* drained; saves one EAGAIN round trip */
    }
    size_t pos = 0;
    long used = 0;
    while (!c->closing && (used = parse_one(c, c->in + pos, c->in_len - pos)) > 0)
        pos += (size_t)used;
    if (used < 0) {
        fprintf(stderr, "loadgen: protocol error on fd %d (header %.12s)\n", c->fd, c->in + pos);
        close_conn(c);
        return;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    if (c->out_len) flush_out(c);
    else if (c->closing) close_conn(c);
}

static int connect_one(const char *unix_path, const char *host, const char *port,
                       double timeout) {
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int fd = -1;
        if (unix_path) {
            struct sockaddr_un sa = {.sun_family = AF_UNIX};
            strncpy(sa.sun_path, unix_path, sizeof sa.sun_path - 1);
            fd = socket(AF_UNIX, SOCK_STREAM, 0);
            if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) return fd;
        } else {
            struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
            if (getaddrinfo(host, port, &hints, &ai) != 0) die("getaddrinfo");
            fd = socket(ai->ai_family, SOCK_STREAM, 0);
            int ok = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
            freeaddrinfo(ai);
            if (ok) {
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                return fd;
            }
        }
        if (fd < 0) die("socket");
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec + 1e-9 * (now.tv_nsec - t0.tv_nsec) > timeout) {
            perror("loadgen: connect");
            exit(1);
        }
        usleep(10000);  /* the hub is not listening yet */
    }
}

int main(int argc, char **argv) {
    const char *unix_path = NULL, *host = "127.0.0.1", *port = NULL;
    long n = 1;
    double timeout = 30.0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--unix")) unix_path = argv[i + 1];
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = argv[i + 1];
        else if (!strcmp(argv[i], "-n")) n = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--timeout")) timeout = atof(argv[i + 1]);
        else {
            fprintf(stderr, "loadgen: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if ((!unix_path && !port) || n < 1) {
        fprintf(stderr, "usage: loadgen (--unix PATH | --host HOST --port PORT) -n N "
                        "[--timeout S]\n");
        return 2;
    }
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    conn_t *conns = calloc((size_t)n, sizeof *conns);
    if (!conns) die("calloc");
    for (long i = 0; i < n; i++) {
        conn_t *c = &conns[i];
        c->fd = connect_one(unix_path, host, port, timeout);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
        live++;
    }
    struct epoll_event events[256];
    while (live > 0) {
        int k = epoll_wait(epfd, events, 256, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < k; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->fd >= 0 && (events[i].events & EPOLLOUT)) flush_out(c);
            if (c->fd >= 0 && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                on_readable(c);
        }
    }
    return 0;
}
