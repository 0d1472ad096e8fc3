/* Datagram and record sockets (unix SOCK_DGRAM and SOCK_SEQPACKET, UDP):
 * their queued messages read without consuming them, and a UDP datagram
 * put back into a receive queue as if its original sender had sent it.
 * Plain C; functions return a count or 0, or -errno. */
#ifndef APPSHOT_DGRAM_H
#define APPSHOT_DGRAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "fsident.h"

typedef struct {
  unsigned char* data; /* malloc'd, len bytes */
  size_t len;
  struct sockaddr_storage from;
  socklen_t from_len; /* 0 when the kernel gave no sender */
  /* What the IP header said, as far as the socket asked to be shown it
   * (IP_PKTINFO, IP_RECVTOS, IP_RECVTTL or their IPv6 twins; only asked of
   * an IP socket): the address it was sent to (to_len 0: not shown), its
   * TOS or traffic class and its TTL or hop limit (-1: not shown). */
  struct sockaddr_storage to;
  socklen_t to_len;
  int tos, ttl;
  /* A unix socket's, asked for (dgram_queue's `creds`): who sent it, as
   * SCM_CREDENTIALS shows the receiver (has_creds 0: the kernel gave no
   * such message). */
  int has_creds;
  struct ucred creds;
} dgram_msg;

/* Every message queued for reading on `fd`, in order and with its
 * boundaries, left queued: peeked with SO_PEEK_OFF walking the queue, the
 * socket's own peek offset put back after. At most `max_count` messages of
 * `max_total` bytes in all (-E2BIG past that); a message larger than
 * `max_one` is -EMSGSIZE. `shut_for_reading`: a seqpacket socket shut down
 * for reading (its peer closed, or shut its side down), where a peek past
 * the last message answers 0, as for an empty message, instead of EAGAIN
 * (a datagram socket still says EAGAIN): an empty answer ends the walk
 * there (an empty record on such a socket is lost). DGRAM_ERROR_PENDING
 * when the socket holds an error for the application to read (poll says
 * POLLERR), which any peek would consume: nothing is read then.
 * `creds`: a unix socket with SO_PASSCRED, each message read with its
 * SCM_CREDENTIALS (and room for control data: a descriptor it carried
 * would be installed here, close-on-exec, and is closed at once). */
#define DGRAM_ERROR_PENDING (-4096) /* an error waits to be read: nothing was peeked */
long dgram_queue(int fd, size_t max_count, size_t max_total, size_t max_one, int shut_for_reading, int creds, dgram_msg** out);
/* sendmsg(2) of one whole message with SCM_CREDENTIALS naming `creds`
 * (the kernel lets a process name a pid not its own only with
 * CAP_SYS_ADMIN, a uid or gid not its own with CAP_SETUID, CAP_SETGID).
 * `to` NULL: the socket's peer. 0 or -errno (-EMSGSIZE: sent in part). */
int dgram_send_creds(int fd, const void* data, size_t len, const struct sockaddr* to, socklen_t to_len, const struct ucred* creds);
void dgram_free(dgram_msg* msgs, long n);

/* bind(2) as the application's process `who` would (its filesystem
 * identity, fsident.c; NULL: the restorer's own), a relative unix name
 * resolved in directory `dir` (NULL or "": the process's working
 * directory), where that process bound it: done in a thread of its own
 * that leaves the process's working directory and credentials as they
 * were. 0 or -errno. */
int bind_in(int fd, const struct sockaddr* addr, socklen_t len, const char* dir, const struct fsident_list* who);
/* connect(2), likewise: a relative name (or a long one, given relative to
 * its directory) resolved in `dir`. */
int connect_in(int fd, const struct sockaddr* addr, socklen_t len, const char* dir, const struct fsident_list* who);

/* An O_PATH descriptor of the file `name` in directory `dir` (opened as
 * `who`, as bind_in), if it is the very file unix socket `sock`'s bind
 * made (sock_diag's UNIX_DIAG_VFS): -ESTALE if it is anything else (a
 * symlink put there, another socket's file). Datagrams are sent to
 * `sock` through it ("/proc/self/fd/N"): its name, looked up again at
 * each send, is anyone's who may change its directory. Close-on-exec;
 * -errno on failure. */
int dgram_socket_file_open(int sock, const char* dir, const char* name, const struct fsident_list* who);

/* One UDP datagram from `from` to `to` (both AF_INET, or both AF_INET6),
 * built whole and sent through a raw socket (CAP_NET_RAW), so that its
 * receiver sees the original sender's address and port, and `tos` (TOS
 * or traffic class, 0-255) and `ttl` (TTL or hop limit, 1-255) as its
 * header's. */
int udp_inject(const struct sockaddr* from, const struct sockaddr* to, const void* data, size_t len, int tos, int ttl);

#endif
