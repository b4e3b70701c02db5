/* The hub's steady step in C: fields out to many driver sockets, SOURCEREADY back.
 *
 * The compiled twin of maxwellhub/net/steadyio.py (same functions, same results; read
 * the Python module for the contract). It only moves bytes and checks the one reply
 * shape it may handle alone; everything else (a partial or odd read, end of file, a
 * socket it does not know, the event loop's own descriptor) goes back to Python at once,
 * so the protocol machine and the hub keep every decision.
 *
 *   configure(head, tail, reply_prefix, reply_size)
 *   send(fds, rows, fields) -> [(k, sent), ...]          writes that did not complete
 *   collect(epoll, loop_fd, outer_fd, table, raw, rows, sources, done, waiting,
 *           deadline, max_extras, extras, answered) -> (status, waiting, last, who, data)
 *
 * Buffers are read through the buffer protocol (numpy arrays, array.array, bytes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD 256
#define MAX_TAIL 64
#define MAX_PREFIX 64
#define READ_SIZE (1 << 16) /* as SteadyReader reads a single-molecule driver */
#define MAX_EVENTS 512

enum { ST_DONE = 0, ST_LOOP = 1, ST_TIMEOUT = 2, ST_DATA = 3, ST_GONE = 4, ST_FOREIGN = 5 };

static unsigned char head[MAX_HEAD], tail[MAX_TAIL], prefix[MAX_PREFIX];
static Py_ssize_t head_len = -1, tail_len, prefix_len, reply_size;
static unsigned char readbuf[READ_SIZE];
static const unsigned char zeros[72];

static PyObject *configure(PyObject *self, PyObject *args) {
    Py_buffer h, t, p;
    Py_ssize_t size;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &h, &t, &p, &size)) return NULL;
    int ok = h.len <= MAX_HEAD && t.len <= MAX_TAIL && p.len <= MAX_PREFIX && p.len >= 0 &&
             size >= p.len + 3 * 8 + 72 + 4;
    if (ok) {
        memcpy(head, h.buf, (size_t)h.len);
        memcpy(tail, t.buf, (size_t)t.len);
        memcpy(prefix, p.buf, (size_t)p.len);
        head_len = h.len;
        tail_len = t.len;
        prefix_len = p.len;
        reply_size = size;
    }
    PyBuffer_Release(&h);
    PyBuffer_Release(&t);
    PyBuffer_Release(&p);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "configure: frame constants out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Get a C-contiguous buffer of `count` items of `itemsize` bytes (writable if asked). */
