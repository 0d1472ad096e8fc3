#define _GNU_SOURCE
#include "dgram.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "sockfile.h"

/* The address a datagram was sent to, as the socket names it: an IPv4
 * one on an IPv6 socket as ::ffff:a.b.c.d. */
static void to_v4(dgram_msg* m, sa_family_t family, struct in_addr a) {
  if (family == AF_INET6) {
    struct sockaddr_in6* t = (void*)&m->to;
    t->sin6_family = AF_INET6;
    t->sin6_addr.s6_addr[10] = t->sin6_addr.s6_addr[11] = 0xff;
    memcpy(&t->sin6_addr.s6_addr[12], &a, 4);
    m->to_len = sizeof *t;
  } else {
    struct sockaddr_in* t = (void*)&m->to;
    t->sin_family = AF_INET;
    t->sin_addr = a;
    m->to_len = sizeof *t;
  }
}

static void to_v6(dgram_msg* m, const struct in6_addr* a) {
  struct sockaddr_in6* t = (void*)&m->to;
  t->sin6_family = AF_INET6;
  t->sin6_addr = *a;
  m->to_len = sizeof *t;
}

/* The IP header fields a peeked message's control data shows (dgram_msg):
 * where it was sent (IP_PKTINFO, IP_RECVORIGDSTADDR and their IPv6 twins, RFC 2292's names
 * too), its TOS or traffic class, its TTL or hop limit (-1: not shown). */
static void header_fields(struct msghdr* mh, sa_family_t family, dgram_msg* m) {
  memset(&m->to, 0, sizeof m->to);
  m->to_len = 0;
  m->tos = m->ttl = -1;
  if (!mh->msg_control) return;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
    size_t len = c->cmsg_len - CMSG_LEN(0);
    const unsigned char* d = CMSG_DATA(c);
    int ip = c->cmsg_level == IPPROTO_IP, ip6 = c->cmsg_level == IPPROTO_IPV6;
    if (ip && c->cmsg_type == IP_PKTINFO && len >= sizeof(struct in_pktinfo)) {
      struct in_pktinfo pi;
      memcpy(&pi, d, sizeof pi);
      to_v4(m, family, pi.ipi_addr);
    } else if (ip && c->cmsg_type == IP_ORIGDSTADDR && len >= sizeof(struct sockaddr_in)) {
      /* A sockaddr, whose port is the socket's own: a restore sends there. */
      struct sockaddr_in o;
      memcpy(&o, d, sizeof o);
      to_v4(m, family, o.sin_addr);
    } else if (ip6 && (c->cmsg_type == IPV6_PKTINFO || c->cmsg_type == IPV6_2292PKTINFO) && len >= sizeof(struct in6_pktinfo)) {
      struct in6_pktinfo pi;
      memcpy(&pi, d, sizeof pi);
      to_v6(m, &pi.ipi6_addr);
    } else if (ip6 && c->cmsg_type == IPV6_ORIGDSTADDR && len >= sizeof(struct sockaddr_in6)) {
      struct sockaddr_in6 o;
      memcpy(&o, d, sizeof o);
      to_v6(m, &o.sin6_addr);
    } else if (ip && c->cmsg_type == IP_TOS && len >= 1) {
      m->tos = d[0];
    } else if (ip6 && c->cmsg_type == IPV6_TCLASS && len >= sizeof(int)) {
      memcpy(&m->tos, d, sizeof(int));
    } else if (((ip && c->cmsg_type == IP_TTL) || (ip6 && (c->cmsg_type == IPV6_HOPLIMIT || c->cmsg_type == IPV6_2292HOPLIMIT))) && len >= sizeof(int)) {
      memcpy(&m->ttl, d, sizeof(int));
    }
  }
}

void dgram_free(dgram_msg* msgs, long n) {
  for (long i = 0; i < n; i++) free(msgs[i].data);
  free(msgs);
}

/* The sender's credentials a unix message's control data shows; any
 * descriptor it carried (SCM_RIGHTS, SCM_PIDFD) closed. */
