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
 * Not covered: calls made inside libc (sleep already passes a `rem`;
 * getaddrinfo's polls do not go through these symbols), raw system calls,
 * and a relative FUTEX_WAIT (which takes no `rem`).
 */
#include "preload.h"

#include <errno.h>
#include <poll.h>
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
  if (r < 0 && (errno == ENOSYS || errno == EPERM)) return (int)libc_ret(sys6(SYS_poll, (long)fds, (long)nfds, timeout, 0, 0, 0));
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
