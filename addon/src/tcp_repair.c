/* Established TCP connections through repair mode: see tcp_repair.h.
 *
 * Repair mode makes a socket a passive record of its connection: what is
 * written to it goes into a queue of our choosing without a packet sent,
 * its sequence numbers can be read and set, connect() makes it connected
 * without a handshake, and close() sends the peer nothing. */
#define _GNU_SOURCE
#include "peercred.h"
#include "tcp_repair.h"

#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <linux/filter.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>


/* TCP option kinds as TCP_REPAIR_OPTIONS takes them (RFC 793, 1323, 2018). */
enum { OPT_MAXSEG = 2, OPT_WINDOW = 3, OPT_SACK_PERM = 4, OPT_TIMESTAMP = 8 };

#define FAIL(what)          \
  do {                      \
    *step = (what);         \
    return -errno;          \
  } while (0)

int tcp_repair_set(int fd, int on, const char** step) {
  if (setsockopt(fd, SOL_TCP, TCP_REPAIR, &on, sizeof on)) FAIL("setting TCP_REPAIR");
  return 0;
}

int tcp_lock(int fd, const char** step) {
  /* With no room given, SO_GET_FILTER tells how long the socket's own
   * filter is. */
  socklen_t own = 0;
  if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, NULL, &own)) FAIL("reading the socket's filter");
  if (own) {
    errno = EEXIST;
    FAIL("the socket has a packet filter of its own");
  }
  struct sock_filter drop = BPF_STMT(BPF_RET | BPF_K, 0);
  struct sock_fprog prog = {1, &drop};
  if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog)) FAIL("attaching a filter that drops every packet");
  return 0;
}

int tcp_unlock(int fd, const char** step) {
  int unused = 0;
  if (!tcp_is_locked(fd)) {
    errno = ENOENT;
    FAIL("detaching the packet filter (the socket does not have the snapshot's)");
  }
  if (setsockopt(fd, SOL_SOCKET, SO_DETACH_FILTER, &unused, sizeof unused)) FAIL("detaching the packet filter");
  return 0;
}

static int select_queue(int fd, int queue, const char** step) {
  if (setsockopt(fd, SOL_TCP, TCP_REPAIR_QUEUE, &queue, sizeof queue)) FAIL("selecting a repair queue");
  return 0;
}

/* Copies `len` bytes of the selected queue, leaving them queued. */
static int peek_queue(int fd, uint8_t** out, uint32_t len, const char** step) {
  *out = malloc(len ? len : 1);
  if (!*out) {
    errno = ENOMEM;
    FAIL("allocating a queue's copy");
  }
  if (!len) return 0;
  /* A peek of the receive queue starts at the socket's own peek offset
   * (SO_PEEK_OFF, TCP's since Linux 6.10) and moves it: it starts at 0
   * here, and the application's offset is put back. */
  int saved = -1, zero = 0;
  socklen_t sl = sizeof saved;
  if (getsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, &sl)) saved = -1;
  if (saved > 0 && setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof zero)) FAIL("setting the peek offset to 0");
  ssize_t n = recv(fd, *out, len, MSG_PEEK | MSG_DONTWAIT);
  int peek_errno = errno;
  if (saved >= 0) setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, sizeof saved);
  errno = peek_errno;
  if (n < 0) FAIL("peeking at a queue");
  if ((uint32_t)n != len) {
    /* The receive queue may still grow while the application is frozen,
     * but never shrink: fewer bytes than counted is a kernel we do not
     * understand. */
    errno = EIO;
    FAIL("peeking at a queue (it holds fewer bytes than counted)");
  }
  return 0;
}

static int address_of(const struct sockaddr_storage* a, char* text, uint16_t* port) {
  if (a->ss_family == AF_INET) {
    const struct sockaddr_in* v4 = (const struct sockaddr_in*)a;
    inet_ntop(AF_INET, &v4->sin_addr, text, INET6_ADDRSTRLEN);
    *port = ntohs(v4->sin_port);
  } else {
    const struct sockaddr_in6* v6 = (const struct sockaddr_in6*)a;
    inet_ntop(AF_INET6, &v6->sin6_addr, text, INET6_ADDRSTRLEN);
    *port = ntohs(v6->sin6_port);
  }
  return 0;
}

