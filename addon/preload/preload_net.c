/*
 * TCP ports: an instance of a template asks for the template's fixed port
 * (the virtual one) and really has a port of its own (the system one),
 * bound in the `port` table by appshot before the application runs.
 *
 * bind: an AF_INET or AF_INET6 stream socket bound to a non-zero port that
 * has a virtual -> system mapping is bound to the system port instead.
 * getsockname: an AF_INET/AF_INET6 stream socket's port that has a
 * system -> virtual mapping is shown as the virtual one.
 *
 * An AF_UNIX socket's name is a path, rewritten as paths are (bind,
 * connect, the destinations of sendto, sendmsg and sendmmsg), and shown
 * as the application named it where the kernel answers it (getsockname,
 * getpeername, accept, accept4, recvfrom, recvmsg, recvmmsg):
 * preload_path.c, "Socket names".
 *
 * Not translated: connect() and sendto() to a mapped port (a client inside
 * the instance that connects to its own server's fixed port reaches that
 * port on the node, not the instance's), getpeername(), accept()'s
 * addresses, UDP (the table is of TCP ports), and /proc/net listings.
 */
#include "preload.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

/* Both families keep the port at the same place (sin_port, sin6_port). */
_Static_assert(__builtin_offsetof(struct sockaddr_in, sin_port) ==
                   __builtin_offsetof(struct sockaddr_in6, sin6_port),
               "port offset");
#define PORT_OFF __builtin_offsetof(struct sockaddr_in, sin_port)

/* The shortest AF_INET6 address the kernel takes (no sin6_scope_id). */
#define SIN6_MIN_LEN 24

static int inet_family(const struct sockaddr *a, socklen_t len) {
  return (a->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) ||
         (a->sa_family == AF_INET6 && len >= SIN6_MIN_LEN);
}

