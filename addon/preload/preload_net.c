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
 * Not translated: connect() and sendto() to a mapped port (a client inside
 * the instance that connects to its own server's fixed port reaches that
 * port on the node, not the instance's), getpeername(), accept()'s
 * addresses, UDP (the table is of TCP ports), and /proc/net listings.
 */
#include "preload.h"

#include <netinet/in.h>
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
