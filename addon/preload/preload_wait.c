/*
 * Waits whose time left a snapshot can see.
 *
 * When a stop (a snapshot's freeze) interrupts poll(2), or a nanosleep
 * given no `rem`, the kernel keeps the instant the wait ends in the
 * thread's restart block, which nothing outside the thread shows: a
 * restore could only make the call again with its whole timeout
 * (src/resources/threads.ts resumeRegisters), waiting up to that much
 * longer than the program asked. ppoll writes the time left back to its
 * timespec when it is interrupted, and nanosleep to its `rem`: both in the
 * thread's own stack, which the image holds. So poll is made as ppoll
 * without a signal mask (the kernel's same do_sys_poll; a cancellation
 * point as poll is), and nanosleep and usleep always pass a `rem` of
 * their own; the restored thread then waits for exactly what was left.
 * No translation here, no allocation, nothing but the call: safe in a
 * signal handler as the calls themselves are.
 *
 * The price: a stop (SIGSTOP, a debugger, a --leave-running snapshot's
 * freeze) is not counted in a poll's timeout any more. The kernel
 * restarts poll towards its original deadline, and ppoll with the time
 * that was left when it stopped, so a wait caught by a stop ends that much
 * later: longer than asked, as a timeout allows (a loaded machine does as
 * much), never shorter; the same as across a restore, where the time the
 * image waited is not counted either (as timerfd.ts does for timers).
 *
 * An epoll wait ends at a stop with EINTR (signal(7)), and writes nothing
 * back; the restore makes it again (src/resources/threads.ts
 * resumeRegisters). So epoll_wait and epoll_pwait with a timeout keep, in
 * the thread's t_timed_wait, the CLOCK_MONOTONIC instant it ends and the
 * call's arguments; a snapshot that finds the thread in that very call
 * (the same arguments in its registers) gives the call the time that was
 * left when the freeze began (src/resources/threads.ts timeLeftOfWaits):
 * never less than was left, longer by at most the freeze's own time.
 * The price: a clock read and a few TLS stores per wait with a timeout.
 *
 * Not covered: calls made inside libc (sleep already passes a `rem`;
 * getaddrinfo's polls do not go through these symbols), raw system calls,
 * epoll_pwait2 (its timeout is in memory), and a relative FUTEX_WAIT
 * (which takes no `rem`).
 */
#include "preload.h"

#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>

/* glibc's own nanosleep, a cancellation point, under its exported twin
 * name (this library defines nanosleep itself). */
extern int __nanosleep(const struct timespec *req, struct timespec *rem);
extern void __chk_fail(void) __attribute__((noreturn));

/* One body for poll, __poll and __poll_chk, called directly: a program
 * that defines its own poll and forwards to __poll must not be called
 * back. ppoll never fails with ENOSYS or EPERM by itself: either is a
 * seccomp filter that allows poll and not ppoll, and poll is made then
 * (a raw call there: no cancellation point, on that path only). */
static int poll_as_ppoll(struct pollfd *fds, nfds_t nfds, int timeout) {
  struct timespec left = {timeout / 1000, (long)(timeout % 1000) * 1000000L};
  int r = ppoll(fds, nfds, timeout < 0 ? NULL : &left, NULL);
#ifdef SYS_poll
  if (r < 0 && (errno == ENOSYS || errno == EPERM)) return (int)libc_ret(appshot_raw_syscall(SYS_poll, (long)fds, (long)nfds, timeout, 0, 0, 0));
#endif
  return r;
}

API int poll(struct pollfd *fds, nfds_t nfds, int timeout) { return poll_as_ppoll(fds, nfds, timeout); }

API int __poll(struct pollfd *fds, nfds_t nfds, int timeout) { return poll_as_ppoll(fds, nfds, timeout); }

/* _FORTIFY_SOURCE's poll: the array's size checked as glibc does. */
API int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen) {
  if (fdslen / sizeof *fds < nfds) __chk_fail();
  return poll_as_ppoll(fds, nfds, timeout);
}

API int nanosleep(const struct timespec *req, struct timespec *rem) {
  struct timespec left;
  return __nanosleep(req, rem ? rem : &left);
}

API int usleep(useconds_t usec) {
  struct timespec req = {usec / 1000000, (long)(usec % 1000000) * 1000L}, left;
  return __nanosleep(&req, &left);
}

/* The epoll wait with a timeout the thread is in (see above): read by
 * the snapshot at the thread pointer plus appshot_timed_wait_tpoff, with
 * this layout (src/resources/threads.ts TIMED_WAIT). */
__thread struct appshot_timed_wait t_timed_wait TLS_IE HIDDEN;
long appshot_timed_wait_tpoff API;
/* Counted up by each restore of the process (src/resources/threads.ts
 * forgetTimedWaits), never by the library: see struct appshot_timed_wait. */
int64_t appshot_restore_generation API;

static int epoll_timed(int epfd, struct epoll_event *events, int max, int timeout,
                       const sigset_t *mask, int pwait) {
  ensure_init();
  int (*wait)(int, struct epoll_event *, int, int) = REAL(epoll_wait);
  int (*pwait_fn)(int, struct epoll_event *, int, int, const sigset_t *) = REAL(epoll_pwait);
  if (UNLIKELY(!wait || !pwait_fn)) /* only inside our own init */
    return (int)libc_ret(appshot_raw_syscall(SYS_epoll_pwait, epfd, (long)events, max, timeout, (long)mask, 8));
  if (timeout <= 0) return pwait ? pwait_fn(epfd, events, max, timeout, mask) : wait(epfd, events, max, timeout);
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now); /* ours: the vDSO for this clock */
  /* A handler's wait nested in this one puts back what it found. The
   * instant last: a record is whole once it is set. */
  struct appshot_timed_wait outer = t_timed_wait;
  t_timed_wait.deadline = 0;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_timed_wait.epfd = epfd;
  t_timed_wait.events = (int64_t)(uintptr_t)events;
  t_timed_wait.maxevents = max;
  t_timed_wait.timeout = timeout;
  t_timed_wait.sp = stack_pointer();
  t_timed_wait.generation = __atomic_load_n(&appshot_restore_generation, __ATOMIC_RELAXED);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_timed_wait.deadline = (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec + (int64_t)timeout * 1000000LL;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  test_pause("epoll-noted");
  int r = pwait ? pwait_fn(epfd, events, max, timeout, mask) : wait(epfd, events, max, timeout);
  int e = errno;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_timed_wait = outer;
  errno = e;
  return r;
}

API int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout) {
  return epoll_timed(epfd, events, max, timeout, NULL, 0);
}

API int epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
                    const sigset_t *mask) {
  return epoll_timed(epfd, events, max, timeout, mask, 1);
}