int tcp_conn_read(int fd, tcp_conn* c, const char** step) {
  memset(c, 0, sizeof *c);
  struct sockaddr_storage a;
  socklen_t alen = sizeof a;
  if (getsockname(fd, (struct sockaddr*)&a, &alen)) FAIL("getsockname");
  c->family = a.ss_family;
  address_of(&a, c->local, &c->local_port);
  alen = sizeof a;
  if (getpeername(fd, (struct sockaddr*)&a, &alen)) FAIL("getpeername");
  address_of(&a, c->peer, &c->peer_port);

  struct tcp_info ti;
  socklen_t tlen = sizeof ti;
  if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &tlen)) FAIL("reading TCP_INFO");
  c->state = ti.tcpi_state;
  c->options = ti.tcpi_options;
  if (ti.tcpi_options & TCPI_OPT_WSCALE) {
    c->snd_wscale = ti.tcpi_snd_wscale;
    c->rcv_wscale = ti.tcpi_rcv_wscale;
  }
  int size;
  if (ioctl(fd, SIOCOUTQ, &size)) FAIL("reading the send queue's size");
  c->send_len = size;
  if (ioctl(fd, SIOCOUTQNSD, &size)) FAIL("reading the unsent part's size");
  c->unsent = size;
  /* The application's FIN, once it shut its side down (FIN_WAIT1), counts
   * in both sizes while unacknowledged (and in the unsent part until it
   * left), but is not data. */
  if (c->state == TCP_FIN_WAIT1) {
    if (c->send_len) c->send_len--;
    if (c->unsent) c->unsent--;
  }
  if (ioctl(fd, SIOCINQ, &size)) FAIL("reading the receive queue's size");
  c->recv_len = size;

  socklen_t ilen = sizeof c->mss_clamp;
  if (getsockopt(fd, SOL_TCP, TCP_MAXSEG, &c->mss_clamp, &ilen)) FAIL("reading TCP_MAXSEG");
  if (c->options & TCPI_OPT_TIMESTAMPS) {
    ilen = sizeof c->timestamp;
    if (getsockopt(fd, SOL_TCP, TCP_TIMESTAMP, &c->timestamp, &ilen)) FAIL("reading TCP_TIMESTAMP");
  }
  struct tcp_repair_window w;
  socklen_t wlen = sizeof w;
  if (getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &w, &wlen) == 0) {
    c->has_window = 1;
    c->snd_wl1 = w.snd_wl1;
    c->snd_wnd = w.snd_wnd;
    c->max_window = w.max_window;
    c->rcv_wnd = w.rcv_wnd;
    c->rcv_wup = w.rcv_wup;
  } else if (errno != ENOPROTOOPT) {
    FAIL("reading TCP_REPAIR_WINDOW");
  }

  int rc;
  socklen_t slen = sizeof c->send_seq;
  if ((rc = select_queue(fd, TCP_SEND_QUEUE, step))) return rc;
  if (getsockopt(fd, SOL_TCP, TCP_QUEUE_SEQ, &c->send_seq, &slen)) FAIL("reading the send queue's sequence number");
  if ((rc = peek_queue(fd, &c->send_queue, c->send_len, step))) goto fail;
  if ((rc = select_queue(fd, TCP_RECV_QUEUE, step))) goto fail;
  slen = sizeof c->recv_seq;
  if (getsockopt(fd, SOL_TCP, TCP_QUEUE_SEQ, &c->recv_seq, &slen)) {
    *step = "reading the receive queue's sequence number";
    rc = -errno;
    goto fail;
  }
  if ((rc = peek_queue(fd, &c->recv_queue, c->recv_len, step))) goto fail;
  if ((rc = select_queue(fd, TCP_NO_QUEUE, step))) goto fail;
  return 0;
fail:
  free(c->send_queue);
  free(c->recv_queue);
  c->send_queue = c->recv_queue = NULL;
  return rc;
}

static int sockaddr_of(int family, const char* text, uint16_t port, struct sockaddr_storage* a, socklen_t* len) {
  memset(a, 0, sizeof *a);
  if (family == AF_INET) {
    struct sockaddr_in* v4 = (struct sockaddr_in*)a;
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    *len = sizeof *v4;
    return inet_pton(AF_INET, text, &v4->sin_addr) == 1 ? 0 : -EINVAL;
  }
  struct sockaddr_in6* v6 = (struct sockaddr_in6*)a;
  v6->sin6_family = AF_INET6;
  v6->sin6_port = htons(port);
  *len = sizeof *v6;
  return inet_pton(AF_INET6, text, &v6->sin6_addr) == 1 ? 0 : -EINVAL;
}