static int is_stream(int fd) {
  int type = 0;
  socklen_t tl = sizeof type;
  return SYS5(getsockopt, fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 &&
         type == SOCK_STREAM;
}

/* The port table, or NULL when there is nothing to translate. */
static const struct appshot_header *ports(void) {
  const struct appshot_header *h = g_h;
  if (LIKELY(!h) ||
      !__atomic_load_n(&h->tables[APPSHOT_PORT].live, __ATOMIC_RELAXED))
    return NULL;
  return h;
}

static uint16_t get_port(const void *a) {
  uint16_t p;
  memcpy(&p, (const char *)a + PORT_OFF, sizeof p);
  return ntohs(p);
}

static void set_port(void *a, uint16_t port) {
  uint16_t p = htons(port);
  memcpy((char *)a + PORT_OFF, &p, sizeof p);
}

/* With _GNU_SOURCE, glibc declares the address arguments as transparent
 * unions; the definitions must match. */
API int bind(int fd, __CONST_SOCKADDR_ARG addr_arg, socklen_t len) {
  const struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  /* An AF_UNIX name is a path: preload_path.c. */
  if (UNLIKELY(unix_name_hooked(addr, len))) return unix_bind_slow(fd, addr, len);
  const struct appshot_header *h = ports();
  if (h && addr && inet_family(addr, len)) {
    int32_t sys;
    uint16_t port = get_port(addr);
    if (port && appshot_v2s(h, APPSHOT_PORT, port, &sys) && sys > 0 &&
        sys <= 65535 && is_stream(fd)) {
      struct sockaddr_storage a;
      socklen_t n = len < sizeof a ? len : sizeof a;
      memcpy(&a, addr, n);
      set_port(&a, (uint16_t)sys);
      return (int)libc_ret(SYS3(bind, fd, &a, n));
    }
  }
  return (int)libc_ret(SYS3(bind, fd, addr, len));
}

API int getsockname(int fd, __SOCKADDR_ARG addr_arg,
                    socklen_t *restrict lenp) {
  struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  socklen_t cap = lenp ? *lenp : 0;
  long r = SYS3(getsockname, fd, addr, lenp);
  if (r < 0) return (int)libc_ret(r);
  if (UNLIKELY(unix_answer_hooked(addr, cap, lenp))) {
    unix_name_answered(addr, cap, lenp);
    return 0;
  }
  const struct appshot_header *h = ports();
  /* The kernel filled min(cap, *lenp) bytes: the port must be among them. */
  if (h && addr && cap >= PORT_OFF + 2 && inet_family(addr, *lenp)) {
    int32_t virt;
    uint16_t port = get_port(addr);
    if (port && appshot_s2v(h, APPSHOT_PORT, port, &virt) && virt > 0 &&
        virt <= 65535 && is_stream(fd))
      set_port(addr, (uint16_t)virt);
  }
  return 0;
}

API int getpeername(int fd, __SOCKADDR_ARG addr_arg, socklen_t *restrict lenp) {
  struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  socklen_t cap = answer_room(addr, lenp);
  long r = SYS3(getpeername, fd, addr, lenp);
  if (r == 0 && UNLIKELY(unix_answer_hooked(addr, cap, lenp))) unix_name_answered(addr, cap, lenp);
  return (int)libc_ret(r);
}

/* --- Unix socket names sent to and answered --------------------------------
 *
 * A destination named by an absolute path goes as the path rules name it;
 * a sender's or peer's name comes back as the application named it
 * (preload_path.c, "Socket names"). The blocking calls are glibc's
 * (cancellation points). */

/* SLOW_PATH's window (a /proc/<vpid>/root/... name carries a system PID)
 * stays open across the send. */
static NOINLINE ssize_t sendto_named(int fd, const void *buf, size_t n, int flags,
                                     const struct sockaddr *addr, socklen_t len) {
  char name[UNIX_NAME_MAX + 1];
  /* Unreadable now, or not rewritten: the caller's own address (as
   * unix_bind_slow). */
  if (!unix_name_of(addr, len, name)) return REAL(sendto)(fd, buf, n, flags, addr, len);
  SLOW_PATH(p, AT_FDCWD, name, PATH_READ, -1);
  if (p == name) return REAL(sendto)(fd, buf, n, flags, addr, len);
  struct sockaddr_un a;
  socklen_t al = unix_addr_of(p, &a);
  return al ? REAL(sendto)(fd, buf, n, flags, (struct sockaddr *)&a, al) : -1;
}

API ssize_t sendto(int fd, const void *buf, size_t n, int flags,
                   __CONST_SOCKADDR_ARG addr_arg, socklen_t len) {
  const struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  if (UNLIKELY(unix_dest_hooked(addr, len))) return sendto_named(fd, buf, n, flags, addr, len);
  return REAL(sendto)(fd, buf, n, flags, addr_arg, len);
}

API ssize_t recvfrom(int fd, void *restrict buf, size_t n, int flags,
                     __SOCKADDR_ARG addr_arg, socklen_t *restrict lenp) {
  struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  socklen_t cap = answer_room(addr, lenp);
  ssize_t r = REAL(recvfrom)(fd, buf, n, flags, addr_arg, lenp);
  if (r >= 0 && UNLIKELY(unix_answer_hooked(addr, cap, lenp))) unix_name_answered(addr, cap, lenp);
  return r;
}

API int accept(int fd, __SOCKADDR_ARG addr_arg, socklen_t *restrict lenp) {
  struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  socklen_t cap = answer_room(addr, lenp);
  int r = REAL(accept)(fd, addr_arg, lenp);
  if (r >= 0 && UNLIKELY(unix_answer_hooked(addr, cap, lenp))) unix_name_answered(addr, cap, lenp);
  return r;
}

API int accept4(int fd, __SOCKADDR_ARG addr_arg, socklen_t *restrict lenp, int flags) {
  struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  socklen_t cap = answer_room(addr, lenp);
  int r = REAL(accept4)(fd, addr_arg, lenp, flags);
  if (r >= 0 && UNLIKELY(unix_answer_hooked(addr, cap, lenp))) unix_name_answered(addr, cap, lenp);
  return r;
}

/* The room m's msg_name gives before the call (answer_room): m itself
 * is read, through copy_in, only with rules; 0 for an unreadable one (the
 * kernel fails the call with EFAULT). */
static socklen_t msg_name_room(const struct msghdr *m) {
  if (!g_h || !g_h->instance.redirs || !m) return 0;
  struct msghdr h;
  size_t n = offsetof(struct msghdr, msg_namelen) + sizeof h.msg_namelen;
  long rc = read_in(&h, m, n);
  if (rc == -EFAULT) return 0;
  if (rc < 0) memcpy(&h, m, n); /* the copy refused (seccomp): as before */
  return h.msg_name ? h.msg_namelen : 0;
}

/* A received message's sender, as the application named it. cap: the
 * room msg_namelen gave before the call. */
static inline void sender_answered(struct msghdr *m, socklen_t cap) {
  if (UNLIKELY(unix_answer_hooked(m->msg_name, cap, &m->msg_namelen)))
    unix_name_answered(m->msg_name, cap, &m->msg_namelen);
}

/* --- Credentials: SCM_CREDENTIALS and SO_PEERCRED ---------------------------
 *
 * A unix socket's peer credentials carry a PID. Received (recvmsg and
 * recvmmsg's SCM_CREDENTIALS, getsockopt SO_PEERCRED) it is the system's
 * and is shown as the virtual one, 0 for a process outside the application
 * (as the kernel shows a sender outside the receiver's PID namespace).
 * Sent (sendmsg and sendmmsg with SCM_CREDENTIALS) it is the sender's
 * virtual one, which the kernel checks against the caller's real PID: it
 * is sent as the system one, from a copy of the control data (the caller's
 * may be shared or read-only); a PID the application does not have goes as
 * it is (the kernel refuses it unless the sender is privileged). uid and
 * gid are real ids and stay. SO_PEERPIDFD hands a pidfd: nothing to
 * translate. Through syscall() too. Control data larger than the copy's
 * room (1 KiB, room for a credentials message and some 240 descriptors)
 * fails with ENOBUFS rather than send an untranslated PID. */

/* The credentials message `c` of `m` carries, if its first `need` bytes
 * (the PID's, received; all of it, sent) lie in both the message and the
 * control data: one cut short by MSG_CTRUNC still shows its PID, and a
 * malformed one to send is the kernel's to refuse (EINVAL), never ours to
 * read past the caller's buffer (review33 L7, L11). */
static struct ucred *creds_of(const struct msghdr *m, struct cmsghdr *c, size_t need) {
  return c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS &&
                 c->cmsg_len >= CMSG_LEN(need) &&
                 (const char *)c + CMSG_LEN(need) <= (const char *)m->msg_control + m->msg_controllen
             ? (struct ucred *)CMSG_DATA(c)
             : NULL;
}

static void creds_received(struct msghdr *m) {
  if (!g_h || !m || !m->msg_control || m->msg_controllen < sizeof(struct cmsghdr)) return;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
    struct ucred *u = creds_of(m, c, sizeof(pid_t));
    if (!u) continue;
    pid_t pid;
    memcpy(&pid, &u->pid, sizeof pid); /* CMSG_DATA is only int-aligned */
    if (pid > 0) {
      pid = s2v_or0(APPSHOT_PID, pid);
      memcpy(&u->pid, &pid, sizeof pid);
    }
  }
}

