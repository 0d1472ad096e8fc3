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
 * Not covered: calls made inside libc (sleep already passes a `rem`;
 * getaddrinfo's polls do not go through these symbols), raw system calls,
 * and a relative FUTEX_WAIT (which takes no `rem`).
 */
#include "preload.h"

#include <poll.h>
#include <time.h>

/* glibc's own nanosleep, a cancellation point, under its exported twin
 * name (this library defines nanosleep itself). */
extern int __nanosleep(const struct timespec *req, struct timespec *rem);
extern void __chk_fail(void) __attribute__((noreturn));

API int poll(struct pollfd *fds, nfds_t nfds, int timeout) {
  if (timeout < 0) return ppoll(fds, nfds, NULL, NULL);
  struct timespec left = {timeout / 1000, (long)(timeout % 1000) * 1000000L};
  return ppoll(fds, nfds, &left, NULL);
}

API int __poll(struct pollfd *fds, nfds_t nfds, int timeout) { return poll(fds, nfds, timeout); }

/* _FORTIFY_SOURCE's poll: the array's size checked as glibc does. */
API int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen) {
  if (fdslen / sizeof *fds < nfds) __chk_fail();
  return poll(fds, nfds, timeout);
}

API int nanosleep(const struct timespec *req, struct timespec *rem) {
  struct timespec left;
  return __nanosleep(req, rem ? rem : &left);
}

API int usleep(useconds_t usec) {
  struct timespec req = {usec / 1000000, (long)(usec % 1000000) * 1000L}, left;
  return __nanosleep(&req, &left);
}
