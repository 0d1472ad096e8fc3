/*
 * appshot's side of the TCP connection keeper (addon/keeper/appshot_keeper.c):
 * starting one with an ended application's connections, and taking them
 * back at the restore. Why it exists: see the keeper's own comment.
 */
#define _GNU_SOURCE
#include "keeper.h"

#include "appshot_fds.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define FDS_PER_MESSAGE APPSHOT_FDS_PER_MESSAGE

static int fail(const char **step, const char *what) {
  int e = errno;
  *step = what;
  return -e;
}

static int unix_address(const char *path, struct sockaddr_un *sa) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (strlen(path) >= sizeof sa->sun_path) return -ENAMETOOLONG;
  strcpy(sa->sun_path, path);
  return 0;
}


int keeper_start(const char *binary, const char *path, const char *image_id, long hold_seconds, const int *fds, size_t nfds,
                 const char **step) {
  struct sockaddr_un sa;
  int rc = unix_address(path, &sa);
  if (rc) {
    *step = "the keeper's socket path";
    return rc;
  }
  int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) return fail(step, "making the keeper's socket");
  int sv[2] = {-1, -1};
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  // Only the user may connect (the keeper checks the peer too): the mode
  // a socket file gets is the socket's own, so set before bind(). Bound
  // under a temporary name and renamed into place listening, so that a
  // restore never finds the name taken but nothing listening.
  char tmp[sizeof sa.sun_path + 16];
  struct sockaddr_un tmpsa;
  snprintf(tmp, sizeof tmp, "%s.%d", path, (int)getpid());
  if ((rc = unix_address(tmp, &tmpsa))) {
    *step = "the keeper's socket path";
    goto out_early;
  }
  unlink(tmp);
  if (fchmod(listener, 0600) || bind(listener, (struct sockaddr *)&tmpsa, sizeof tmpsa) || listen(listener, 8)) {
    rc = fail(step, "binding the keeper's socket");
    unlink(tmp);
    goto out_early;
  }
  if (rename(tmp, path)) {
    rc = fail(step, "naming the keeper's socket");
    unlink(tmp);
    goto out_early;
  }
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) {
    rc = fail(step, "making the keeper's control socket");
    goto out;
  }
  // Descriptor 3 is the keeper's control socket; nothing else of ours
  // reaches it (everything of Node's is close-on-exec).
  if (sv[1] == 3) {
    int moved = fcntl(sv[1], F_DUPFD_CLOEXEC, 10);
    if (moved < 0) {
      rc = fail(step, "making the keeper's control socket");
      goto out;
    }
    close(sv[1]);
    sv[1] = moved;
  }
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawn_file_actions_adddup2(&actions, sv[1], 3);
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  sigaddset(&defaults, SIGHUP);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  // Its own session: not killed with the terminal or the process group
  // of the command that ended the application.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  char hold[24];
  snprintf(hold, sizeof hold, "%ld", hold_seconds);
  char *argv[] = {(char *)"appshot-keeper", (char *)path, (char *)image_id, hold, NULL};
  pid_t pid;
  rc = posix_spawn(&pid, binary, &actions, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc) {
    errno = rc;
    rc = fail(step, "starting appshot-keeper");
    goto out;
  }
  // It forks at once and its parent leaves, so that whoever outlives it
  // (init, not a resident engine) reaps it.
  while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
  }
  close(sv[1]);
  sv[1] = -1;
  // The listener first, then the connections; in flight, they are held
  // by the control socket until the keeper takes them.
  if (appshot_send_fds(sv[0], &listener, 1) || appshot_send_fds(sv[0], fds, nfds) || shutdown(sv[0], SHUT_WR)) {
    rc = fail(step, "handing the connections to appshot-keeper");
    goto out;
  }
  // The keeper says how many it holds: all of them, or the snapshot fails
  // before the application is ended.
  struct timeval tv = {10, 0};
  setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char answer[64];
  size_t got = 0;
  for (;;) {
    ssize_t n = read(sv[0], answer + got, sizeof answer - 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
    if (got == sizeof answer - 1 || memchr(answer, '\n', got)) break;
  }
  answer[got] = 0;
  unsigned long held = 0;
  if (sscanf(answer, "HELD %lu", &held) != 1 || held != nfds + 1) {
    errno = EIO;
    rc = fail(step, "appshot-keeper did not say it holds every connection");
    goto out;
  }
  rc = 0;
out:
  if (sv[0] >= 0) close(sv[0]);
  if (sv[1] >= 0) close(sv[1]);
  if (rc) unlink(path);
out_early:
  close(listener);
  return rc;
}