/* Writes into the selected queue. In repair mode the kernel makes one
 * linear buffer of each write, which a big write may not get: halve the
 * chunk on ENOMEM. */
static int fill_queue(int fd, const uint8_t* data, uint32_t len, const char* what, const char** step) {
  uint32_t chunk = 256 * 1024;
  while (len) {
    ssize_t n = send(fd, data, len < chunk ? len : chunk, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && errno == ENOMEM && chunk > 1024) {
      chunk /= 2;
      continue;
    }
    if (n <= 0) {
      if (n == 0) errno = EIO;
      FAIL(what);
    }
    data += n;
    len -= (uint32_t)n;
  }
  return 0;
}

/* A buffer at least `need` bytes beyond what its queue's overhead takes;
 * the *FORCE variants pass wmem_max/rmem_max (CAP_NET_ADMIN). Raised only
 * when the default is too small: a set size stops the kernel's tuning
 * (its lock bit), which tcp.ts ownBufferLocks clears again, to the
 * application's own bits, once the connection is out of repair mode. */
static int make_room(int fd, int force, int name, uint32_t need, const char** step) {
  int have = 0;
  socklen_t len = sizeof have;
  if (getsockopt(fd, SOL_SOCKET, name, &have, &len)) FAIL("reading a buffer size");
  /* Each kernel buffer costs about twice its data (skb overhead): the
   * kernel doubles what is set, and the data needs doubling again. */
  uint64_t want = (uint64_t)need * 2 + 256 * 1024;
  if ((uint64_t)have >= want * 2) return 0;
  int set = want > 0x3fffffff ? 0x3fffffff : (int)want;
  if (setsockopt(fd, SOL_SOCKET, force, &set, sizeof set)) FAIL("raising a buffer size");
  return 0;
}