/* Whether m sends credentials whose PID must be translated. */
static int creds_to_send(const struct msghdr *m) {
  if (!g_h || !m || !m->msg_control || m->msg_controllen < sizeof(struct cmsghdr)) return 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR((struct msghdr *)m, c)) {
    struct ucred *u = creds_of(m, c, sizeof(struct ucred));
    pid_t pid;
    if (u && (memcpy(&pid, &u->pid, sizeof pid), pid > 0)) return 1;
  }
  return 0;
}

enum { CREDS_ROOM = 1024 };

/* A copy of *m in *out whose control data, copied into room, carries
 * system PIDs. 0, or an errno. */
static int creds_translated(const struct msghdr *m, struct msghdr *out,
                            char *room) {
  if (m->msg_controllen > CREDS_ROOM) return ENOBUFS;
  *out = *m;
  memcpy(room, m->msg_control, m->msg_controllen);
  out->msg_control = room;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(out); c; c = CMSG_NXTHDR(out, c)) {
    struct ucred *u = creds_of(out, c, sizeof(struct ucred));
    pid_t pid, sys;
    if (!u) continue;
    memcpy(&pid, &u->pid, sizeof pid);
    if (pid > 0 && v2s_pid(pid, &sys)) memcpy(&u->pid, &sys, sizeof sys);
  }
  return 0;
}

