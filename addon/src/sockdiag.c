#define _GNU_SOURCE
#include "sockdiag.h"

#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/netlink_diag.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* The dump changed while it was read (NLM_F_DUMP_INTR on a reply): its
 * answer may miss or repeat sockets. Asked again, this many times at most.
 * inet_diag and unix_diag do not set the flag (as of Linux 6.x they walk
 * their hash tables without a sequence check): this only guards against a
 * kernel that does. Their dumps may still miss or repeat a socket that
 * comes or goes while they are read, and nothing here can tell. */
#define DUMP_INTERRUPTED 1
#define DUMP_TRIES 8

/* Sends one dump request and calls `each` for every reply message; 0, or
 * DUMP_INTERRUPTED if a reply said the dump was not consistent (every
 * message was still handed to `each`), or -errno. */
static int dump(const void* req, size_t len, int (*each)(struct nlmsghdr*, void*), void* ctx) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (fd < 0) return -errno;
  struct sockaddr_nl nl = {.nl_family = AF_NETLINK};
  struct iovec iov = {(void*)req, len};
  struct msghdr msg = {.msg_name = &nl, .msg_namelen = sizeof nl, .msg_iov = &iov, .msg_iovlen = 1};
  if (sendmsg(fd, &msg, 0) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  static __thread char buf[32768] __attribute__((aligned(8)));
  int rc = 0, interrupted = 0;
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      rc = -errno;
      break;
    }
    struct nlmsghdr* h = (struct nlmsghdr*)buf;
    for (; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_flags & NLM_F_DUMP_INTR) interrupted = 1;
      if (h->nlmsg_type == NLMSG_DONE) goto out;
      if (h->nlmsg_type == NLMSG_ERROR) {
        struct nlmsgerr* err = NLMSG_DATA(h);
        rc = err->error ? err->error : -EIO;
        goto out;
      }
      if ((rc = each(h, ctx))) goto out;
      /* The answer to a request for one socket (not a dump) is a single
       * message, with no NLMSG_DONE after it. */
      if (!(h->nlmsg_flags & NLM_F_MULTI)) goto out;
    }
  }
out:
  close(fd);
  return rc ? rc : interrupted ? DUMP_INTERRUPTED : 0;
}

struct grow {
  void* items;
  size_t n, cap, size;
};

static void* push(struct grow* g) {
  if (g->n == g->cap) {
    size_t cap = g->cap ? g->cap * 2 : 64;
    void* p = realloc(g->items, cap * g->size);
    if (!p) return NULL;
    g->items = p;
    g->cap = cap;
  }
  return (char*)g->items + g->size * g->n++;
}

typedef int (*each_fn)(struct nlmsghdr*, void*);

/* One dump request, each reply made an item of g->size bytes by `each`,
 * which is handed g (or the struct g begins): the number of items, *out
 * the array (the caller frees it), or -errno. */
static long collect(const void* req, size_t len, each_fn each, struct grow* g, void** out) {
  int rc = DUMP_INTERRUPTED;
  /* A dump the kernel says was inconsistent (only one that sets
   * NLM_F_DUMP_INTR: see DUMP_INTERRUPTED) has its items dropped and is
   * asked again: a socket missed or seen twice would be a connection not
   * counted, or a peer not found. Tables that keep changing under every
   * try: -EAGAIN. */
  for (int i = 0; i < DUMP_TRIES && rc == DUMP_INTERRUPTED; i++) {
    g->n = 0;
    rc = dump(req, len, each, g);
  }
  if (rc) {
    free(g->items);
    return rc == DUMP_INTERRUPTED ? -EAGAIN : rc;
  }
  *out = g->items;
  return (long)g->n;
}

/* A dump request for the sockets of one IP protocol and family in
 * `states` (a bit per TCP state). */
struct inet_dump {
  struct nlmsghdr h;
  struct inet_diag_req_v2 r;
};

static struct inet_dump inet_dump_of(int family, int protocol, uint32_t states) {
  struct inet_dump req = {0};
  req.h.nlmsg_len = sizeof req;
  req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  req.r.sdiag_family = (uint8_t)family;
  req.r.sdiag_protocol = (uint8_t)protocol;
  req.r.idiag_states = states;
  return req;
}

static long inet_all(int family, int protocol, uint32_t states, each_fn each, size_t size, void** out) {
  struct inet_dump req = inet_dump_of(family, protocol, states);
  return collect(&req, sizeof req, each, &(struct grow){NULL, 0, 0, size}, out);
}

