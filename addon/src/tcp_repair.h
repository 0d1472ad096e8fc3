/* Established TCP connections through the kernel's repair mode
 * (TCP_REPAIR, Linux >= 3.11; CAP_NET_ADMIN): read a connection's state
 * without disturbing it, and make a socket that carries on with that state
 * without a handshake. Plain C; functions return 0 or -errno, and name the
 * step that failed in *step. */
#ifndef APPSHOT_TCP_REPAIR_H
#define APPSHOT_TCP_REPAIR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/filter.h>

typedef struct {
  int family;               /* AF_INET or AF_INET6 */
  char local[INET6_ADDRSTRLEN];
  uint16_t local_port;
  char peer[INET6_ADDRSTRLEN];
  uint16_t peer_port;
  int state;                /* tcpi_state: ESTABLISHED 1, FIN_WAIT1 4, FIN_WAIT2 5, CLOSE_WAIT 8 */
  /* Sequence numbers where the queues end: write_seq (the byte after the
   * last one the application wrote) and rcv_nxt (after the last received). */
  uint32_t send_seq;
  uint32_t recv_seq;
  /* The send queue: sent but not acknowledged, then never sent (the last
   * `unsent` bytes). The receive queue: received, not read. malloc'd.
   * FINs are not data: neither queue nor size counts one. */
  uint8_t* send_queue;
  uint32_t send_len;
  uint32_t unsent;
  uint8_t* recv_queue;
  uint32_t recv_len;
  /* What the handshake agreed, which a repaired socket is told again. */
  uint32_t mss_clamp;
  uint8_t options;          /* TCPI_OPT_* */
  uint8_t snd_wscale;
  uint8_t rcv_wscale;
  uint32_t timestamp;       /* TCP_TIMESTAMP: this socket's clock */
  int has_window;
  uint32_t snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup;
  /* The socket's owner, as the application's process made it (its fsuid
   * and fsgid: inode owner, sk_uid, file credentials); 0: appshot's. */
  int has_owner;
  uint32_t owner_uid, owner_gid;
  /* SO_REUSEPORT, set before the bind: the kernel decides at bind whether
   * the port's bucket still takes reuseport sockets (an accepted
   * connection of a reuseport listener has it), and set later it would
   * keep every new reuseport listener off the port (EADDRINUSE). */
  int reuseport;
} tcp_conn;

/* TCP_REPAIR on (1) or off (0). */
int tcp_repair_set(int fd, int on, const char** step);

/* Drops every packet that reaches the socket (a one-instruction socket
 * filter), so that nothing the peer sends is acknowledged after the
 * connection was read: the peer sends it again later. Refused (EEXIST)
 * for a socket with a filter of its own, which would be lost. */
int tcp_lock(int fd, const char** step);

/* Takes that filter away; ENOENT if the socket's filter is not that one
 * (none, or one the application attached since), which stays. */
int tcp_unlock(int fd, const char** step);

/* Whether the socket's filter is the one tcp_lock attaches (a single
 * "drop": the application, which had none, would not attach that to a
 * connection it uses). Inline for appshot-guard, which links nothing
 * else of the addon. */
static inline int tcp_is_locked(int fd) {
  struct sock_filter f;
  socklen_t n = 0;
  /* With no room given, SO_GET_FILTER tells the length in instructions. */
  if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, NULL, &n) || n != 1) return 0;
  if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, &f, &n) || n != 1) return 0;
  return f.code == (BPF_RET | BPF_K) && f.k == 0;
}

/* Reads the connection of `fd`, which must be in repair mode. On success
 * the caller frees c->send_queue and c->recv_queue. */
int tcp_conn_read(int fd, tcp_conn* c, const char** step);

/* A new socket (close-on-exec) in repair mode, bound and connected as `c`
 * says without a packet sent, holding its receive queue and the sent part
 * of its send queue. The never-sent part is written by tcp_conn_release,
 * once the socket leaves repair mode: until then the peer may not exist
 * yet (both ends of a connection inside one application). */
int tcp_conn_make(const tcp_conn* c, int* out, const char** step);

/* Repair mode off, then the never-sent bytes written (the kernel sends
 * them as the peer's window allows). */
int tcp_conn_release(int fd, const uint8_t* unsent, uint32_t len, const char** step);

/* A connection in CLOSE_WAIT had received its peer's FIN, which repair
 * mode cannot queue: the FIN is sent to the released socket again, as
 * the peer sent it, through a raw socket (CAP_NET_RAW). */
int tcp_conn_refin(const tcp_conn* c, const char** step);

/* The socket's tcpi_state, or -errno. */
int tcp_state(int fd);

/* A connected TCP socket of `family` whose connection was reset: what
 * an application is given for a connection that was not kept. */
int tcp_reset_socket(int family, int* out, const char** step);

/* A guardian of the sockets a snapshot holds in repair mode: a process of
 * its own (`binary`, addon/guard/appshot_guard.c, spawned in a session of
 * its own; *pid), which is handed a duplicate of
 * each socket before it is locked and enters repair mode, and lets out
 * of it each one still in it (SO_REUSEADDR set back to `reuse`), then
 * detaches the snapshot's filter if `locked` and the socket has it, the
 * moment the snapshot's process is gone, however it died:
 * the end of *guard it holds closes then. Disarmed, it lets go of them
 * untouched (the image carries them on, or they were let out already).
 * Returns the end of the channel to it (close-on-exec) in *guard. */
int tcp_guard_start(const char* binary, int* guard, pid_t* pid, const char** step);
int tcp_guard_add(int guard, int fd, int locked, int reuse, const char** step);
/* Disarms the guardian, closes `guard` and reaps it. */
int tcp_guard_disarm(int guard, pid_t pid, const char** step);

/* A message on the channel (SOCK_SEQPACKET); TCP_GUARD_ADD carries the
 * socket (SCM_RIGHTS). */
enum { TCP_GUARD_ADD = 1, TCP_GUARD_DISARM = 2 };
typedef struct {
  int32_t kind;
  int32_t locked;
  int32_t reuse;
} tcp_guard_msg;

#endif