/* raw: through syscall(), as a bare system call. */
static NOINLINE ssize_t sendmsg_creds(int fd, const struct msghdr *m, int flags, int raw) {
  ID_WINDOW();
  _Alignas(struct cmsghdr) char room[CREDS_ROOM];
  struct msghdr t;
  int err = creds_translated(m, &t, room);
  if (err) return fail(err);
  if (raw) return libc_ret(SYS3(sendmsg, fd, &t, flags));
  return REAL(sendmsg)(fd, &t, flags);
}

/* Whether m's destination is a unix name the path rules may rewrite. */
static inline int dest_named(const struct msghdr *m) {
  return m && unix_dest_hooked(m->msg_name, m->msg_namelen);
}

/* m sent to its destination as the path rules name it (dest_named),
 * from a copy of the header, its credentials translated too. SLOW_PATH's
 * window stays open across the send, as sendto_named's. */
static NOINLINE ssize_t sendmsg_named(int fd, const struct msghdr *m, int flags, int raw) {
  char name[UNIX_NAME_MAX + 1];
  struct msghdr t = *m;
  /* Unreadable now, or not rewritten: the caller's own address (as
   * unix_bind_slow). */
  if (!unix_name_of(m->msg_name, m->msg_namelen, name)) name[0] = '\0';
  if (name[0]) {
    SLOW_PATH(p, AT_FDCWD, name, PATH_READ, -1);
    struct sockaddr_un a;
    if (p != name) {
      if (!(t.msg_namelen = unix_addr_of(p, &a))) return -1;
      t.msg_name = &a;
    }
    if (creds_to_send(&t)) return sendmsg_creds(fd, &t, flags, raw);
    return raw ? libc_ret(SYS3(sendmsg, fd, &t, flags)) : REAL(sendmsg)(fd, &t, flags);
  }
  if (creds_to_send(&t)) return sendmsg_creds(fd, &t, flags, raw);
  return raw ? libc_ret(SYS3(sendmsg, fd, &t, flags)) : REAL(sendmsg)(fd, &t, flags);
}

API ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
  ensure_init();
  if (UNLIKELY(dest_named(m))) return sendmsg_named(fd, m, flags, 0);
  if (UNLIKELY(creds_to_send(m))) return sendmsg_creds(fd, m, flags, 0);
  return REAL(sendmsg)(fd, m, flags);
}

API ssize_t recvmsg(int fd, struct msghdr *m, int flags) {
  ID_WINDOW();
  ensure_init();
  socklen_t cap = msg_name_room(m);
  ssize_t r = REAL(recvmsg)(fd, m, flags);
  if (r >= 0) {
    creds_received(m);
    sender_answered(m, cap);
  }
  return r;
}

/* The room each of the first n messages gives its sender's name, before
 * the call (a name the kernel answered beyond it was cut): at most 64
 * are shown as the application named them, the rest as the kernel
 * answered (an array of every n's would not be allocation-free). */
