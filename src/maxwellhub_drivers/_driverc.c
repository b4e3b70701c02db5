/*
 * maxwellhub_drivers._driverc: the single-molecule driver's steady step loop in C.
 *
 * maxwellhub_drivers.fastloop hands this module the driver's connected socket and the
 * state of its model once the session is READY (bound, nothing staged, nothing buffered);
 * tls_loop() (a two-level system) or sho_loop() (a harmonic oscillator) then answers
 * steady steps until anything else arrives:
 *
 *   read one block; it must be exactly one fused FIELDDATA (identity cells, nat 1) +
 *   GETSOURCE block of 196 bytes with a finite field; step the molecule as
 *   maxwellhub.models.tls / .sho do for one molecule (the same operations in the same
 *   order; for the TLS the same numpy cos and sin, see direct_trig); write SOURCEREADY
 *   (124 bytes) and the extras JSON that maxwellhub.protocol.session.ExtrasJSON writes
 *   (keys sorted, floats as repr(), see repr_fast); repeat.
 *
 * It returns the bytes it read but did not handle (a partial or merged read, any other
 * message, a step whose source or extras are not finite), or b"" at EOF; the session
 * machine in Python takes it from there. The state buffer (the model's three numbers,
 * the time, steps committed, steps sent) is updated after every step, so it is current even when the
 * loop ends by an exception (a signal handler raising, a failed send).
 *
 * The GIL is released while blocked in recv() and poll(); EINTR runs the Python signal
 * handlers (PyErr_CheckSignals) and goes on unless one raised. Every wait has no deadline
 * on purpose, as the Python driver's: the hub may compute its step for as long as it
 * needs, and its death ends the wait by the connection (EOF, reset, keepalive).
 *
 * Floating point: the arithmetic must not be contracted into fused multiply-adds, or the
 * numbers would differ from Python's in the last bit. ISO C mode (-std=c11, as setup.py
 * builds it) already means -ffp-contract=off for GCC; the pragmas make sure elsewhere.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <float.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: Python ignores SIGPIPE, so a send to a closed peer is EPIPE */
#endif

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__) && !defined(__STRICT_ANSI__)
#pragma GCC optimize("fp-contract=off")
#endif

#define HEAD_SIZE 160    /* POSDATA header, two identity cells, nat = 1 */
#define FIELD_AT 160     /* three f64 of the field */
#define TAIL_AT 184      /* GETFORCE header */
#define STEP_SIZE 196    /* the fused block */
#define REPLY_FIXED 124  /* SOURCEREADY up to and with its extras length */
#define SOURCE_AT 24     /* header 12, energy 8, nat 4 */
#define EXTRAS_LEN_AT 120
#define READ_SIZE 4096   /* a steady read is 196 bytes; anything longer is handed back */
#define REPLY_ROOM 1024  /* 124 + nine keys and nine reprs of at most 24 characters */

static double
load_f64(const unsigned char *p)
{
    uint64_t u = 0;
    for (int i = 7; i >= 0; i--) {
        u = (u << 8) | p[i];
    }
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static void
store_f64(unsigned char *p, double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(u >> (8 * i));
    }
}

static void
store_i32(unsigned char *p, int32_t v)
{
    uint32_t u = (uint32_t)v;
    for (int i = 0; i < 4; i++) {
        p[i] = (unsigned char)(u >> (8 * i));
    }
}

/* Wait until fd is readable or writable (POLLIN / POLLOUT) with the GIL released:
   0, or -1 with a Python exception set. */
static int
wait_fd(int fd, short events)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = events, .revents = 0};
        int rc, err;
        Py_BEGIN_ALLOW_THREADS
        rc = poll(&pfd, 1, -1); /* no deadline: see the file's comment */
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc >= 0) {
            return 0;
        }
        if (err != EINTR) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

/* One read of up to cap bytes: the count (0 at EOF), or -1 with an exception set. A
   signal that came while the loop computed is handled first (it found no recv() to
   interrupt). */