static void unix_fields(struct msghdr* mh, dgram_msg* m) {
  m->has_creds = 0;
  if (!mh->msg_control) return;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    size_t len = c->cmsg_len - CMSG_LEN(0);
    if (c->cmsg_type == SCM_CREDENTIALS && len >= sizeof(struct ucred)) {
      memcpy(&m->creds, CMSG_DATA(c), sizeof m->creds);
      m->has_creds = 1;
    } else if (c->cmsg_type == SCM_RIGHTS || c->cmsg_type == 0x04 /* SCM_PIDFD */) {
      for (size_t i = 0; i + sizeof(int) <= len; i += sizeof(int)) {
        int got;
        memcpy(&got, CMSG_DATA(c) + i, sizeof got);
        close(got);
      }
    }
  }
}

int dgram_send_creds(int fd, const void* data, size_t len, const struct sockaddr* to, socklen_t to_len, const struct ucred* creds) {
  union {
    struct cmsghdr align;
    unsigned char bytes[CMSG_SPACE(sizeof(struct ucred))];
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = {(void*)data, len};
  struct msghdr mh = {.msg_name = (void*)to, .msg_namelen = to ? to_len : 0, .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
  struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_CREDENTIALS;
  c->cmsg_len = CMSG_LEN(sizeof(struct ucred));
  memcpy(CMSG_DATA(c), creds, sizeof *creds);
  ssize_t n = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n < 0) return -errno;
  return (size_t)n == len ? 0 : -EMSGSIZE;
}

long dgram_queue(int fd, size_t max_count, size_t max_total, size_t max_one, int shut_for_reading, int creds, dgram_msg** out) {
  /* A pending error (sk_err: a connected UDP socket's ICMP port
   * unreachable, a seqpacket whose peer closed on unread data) is what a
   * peek would answer first, and answering consumes it: the application's
   * next call would no longer see it. The error queue (IP_RECVERR,
   * MSG_ZEROCOPY completions) shows the same way. poll() shows either
   * without touching it. */
  struct pollfd pf = {.fd = fd, .events = 0};
  if (poll(&pf, 1, 0) < 0) return -errno;
  if (pf.revents & POLLERR) return DGRAM_ERROR_PENDING;
  int saved = -1;
  socklen_t sl = sizeof saved;
  if (getsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, &sl)) return -errno;
  int zero = 0;
  if (setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof zero)) return -errno;
  /* An IP socket's messages come with the header fields it asked to see;
   * a unix socket's are read without room for any (a peek with room would
   * install descriptors sent with SCM_RIGHTS into this process). */
  struct sockaddr_storage own;
  socklen_t own_len = sizeof own;
  int ip = getsockname(fd, (struct sockaddr*)&own, &own_len) == 0 && (own.ss_family == AF_INET || own.ss_family == AF_INET6);
  size_t cap = 0, n = 0, total = 0;
  dgram_msg* msgs = NULL;
  unsigned char* buf = malloc(max_one + 1);
  long rc = buf ? 0 : -ENOMEM;
  while (rc == 0) {
    struct sockaddr_storage from;
    struct iovec iov = {buf, max_one + 1};
    union {
      struct cmsghdr align;
      unsigned char bytes[512];
    } control;
    struct msghdr mh = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1};
    if (ip || creds) {
      mh.msg_control = control.bytes;
      mh.msg_controllen = sizeof control.bytes;
    }
    ssize_t got = recvmsg(fd, &mh, MSG_PEEK | MSG_DONTWAIT | (ip ? 0 : MSG_CMSG_CLOEXEC));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) rc = -errno;
      break;
    }
    /* Read (its descriptors closed) before anything may end the walk. */
    dgram_msg seen;
    if (ip) seen.has_creds = 0;
    else unix_fields(&mh, &seen);
    if (got == 0 && shut_for_reading) break;
    if ((size_t)got > max_one || (mh.msg_flags & MSG_TRUNC)) {
      rc = -EMSGSIZE;
      break;
    }
    if (n == max_count || total + (size_t)got > max_total) {
      rc = -E2BIG;
      break;
    }
    if (n == cap) {
      size_t ncap = cap ? cap * 2 : 16;
      dgram_msg* p = realloc(msgs, ncap * sizeof *p);
      if (!p) {
        rc = -ENOMEM;
        break;
      }
      msgs = p;
      cap = ncap;
    }
    dgram_msg* m = &msgs[n];
    m->data = malloc(got ? (size_t)got : 1);
    if (!m->data) {
      rc = -ENOMEM;
      break;
    }
    memcpy(m->data, buf, (size_t)got);
    m->len = (size_t)got;
    memcpy(&m->from, &from, sizeof from);
    m->from_len = mh.msg_namelen > sizeof from ? sizeof from : mh.msg_namelen;
    header_fields(&mh, own.ss_family, m);
    m->has_creds = seen.has_creds;
    m->creds = seen.creds;
    n++;
    total += (size_t)got;
  }
  free(buf);
  /* The application's own peek offset (usually off: -1) comes back. */
  setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, sizeof saved);
  if (rc < 0) {
    dgram_free(msgs, (long)n);
    return rc;
  }
  *out = msgs;
  return (long)n;
}