enum { MMSG_NAMES = 64 };
static void mmsg_name_room(const struct mmsghdr *v, unsigned int n, socklen_t cap[MMSG_NAMES]) {
  unsigned int k = n < MMSG_NAMES ? n : MMSG_NAMES;
  memset(cap, 0, k * sizeof *cap);
  if (!g_h || !g_h->instance.redirs) return; /* no name shown otherwise */
  /* The headers read as msg_name_room reads one, 8 at a time. */
  struct mmsghdr h[8];
  for (unsigned int i = 0; i < k; i += 8) {
    unsigned int c = k - i < 8 ? k - i : 8;
    long rc = read_in(h, v + i, c * sizeof *h);
    if (rc == -EFAULT) return;
    if (rc < 0) memcpy(h, v + i, c * sizeof *h);
    for (unsigned int j = 0; j < c; j++) cap[i + j] = h[j].msg_hdr.msg_name ? h[j].msg_hdr.msg_namelen : 0;
  }
}
static void mmsg_received(struct mmsghdr *v, long r, const socklen_t cap[MMSG_NAMES]) {
  for (long i = 0; i < r; i++) {
    creds_received(&v[i].msg_hdr);
    if (i < MMSG_NAMES) sender_answered(&v[i].msg_hdr, cap[i]);
  }
}

API int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags,
                 struct timespec *timeout) {
  ID_WINDOW();
  ensure_init();
  socklen_t cap[MMSG_NAMES];
  if (v) mmsg_name_room(v, n, cap);
  int r = REAL(recvmmsg)(fd, v, n, flags, timeout);
  mmsg_received(v, r, cap);
  return r;
}

/* Whether one of the n messages needs more than the kernel's sendmmsg:
 * credentials to translate or a destination to rewrite. */
static int mmsg_to_translate(const struct mmsghdr *v, unsigned int n) {
  for (unsigned int i = 0; v && i < n; i++)
    if (creds_to_send(&v[i].msg_hdr) || dest_named(&v[i].msg_hdr)) return 1;
  return 0;
}

/* One message at a time once one needs translating, as the kernel
 * itself sends them: the count sent so far, or -1 and errno for the first.
 * raw: through syscall(). */
static NOINLINE int sendmmsg_each(int fd, struct mmsghdr *v, unsigned int n, int flags, int raw) {
  unsigned int i;
  for (i = 0; i < n; i++) {
    const struct msghdr *m = &v[i].msg_hdr;
    ssize_t r = dest_named(m)      ? sendmsg_named(fd, m, flags, raw)
                : creds_to_send(m) ? sendmsg_creds(fd, m, flags, raw)
                : raw              ? libc_ret(SYS3(sendmsg, fd, m, flags))
                                   : REAL(sendmsg)(fd, m, flags);
    if (r < 0) return i ? (int)i : -1;
    v[i].msg_len = (unsigned int)r;
  }
  return (int)i;
}

API int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags) {
  ensure_init();
  if (LIKELY(!mmsg_to_translate(v, n))) return REAL(sendmmsg)(fd, v, n, flags);
  return sendmmsg_each(fd, v, n, flags, 0);
}

/* NOINLINE: do_creds_syscall calls it inside its own window (preload.h:
 * an inner window must begin in a deeper frame). */
static NOINLINE long getsockopt_raw(int fd, int level, int name, void *val, socklen_t *lenp) {
  ID_WINDOW();
  long r = SYS5(getsockopt, fd, level, name, val, lenp);
  /* The PID comes first: a buffer cut short still holds it. */
  if (r == 0 && g_h && level == SOL_SOCKET && name == SO_PEERCRED && val &&
      lenp && *lenp >= sizeof(pid_t)) {
    pid_t pid;
    memcpy(&pid, val, sizeof pid);
    if (pid > 0) {
      pid = s2v_or0(APPSHOT_PID, pid);
      memcpy(val, &pid, sizeof pid);
    }
  }
  return r;
}

