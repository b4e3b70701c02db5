/* epoll_hub: the smallest hub that does the job, as a floor for what the kernel allows.
 *
 *   epoll_hub (--unix PATH | --host HOST --port PORT) -n N
 *             [--seconds S] [--repeats R] [--min-steps M] [--no-check]
 *
 * Listens, accepts N drivers; each gets STATUS (its reply is read) and INIT with
 * {"molecule_id": i, "dt_au": 0.5}. Then barrier steps: the 196-byte FIELDDATA+GETSOURCE
 * block is written to every driver, and every SOURCEREADY (124 + m bytes) is gathered
 * with epoll. Without --no-check each reply's dmu/dt must equal the field sent (what
 * benchmarks/c/loadgen.c answers).
 *
 * Timing, the same rule as benchmarks/hub_throughput.py: warm up for at least M steps and
 * a quarter of S seconds, then R timed runs of max(M, S * warm-up rate) steps each.
 * Reports go to stdout as "@bench {json}" lines: one when listening, one per timed run
 * (steps, wall_s, mean_ms, p99_ms, cpu_s from getrusage), one at the end; then STOP to
 * every driver and a short wait for BYE. The wire is little-endian (x86 and arm64 are),
 * so numbers are copied, not converted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 12
#define BLOCK 196
#define FIXED 124

typedef struct {
    int fd;
    double field[3];
    unsigned char *buf;
    size_t got, cap;
    int done;
} driver_t;

static driver_t *drivers;
static long n;
static int epfd, check = 1;
static unsigned char block[BLOCK];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
           + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static void header(unsigned char *p, const char *name) {
    memset(p, ' ', HDR);
    memcpy(p, name, strlen(name));
}

static void send_all(int fd, const void *p, size_t len) {
    const unsigned char *b = p;
    while (len) {
        ssize_t k = send(fd, b, len, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("send");
        b += k;
        len -= (size_t)k;
    }
}

static void recv_all(int fd, void *p, size_t len) {
    unsigned char *b = p;
    while (len) {
        ssize_t k = recv(fd, b, len, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("recv (handshake)");
        b += k;
        len -= (size_t)k;
    }
}

static int listen_on(const char *unix_path, const char *host, const char *port) {
    int fd, one = 1;
    if (unix_path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, unix_path, sizeof sa.sun_path - 1);
        unlink(unix_path);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    } else {
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
        if (getaddrinfo(host, port, &hints, &ai) != 0) die("getaddrinfo");
        fd = socket(ai->ai_family, SOCK_STREAM, 0);
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) die("bind");
        freeaddrinfo(ai);
    }
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

/* Accept N drivers; STATUS, its reply, then INIT. */
static void bind_drivers(int lfd, int tcp) {
    for (long i = 0; i < n; i++) {
        driver_t *d = &drivers[i];
        d->fd = accept(lfd, NULL, NULL);
        if (d->fd < 0) die("accept");
        if (tcp) {
            int one = 1;
            setsockopt(d->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        unsigned char h[HDR];
        header(h, "STATUS");
        send_all(d->fd, h, HDR);
        recv_all(d->fd, h, HDR);
        if (memcmp(h, "READY", 5) && memcmp(h, "NEEDINIT", 8)) {
            fprintf(stderr, "epoll_hub: driver %ld answered STATUS with %.12s\n", i, h);
            exit(1);
        }
        char json[64];
        int32_t hdr2[2] = {(int32_t)i, 0};
        hdr2[1] = snprintf(json, sizeof json, "{\"molecule_id\": %ld, \"dt_au\": 0.5}", i);
        unsigned char init[HDR + 8 + sizeof json];
        header(init, "INIT");
        memcpy(init + HDR, hdr2, 8);
        memcpy(init + HDR + 8, json, (size_t)hdr2[1]);
        send_all(d->fd, init, HDR + 8 + (size_t)hdr2[1]);
        d->cap = 4096;
        d->buf = malloc(d->cap);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = d};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, d->fd, &ev) < 0) die("epoll_ctl");
    }
}

/* Read what a driver sent; returns 1 when its SOURCEREADY is complete. */
static int read_reply(driver_t *d, long step) {
    for (;;) {
        if (d->got == d->cap) {
            d->cap *= 2;
            d->buf = realloc(d->buf, d->cap);
        }
        ssize_t k = recv(d->fd, d->buf + d->got, d->cap - d->got, MSG_DONTWAIT);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (k <= 0) {
            fprintf(stderr, "epoll_hub: driver %ld left at step %ld\n", (long)(d - drivers), step);
            exit(1);
        }
        d->got += (size_t)k;
        if (d->got < FIXED) return 0;
        int32_t m;
        memcpy(&m, d->buf + 120, 4);
        if (memcmp(d->buf, "FORCEREADY  ", HDR) || m < 0 || d->got > FIXED + (size_t)m) {
            fprintf(stderr, "epoll_hub: bad reply from driver %ld\n", (long)(d - drivers));
            exit(1);
        }
        if (d->got < FIXED + (size_t)m) continue;
        if (check && memcmp(d->buf + 24, d->field, 24)) {
            fprintf(stderr, "epoll_hub: driver %ld returned a wrong source\n",
                    (long)(d - drivers));
            exit(1);
        }
        d->got = 0;
        return 1;
    }
}