static uint32_t sum16(const void* p, size_t len, uint32_t acc) {
  const unsigned char* b = p;
  for (size_t i = 0; i + 1 < len; i += 2) acc += (uint32_t)(b[i] << 8 | b[i + 1]);
  if (len & 1) acc += (uint32_t)(b[len - 1] << 8);
  return acc;
}

static uint16_t fold(uint32_t acc) {
  while (acc >> 16) acc = (acc & 0xffff) + (acc >> 16);
  uint16_t c = (uint16_t)~acc;
  return c ? c : 0xffff;
}

int udp_inject(const struct sockaddr* from, const struct sockaddr* to, const void* data, size_t len, int tos, int ttl) {
  if (from->sa_family != to->sa_family) return -EAFNOSUPPORT;
  if (tos < 0 || tos > 255 || ttl < 1 || ttl > 255) return -EINVAL;
  if (len > 65507) return -EMSGSIZE;
  size_t ulen = sizeof(struct udphdr) + len;
  unsigned char* pkt = calloc(1, 40 + ulen);
  if (!pkt) return -ENOMEM;
  int fd = -1, rc = 0;
  ssize_t sent;
  if (from->sa_family == AF_INET) {
    const struct sockaddr_in* f = (const void*)from;
    const struct sockaddr_in* t = (const void*)to;
    struct iphdr* ip = (void*)pkt;
    ip->version = 4;
    ip->ihl = 5;
    /* The whole TOS byte, its ECN bits too: a header of our own is sent as
     * it is (IP_HDRINCL), and loopback delivery keeps TOS and TTL. */
    ip->tos = (uint8_t)tos;
    ip->ttl = (uint8_t)ttl;
    ip->protocol = IPPROTO_UDP;
    ip->saddr = f->sin_addr.s_addr;
    ip->daddr = t->sin_addr.s_addr;
    ip->tot_len = htons((uint16_t)(20 + ulen)); /* the kernel fills id and checksum */
    struct udphdr* u = (void*)(pkt + 20);
    u->source = f->sin_port;
    u->dest = t->sin_port;
    u->len = htons((uint16_t)ulen);
    memcpy(u + 1, data, len);
    uint32_t acc = sum16(&ip->saddr, 8, 0) + IPPROTO_UDP + (uint32_t)ulen;
    u->check = htons(fold(sum16(u, ulen, acc)));
    fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW); /* IP_HDRINCL implied */
    if (fd < 0) {
      rc = -errno;
      goto out;
    }
    struct sockaddr_in dst = *t;
    dst.sin_port = 0;
    sent = sendto(fd, pkt, 20 + ulen, 0, (void*)&dst, sizeof dst);
  } else if (from->sa_family == AF_INET6) {
    const struct sockaddr_in6* f = (const void*)from;
    const struct sockaddr_in6* t = (const void*)to;
    unsigned char* ip = pkt;
    ip[0] = (unsigned char)(0x60 | (tos >> 4)); /* version 6, traffic class, flow label 0 */
    ip[1] = (unsigned char)((tos & 0xf) << 4);
    ip[4] = (unsigned char)(ulen >> 8);
    ip[5] = (unsigned char)ulen;
    ip[6] = IPPROTO_UDP;
    ip[7] = (unsigned char)ttl;
    memcpy(ip + 8, &f->sin6_addr, 16);
    memcpy(ip + 24, &t->sin6_addr, 16);
    struct udphdr* u = (void*)(pkt + 40);
    u->source = f->sin6_port;
    u->dest = t->sin6_port;
    u->len = htons((uint16_t)ulen);
    memcpy(u + 1, data, len);
    uint32_t acc = sum16(ip + 8, 32, 0) + IPPROTO_UDP + (uint32_t)ulen;
    u->check = htons(fold(sum16(u, ulen, acc)));
    fd = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW); /* the header is ours */
    if (fd < 0) {
      rc = -errno;
      goto out;
    }
    struct sockaddr_in6 dst = *t;
    dst.sin6_port = 0;
    sent = sendto(fd, pkt, 40 + ulen, 0, (void*)&dst, sizeof dst);
  } else {
    rc = -EAFNOSUPPORT;
    goto out;
  }
  if (sent < 0) rc = -errno;
