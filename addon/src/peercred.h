/* A unix connection made again with the peer credentials it had
 * (peercred.c; src/resources/sockets.ts). Plain C; functions return 0 or
 * -errno. */
#ifndef APPSHOT_PEERCRED_H
#define APPSHOT_PEERCRED_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PEERCRED_MAX_GROUPS 65536

/* What SO_PEERCRED (uid, gid: effective ids) and SO_PEERGROUPS say. */
struct peercred {
  uint32_t uid;
  uint32_t gid;
  uint32_t ngroups;
  const uint32_t* groups;
};

/* SO_PEERCRED and SO_PEERGROUPS of `fd` into `out`, its groups into
 * `groups` (room for `room`); -ERANGE with out->ngroups the count if
 * they do not fit. */
int peercred_of(int fd, struct peercred* out, uint32_t* groups, uint32_t room);

/* A connected unix pair of `type` (SOCK_STREAM or SOCK_SEQPACKET,
 * close-on-exec) whose end 0 sees `see0` as its peer and end 1 `see1`
 * (NULL: the caller's own credentials), as the kernel records them: made
 * by threads holding those credentials. Ends that see two makers are a
 * stream or seqpacket connection (-EINVAL for datagrams); -EAGAIN if
 * strangers kept the listener's queue full. */
int peercred_pair(int type, const struct peercred* see0, const struct peercred* see1, int fds[2]);

/* listen(2) on unix socket `fd` by a thread holding `as`'s credentials
 * (NULL: the caller's), which the kernel records for every client that
 * connects to see (SO_PEERCRED on its end). */
int peercred_listen(int fd, int backlog, const struct peercred* as);

/* socket(2) with `uid` and `gid` as the calling thread's fsuid and fsgid
 * for the one call: the socket's inode owner, its sk_uid (who may join
 * its SO_REUSEPORT group) and its file's credentials (netfilter's owner
 * match) are then theirs from the start, as when the application's
 * process made it. -1 with errno (EPERM: not taken). */
int peercred_owned_socket(int family, int type, int protocol, uint32_t uid, uint32_t gid);

#ifdef __cplusplus
}
#endif

#endif