static int get_array(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable,
                     const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (view->len % itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte items",
                     what, view->len, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *send_fields(PyObject *self, PyObject *args) {
    PyObject *fds_obj, *rows_obj, *fields_obj;
    Py_buffer fds, rows, fields;
    (void)self;
    if (head_len < 0) {
        PyErr_SetString(PyExc_RuntimeError, "send: configure() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOO", &fds_obj, &rows_obj, &fields_obj)) return NULL;
    if (get_array(fds_obj, &fds, 4, 0, "fds") < 0) return NULL;
    if (get_array(rows_obj, &rows, 8, 0, "rows") < 0) {
        PyBuffer_Release(&fds);
        return NULL;
    }
    if (get_array(fields_obj, &fields, 24, 0, "fields") < 0) {
        PyBuffer_Release(&fds);
        PyBuffer_Release(&rows);
        return NULL;
    }
    PyObject *short_writes = PyList_New(0);
    Py_ssize_t n = fds.len / 4, nrows = fields.len / 24;
    const int32_t *fd = (const int32_t *)fds.buf;
    const int64_t *row = (const int64_t *)rows.buf;
    unsigned char block[MAX_HEAD + 24 + MAX_TAIL];
    Py_ssize_t size = head_len + 24 + tail_len;
    memcpy(block, head, (size_t)head_len);
    memcpy(block + head_len + 24, tail, (size_t)tail_len);
    if (short_writes == NULL || rows.len / 8 != n) {
        if (short_writes != NULL) PyErr_SetString(PyExc_ValueError, "send: fds and rows differ in length");
        goto fail;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (row[k] < 0 || row[k] >= nrows) {
            PyErr_Format(PyExc_IndexError, "send: row %lld outside the %zd fields",
                         (long long)row[k], nrows);
            goto fail;
        }
        memcpy(block + head_len, (const char *)fields.buf + 24 * row[k], 24);
        ssize_t sent;
        do {
            sent = write(fd[k], block, (size_t)size);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) sent = 0; /* EAGAIN, or an error the transport will meet and report */
        if (sent < size) {
            PyObject *item = Py_BuildValue("(nn)", k, (Py_ssize_t)sent);
            if (item == NULL || PyList_Append(short_writes, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
    }
    PyBuffer_Release(&fds);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&fields);
    return short_writes;
fail:
    Py_XDECREF(short_writes);
    PyBuffer_Release(&fds);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&fields);
    return NULL;
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Milliseconds until `deadline` (monotonic seconds), rounded up; -1 for none. */
static int wait_ms(double deadline) {
    if (!isfinite(deadline)) return deadline > 0 ? -1 : 0;
    double left = deadline - monotonic();
    if (left <= 0) return 0;
    double ms = ceil(left * 1e3);
    return ms > 2147483.0 ? 2147483 : (int)ms;
}

static double spin_seconds = 0.0; /* poll without sleeping this long before a blocking wait */
static double recent_wait = 0.0;  /* how long the last wait for a reply took */

static PyObject *set_spin(PyObject *self, PyObject *arg) {
    (void)self;
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred()) return NULL;
    spin_seconds = us > 0 ? 1e-6 * us : 0.0;
    Py_RETURN_NONE;
}

/* Whether epfd (or outer_fd, when given) is readable now. */
static int ready_now(int epfd, int outer_fd) {
    struct pollfd p[2] = {{epfd, POLLIN, 0}, {outer_fd, POLLIN, 0}};
    return poll(p, outer_fd >= 0 ? 2 : 1, 0) != 0; /* an error too: the real wait reports it */
}

/* Busy-poll (yielding the core at each turn) until something is ready or the spin
 * budget is spent; only while replies have been coming within the budget. Returns
 * whether something is ready. A reply caught here saves the sleep and the wake-up,
 * which on a virtual machine are most of a small step's round trip. */
static int spin(int epfd, int outer_fd, double deadline) {
    if (spin_seconds <= 0 || recent_wait > spin_seconds) return 0;
    double start = monotonic(), until = start + spin_seconds;
    if (until > deadline) until = deadline;
    int ready;
    do {
        sched_yield(); /* a peer runnable on this core runs first */
        ready = ready_now(epfd, outer_fd);
    } while (!ready && monotonic() < until);
    recent_wait = monotonic() - start;
    return ready;
}

/* One wait: epoll_wait on epfd (and poll on outer_fd first when there is one). Sets
 * *outer_ready. Returns the event count, or -1 with a Python error set (a signal). */
static int wait_events(int epfd, int outer_fd, double deadline, struct epoll_event *events,
                       int *outer_ready) {
    for (;;) {
        int ms = wait_ms(deadline), nev;
        double start = monotonic();
        *outer_ready = 0;
        if (ms != 0 && spin(epfd, outer_fd, deadline)) ms = 0;
        if (outer_fd >= 0) {
            struct pollfd p[2] = {{epfd, POLLIN, 0}, {outer_fd, POLLIN, 0}};
            int r;
            if (ms == 0) { /* something is ready (or it is the deadline): our replies first */
                nev = epoll_wait(epfd, events, MAX_EVENTS, 0);
                if (nev > 0) return nev;
                if (nev < 0) {
                    if (errno == EINTR) {
                        if (PyErr_CheckSignals() < 0) return -1;
                        continue;
                    }
                    PyErr_SetFromErrno(PyExc_OSError);
                    return -1;
                }
            }
            if (ms != 0) {
                Py_BEGIN_ALLOW_THREADS r = poll(p, 2, ms);
                Py_END_ALLOW_THREADS
            } else {
                r = poll(p, 2, 0);
            }
            if (r < 0) {
                if (errno == EINTR) {
                    if (PyErr_CheckSignals() < 0) return -1;
                    continue;
                }
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            if (r == 0) return 0; /* the deadline */
            if (ms != 0) recent_wait = monotonic() - start;
            /* The loop's selector, looked into only when our set has nothing: it holds our
             * set, so it is ready whenever we are, and the replies come first (the loop's
             * work waits at most until the ready ones are read). */
            if (p[1].revents && !p[0].revents) {
                struct epoll_event o[64];
                int no = epoll_wait(outer_fd, o, 64, 0); /* level-triggered: consumes nothing */
                for (int i = 0; i < no; i++)
                    if (o[i].data.fd != epfd) *outer_ready = 1;
                if (no < 0) *outer_ready = 1; /* not an epoll: let the loop look */
            }
            if (!p[0].revents) {
                if (*outer_ready) return 0;
                continue; /* only our set was ready, and it is not now: wait again */
            }
            ms = 0;
        }
        if (ms != 0) {
            Py_BEGIN_ALLOW_THREADS nev = epoll_wait(epfd, events, MAX_EVENTS, ms);
            Py_END_ALLOW_THREADS
            if (nev > 0) recent_wait = monotonic() - start;
        } else {
            nev = epoll_wait(epfd, events, MAX_EVENTS, 0);
        }
        if (nev >= 0) return nev;
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) return -1;
    }
}

static int finite3(const double *s) { return isfinite(s[0]) && isfinite(s[1]) && isfinite(s[2]); }

typedef struct {
    Py_buffer table, raw, rows, sources, done;
} views_t;

static void release_views(views_t *v) {
    PyBuffer_Release(&v->table);
    PyBuffer_Release(&v->raw);
    PyBuffer_Release(&v->rows);
    PyBuffer_Release(&v->sources);
    PyBuffer_Release(&v->done);
}

static int get_views(views_t *v, PyObject *table, PyObject *raw, PyObject *rows,
                     PyObject *sources, PyObject *done) {
    memset(v, 0, sizeof *v);
    if (get_array(table, &v->table, 4, 0, "table") < 0) return -1;
    if (get_array(raw, &v->raw, 1, 0, "raw") < 0) goto fail1;
    if (get_array(rows, &v->rows, 8, 0, "rows") < 0) goto fail2;
    if (get_array(sources, &v->sources, 24, 1, "sources") < 0) goto fail3;
    if (get_array(done, &v->done, 1, 1, "done") < 0) goto fail4;
    if (v->raw.len != v->rows.len / 8 || v->sources.len / 24 != v->done.len) {
        PyErr_SetString(PyExc_ValueError, "collect: raw/rows or sources/done differ in length");
        release_views(v);
        return -1;
    }
    const int64_t *row = (const int64_t *)v->rows.buf;
    for (Py_ssize_t k = 0; k < v->rows.len / 8; k++) {
        if (row[k] < 0 || row[k] >= v->done.len) {
            PyErr_Format(PyExc_IndexError, "collect: row %lld outside the %zd rows",
                         (long long)row[k], v->done.len);
            release_views(v);
            return -1;
        }
    }
    return 0;
fail4:
    PyBuffer_Release(&v->sources);
fail3:
    PyBuffer_Release(&v->rows);
fail2:
    PyBuffer_Release(&v->raw);
fail1:
    PyBuffer_Release(&v->table);
    return -1;
}

/* Whether buf[0:n] is exactly one SOURCEREADY this path may take alone; sets *m. */
static int clean_reply(const unsigned char *buf, Py_ssize_t n, Py_ssize_t max_extras,
                       int32_t *m) {
    if (n < reply_size || memcmp(buf, prefix, (size_t)prefix_len) != 0) return 0;
    if (memcmp(buf + prefix_len + 24, zeros, 72) != 0) return 0;
    memcpy(m, buf + prefix_len + 24 + 72, 4);
    return *m >= 0 && *m == n - reply_size && *m <= max_extras;
}

static PyObject *collect(PyObject *self, PyObject *args) {
    int epfd, loop_fd, outer_fd;
    PyObject *epoll_o, *table_o, *raw_o, *rows_o, *sources_o, *done_o, *extras, *answered;
    Py_ssize_t waiting, max_extras;
    double deadline;
    (void)self;
    if (prefix_len <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "collect: configure() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OiiOOOOOndnO!O!", &epoll_o, &loop_fd, &outer_fd, &table_o, &raw_o,
                          &rows_o, &sources_o, &done_o, &waiting, &deadline, &max_extras,
                          &PyDict_Type, &extras, &PyList_Type, &answered))
        return NULL;
    epfd = PyObject_AsFileDescriptor(epoll_o); /* a select.epoll (or its fd) */
    if (epfd < 0) return NULL;
    views_t v;
    if (get_views(&v, table_o, raw_o, rows_o, sources_o, done_o) < 0) return NULL;
    const int32_t *table = (const int32_t *)v.table.buf;
    Py_ssize_t table_len = v.table.len / 4;
    const uint8_t *raw = (const uint8_t *)v.raw.buf;
    const int64_t *rows = (const int64_t *)v.rows.buf;
    double *sources = (double *)v.sources.buf;
    uint8_t *done = (uint8_t *)v.done.buf;
    struct epoll_event events[MAX_EVENTS];
    Py_ssize_t last = -1, who = -1;
    int status = -1;
    PyObject *data = NULL;

    while (status < 0 && waiting > 0) {
        int outer_ready = 0, loop_ready = 0;
        int nev = wait_events(epfd, outer_fd, deadline, events, &outer_ready);
        if (nev < 0) goto fail;
        if (nev == 0 && !outer_ready) {
            status = ST_TIMEOUT;
            break;
        }
        for (int e = 0; e < nev && status < 0; e++) {
            int fd = events[e].data.fd;
            if (fd == loop_fd) {
                loop_ready = 1;
                continue;
            }
            Py_ssize_t k = (fd >= 0 && fd < table_len) ? table[fd] : -1;
            if (k < 0) {
                status = ST_FOREIGN;
                who = fd;
                break;
            }
            ssize_t n;
            do {
                n = read(fd, readbuf, READ_SIZE);
            } while (n < 0 && errno == EINTR);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            if (n <= 0) { /* end of file or an error: the event loop closes it */
                status = ST_GONE;
                who = k;
                break;
            }
            int64_t row = rows[k];
            int32_t m = 0;
            double s[3];
            if (!raw[k] && !done[row] && clean_reply(readbuf, n, max_extras, &m)) {
                memcpy(s, readbuf + prefix_len, 24);
                if (finite3(s)) {
                    memcpy(sources + 3 * row, s, 24);
                    done[row] = 1;
                    waiting--;
                    last = k;
                    PyObject *key = PyLong_FromSsize_t(k);
                    if (key == NULL || PyList_Append(answered, key) < 0) {
                        Py_XDECREF(key);
                        goto fail;
                    }
                    Py_DECREF(key);
                    if (m > 0) {
                        PyObject *r = PyLong_FromLongLong(row);
                        PyObject *b = PyBytes_FromStringAndSize((const char *)readbuf + reply_size, m);
                        int bad = r == NULL || b == NULL || PyDict_SetItem(extras, r, b) < 0;
                        Py_XDECREF(r);
                        Py_XDECREF(b);
                        if (bad) goto fail;
                    }
                    continue;
                }
            }
            status = ST_DATA; /* for the protocol machine: partial, merged, odd or raw */
            who = k;
            data = PyBytes_FromStringAndSize((const char *)readbuf, n);
            if (data == NULL) goto fail;
        }
        if (status < 0 && waiting > 0 && (loop_ready || outer_ready)) status = ST_LOOP;
    }
    if (status < 0) status = ST_DONE;
    release_views(&v);
    if (data == NULL) {
        data = Py_None;
        Py_INCREF(data);
    }
    return Py_BuildValue("(innnN)", status, waiting, last, who, data);
fail:
    Py_XDECREF(data);
    release_views(&v);
    return NULL;
}

/* request_fields(requests, ids, fields) -> bool: MaxwellLink's request dict
 * {int id: {"efield_au": 3 float64, ...}} into ids (int64, n) and fields (float64, n x 3),
 * when every key is an int and every field a contiguous buffer of 3 doubles with finite
 * values; False for anything else (nothing is raised: the Python path then reads the dict
 * and names what is wrong). */
static PyObject *request_fields(PyObject *self, PyObject *args) {
    PyObject *requests, *ids_o, *fields_o;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &requests, &ids_o, &fields_o)) return NULL;
    Py_buffer ids, fields;
    if (get_array(ids_o, &ids, 8, 1, "ids") < 0) return NULL;
    if (get_array(fields_o, &fields, 24, 1, "fields") < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    static PyObject *key_name = NULL;
    if (key_name == NULL && (key_name = PyUnicode_InternFromString("efield_au")) == NULL) {
        PyBuffer_Release(&ids);
        PyBuffer_Release(&fields);
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(requests), pos = 0, i = 0;
    int ok = ids.len / 8 == n && fields.len / 24 == n;
    PyObject *key, *value;
    int64_t *id = (int64_t *)ids.buf;
    double *f = (double *)fields.buf;
    while (ok && PyDict_Next(requests, &pos, &key, &value)) {
        if (!PyLong_CheckExact(key) || !PyDict_CheckExact(value)) {
            ok = 0;
            break;
        }
        int overflow = 0;
        long long k = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (overflow || (k == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        PyObject *field = PyDict_GetItemWithError(value, key_name); /* borrowed */
        if (field == NULL) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        Py_buffer b;
        if (PyObject_GetBuffer(field, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        const char *fmt = b.format ? b.format : "B";
        if (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@') fmt++;
        ok = b.len == 24 && b.itemsize == 8 && b.ndim == 1 && strcmp(fmt, "d") == 0;
        if (ok) {
            memcpy(f + 3 * i, b.buf, 24);
            ok = finite3(f + 3 * i);
            id[i] = k;
        }
        PyBuffer_Release(&b);
        i++;
    }
    ok = ok && i == n;
    PyBuffer_Release(&ids);
    PyBuffer_Release(&fields);
    return PyBool_FromLong(ok);
}

/* result_dict(ids, sources, extras) -> {id: {"amp": sources[r], "extra": extras.get(r, b"")}}
 * (MaxwellLink's result shape; sources[r] is the array's own row view). */
static PyObject *result_dict(PyObject *self, PyObject *args) {
    PyObject *ids_o, *sources, *extras;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO!", &ids_o, &sources, &PyDict_Type, &extras)) return NULL;
    static PyObject *amp_name = NULL, *extra_name = NULL, *empty = NULL;
    if (amp_name == NULL) {
        amp_name = PyUnicode_InternFromString("amp");
        extra_name = PyUnicode_InternFromString("extra");
        empty = PyBytes_FromStringAndSize("", 0);
        if (amp_name == NULL || extra_name == NULL || empty == NULL) return NULL;
    }
    Py_buffer ids;
    if (get_array(ids_o, &ids, 8, 0, "ids") < 0) return NULL;
    Py_ssize_t n = ids.len / 8;
    const int64_t *id = (const int64_t *)ids.buf;
    PyObject *out = PyDict_New();
    if (out == NULL) goto fail;
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PyLong_FromSsize_t(r);
        PyObject *extra = row ? PyDict_GetItemWithError(extras, row) : NULL; /* borrowed */
        Py_XDECREF(row);
        if (extra == NULL) {
            if (PyErr_Occurred()) goto fail;
            extra = empty;
        }
        PyObject *amp = PySequence_GetItem(sources, r);
        PyObject *entry = PyDict_New();
        PyObject *key = PyLong_FromLongLong(id[r]);
        int bad = amp == NULL || entry == NULL || key == NULL ||
                  PyDict_SetItem(entry, amp_name, amp) < 0 ||
                  PyDict_SetItem(entry, extra_name, extra) < 0 ||
                  PyDict_SetItem(out, key, entry) < 0;
        Py_XDECREF(amp);
        Py_XDECREF(entry);
        Py_XDECREF(key);
        if (bad) goto fail;
    }
    PyBuffer_Release(&ids);
    return out;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&ids);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Set the frame constants (from maxwellhub.wire)."},
    {"send", send_fields, METH_VARARGS, "Write each row's field block to its socket."},
    {"request_fields", request_fields, METH_VARARGS, "A request dict into ids and fields."},
    {"result_dict", result_dict, METH_VARARGS, "MaxwellLink's result dict from the arrays."},
    {"set_spin", set_spin, METH_O, "Busy-poll this many microseconds before blocking."},
    {"collect", collect, METH_VARARGS, "Read SOURCEREADY replies until done or Python is needed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "maxwellhub.net._steadyc",
    "The hub's steady step in C (see maxwellhub.net.steadyio).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__steadyc(void) { return PyModule_Create(&module); }