int tcp_conn_make(const tcp_conn* c, int* out, const char** step) {
  struct sockaddr_storage local, peer;
  socklen_t local_len, peer_len;
  if (sockaddr_of(c->family, c->local, c->local_port, &local, &local_len) ||
      sockaddr_of(c->family, c->peer, c->peer_port, &peer, &peer_len)) {
    *step = "parsing the connection's addresses";
    return -EINVAL;
  }
  int fd = c->has_owner ? peercred_owned_socket(c->family, SOCK_STREAM | SOCK_CLOEXEC, 0, c->owner_uid, c->owner_gid)
                        : socket(c->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) FAIL("socket");
  int rc;
  uint32_t seq;
  /* The application shut its side down: its FIN, which repair mode queues
   * with shutdown(), goes after every byte, so all of them are queued as
   * sent (those never sent go out a retransmission timeout later). */
  int fin_sent = c->state == TCP_FIN_WAIT1 || c->state == TCP_FIN_WAIT2;
  uint32_t sent = fin_sent ? c->send_len : c->send_len - c->unsent;
  uint32_t send_end = fin_sent ? c->send_seq - 1 : c->send_seq;
  /* The peer's FIN counts in rcv_nxt; it is not data, and comes back as a
   * packet once the socket is out of repair mode (tcp_conn_refin). */
  uint32_t recv_end = c->state == TCP_CLOSE_WAIT ? c->recv_seq - 1 : c->recv_seq;
  if ((rc = tcp_repair_set(fd, 1, step))) goto fail;
  int one = 1;
  if (c->reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) {
    *step = "setting SO_REUSEPORT";
    goto fail_errno;
  }
  /* Repair mode lets the bind share the port with a listener (or with a
   * socket of the same port still closing). */
  if (bind(fd, (struct sockaddr*)&local, local_len)) {
    *step = "binding to the connection's local address";
    goto fail_errno;
  }
  /* The queues start where the image's queued bytes begin: writing them
   * below moves each sequence number to where it was. */
  if ((rc = select_queue(fd, TCP_RECV_QUEUE, step))) goto fail;
  seq = recv_end - c->recv_len;
  if (setsockopt(fd, SOL_TCP, TCP_QUEUE_SEQ, &seq, sizeof seq)) {
    *step = "setting the receive sequence number";
    goto fail_errno;
  }
  if ((rc = select_queue(fd, TCP_SEND_QUEUE, step))) goto fail;
  seq = send_end - c->send_len;
  if (setsockopt(fd, SOL_TCP, TCP_QUEUE_SEQ, &seq, sizeof seq)) {
    *step = "setting the send sequence number";
    goto fail_errno;
  }
  /* The segment size the connection sends is worked out when it connects,
   * from the route's MTU and the MSS clamp (TCP_REPAIR_OPTIONS below sets
   * the clamp, but nothing works the size out again): asked for as the
   * program's own MSS (TCP_MAXSEG), the clamp is there then, or the
   * connection would send 536-byte segments for good. The kernel takes no
   * more than 32767 that way (the route bounds it anyway, but on
   * loopback). */
  int asked = c->mss_clamp > 32767 ? 32767 : (int)c->mss_clamp;
  if (asked >= 88 && setsockopt(fd, SOL_TCP, TCP_MAXSEG, &asked, sizeof asked)) {
    *step = "setting TCP_MAXSEG for the handshake";
    goto fail_errno;
  }
  if (connect(fd, (struct sockaddr*)&peer, peer_len)) {
    *step = errno == EADDRNOTAVAIL ? "connecting (the same connection exists on this node: is the original still running?)"
                                   : "connecting in repair mode";
    goto fail_errno;
  }
  struct tcp_repair_opt opts[4];
  int n = 0;
  if (c->options & TCPI_OPT_SACK) opts[n++] = (struct tcp_repair_opt){OPT_SACK_PERM, 0};
  if (c->options & TCPI_OPT_WSCALE) opts[n++] = (struct tcp_repair_opt){OPT_WINDOW, c->snd_wscale + ((uint32_t)c->rcv_wscale << 16)};
  if (c->options & TCPI_OPT_TIMESTAMPS) opts[n++] = (struct tcp_repair_opt){OPT_TIMESTAMP, 0};
  opts[n++] = (struct tcp_repair_opt){OPT_MAXSEG, c->mss_clamp};
  if (setsockopt(fd, SOL_TCP, TCP_REPAIR_OPTIONS, opts, n * sizeof opts[0])) {
    *step = "setting TCP_REPAIR_OPTIONS";
    goto fail_errno;
  }
  /* Connected, the program's own MSS only shapes a later connection of
   * the socket (the kernel does not show it, so the kernel's default). */
  int none = 0;
  if (setsockopt(fd, SOL_TCP, TCP_MAXSEG, &none, sizeof none)) {
    *step = "clearing TCP_MAXSEG";
    goto fail_errno;
  }
  if ((c->options & TCPI_OPT_TIMESTAMPS) && setsockopt(fd, SOL_TCP, TCP_TIMESTAMP, &c->timestamp, sizeof c->timestamp)) {
    *step = "setting TCP_TIMESTAMP";
    goto fail_errno;
  }
  if (c->recv_len > 64 * 1024 && (rc = make_room(fd, SO_RCVBUFFORCE, SO_RCVBUF, c->recv_len, step))) goto fail;
  if (c->send_len > 16 * 1024 && (rc = make_room(fd, SO_SNDBUFFORCE, SO_SNDBUF, c->send_len, step))) goto fail;
  if ((rc = select_queue(fd, TCP_RECV_QUEUE, step))) goto fail;
  if ((rc = fill_queue(fd, c->recv_queue, c->recv_len, "refilling the receive queue", step))) goto fail;
  if ((rc = select_queue(fd, TCP_SEND_QUEUE, step))) goto fail;
  if ((rc = fill_queue(fd, c->send_queue, sent, "refilling the send queue", step))) goto fail;
  /* Queued as sent, like the data before it: the kernel sends it again
   * when its timer runs out, and the peer's acknowledgement takes the
   * socket from FIN_WAIT1 to FIN_WAIT2 if it was there. */
  if (fin_sent && shutdown(fd, SHUT_WR)) {
    *step = "queueing the application's FIN";
    goto fail_errno;
  }
  if ((rc = select_queue(fd, TCP_NO_QUEUE, step))) goto fail;
  if (c->has_window) {
    struct tcp_repair_window w = {c->snd_wl1, c->snd_wnd, c->max_window, c->rcv_wnd, c->rcv_wup};
    /* The kernel refuses a window update point past rcv_nxt: moved back
     * over the FIN, the window's right edge where it was. */
    if ((int32_t)(w.rcv_wup - recv_end) > 0) {
      w.rcv_wnd += w.rcv_wup - recv_end;
      w.rcv_wup = recv_end;
    }
    if (setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &w, sizeof w)) {
      *step = "setting TCP_REPAIR_WINDOW";
      goto fail_errno;
    }
  }
  *out = fd;
  return 0;