static void one_step(long step) {
    for (long i = 0; i < n; i++) {
        driver_t *d = &drivers[i];
        d->field[0] = 1e-6 * (double)(step % 1000);
        d->field[1] = 1e-9 * (double)i;
        d->field[2] = 1e-3;
        memcpy(block + 160, d->field, 24);
        send_all(d->fd, block, BLOCK);
        d->done = 0;
    }
    long pending = n;
    struct epoll_event events[1024];
    while (pending) {
        int k = epoll_wait(epfd, events, 1024, 60000);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("epoll_wait (no reply within 60 s)");
        for (int j = 0; j < k; j++) {
            driver_t *d = events[j].data.ptr;
            if (!d->done && read_reply(d, step)) {
                d->done = 1;
                pending--;
            }
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void say_goodbye(void) {
    unsigned char h[HDR];
    header(h, "STOP");
    for (long i = 0; i < n; i++) send(drivers[i].fd, h, HDR, MSG_NOSIGNAL);
    long open = n;
    double deadline = now() + 2.0;
    struct epoll_event events[1024];
    while (open && now() < deadline) {
        int k = epoll_wait(epfd, events, 1024, 100);
        for (int j = 0; j < k; j++) {
            driver_t *d = events[j].data.ptr;
            char buf[256];
            ssize_t r = recv(d->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r == 0 || (r > 0 && r >= 3 && !memcmp(buf, "BYE", 3)) ||
                (r < 0 && errno != EAGAIN)) {
                epoll_ctl(epfd, EPOLL_CTL_DEL, d->fd, NULL);
                open--;
            }
        }
    }
    for (long i = 0; i < n; i++) close(drivers[i].fd);
}

int main(int argc, char **argv) {
    const char *unix_path = NULL, *host = "127.0.0.1", *port = NULL;
    double seconds = 1.5;
    long repeats = 3, min_steps = 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--no-check")) { check = 0; continue; }
        if (!strcmp(a, "--unix")) unix_path = v;
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = v;
        else if (!strcmp(a, "-n")) n = atol(v);
        else if (!strcmp(a, "--seconds")) seconds = atof(v);
        else if (!strcmp(a, "--repeats")) repeats = atol(v);
        else if (!strcmp(a, "--min-steps")) min_steps = atol(v);
        else {
            fprintf(stderr, "epoll_hub: unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if ((!unix_path && !port) || n < 1 || repeats < 1 || min_steps < 1) {
        fprintf(stderr, "usage: epoll_hub (--unix PATH | --host HOST --port PORT) -n N "
                        "[--seconds S] [--repeats R] [--min-steps M] [--no-check]\n");
        return 2;
    }
    drivers = calloc((size_t)n, sizeof *drivers);
    epfd = epoll_create1(0);
    if (!drivers || epfd < 0) die("setup");
    int lfd = listen_on(unix_path, host, port);
    printf("@bench {\"listening\": true}\n");
    fflush(stdout);
    bind_drivers(lfd, unix_path == NULL);

    /* The block's constant part: identity cell and inverse, nat = 1, GETFORCE. */
    header(block, "POSDATA");
    double identity[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    memcpy(block + 12, identity, 72);
    memcpy(block + 84, identity, 72);
    int32_t one = 1;
    memcpy(block + 156, &one, 4);
    header(block + 184, "GETFORCE");

    long step = 0, warm = 0;
    double t0 = now();
    while (warm < min_steps || now() - t0 < 0.25 * seconds) {
        one_step(step++);
        warm++;
    }
    double rate = warm / (now() - t0);
    long steps = (long)ceil(seconds * rate);
    if (steps < min_steps) steps = min_steps;
    double *times = malloc((size_t)steps * sizeof *times);
    for (long r = 0; r < repeats; r++) {
        double c0 = cpu_seconds(), start = now(), last = start;
        for (long s = 0; s < steps; s++) {
            one_step(step++);
            double t = now();
            times[s] = t - last;
            last = t;
        }
        double cpu = cpu_seconds() - c0, wall = last - start;
        qsort(times, (size_t)steps, sizeof *times, cmp_double);
        long i99 = (long)ceil(0.99 * steps) - 1;
        printf("@bench {\"steps\": %ld, \"wall_s\": %.9f, \"mean_ms\": %.9f, \"p99_ms\": %.9f, "
               "\"cpu_s\": %.9f}\n", steps, wall, 1e3 * wall / steps, 1e3 * times[i99], cpu);
        fflush(stdout);
    }
    say_goodbye();
    printf("@bench {\"done\": true}\n");
    close(lfd);
    if (unix_path) unlink(unix_path);
    return 0;
}