static int each_unix(struct nlmsghdr* h, void* ctx) {
  struct unix_diag_msg* m = NLMSG_DATA(h);
  sockdiag_unix* u = push(ctx);
  if (!u) return -ENOMEM;
  memset(u, 0, sizeof *u);
  u->ino = m->udiag_ino;
  u->type = m->udiag_type;
  u->state = m->udiag_state;
  int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
  for (struct rtattr* a = (struct rtattr*)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    if (a->rta_type == UNIX_DIAG_PEER) {
      u->peer = *(uint32_t*)RTA_DATA(a);
    } else if (a->rta_type == UNIX_DIAG_RQLEN) {
      struct unix_diag_rqlen* q = RTA_DATA(a);
      u->rqueue = q->udiag_rqueue;
      u->wqueue = q->udiag_wqueue;
    } else if (a->rta_type == UNIX_DIAG_SHUTDOWN) {
      u->shutdown = *(uint8_t*)RTA_DATA(a);
    } else if (a->rta_type == UNIX_DIAG_VFS) {
      struct unix_diag_vfs* v = RTA_DATA(a);
      u->vfs_ino = v->udiag_vfs_ino;
      u->vfs_dev = makedev(v->udiag_vfs_dev >> 20, v->udiag_vfs_dev & 0xfffff);
    }
  }
  return 0;
}

/* A request for every unix socket, or (ino != 0) for that one alone. */
struct unix_request {
  struct nlmsghdr h;
  struct unix_diag_req r;
};

static struct unix_request unix_request_of(uint32_t ino) {
  struct unix_request req = {0};
  req.h.nlmsg_len = sizeof req;
  req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  req.h.nlmsg_flags = NLM_F_REQUEST | (ino ? 0 : NLM_F_DUMP);
  req.r.sdiag_family = AF_UNIX;
  req.r.udiag_states = ~0u;
  req.r.udiag_ino = ino;
  req.r.udiag_cookie[0] = req.r.udiag_cookie[1] = ~0u; /* INET_DIAG_NOCOOKIE: not checked */
  req.r.udiag_show = UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_VFS;
  return req;
}

long sockdiag_unix_all(sockdiag_unix** out) {
  struct unix_request req = unix_request_of(0);
  return collect(&req, sizeof req, each_unix, &(struct grow){NULL, 0, 0, sizeof(sockdiag_unix)}, (void**)out);
}

int sockdiag_unix_one(uint32_t ino, sockdiag_unix* out) {
  struct unix_request req = unix_request_of(ino);
  sockdiag_unix* got = NULL;
  long n = collect(&req, sizeof req, each_unix, &(struct grow){NULL, 0, 0, sizeof(sockdiag_unix)}, (void**)&got);
  if (n < 0) return (int)n;
  if (n > 0) *out = got[0];
  free(got);
  return n > 0 ? 0 : -ENOENT;
}

static int each_udp(struct nlmsghdr* h, void* ctx) {
  struct inet_diag_msg* m = NLMSG_DATA(h);
  sockdiag_udp* u = push(ctx);
  if (!u) return -ENOMEM;
  u->ino = m->idiag_inode;
  u->shutdown = 0;
  int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
  for (struct rtattr* a = (struct rtattr*)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len))
    if (a->rta_type == INET_DIAG_SHUTDOWN) u->shutdown = *(uint8_t*)RTA_DATA(a);
  return 0;
}

long sockdiag_udp_all(int family, sockdiag_udp** out) {
  return inet_all(family, IPPROTO_UDP, ~0u, each_udp, sizeof(sockdiag_udp), (void**)out);
}

struct listening_ctx {
  struct grow g;
  uint16_t port; /* network byte order */
  /* The local address too, unless NULL (any): 4 bytes (AF_INET) or 16. */
  const uint8_t* local;
  size_t local_len;
};

/* collect, for the TCP sockets in `states` whose local port is `port`
 * and, if `local` is given, whose local address is that (the callback
 * skips the others: on_port). */
static long tcp_on_port(int family, uint32_t states, uint16_t port, const uint8_t* local, each_fn each, size_t size, void** out) {
  struct inet_dump req = inet_dump_of(family, IPPROTO_TCP, states);
  struct listening_ctx c = {{NULL, 0, 0, size}, htons(port), local, family == AF_INET ? 4 : 16};
  return collect(&req, sizeof req, each, &c.g, out);
}

static int on_port(const struct listening_ctx* c, const struct inet_diag_msg* m) {
  if (m->id.idiag_sport != c->port) return 0;
  return !c->local || memcmp(m->id.idiag_src, c->local, c->local_len) == 0;
}