fail_errno:
  rc = -errno;
fail:
  close(fd); /* in repair mode: the peer hears nothing */
  return rc;
}

int tcp_conn_release(int fd, const uint8_t* unsent, uint32_t len, const char** step) {
  int rc = tcp_repair_set(fd, 0, step);
  if (rc) return rc;
  return fill_queue(fd, unsent, len, "writing the never-sent bytes", step);
}

int tcp_state(int fd) {
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &len)) return -errno;
  return ti.tcpi_state;
}

/* The ones' complement sum of RFC 1071, over several pieces. */
static uint32_t sum16(uint32_t sum, const void* data, size_t len) {
  const uint8_t* p = data;
  for (; len > 1; p += 2, len -= 2) sum += (uint32_t)(p[0] << 8 | p[1]);
  if (len) sum += (uint32_t)(p[0] << 8);
  return sum;
}

static uint16_t fold(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return htons((uint16_t)~sum);
}

int tcp_conn_refin(const tcp_conn* c, const char** step) {
  struct sockaddr_storage from, to;
  socklen_t from_len, to_len;
  if (sockaddr_of(c->family, c->peer, c->peer_port, &from, &from_len) ||
      sockaddr_of(c->family, c->local, c->local_port, &to, &to_len)) {
    *step = "parsing the connection's addresses";
    return -EINVAL;
  }
  /* The FIN as the peer sent it: at the sequence number it took, acking
   * what the peer had acknowledged, with its window. */
  struct tcphdr th;
  memset(&th, 0, sizeof th);
  th.source = htons(c->peer_port);
  th.dest = htons(c->local_port);
  th.seq = htonl(c->recv_seq - 1);
  th.ack_seq = htonl(c->send_seq - c->send_len);
  th.doff = sizeof th / 4;
  th.fin = 1;
  th.ack = 1;
  uint32_t window = c->snd_wnd >> c->snd_wscale;
  th.window = htons(window > 0xffff ? 0xffff : (uint16_t)window);
  uint8_t packet[sizeof(struct ip6_hdr) + sizeof th];
  size_t ip_len;
  uint32_t sum;
  uint16_t tcp_len = htons(sizeof th);
  uint16_t proto = htons(IPPROTO_TCP);
  if (c->family == AF_INET) {
    struct iphdr ip;
    memset(&ip, 0, sizeof ip);
    ip.version = 4;
    ip.ihl = sizeof ip / 4;
    ip.tot_len = htons(sizeof ip + sizeof th);
    ip.frag_off = htons(IP_DF);
    ip.ttl = 64;
    ip.protocol = IPPROTO_TCP;
    ip.saddr = ((struct sockaddr_in*)&from)->sin_addr.s_addr;
    ip.daddr = ((struct sockaddr_in*)&to)->sin_addr.s_addr;
    sum = sum16(0, &ip.saddr, 8); /* pseudo-header: both addresses... */
    sum = sum16(sum, &proto, 2);  /* ...the protocol, the TCP length */
    sum = sum16(sum, &tcp_len, 2);
    sum = sum16(sum, &th, sizeof th);
    th.check = fold(sum);
    memcpy(packet, &ip, sizeof ip); /* the kernel fills the IP checksum */
    ip_len = sizeof ip;
  } else {
    struct ip6_hdr ip;
    memset(&ip, 0, sizeof ip);
    ip.ip6_flow = htonl(6u << 28);
    ip.ip6_plen = htons(sizeof th);
    ip.ip6_nxt = IPPROTO_TCP;
    ip.ip6_hlim = 64;
    ip.ip6_src = ((struct sockaddr_in6*)&from)->sin6_addr;
    ip.ip6_dst = ((struct sockaddr_in6*)&to)->sin6_addr;
    uint32_t len32 = htonl(sizeof th);
    uint8_t next[4] = {0, 0, 0, IPPROTO_TCP};
    sum = sum16(0, &ip.ip6_src, 32);
    sum = sum16(sum, &len32, 4);
    sum = sum16(sum, next, 4);
    sum = sum16(sum, &th, sizeof th);
    th.check = fold(sum);
    memcpy(packet, &ip, sizeof ip);
    ip_len = sizeof ip;
  }
  memcpy(packet + ip_len, &th, sizeof th);
  /* IPPROTO_RAW: the header is ours (IP_HDRINCL). */
  int raw = socket(c->family, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
  if (raw < 0) FAIL("opening a raw socket to send the peer's FIN again");
  if (c->family == AF_INET6) ((struct sockaddr_in6*)&to)->sin6_port = 0;
  ssize_t n = sendto(raw, packet, ip_len + sizeof th, 0, (struct sockaddr*)&to, to_len);
  int e = errno;
  close(raw);
  if (n < 0) {
    errno = e;
    FAIL("sending the peer's FIN again");
  }
  return 0;
}

int tcp_reset_socket(int family, int* out, const char** step) {
  struct sockaddr_storage a;
  socklen_t alen;
  sockaddr_of(family, family == AF_INET ? "127.0.0.1" : "::1", 0, &a, &alen);
  int l = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (l < 0) FAIL("socket");
  int c = -1, s = -1, rc = 0;
  if (bind(l, (struct sockaddr*)&a, alen) || listen(l, 1) || getsockname(l, (struct sockaddr*)&a, &alen)) {
    *step = "listening on loopback";
    goto fail_errno;
  }
  c = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c < 0 || connect(c, (struct sockaddr*)&a, alen)) {
    *step = "connecting on loopback";
    goto fail_errno;
  }
  s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
  if (s < 0) {
    *step = "accepting on loopback";
    goto fail_errno;
  }
  /* A zero linger makes close() reset the connection. */
  struct linger lg = {1, 0};
  if (setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg)) {
    *step = "setting SO_LINGER";
    goto fail_errno;
  }
  close(s);
  s = -1;
  struct pollfd p = {c, POLLIN, 0};
  if (poll(&p, 1, 2000) <= 0 || !(p.revents & (POLLERR | POLLHUP))) {
    errno = ETIMEDOUT;
    *step = "waiting for the reset";
    goto fail_errno;
  }
  close(l);
  *out = c;
  return 0;
