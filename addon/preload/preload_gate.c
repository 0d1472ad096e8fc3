/*
 * The freeze gate's slow path (preload.h, "Freeze gate"): a thread about
 * to begin an outermost translation window while a snapshot holds the
 * gate closed waits here, outside every window, until the snapshot opens
 * it or its deadline passes. Raw system calls only (clock_gettime and
 * futex), nothing allocated: it runs in signal handlers and between fork
 * and exec like every wrapper.
 */
#include "preload.h"

#include <linux/futex.h>

struct appshot_freeze_gate g_freeze_gate;
extern struct appshot_freeze_gate appshot_freeze_gate
    __attribute__((alias("g_freeze_gate"), visibility("default")));

/* One wait at most this long: a gate opened while its waiter ran (not
 * stopped by the snapshot, which cannot wake a private futex) holds the
 * waiter no longer. */
#define GATE_WAIT_MAX_NS (50 * 1000 * 1000LL)
/* A deadline further ahead than this was not set on this clock (the
 * snapshot sets one a second ahead): taken as passed. */
#define GATE_AHEAD_MAX_NS (10 * 1000 * 1000 * 1000LL)

void freeze_gate_wait(void) {
  int saved = errno;
  for (;;) {
    int32_t closed = __atomic_load_n(&g_freeze_gate.closed, __ATOMIC_ACQUIRE);
    if (!closed) break;
    struct timespec now;
    if (SYS2(clock_gettime, CLOCK_MONOTONIC, &now) != 0) break;
    int64_t left = __atomic_load_n(&g_freeze_gate.deadline_ns, __ATOMIC_RELAXED) -
                   ((int64_t)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (left <= 0 || left > GATE_AHEAD_MAX_NS) break;
    if (left > GATE_WAIT_MAX_NS) left = GATE_WAIT_MAX_NS;
    struct timespec wait = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
    /* Woken, timed out, changed (EAGAIN) or interrupted (EINTR, a
     * handler ran): looked at again. */
    SYS4(futex, &g_freeze_gate.closed, FUTEX_WAIT_PRIVATE, closed, &wait);
  }
  errno = saved;
}
