/* Descriptors passed over a unix socket (SCM_RIGHTS), for appshot's side
 * of the connection keeper (addon/src/keeper.c) and the keeper itself
 * (addon/keeper/appshot_keeper.c). Header-only: the keeper is its own
 * small program. */
#ifndef APPSHOT_FDS_H
#define APPSHOT_FDS_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

/* Below the kernel's SCM_MAX_FD (253) descriptors per message. */
#define APPSHOT_FDS_PER_MESSAGE 240

/* Sends `fds`, APPSHOT_FDS_PER_MESSAGE at a time, each message carrying
 * one byte 'F'. 0, or -1 with errno. */
static inline int appshot_send_fds(int to, const int *fds, size_t n) {
  for (size_t at = 0; at < n; at += APPSHOT_FDS_PER_MESSAGE) {
    size_t count = n - at < APPSHOT_FDS_PER_MESSAGE ? n - at : APPSHOT_FDS_PER_MESSAGE;
    char byte = 'F';
    char control[CMSG_SPACE(APPSHOT_FDS_PER_MESSAGE * sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = CMSG_SPACE(count * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(count * sizeof(int));
    memcpy(CMSG_DATA(c), fds + at, count * sizeof(int));
    while (sendmsg(to, &msg, MSG_NOSIGNAL) < 0)
      if (errno != EINTR) return -1;
  }
  return 0;
}

#endif