static Py_ssize_t
read_some(int fd, unsigned char *buf, size_t cap)
{
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    for (;;) {
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = recv(fd, buf, cap, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0) {
            return (Py_ssize_t)n;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
        }
        else if (err == EAGAIN || err == EWOULDBLOCK) {
            if (wait_fd(fd, POLLIN) < 0) {
                return -1;
            }
        }
        else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
}

/* Send all of buf: first without blocking and with the GIL held (the reply fits the
   socket buffer almost always), else wait for room with the GIL released. */
static int
send_all(int fd, const unsigned char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t k = send(fd, buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k >= 0) {
            done += (size_t)k;
            continue;
        }
        int err = errno;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
        }
        else if (err == EAGAIN || err == EWOULDBLOCK) {
            if (wait_fd(fd, POLLOUT) < 0) {
                return -1;
            }
        }
        else {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

/*
 * repr() of a float, fast. Python prints a float as the shortest decimal that reads back
 * as the same double (the nearest such one), in fixed notation when the decimal point
 * falls in -4 < decpt <= 16 (with ".0" when no fraction is left), else as d.ddde+XX.
 * PyOS_double_to_string does it exactly with big integers (about 0.5 us a value). Here:
 *
 * S = v 10^p in [10^16, 10^17) in long double (64-bit significand: |error| <= 2^-63 S,
 * under 0.011), and H = half the gap between v and its neighbours (ulp(v) / 2, times
 * 10^p, exact but for 10^p's rounding). A multiple of 10^j within H of S reads back as v;
 * the largest j with one is the shortest decimal, the nearest multiple is Python's. Every
 * comparison must win by REPR_MARGIN (> twice the error of S), or the fast path declines
 * and PyOS_double_to_string decides: a tie, a distance equal to H up to the error (where
 * reading back depends on round-half-even), a power of two (its lower gap is half the
 * upper), a value outside 1e-28 .. 1e17, or a long double without 64 bits of precision
 * at run time (say x87 set to double precision). So what it prints is exact; the tests
 * compare it with repr() on 200,000 values of every kind.
 */
#define REPR_MAX_P 44
#define REPR_MARGIN (1.0L / 32.0L)
static long double pow10_ld[REPR_MAX_P + 1];
static uint64_t pow10_u64[18];
static int repr_fast_ok;

static void
repr_init(void)
{
    char text[16];
    pow10_u64[0] = 1;
    for (int i = 1; i < 18; i++) {
        pow10_u64[i] = pow10_u64[i - 1] * 10u;
    }
    for (int p = 0; p <= REPR_MAX_P; p++) {
        snprintf(text, sizeof text, "1e%d", p);
        pow10_ld[p] = strtold(text, NULL); /* correctly rounded */
    }
    volatile long double one = 1.0L, tiny = ldexpl(1.0L, -63);
    volatile long double sum = one + tiny;
    repr_fast_ok = LDBL_MANT_DIG >= 64 && sum != one;
}

/* repr(v) of a finite v into out (room for 32 bytes): its length, or 0 when the fast
   path declines (see above). */
static int
repr_fast(double v, char *out)
{
    char *o = out;
    if (v == 0.0) {
        const char *zero = signbit(v) ? "-0.0" : "0.0";
        size_t k = strlen(zero);
        memcpy(out, zero, k);
        return (int)k;
    }
    if (!repr_fast_ok) {
        return 0;
    }
    if (v < 0) {
        *o++ = '-';
        v = -v;
    }
    int ex;
    double f = frexp(v, &ex); /* v = f 2^ex, f in [0.5, 1): ulp(v) = 2^(ex - 53) */
    if (f == 0.5) {
        return 0;
    }
    /* at most one below floor(log10(v)): S >= 10^16, and at most one step down */
    int p = 16 - (int)floor((ex - 1) * 0.30102999566398120);
    if (p < 0 || p > REPR_MAX_P) {
        return 0;
    }
    long double S = (long double)v * pow10_ld[p];
    if (S >= 1e17L) {
        if (--p < 0) {
            return 0;
        }
        S = (long double)v * pow10_ld[p];
    }
    if (S < 1e16L || S >= 1e17L) {
        return 0;
    }
    const long double H = ldexpl(pow10_ld[p], ex - 54);
    const uint64_t N = (uint64_t)S;
    const long double frac = S - (long double)N; /* exact, as are the distances below */
    uint64_t best = 0;
    int found = -1;
    for (int j = 0; j < 18; j++) {
        const uint64_t P = pow10_u64[j];
        const uint64_t q = N / P;
        const long double down = (long double)(N % P) + frac; /* S - q P */
        const long double up = (long double)P - down;        /* (q + 1) P - S */
        long double d = down < up ? down : up;
        uint64_t c;
        if (d - REPR_MARGIN > H) {
            break; /* the nearest multiple is out, and so is every one of a longer step */
        }
        if (down + REPR_MARGIN < up) {
            d = down;
            c = q;
        }
        else if (up + REPR_MARGIN < down) {
            d = up;
            c = q + 1;
        }
        else {
            return 0; /* a tie, or too close to call */
        }
        if (!(d + REPR_MARGIN < H)) {
            return 0; /* on the edge: reading back depends on round-half-even */
        }
        best = c;
        found = j;
    }
    if (found < 0 || best == 0) {
        return 0;
    }
    int j = found;
    while (best % 10u == 0) {
        best /= 10u;
        j++;
    }
    char digits[24] = {'0'};
    int k = 0;
    for (uint64_t c = best; c; c /= 10u) {
        digits[k++] = (char)('0' + (int)(c % 10u));
    }
    for (int i = 0; i < k / 2; i++) {
        char t = digits[i];
        digits[i] = digits[k - 1 - i];
        digits[k - 1 - i] = t;
    }
    const int decpt = k + j - p; /* v = 0.DIGITS 10^decpt */
    if (decpt <= -4 || decpt > 16) {
        *o++ = digits[0];
        if (k > 1) {
            *o++ = '.';
            memcpy(o, digits + 1, (size_t)(k - 1));
            o += k - 1;
        }
        int e = decpt - 1;
        *o++ = 'e';
        *o++ = e < 0 ? '-' : '+';
        e = e < 0 ? -e : e;
        if (e >= 100) {
            *o++ = (char)('0' + e / 100);
        }
        *o++ = (char)('0' + e / 10 % 10);
        *o++ = (char)('0' + e % 10);
    }
    else if (decpt <= 0) {
        *o++ = '0';
        *o++ = '.';
        for (int i = decpt; i < 0; i++) {
            *o++ = '0';
        }
        memcpy(o, digits, (size_t)k);
        o += k;
    }
    else if (decpt < k) {
        memcpy(o, digits, (size_t)decpt);
        o += decpt;
        *o++ = '.';
        memcpy(o, digits + decpt, (size_t)(k - decpt));
        o += k - decpt;
    }
    else {
        memcpy(o, digits, (size_t)k);
        o += k;
        for (int i = k; i < decpt; i++) {
            *o++ = '0';
        }
        *o++ = '.';
        *o++ = '0';
    }
    return (int)(o - out);
}

/* Append repr(v) (what float.__repr__ and json.dumps print for a finite float). */
static int
put_repr(unsigned char **at, const unsigned char *end, double v)
{
    char fast[32];
    int n = repr_fast(v, fast);
    if (n > 0) {
        if (n > end - *at) {
            PyErr_SetString(PyExc_RuntimeError, "_driverc: extras JSON longer than its buffer");
            return -1;
        }
        memcpy(*at, fast, (size_t)n);
        *at += n;
        return 0;
    }
    char *text = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    size_t k = strlen(text);
    if (k > (size_t)(end - *at)) {
        PyMem_Free(text);
        PyErr_SetString(PyExc_RuntimeError, "_driverc: extras JSON longer than its buffer");
        return -1;
    }
    memcpy(*at, text, k);
    *at += k;
    PyMem_Free(text);
    return 0;
}

static int
put_text(unsigned char **at, const unsigned char *end, const char *text)
{
    size_t k = strlen(text);
    if (k > (size_t)(end - *at)) {
        PyErr_SetString(PyExc_RuntimeError, "_driverc: extras JSON longer than its buffer");
        return -1;
    }
    memcpy(*at, text, k);
    *at += k;
    return 0;
}

/* numpy's cos or sin of the angle: ufunc(angle_array, out_array), both 0-d float64 arrays
   whose memory the caller holds: the call, loop and value of the Python model's
   np.cos(angle) on a float (which numpy makes a 0-d array). */
static int
call_trig(PyObject *ufunc, PyObject *const *args)
{
    PyObject *res = PyObject_Vectorcall(ufunc, args, 2, NULL);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/*
 * The same loop without the ufunc call (about 0.6 us each): numpy >= 1.24 hands out the
 * strided loop a call would run, ufunc._resolve_dtypes_and_context and
 * ufunc._get_strided_loop (documented there as unstable), in a capsule of this layout.
 * fastloop.py asks for the loop of np.cos(float): a 0-d input and a fresh 0-d output, so
 * strides (0, 8) and one element, as numpy's trivial-loop path calls it, and uses it only
 * after checking it against np.cos on thousands of angles; otherwise call_trig.
 */
#define CALL_INFO_NAME "numpy_1.24_ufunc_call_info"
typedef int (*strided_loop_fn)(void *context, char *const *data, const Py_ssize_t *dimensions,
                               const Py_ssize_t *strides, void *auxdata);
typedef struct {
    strided_loop_fn strided_loop;
    void *context;
    void *auxdata;
    unsigned char requires_pyapi;
    unsigned char no_floatingpoint_errors;
} ufunc_call_info;

static const Py_ssize_t trig_strides[2] = {0, sizeof(double)};
static const Py_ssize_t trig_count = 1;

/* The call info in a capsule (None: NULL without an error), or NULL with an error. */
static ufunc_call_info *
call_info(PyObject *capsule, int *failed)
{
    *failed = 0;
    if (capsule == Py_None) {
        return NULL;
    }
    ufunc_call_info *info = PyCapsule_GetPointer(capsule, CALL_INFO_NAME);
    if (info == NULL || info->strided_loop == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "_driverc: the ufunc call info has no loop");
        }
        *failed = 1;
        return NULL;
    }
    return info;
}

static int
direct_trig(const ufunc_call_info *info, double angle, double *out)
{
    char *data[2] = {(char *)&angle, (char *)out};
    if (info->strided_loop(info->context, data, &trig_count, trig_strides, info->auxdata) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "_driverc: numpy's cos or sin loop failed");
        }
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(trig_loop_doc,
"trig_loop(call_info, angle) -> float\n"
"\n"
"numpy's strided loop in call_info (ufunc._get_strided_loop's capsule) on angle, as\n"
"the compiled loop calls it (fastloop.py compares it with the ufunc before use).");

static PyObject *
trig_loop(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *capsule;
    double angle, out = 0.0;
    int failed;
    if (!PyArg_ParseTuple(args, "Od:trig_loop", &capsule, &angle)) {
        return NULL;
    }
    ufunc_call_info *info = call_info(capsule, &failed);
    if (info == NULL) {
        if (!failed) {
            PyErr_SetString(PyExc_ValueError, "_driverc.trig_loop: call_info is None");
        }
        return NULL;
    }
    if (direct_trig(info, angle, &out) < 0) {
        return NULL;
    }
    return PyFloat_FromDouble(out);
}

typedef struct {
    Py_buffer view;
    int held;
} Held;

static int
hold(Held *h, PyObject *obj, Py_ssize_t doubles, const char *what)
{
    if (PyObject_GetBuffer(obj, &h->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    h->held = 1;
    if (h->view.len != doubles * (Py_ssize_t)sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "_driverc: %s must hold %zd float64 values", what,
                     doubles);
        return -1;
    }
    return 0;
}

static void
release(Held *h)
{
    if (h->held) {
        PyBuffer_Release(&h->view);
        h->held = 0;
    }
}

/* One model's step for one molecule. The state buffer: the model's NSTATE doubles, the
   time last, then the steps committed and the steps sent. */
#define NSTATE 4
#define MAX_VALUES 10
enum { ST_TIME = NSTATE - 1, ST_COMMITTED = NSTATE, ST_SENT, ST_SIZE };

typedef struct Stepper Stepper;
struct Stepper {
    int axis;
    int nconst;
    double k[8];
    double *s;
    int nvalues;
    const char *const *keys; /* each value's JSON prefix, keys sorted */
    /* the next state, the source on the axis and the extras values: 0; 1 to hand the step
       back to Python; -1 with an exception */
    int (*step)(Stepper *m, const double field[3], double next[NSTATE], double *source,
                double *values);
    /* the TLS's numpy cos and sin: their loops (direct_trig), else ufunc calls (call_trig) */
    const ufunc_call_info *cos_info, *sin_info;
    PyObject *cos_fn, *sin_fn, *cos_args[2], *sin_args[2];
    double *angle_at, *cos_at, *sin_at;
};

/* maxwellhub.models.tls: constants (axis, angle_per_field, turn_cos, turn_sin,
   source_per_y, omega, mu12, dt), state (x, y, z, time) */
enum { T_AXIS, T_ANGLE_PER_FIELD, T_TURN_COS, T_TURN_SIN, T_SOURCE_PER_Y, T_OMEGA, T_MU12, T_DT };
static const char *const tls_keys[9] = {
    "{\"Pe\":",     ",\"Pg\":",     ",\"Pge_imag\":", ",\"Pge_real\":", ",\"energy_au\":",
    ",\"mux_au\":", ",\"muy_au\":", ",\"muz_au\":",   ",\"time_au\":",
};

static int
tls_step(Stepper *m, const double field[3], double next[NSTATE], double *source,
         double *values)
{
    const double *k = m->k;
    const double tc = k[T_TURN_COS], ts = k[T_TURN_SIN];
    const double x = m->s[0], y = m->s[1], z = m->s[2];
    /* tls._bloch_step, operation for operation */
    const double angle = k[T_ANGLE_PER_FIELD] * field[m->axis];
    if (!isfinite(angle)) {
        return 1; /* numpy warns, the source is not finite: the Python path says so */
    }
    double c, sn;
    if (m->cos_info != NULL) {
        if (direct_trig(m->cos_info, angle, &c) < 0 || direct_trig(m->sin_info, angle, &sn) < 0) {
            return -1;
        }
    }
    else {
        *m->angle_at = angle;
        if (call_trig(m->cos_fn, m->cos_args) < 0 || call_trig(m->sin_fn, m->sin_args) < 0) {
            return -1;
        }
        c = *m->cos_at;
        sn = *m->sin_at;
    }
    const double x1 = x * tc - y * ts;
    const double y1 = x * ts + y * tc;
    const double z2 = c * z + sn * y1;
    const double y2 = c * y1 - sn * z;
    const double x3 = x1 * tc - y2 * ts;
    const double y3 = x1 * ts + y2 * tc;
    *source = k[T_SOURCE_PER_Y] * y3;
    const double time = m->s[ST_TIME] + k[T_DT];
    /* tls._reported and TLSModel._extras_one */
    const double pe = 0.5 * (1.0 - z2);
    const double dipole = k[T_MU12] * x3;
    values[0] = pe;
    values[1] = 0.5 * (1.0 + z2);
    values[2] = 0.5 * y3;
    values[3] = 0.5 * x3;
    values[4] = k[T_OMEGA] * pe;
    values[5] = m->axis == 0 ? dipole : 0.0;
    values[6] = m->axis == 1 ? dipole : 0.0;
    values[7] = m->axis == 2 ? dipole : 0.0;
    values[8] = time;
    next[0] = x3;
    next[1] = y3;
    next[2] = z2;
    next[3] = time;
    return 0;
}

/* maxwellhub.models.sho: constants (axis, omega2, mu0, dt), state (p, q, a, time) */
enum { S_AXIS, S_OMEGA2, S_MU0, S_DT };
static const char *const sho_keys[10] = {
    "{\"energy_au\":", ",\"mux_au\":", ",\"mux_m_au\":", ",\"muy_au\":", ",\"muy_m_au\":",
    ",\"muz_au\":",    ",\"muz_m_au\":", ",\"p_au\":",   ",\"q_au\":",   ",\"time_au\":",
};

static int
sho_step(Stepper *m, const double field[3], double next[NSTATE], double *source,
         double *values)
{
    const double omega2 = m->k[S_OMEGA2], mu0 = m->k[S_MU0], dt = m->k[S_DT];
    double p = m->s[0], q = m->s[1], a = m->s[2];
    /* sho._verlet_step and sho._half_step_ahead, operation for operation */
    p = p + 0.5 * a * dt;
    q = q + p * dt;
    a = -omega2 * q + field[m->axis] * mu0;
    p = p + 0.5 * a * dt;
    const double p_half = p + 0.5 * a * dt;
    *source = p_half * mu0;
    const double time = m->s[ST_TIME] + dt;
    /* SHOModel._extras_one */
    const double q_half = q + 0.5 * p_half * dt;
    const double dipole = mu0 * q_half, dipole_m = mu0 * q;
    values[0] = 0.5 * omega2 * (q_half * q_half) + 0.5 * (p_half * p_half);
    for (int axis = 0; axis < 3; axis++) {
        values[1 + 2 * axis] = m->axis == axis ? dipole : 0.0;
        values[2 + 2 * axis] = m->axis == axis ? dipole_m : 0.0;
    }
    values[7] = p;
    values[8] = q;
    values[9] = time;
    next[0] = p;
    next[1] = q;
    next[2] = a;
    next[3] = time;
    return 0;
}

/* The loop itself (see the file's comment); the model's state buffer is m->s. */
static PyObject *
run_loop(int fd, const Py_buffer *head, const Py_buffer *tail, const Py_buffer *answer,
         Stepper *m)
{
    unsigned char *buf = PyMem_Malloc(READ_SIZE + REPLY_ROOM);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    double *s = m->s;
    unsigned char *in = buf, *reply = buf + READ_SIZE;
    const unsigned char *end = reply + REPLY_ROOM;
    memcpy(reply, answer->buf, 12);
    store_f64(reply + 12, 0.0); /* energy */
    store_i32(reply + 20, 1);   /* nat */
    memset(reply + SOURCE_AT, 0, REPLY_FIXED - SOURCE_AT);

    for (;;) {
        Py_ssize_t n = read_some(fd, in, READ_SIZE);
        if (n < 0) {
            break;
        }
        if (n != STEP_SIZE || memcmp(in, head->buf, HEAD_SIZE) != 0 ||
            memcmp(in + TAIL_AT, tail->buf, STEP_SIZE - TAIL_AT) != 0) {
            result = PyBytes_FromStringAndSize((const char *)in, n);
            break;
        }
        const double field[3] = {load_f64(in + FIELD_AT), load_f64(in + FIELD_AT + 8),
                                 load_f64(in + FIELD_AT + 16)};
        if (!(isfinite(field[0]) && isfinite(field[1]) && isfinite(field[2]))) {
            result = PyBytes_FromStringAndSize((const char *)in, n); /* Python names it */
            break;
        }
        double next[NSTATE], source, values[MAX_VALUES];
        const int stepped = m->step(m, field, next, &source, values);
        if (stepped < 0) {
            break;
        }
        int finite = stepped == 0 && isfinite(source);
        for (int i = 0; i < m->nvalues; i++) {
            finite = finite && isfinite(values[i]);
        }
        if (!finite) {
            /* Python raises (a source) or writes json's NaN (extras): let it */
            result = PyBytes_FromStringAndSize((const char *)in, n);
            break;
        }
        unsigned char *at = reply + REPLY_FIXED;
        int failed = 0;
        for (int i = 0; i < m->nvalues && !failed; i++) {
            failed = put_text(&at, end, m->keys[i]) < 0 || put_repr(&at, end, values[i]) < 0;
        }
        if (failed || put_text(&at, end, "}") < 0) {
            break;
        }
        for (int axis = 0; axis < 3; axis++) {
            store_f64(reply + SOURCE_AT + 8 * axis, axis == m->axis ? source : 0.0);
        }
        store_i32(reply + EXTRAS_LEN_AT, (int32_t)(at - reply - REPLY_FIXED));
        /* committed, as the model's commit() before the answer is sent */
        memcpy(s, next, sizeof next);
        s[ST_COMMITTED] += 1.0;
        if (send_all(fd, reply, (size_t)(at - reply)) < 0) {
            break;
        }
        s[ST_SENT] += 1.0;
    }
    PyMem_Free(buf);
    return result;
}

/* The arguments both loops share: fd, head, tail, answer, constants, state. */
typedef struct {
    int fd;
    Py_buffer head, tail, answer;
    Held state;
} Common;

static int
common_args(Common *c, Stepper *m, PyObject *consts, PyObject *state_obj, const char *name)
{
    if (c->head.len != HEAD_SIZE || c->tail.len != STEP_SIZE - TAIL_AT || c->answer.len != 12) {
        PyErr_Format(PyExc_ValueError, "_driverc.%s: head must be 160 bytes, tail and answer 12",
                     name);
        return -1;
    }
    if (PyTuple_GET_SIZE(consts) != m->nconst) {
        PyErr_Format(PyExc_ValueError, "_driverc.%s: constants must be %d numbers", name,
                     m->nconst);
        return -1;
    }
    for (int i = 0; i < m->nconst; i++) {
        m->k[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(consts, i));
        if (m->k[i] == -1.0 && PyErr_Occurred()) {
            return -1;
        }
    }
    m->axis = (int)m->k[0];
    if (m->k[0] != (double)m->axis || m->axis < 0 || m->axis > 2) {
        PyErr_Format(PyExc_ValueError, "_driverc.%s: the axis must be 0, 1 or 2", name);
        return -1;
    }
    if (hold(&c->state, state_obj, ST_SIZE, "the state") < 0) {
        return -1;
    }
    m->s = c->state.view.buf;
    return 0;
}

static void
common_release(Common *c)
{
    release(&c->state);
    PyBuffer_Release(&c->answer);
    PyBuffer_Release(&c->tail);
    PyBuffer_Release(&c->head);
}

#define LOOP_DOC                                                                           \
    "Answer steady FIELDDATA+GETSOURCE steps of one molecule on the blocking socket fd\n"  \
    "until anything else arrives; return the bytes read and not handled, or b'' at EOF.\n" \
    "head: the 160 bytes a step block starts with; tail: its 12-byte GETSOURCE header;\n"  \
    "answer: SOURCEREADY's 12-byte header. state: a writable buffer of 6 float64 (the\n"   \
    "model's 3, the time, steps committed, steps sent), updated after every step.\n"

PyDoc_STRVAR(tls_loop_doc,
"tls_loop(fd, head, tail, answer, constants, state, trig) -> bytes\n"
"\n"
LOOP_DOC
"A two-level system: constants (axis, angle_per_field, turn_cos, turn_sin,\n"
"source_per_y, omega, mu12, dt), state (x, y, z, time, ...); trig: (cos, sin, angle,\n"
"cos_out, sin_out, cos_info, sin_info): numpy's ufuncs, three 0-d float64 arrays and\n"
"the ufuncs' loops (ufunc._get_strided_loop's capsules; None: call the ufuncs).");

static PyObject *
tls_loop(PyObject *Py_UNUSED(module), PyObject *args)
{
    Common c = {.state = {.held = 0}};
    PyObject *consts, *state_obj, *trig;
    if (!PyArg_ParseTuple(args, "iy*y*y*O!OO!:tls_loop", &c.fd, &c.head, &c.tail, &c.answer,
                          &PyTuple_Type, &consts, &state_obj, &PyTuple_Type, &trig)) {
        return NULL;
    }
    PyObject *result = NULL;
    Held ang = {.held = 0}, co = {.held = 0}, si = {.held = 0};
    Stepper m = {.nconst = 8, .nvalues = 9, .keys = tls_keys, .step = tls_step};
    if (common_args(&c, &m, consts, state_obj, "tls_loop") < 0) {
        goto done;
    }
    if (PyTuple_GET_SIZE(trig) != 7) {
        PyErr_SetString(PyExc_ValueError, "_driverc.tls_loop: trig must be 7 objects");
        goto done;
    }
    int failed_cos, failed_sin;
    m.cos_info = call_info(PyTuple_GET_ITEM(trig, 5), &failed_cos);
    m.sin_info = call_info(PyTuple_GET_ITEM(trig, 6), &failed_sin);
    if (failed_cos || failed_sin) {
        goto done;
    }
    if ((m.cos_info == NULL) != (m.sin_info == NULL)) {
        PyErr_SetString(PyExc_ValueError, "_driverc.tls_loop: give both loops or neither");
        goto done;
    }
    if (hold(&ang, PyTuple_GET_ITEM(trig, 2), 1, "the angle array") < 0 ||
        hold(&co, PyTuple_GET_ITEM(trig, 3), 1, "the cos array") < 0 ||
        hold(&si, PyTuple_GET_ITEM(trig, 4), 1, "the sin array") < 0) {
        goto done;
    }
    m.cos_fn = PyTuple_GET_ITEM(trig, 0);
    m.sin_fn = PyTuple_GET_ITEM(trig, 1);
    m.cos_args[0] = m.sin_args[0] = PyTuple_GET_ITEM(trig, 2);
    m.cos_args[1] = PyTuple_GET_ITEM(trig, 3);
    m.sin_args[1] = PyTuple_GET_ITEM(trig, 4);
    m.angle_at = ang.view.buf;
    m.cos_at = co.view.buf;
    m.sin_at = si.view.buf;
    result = run_loop(c.fd, &c.head, &c.tail, &c.answer, &m);
done:
    release(&si);
    release(&co);
    release(&ang);
    common_release(&c);
    return result;
}

PyDoc_STRVAR(sho_loop_doc,
"sho_loop(fd, head, tail, answer, constants, state) -> bytes\n"
"\n"
LOOP_DOC
"A harmonic oscillator: constants (axis, omega2, mu0, dt), state (p, q, a, time, ...).");

static PyObject *
sho_loop(PyObject *Py_UNUSED(module), PyObject *args)
{
    Common c = {.state = {.held = 0}};
    PyObject *consts, *state_obj;
    if (!PyArg_ParseTuple(args, "iy*y*y*O!O:sho_loop", &c.fd, &c.head, &c.tail, &c.answer,
                          &PyTuple_Type, &consts, &state_obj)) {
        return NULL;
    }
    PyObject *result = NULL;
    Stepper m = {.nconst = 4, .nvalues = 10, .keys = sho_keys, .step = sho_step};
    if (common_args(&c, &m, consts, state_obj, "sho_loop") == 0) {
        result = run_loop(c.fd, &c.head, &c.tail, &c.answer, &m);
    }
    common_release(&c);
    return result;
}

PyDoc_STRVAR(format_repr_doc,
"format_repr(value) -> str | None\n"
"\n"
"repr(value) by the loop's fast path, or None where it leaves the value to\n"
"PyOS_double_to_string (for the tests).");

static PyObject *
format_repr(PyObject *Py_UNUSED(module), PyObject *arg)
{
    double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    char out[32];
    int n = isfinite(v) ? repr_fast(v, out) : 0;
    if (n == 0) {
        Py_RETURN_NONE;
    }
    return PyUnicode_FromStringAndSize(out, n);
}

static PyMethodDef methods[] = {
    {"tls_loop", tls_loop, METH_VARARGS, tls_loop_doc},
    {"sho_loop", sho_loop, METH_VARARGS, sho_loop_doc},
    {"format_repr", format_repr, METH_O, format_repr_doc},
    {"trig_loop", trig_loop, METH_VARARGS, trig_loop_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "maxwellhub_drivers._driverc",
    .m_doc = "The single-molecule driver's steady step loop (see maxwellhub_drivers.fastloop).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__driverc(void)
{
    repr_init();
    return PyModule_Create(&module);
}