long keeper_take(const char *path, const char *image_id, int wait_ms, int **out, int *control, int *none, const char **step) {
  *out = NULL;
  *none = 0;
  *control = -1;
  struct sockaddr_un sa;
  if (unix_address(path, &sa)) {
    *none = 1;
    return 0;
  }
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return fail(step, "making a socket for the keeper");
  // A keeper that is stopped accepts nothing: once its backlog is full
  // (each caller that gave up leaves its connection there), a connect
  // waits as long as the send timeout says (review r250: for good).
  struct timeval tv = {wait_ms / 1000, (wait_ms % 1000) * 1000};
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(s, (struct sockaddr *)&sa, sizeof sa)) {
    int e = errno;
    close(s);
    // No keeper, or one that died: its socket file is left over.
    if (e == ECONNREFUSED) unlink(path);
    if (e == ENOENT || e == ECONNREFUSED) {
      *none = 1;
      return 0;
    }
    errno = e;
    return fail(step, "reaching the keeper");
  }
  // A keeper of this user's (or root's): the directory is the user's own
  // (keeper.ts checks), and so is the process answering.
  struct ucred cred;
  socklen_t clen = sizeof cred;
  if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &clen) || (cred.uid != geteuid() && cred.uid != 0)) {
    close(s);
    errno = EPERM;
    return fail(step, "the keeper's socket is another user's");
  }
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char request[256];
  int len = snprintf(request, sizeof request, "TAKE %s\n", image_id);
  if (len >= (int)sizeof request || write(s, request, (size_t)len) != len) {
    close(s);
    errno = EINVAL;
    return fail(step, "asking the keeper");
  }
  size_t n = 0, capacity = 0;
  int *fds = NULL;
  long rc = 0;
  for (;;) {
    char byte;
    char control[CMSG_SPACE(FDS_PER_MESSAGE * sizeof(int))];
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t got = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      rc = fail(step, "taking the connections from the keeper");
      break;
    }
    if (got == 0) break;
    int last = byte == 'E';
    if (msg.msg_flags & MSG_CTRUNC) {
      errno = EMFILE;
      rc = fail(step, "taking the connections from the keeper (no room for their descriptors)");
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      if (n + count > capacity) {
        capacity = (n + count) * 2;
        int *grown = realloc(fds, capacity * sizeof *fds);
        if (!grown) {
          int *incoming = (int *)CMSG_DATA(c);
          for (size_t i = 0; i < count; i++) close(incoming[i]);
          errno = ENOMEM;
          rc = fail(step, "taking the connections from the keeper");
          continue;
        }
        fds = grown;
      }
      memcpy(fds + n, CMSG_DATA(c), count * sizeof(int));
      n += count;
    }
    if (last) break;
  }
  if (rc) {
    close(s);
    for (size_t i = 0; i < n; i++) close(fds[i]);
    free(fds);
    return rc;
  }
  // Kept open: the keeper holds its copies until told "DONE" on it
  // (keeper_done), and holds them again if it closes without.
  if (n) *control = s;
  else close(s);
  *out = fds;
  return (long)n;
}

int keeper_done(int control) {
  static const char done[] = "DONE\n";
  ssize_t n = write(control, done, sizeof done - 1);
  close(control);
  return n == (ssize_t)(sizeof done - 1) ? 0 : -errno;
}