fail_errno:
  rc = -errno;
  if (s >= 0) close(s);
  if (c >= 0) close(c);
  close(l);
  return rc;
}

extern char** environ;

/* ---- the guardian's channel (tcp_repair.h; the guardian itself is
 * addon/guard/appshot_guard.c) ---------------------------------------- */

int tcp_guard_start(const char* binary, int* guard, pid_t* pid, const char** step) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) FAIL("making the channel to the connections' guardian");
  /* Spawned (vfork-like), not forked: the snapshot starts it with the
   * application frozen, and a fork would make each page appshot writes
   * afterwards fault once (its page tables write-protected for the copy).
   * In a session of its own (a Ctrl-C to appshot's terminal is not for
   * it), its end of the channel as descriptor 0 and nothing else. */
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_adddup2(&actions, sv[1], 0);
  posix_spawn_file_actions_addclosefrom_np(&actions, 1);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);
  char* const argv[] = {(char*)"appshot-guard", NULL};
  int rc = posix_spawn(pid, binary, &actions, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(sv[1]);
  if (rc) {
    close(sv[0]);
    errno = rc;
    FAIL("starting the connections' guardian");
  }
  *guard = sv[0];
  return 0;
}

int tcp_guard_add(int guard, int fd, int locked, int reuse, const char** step) {
  tcp_guard_msg m = {TCP_GUARD_ADD, locked, reuse};
  struct iovec iov = {&m, sizeof m};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  memset(&control, 0, sizeof control);
  struct msghdr mh = {0};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = control.buf;
  mh.msg_controllen = sizeof control.buf;
  struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &fd, sizeof fd);
  ssize_t r;
  while ((r = sendmsg(guard, &mh, MSG_NOSIGNAL)) < 0 && errno == EINTR) {
  }
  if (r < 0) FAIL("handing a socket to the connections' guardian");
  return 0;
}

int tcp_guard_disarm(int guard, pid_t pid, const char** step) {
  /* Killed before its channel closes, not told: a DISARM message that
   * could not be sent (no memory for it) would leave the guardian to read
   * the channel's end as appshot's death and let out sockets the image
   * now carries; and a guardian stopped (SIGSTOP, a frozen cgroup) would
   * never read it and hold up the wait below. SIGKILL is neither: it
   * touches nothing. `pid` is our child, not reaped yet, so the number
   * cannot be another process's. Reaped, as a resident engine would
   * otherwise gather them. */
  int killed = kill(pid, SIGKILL);
  int e = errno;
  close(guard);
  while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
  }
  if (killed < 0 && e != ESRCH) {
    errno = e;
    FAIL("disarming the connections' guardian");
  }
  return 0;
}