static int each_listening(struct nlmsghdr* h, void* ctx) {
  struct listening_ctx* c = ctx;
  struct inet_diag_msg* m = NLMSG_DATA(h);
  if (!on_port(c, m)) return 0;
  sockdiag_tcp_listener* l = push(&c->g);
  if (!l) return -ENOMEM;
  memset(l, 0, sizeof *l);
  l->ino = m->idiag_inode;
  l->uid = m->idiag_uid;
  memcpy(l->local, m->id.idiag_src, 16);
  l->v6only = -1;
  /* Sent for every AF_INET6 socket listening or closed (inet_diag_msg_attrs_fill). */
  int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
  for (struct rtattr* a = (struct rtattr*)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len))
    if (a->rta_type == INET_DIAG_SKV6ONLY && RTA_PAYLOAD(a) >= 1) l->v6only = *(uint8_t*)RTA_DATA(a) ? 1 : 0;
  return 0;
}

long sockdiag_tcp_listening(int family, uint16_t port, sockdiag_tcp_listener** out) {
  /* TCP_LISTEN alone: only the listening hash is walked. */
  return tcp_on_port(family, 1u << 10, port, NULL, each_listening, sizeof(sockdiag_tcp_listener), (void**)out);
}

static int each_established(struct nlmsghdr* h, void* ctx) {
  struct listening_ctx* c = ctx;
  struct inet_diag_msg* m = NLMSG_DATA(h);
  if (!on_port(c, m)) return 0;
  sockdiag_tcp_conn* t = push(&c->g);
  if (!t) return -ENOMEM;
  memset(t, 0, sizeof *t);
  t->ino = m->idiag_inode;
  t->family = m->idiag_family;
  memcpy(t->remote, m->id.idiag_dst, 16);
  t->rport = ntohs(m->id.idiag_dport);
  return 0;
}

long sockdiag_tcp_established(int family, uint16_t port, const uint8_t* local, sockdiag_tcp_conn** out) {
  /* TCP_ESTABLISHED alone (1 << 1). */
  return tcp_on_port(family, 1u << 1, port, local, each_established, sizeof(sockdiag_tcp_conn), (void**)out);
}

static int each_netlink(struct nlmsghdr* h, void* ctx) {
  struct netlink_diag_msg* m = NLMSG_DATA(h);
  sockdiag_netlink* s = push(ctx);
  if (!s) return -ENOMEM;
  memset(s, 0, sizeof *s);
  s->ino = m->ndiag_ino;
  s->portid = m->ndiag_portid;
  s->dst_portid = m->ndiag_dst_portid;
  s->dst_group = m->ndiag_dst_group;
  s->protocol = m->ndiag_protocol;
  s->type = m->ndiag_type;
  s->state = m->ndiag_state;
  int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
  for (struct rtattr* a = (struct rtattr*)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    if (a->rta_type == NETLINK_DIAG_FLAGS) {
      s->flags = *(uint32_t*)RTA_DATA(a);
    } else if (a->rta_type == NETLINK_DIAG_MEMINFO) {
      uint32_t* mem = RTA_DATA(a);
      size_t words = RTA_PAYLOAD(a) / sizeof(uint32_t);
      if (words > SK_MEMINFO_RMEM_ALLOC) s->rmem = mem[SK_MEMINFO_RMEM_ALLOC];
      if (words > SK_MEMINFO_WMEM_ALLOC) s->wmem = mem[SK_MEMINFO_WMEM_ALLOC];
      if (words > SK_MEMINFO_DROPS) s->drops = mem[SK_MEMINFO_DROPS];
    } else if (a->rta_type == NETLINK_DIAG_GROUPS && RTA_PAYLOAD(a) >= sizeof(unsigned long)) {
      /* Shown only for a socket that joined some group once (its bitmap
       * is allocated then): as many longs as the protocol's groups need. */
      size_t bytes = RTA_PAYLOAD(a) & ~(sizeof(unsigned long) - 1);
      s->groups = malloc(bytes);
      if (!s->groups) return -ENOMEM;
      memcpy(s->groups, RTA_DATA(a), bytes);
      s->ngroups = (uint32_t)(bytes * 8);
    }
  }
  return 0;
}

void sockdiag_netlink_free(sockdiag_netlink* all, long n) {
  for (long i = 0; i < n; i++) free(all[i].groups);
  free(all);
}

long sockdiag_netlink_all(sockdiag_netlink** out) {
  struct {
    struct nlmsghdr h;
    struct netlink_diag_req r;
  } req = {0};
  req.h.nlmsg_len = sizeof req;
  req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  req.r.sdiag_family = AF_NETLINK;
  req.r.sdiag_protocol = NDIAG_PROTO_ALL;
  req.r.ndiag_show = NDIAG_SHOW_GROUPS | NDIAG_SHOW_FLAGS | NDIAG_SHOW_MEMINFO;
  struct grow g = {NULL, 0, 0, sizeof(sockdiag_netlink)};
  /* (collect asks again after an inconsistent dump: netlink_diag does not
   * say so either, it walks the hash under its lock once per answer.) */
  long n = collect(&req, sizeof req, each_netlink, &g, (void**)out);
  return n;
}