API int getsockopt(int fd, int level, int name, void *restrict val,
                   socklen_t *restrict lenp) {
  ensure_init();
  return (int)libc_ret(getsockopt_raw(fd, level, name, val, lenp));
}

/* The same calls through syscall(): bare system calls, libc's errors. */
long do_creds_syscall(long nr, long a, long b, long c, long d, long e) {
  ID_WINDOW();
  switch (nr) {
    case SYS_getsockopt:
      return libc_ret(getsockopt_raw((int)a, (int)b, (int)c, (void *)d, (socklen_t *)e));
    case SYS_sendmsg:
      if (dest_named((const struct msghdr *)b))
        return sendmsg_named((int)a, (const struct msghdr *)b, (int)c, 1);
      if (creds_to_send((const struct msghdr *)b))
        return sendmsg_creds((int)a, (const struct msghdr *)b, (int)c, 1);
      break;
    case SYS_sendmmsg:
      if (mmsg_to_translate((struct mmsghdr *)b, (unsigned int)c))
        return sendmmsg_each((int)a, (struct mmsghdr *)b, (unsigned int)c, (int)d, 1);
      break;
    case SYS_recvmsg: {
      struct msghdr *m = (struct msghdr *)b;
      socklen_t cap = msg_name_room(m);
      long r = SYS3(recvmsg, a, b, c);
      if (r >= 0) {
        creds_received(m);
        sender_answered(m, cap);
      }
      return libc_ret(r);
    }
    case SYS_recvmmsg: {
      socklen_t cap[MMSG_NAMES];
      if (b) mmsg_name_room((struct mmsghdr *)b, (unsigned int)c, cap);
      long r = SYS5(recvmmsg, a, b, c, d, e);
      mmsg_received((struct mmsghdr *)b, r, cap);
      return libc_ret(r);
    }
  }
  return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, 0));
}

/* --- Socket options the kernel never shows -----------------------------------
 *
 * A reuseport group's steering program (SO_ATTACH_REUSEPORT_CBPF/EBPF) has
 * no getsockopt, nor does sock_diag or fdinfo show it; an IPv4 multicast
 * interface chosen by index only (IP_MULTICAST_IF with a struct ip_mreqn
 * whose address is 0) reads back as 0.0.0.0, the default; nor do IPv6's
 * sticky IPV6_PKTINFO and IPV6_NEXTHOP, flow label leases, anycast
 * memberships, TCP's MD5 and AO keys, or a socket's IPsec policies show;
 * a UDP socket's IPV6_MTU reads back as the path's MTU. What the program
 * set is noted in the application's tables (appshot_table.h), keyed by the
 * socket's inode, for the snapshot: it carries the multicast interface and
 * the MTU, and refuses the others by name (a note stays once set, even if
 * the program undoes it: refused rather than guessed; cleared IPsec
 * policies and MTU are known, and drop it). Noted after the kernel took
 * the call; a few system calls (fstat, getsockname, getsockopt), no
 * allocation. Through syscall() too; not for static programs or raw
 * system call instructions. A note that finds no room is marked instead
 * (appshot_table.h), and its socket refused. */

#ifndef IPV6_FLOWLABEL_MGR
#define IPV6_FLOWLABEL_MGR 32
#endif
#ifndef TCP_AO_ADD_KEY
#define TCP_AO_ADD_KEY 38
#endif

