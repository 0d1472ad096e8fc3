/* The kernel's socket tables through NETLINK_SOCK_DIAG: what /proc/net
 * does not say (a unix socket's peer and queues, a UDP socket's shutdown).
 * Plain C; functions return a count and a malloc'd array, or -errno. */
#ifndef APPSHOT_SOCKDIAG_H
#define APPSHOT_SOCKDIAG_H

#include <stdint.h>

typedef struct {
  uint32_t ino;
  uint32_t peer;   /* inode of the connected peer, or 0 */
  uint8_t type;    /* SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET */
  uint8_t state;   /* TCP_ESTABLISHED 1, TCP_LISTEN 10, TCP_CLOSE 7 */
  uint32_t rqueue; /* bytes waiting (connected) or queued connections (listening) */
  uint32_t wqueue; /* bytes unsent (connected) or the backlog (listening) */
  uint8_t shutdown; /* sk_shutdown: 1 receive side, 2 send side */
  /* A named socket's file (bound to a path): its inode and its file
   * system's device, as stat(2) gives them (st_ino, st_dev; the kernel's
   * MAJOR << 20 | MINOR converted); 0 and 0 for an abstract or unnamed
   * socket. The file may have been renamed or removed since the bind. */
  uint32_t vfs_ino;
  uint64_t vfs_dev;
} sockdiag_unix;

long sockdiag_unix_all(sockdiag_unix** out);

/* The unix socket of inode `ino` alone (the kernel looks it up): 0, or
 * -ENOENT if this network namespace has none, or -errno. */
int sockdiag_unix_one(uint32_t ino, sockdiag_unix* out);

typedef struct {
  uint32_t ino;
  uint8_t shutdown; /* sk_shutdown: 1 receive side, 2 send side */
} sockdiag_udp;

/* Every UDP socket of `family` (AF_INET, AF_INET6) with its shutdown state. */
long sockdiag_udp_all(int family, sockdiag_udp** out);

typedef struct {
  uint32_t ino;
  uint32_t uid;      /* its inode's owner (the creator's fsuid), as this user namespace sees it */
  uint8_t local[16]; /* bound address, network order, 4 bytes used for AF_INET */
  int8_t v6only;     /* IPV6_V6ONLY of an AF_INET6 one (0, 1); -1: not said (AF_INET) */
} sockdiag_tcp_listener;

/* The TCP sockets of `family` listening on `port` (host order) in this
 * network namespace, each with its address, owner and IPV6_V6ONLY from
 * the one answer. Asked for listening sockets alone, the kernel walks
 * only its listening hash, where /proc/net/tcp walks every bucket of the
 * established one too (milliseconds even when nearly empty). */
long sockdiag_tcp_listening(int family, uint16_t port, sockdiag_tcp_listener** out);

typedef struct {
  uint32_t ino;      /* 0: no socket file yet (waiting in an accept queue) */
  uint8_t family;
  uint8_t remote[16]; /* network order, 4 bytes used for AF_INET */
  uint16_t rport;    /* host order */
} sockdiag_tcp_conn;

/* The established TCP connections of `family` whose local port is `port`
 * (host order) and, unless `local` is NULL, whose local address is `local`
 * (network order, 4 bytes for AF_INET, 16 for AF_INET6), in this network
 * namespace. A dump the kernel says changed while it was read is asked
 * again (-EAGAIN if it keeps changing). */
long sockdiag_tcp_established(int family, uint16_t port, const uint8_t* local, sockdiag_tcp_conn** out);

/* A netlink socket as netlink_diag shows it (net/netlink/diag.c). */
typedef struct {
  uint32_t ino;
  uint32_t portid;     /* its own port id (0: never bound) */
  uint32_t dst_portid; /* connected to this port id (0: the kernel, or none) */
  uint32_t dst_group;  /* connected to this group number (0: none) */
  uint32_t flags;      /* NDIAG_FLAG_*: a dump running, and its options */
  uint32_t rmem;       /* bytes queued for reading (SK_MEMINFO_RMEM_ALLOC) */
  uint32_t wmem;       /* bytes being sent (SK_MEMINFO_WMEM_ALLOC) */
  uint32_t drops;      /* messages the socket dropped (SK_MEMINFO_DROPS) */
  uint8_t protocol;    /* NETLINK_ROUTE, ... */
  uint8_t type;        /* SOCK_RAW or SOCK_DGRAM */
  uint8_t state;       /* NETLINK_CONNECTED 1 */
  uint32_t ngroups;    /* bits in `groups` (the protocol's group count, 0: joined none yet) */
  /* The groups joined, a bit each (group n is bit n-1), in the kernel's
   * own bitmap of longs (whose 32-bit halves swap on a big-endian
   * machine: read it by long); malloc'd, or NULL. */
  unsigned long* groups;
} sockdiag_netlink;

/* Every netlink socket of this network namespace, of every protocol. The
 * caller frees each `groups`, then the array (sockdiag_netlink_free). */
long sockdiag_netlink_all(sockdiag_netlink** out);
void sockdiag_netlink_free(sockdiag_netlink* all, long n);

#endif