out:
  if (fd >= 0) close(fd);
  free(pkt);
  return rc;
}

struct in_dir_call {
  int (*op)(int, const struct sockaddr*, socklen_t);
  int fd;
  const struct sockaddr* addr;
  socklen_t len;
};

static int in_dir_op(void* arg) {
  struct in_dir_call* c = arg;
  /* A unix name, in a retry as another identity than the holder's: not
   * reached through a symlink (fsident.c). */
  const struct sockaddr_un* u = (const struct sockaddr_un*)c->addr;
  size_t off = offsetof(struct sockaddr_un, sun_path);
  if (fsident_strict() && u->sun_family == AF_UNIX && c->len > off && u->sun_path[0]) {
    char path[sizeof u->sun_path + 1];
    size_t n = c->len - off < sizeof u->sun_path ? c->len - off : sizeof u->sun_path;
    memcpy(path, u->sun_path, n);
    path[n] = 0;
    int rc = fsident_plain_path(path, c->op == connect);
    if (rc) return rc;
  }
  return c->op(c->fd, c->addr, c->len) == 0 ? 0 : -errno;
}

/* `op` (bind or connect) as `who` (fsident.c), a relative unix name
 * resolved in `dir`. */
static int in_dir(int (*op)(int, const struct sockaddr*, socklen_t), int fd, const struct sockaddr* addr,
                  socklen_t len, const char* dir, const struct fsident_list* who) {
  struct in_dir_call c = {op, fd, addr, len};
  return fsident_run(who, dir, in_dir_op, &c);
}

int bind_in(int fd, const struct sockaddr* addr, socklen_t len, const char* dir, const struct fsident_list* who) {
  return in_dir(bind, fd, addr, len, dir, who);
}

int connect_in(int fd, const struct sockaddr* addr, socklen_t len, const char* dir, const struct fsident_list* who) {
  return in_dir(connect, fd, addr, len, dir, who);
}

/* statfs(2)'s f_type of an overlay (linux/magic.h). */
#define OVERLAYFS_MAGIC_TYPE 0x794c7630UL

struct socket_file_call {
  const char* dir;
  const char* name;
  const struct sockfile_id* id;
  int fd;
};

static int socket_file_op(void* arg) {
  struct socket_file_call* c = arg;
  int d = fsident_open(c->dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
  if (d < 0) return d;
  /* The entry itself: a symlink there is opened as a symlink (and is
   * not the file), never followed. */
  int f = openat(d, c->name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  int rc = f < 0 ? -errno : 0;
  struct stat st;
  if (!rc && fstat(f, &st) != 0) rc = -errno;
  /* The file by its inode, as sockfile.c tells it: sock_diag's inode
   * number is 32 bits wide, and on an overlay whose layers are other
   * file systems its device is the overlay's, which the directory
   * shows, where a non-directory's stat shows its layer's. */
  if (!rc) {
    int same = S_ISSOCK(st.st_mode) && (uint32_t)st.st_ino == (uint32_t)c->id->ino;
    if (same && st.st_dev != c->id->dev) {
      struct statfs fs;
      struct stat ds;
      same = fstatfs(d, &fs) == 0 && (unsigned long)fs.f_type == OVERLAYFS_MAGIC_TYPE && fstat(d, &ds) == 0 && ds.st_dev == c->id->dev;
    }
    if (!same) rc = -ESTALE;
  }
  close(d);
  if (rc) {
    if (f >= 0) close(f);
    return rc;
  }
  c->fd = f;
  return 0;
}

int dgram_socket_file_open(int sock, const char* dir, const char* name, const struct fsident_list* who) {
  struct sockfile_id id;
  int rc = sockfile_of(sock, &id);
  if (rc) return rc;
  struct socket_file_call c = {dir, name, &id, -1};
  rc = fsident_run(who, NULL, socket_file_op, &c);
  /* socket_file_op keeps a descriptor only when it returns 0. */
  return rc ? rc : c.fd;
}