static void note_sockopt(int fd, int level, int name, const void *val,
                         socklen_t len) {
  struct appshot_header *h = g_h;
  int reuseport_prog = level == SOL_SOCKET &&
                       (name == SO_ATTACH_REUSEPORT_CBPF ||
                        name == SO_ATTACH_REUSEPORT_EBPF);
  int detach = level == SOL_SOCKET && name == SO_DETACH_REUSEPORT_BPF;
  int mcast_if = level == IPPROTO_IP && name == IP_MULTICAST_IF;
  /* The largest fragment a UDP socket sends (getsockopt shows the path's
   * MTU instead); TCP never goes through the path that uses it. */
  int mtu6 = level == IPPROTO_IPV6 && name == IPV6_MTU;
  /* Set only, never shown, and not carried: the snapshot refuses them. */
  int set_only = (level == IPPROTO_IPV6 &&
                  (name == IPV6_PKTINFO || name == IPV6_NEXTHOP ||
                   name == IPV6_2292PKTOPTIONS || name == IPV6_FLOWLABEL_MGR ||
                   name == IPV6_JOIN_ANYCAST)) ||
                 (level == IPPROTO_TCP &&
                  (name == TCP_MD5SIG || name == TCP_MD5SIG_EXT ||
                   name == TCP_AO_ADD_KEY));
  /* A socket's own IPsec policies: no getsockopt. Set with nothing, they
   * are all cleared (known, so the note goes). */
  int ipsec = (level == IPPROTO_IP &&
               (name == IP_IPSEC_POLICY || name == IP_XFRM_POLICY)) ||
              (level == IPPROTO_IPV6 &&
               (name == IPV6_IPSEC_POLICY || name == IPV6_XFRM_POLICY));
  if (LIKELY(!h) || !(reuseport_prog || detach || mcast_if || set_only || mtu6 || ipsec)) return;
  struct stat st;
  if (SYS2(fstat, fd, &st) < 0) return;
  struct sockaddr_storage a;
  socklen_t alen = sizeof a;
  uint16_t port = 0;
  if (SYS3(getsockname, fd, &a, &alen) == 0 &&
      (a.ss_family == AF_INET || a.ss_family == AF_INET6))
    port = get_port(&a);
  int type = 0;
  socklen_t tl = sizeof type;
  if (SYS5(getsockopt, fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0) type = 0;
  uint64_t ino = (uint64_t)st.st_ino;
  if (reuseport_prog || set_only) {
    appshot_note_socket(h, ino, level, name, 0, port, (uint8_t)type);
  } else if (ipsec) {
    if (val || len)
      appshot_note_socket(h, ino, level, name, 0, port, (uint8_t)type);
    else
      appshot_unnote_socket(h, ino, level, name, 0, 0);
  } else if (mtu6) {
    int mtu = 0;
    if (type != SOCK_DGRAM) return;
    if (val && len >= sizeof mtu) memcpy(&mtu, val, sizeof mtu);
    if (mtu > 0)
      appshot_note_socket(h, ino, level, name, mtu, port, (uint8_t)type);
    else
      appshot_unnote_socket(h, ino, level, name, 0, 0);
  } else if (detach) {
    /* The group's program goes, whichever of its sockets detached it. */
    appshot_unnote_socket(h, ino, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, port, (uint8_t)type);
    appshot_unnote_socket(h, ino, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, port, (uint8_t)type);
  } else {
    struct ip_mreqn m;
    int index = 0;
    if (val && len >= sizeof m) {
      memcpy(&m, val, sizeof m);
      index = m.imr_ifindex;
    }
    if (index > 0)
      appshot_note_socket(h, ino, level, name, index, port, (uint8_t)type);
    else
      appshot_unnote_socket(h, ino, level, name, 0, 0);
  }
}

API int setsockopt(int fd, int level, int name, const void *val,
                   socklen_t len) {
  ensure_init();
  long r = SYS5(setsockopt, fd, level, name, val, len);
  if (r == 0) note_sockopt(fd, level, name, val, len);
  return (int)libc_ret(r);
}

long do_setsockopt_syscall(long fd, long level, long name, long val, long len) {
  long r = SYS5(setsockopt, fd, level, name, val, len);
  if (r == 0) note_sockopt((int)fd, (int)level, (int)name, (const void *)val, (socklen_t)len);
  return libc_ret(r);
}
