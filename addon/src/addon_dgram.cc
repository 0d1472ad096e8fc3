// Datagram and record sockets (dgram.c, sockdiag.c), for
// src/resources/unixdgram.ts and src/resources/udp.ts. Addresses cross as
// Buffers holding the raw struct sockaddr, which the TypeScript side reads
// and writes (src/resources/sockaddr.ts).
#include <napi.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>

#include <arpa/inet.h>
#include <linux/audit.h>
#include <linux/netlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <vector>

#include "addon.h"
#include "addon_fsident.h"

extern "C" {
#include "dgram.h"
#include "sockdiag.h"
#include "sockfile.h"
#include "exename.h"
}

namespace appshot {
namespace {


Napi::Value Addr(const Napi::Env& env, const void* a, socklen_t len) {
  return Napi::Buffer<uint8_t>::Copy(env, static_cast<const uint8_t*>(a), len);
}

// sockName(fd) -> Buffer: getsockname's address.
Napi::Value SockName(const Napi::CallbackInfo& info) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  if (getsockname(Int(info[0]), reinterpret_cast<sockaddr*>(&a), &len)) {
    ThrowErrno(info.Env(), "getsockname", errno);
    return info.Env().Undefined();
  }
  return Addr(info.Env(), &a, len);
}

// peerName(fd) -> Buffer, or null when the socket is not connected.
Napi::Value PeerName(const Napi::CallbackInfo& info) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  if (getpeername(Int(info[0]), reinterpret_cast<sockaddr*>(&a), &len)) {
    if (errno == ENOTCONN) return info.Env().Null();
    ThrowErrno(info.Env(), "getpeername", errno);
    return info.Env().Undefined();
  }
  return Addr(info.Env(), &a, len);
}

// sockOpen(family, type, protocol = 0, owner?) -> fd, close-on-exec;
// owner {uid, gid}: made with that fsuid and fsgid (peercred.c).
Napi::Value SockOpen(const Napi::CallbackInfo& info) {
  int protocol = info.Length() > 2 && info[2].IsNumber() ? Int(info[2]) : 0;
  int fd = OwnedSocket(info.Length() > 3 ? info[3] : info.Env().Undefined(), Int(info[0]), Int(info[1]) | SOCK_CLOEXEC, protocol);
  if (fd < 0) {
    ThrowErrno(info.Env(), "socket", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fd);
}

// sockBind(fd, addr), sockConnect(fd, addr)
// sockBind(fd, addr, dir?, who?): a relative unix name is resolved in
// `dir`; a path name as `who` (fsident.c).
Napi::Value SockBind(const Napi::CallbackInfo& info) {
  auto a = info[1].As<Napi::Buffer<uint8_t>>();
  std::string dir = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "";
  FsIdentArg who(info.Env(), info[3]);
  if (who.failed()) return info.Env().Undefined();
  int rc = bind_in(Int(info[0]), reinterpret_cast<sockaddr*>(a.Data()), static_cast<socklen_t>(a.Length()), dir.c_str(), who.get());
  if (rc) ThrowErrno(info.Env(), "bind", -rc);
  return info.Env().Undefined();
}

// sockConnect(fd, addr, dir?, who?): a relative unix name is resolved in
// `dir`; a path name as `who` (fsident.c).
Napi::Value SockConnect(const Napi::CallbackInfo& info) {
  auto a = info[1].As<Napi::Buffer<uint8_t>>();
  std::string dir = info.Length() > 2 && info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : "";
  FsIdentArg who(info.Env(), info[3]);
  if (who.failed()) return info.Env().Undefined();
  int rc = connect_in(Int(info[0]), reinterpret_cast<sockaddr*>(a.Data()), static_cast<socklen_t>(a.Length()), dir.c_str(), who.get());
  if (rc) ThrowErrno(info.Env(), "connect", -rc);
  return info.Env().Undefined();
}

// --- A unix socket's file (sockfile.c)

Napi::Value FileId(const Napi::Env& env, const sockfile_id& id) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ino", Napi::Number::New(env, static_cast<double>(id.ino)));
  o.Set("dev", Napi::Number::New(env, static_cast<double>(id.dev)));
  return o;
}

sockfile_id ToFileId(const Napi::Value& v) {
  auto o = v.As<Napi::Object>();
  return {static_cast<uint64_t>(o.Get("ino").As<Napi::Number>().DoubleValue()),
          static_cast<dev_t>(o.Get("dev").As<Napi::Number>().DoubleValue())};
}

std::string Str(const Napi::Value& v) { return v.As<Napi::String>().Utf8Value(); }

// socketFileOf(fd) -> { ino, dev } | undefined: the file its bind made.
Napi::Value SocketFileOf(const Napi::CallbackInfo& info) {
  sockfile_id id{};
  int rc = sockfile_of(Int(info[0]), &id);
  if (rc == -ENODATA) return info.Env().Undefined();
  if (rc) {
    ThrowErrno(info.Env(), "sock_diag (the socket's file)", -rc);
    return info.Env().Undefined();
  }
  return FileId(info.Env(), id);
}

// socketFileClear(dir, name, who?) -> boolean: a live socket holds it.
Napi::Value SocketFileClear(const Napi::CallbackInfo& info) {
  FsIdentArg who(info.Env(), info[2]);
  if (who.failed()) return info.Env().Undefined();
  int rc = sockfile_clear(Str(info[0]).c_str(), Str(info[1]).c_str(), who.get());
  if (rc < 0) {
    ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]), -rc);
    return info.Env().Undefined();
  }
  return Napi::Boolean::New(info.Env(), rc > 0);
}

// socketFileFinish(dir, name, id, { uid, gid, mode, renamed }, who?)
Napi::Value SocketFileFinish(const Napi::CallbackInfo& info) {
  auto o = info[3].As<Napi::Object>();
  FsIdentArg who(info.Env(), info[4]);
  if (who.failed()) return info.Env().Undefined();
  sockfile_id id = ToFileId(info[2]);
  std::string renamed = o.Has("renamed") && o.Get("renamed").IsString() ? Str(o.Get("renamed")) : "";
  int rc = sockfile_finish(Str(info[0]).c_str(), Str(info[1]).c_str(), &id, o.Get("uid").As<Napi::Number>().Uint32Value(),
                           o.Get("gid").As<Napi::Number>().Uint32Value(), o.Get("mode").As<Napi::Number>().Uint32Value(),
                           renamed.c_str(), who.get());
  if (rc) ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]), -rc);
  return info.Env().Undefined();
}

// socketFileMove(dir, from, to, id, who?)
Napi::Value SocketFileMove(const Napi::CallbackInfo& info) {
  sockfile_id id = ToFileId(info[3]);
  FsIdentArg who(info.Env(), info[4]);
  if (who.failed()) return info.Env().Undefined();
  int rc = sockfile_move(Str(info[0]).c_str(), Str(info[1]).c_str(), Str(info[2]).c_str(), &id, who.get());
  if (rc) ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]) + " -> " + Str(info[2]), -rc);
  return info.Env().Undefined();
}

// socketFileRemove(dir, name, id, who?) -> boolean: removed (it was that file).
Napi::Value SocketFileRemove(const Napi::CallbackInfo& info) {
  sockfile_id id = ToFileId(info[2]);
  FsIdentArg who(info.Env(), info[3]);
  if (who.failed()) return info.Env().Undefined();
  int rc = sockfile_remove(Str(info[0]).c_str(), Str(info[1]).c_str(), &id, who.get());
  if (rc < 0) {
    ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]), -rc);
    return info.Env().Undefined();
  }
  return Napi::Boolean::New(info.Env(), rc > 0);
}

// executableNameMake(dir, name, who?, aside?) -> fd: a new file at `name`
// in `dir`, removed from it at once (exename.c); its error's code says why
// not, and its leftAtName is true when our empty file may still be at the
// name. aside: `name` is a random one (no test point).
Napi::Value ExecutableNameMake(const Napi::CallbackInfo& info) {
  FsIdentArg who(info.Env(), info[2]);
  if (who.failed()) return info.Env().Undefined();
  int left = 0;
  int aside = info.Length() > 3 && info[3].ToBoolean().Value();
  int rc = exename_make_unlinked(Str(info[0]).c_str(), Str(info[1]).c_str(), who.get(), aside, &left);
  if (rc < 0) {
    ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]), -rc);
    if (left && info.Env().IsExceptionPending()) {
      Napi::Error e = info.Env().GetAndClearPendingException();
      e.Set("leftAtName", Napi::Boolean::New(info.Env(), true));
      e.ThrowAsJavaScriptException();
    }
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), rc);
}

// executableNameClear(dir, name, who?) -> boolean: what a killed restore's
// executableNameMake left there, removed (exename_clear).
Napi::Value ExecutableNameClear(const Napi::CallbackInfo& info) {
  FsIdentArg who(info.Env(), info[2]);
  if (who.failed()) return info.Env().Undefined();
  int rc = exename_clear(Str(info[0]).c_str(), Str(info[1]).c_str(), who.get());
  if (rc < 0) {
    ThrowErrno(info.Env(), Str(info[0]) + "/" + Str(info[1]), -rc);
    return info.Env().Undefined();
  }
  return Napi::Boolean::New(info.Env(), rc > 0);
}

// socketFileTarget(sock, dir, name, who?) -> fd: an O_PATH descriptor of
// `name` in `dir` (opened as `who`), checked to be the file `sock`'s bind
// made (ESTALE if it is not): what datagrams for `sock` are sent to, as
// "/proc/self/fd/N", rather than its name looked up again (dgram.c).
Napi::Value SocketFileTarget(const Napi::CallbackInfo& info) {
  FsIdentArg who(info.Env(), info[3]);
  if (who.failed()) return info.Env().Undefined();
  int rc = dgram_socket_file_open(Int(info[0]), Str(info[1]).c_str(), Str(info[2]).c_str(), who.get());
  if (rc < 0) {
    ThrowErrno(info.Env(), Str(info[1]) + "/" + Str(info[2]), -rc);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), rc);
}

// sockSend(fd, data, addr | null, creds?): one message, whole; with
// creds { pid, uid, gid }, sent with SCM_CREDENTIALS naming them.
Napi::Value SockSend(const Napi::CallbackInfo& info) {
  auto d = info[1].As<Napi::Buffer<uint8_t>>();
  const sockaddr* to = nullptr;
  socklen_t len = 0;
  if (info[2].IsBuffer()) {
    auto a = info[2].As<Napi::Buffer<uint8_t>>();
    to = reinterpret_cast<const sockaddr*>(a.Data());
    len = a.Length();
  }
  if (info.Length() > 3 && info[3].IsObject()) {
    // With the sender's credentials (SCM_CREDENTIALS).
    auto c = info[3].As<Napi::Object>();
    struct ucred u = {Int(c.Get("pid")), c.Get("uid").As<Napi::Number>().Uint32Value(), c.Get("gid").As<Napi::Number>().Uint32Value()};
    int rc = dgram_send_creds(Int(info[0]), d.Data(), d.Length(), to, len, &u);
    if (rc) ThrowErrno(info.Env(), "sendmsg (SCM_CREDENTIALS)", -rc);
    return info.Env().Undefined();
  }
  ssize_t n = sendto(Int(info[0]), d.Data(), d.Length(), MSG_DONTWAIT | MSG_NOSIGNAL, to, len);
  if (n < 0) ThrowErrno(info.Env(), "sendto", errno);
  else if (static_cast<size_t>(n) != d.Length()) ThrowErrno(info.Env(), "sendto", EMSGSIZE);
  return info.Env().Undefined();
}

// sockShutdown(fd, how)
Napi::Value SockShutdown(const Napi::CallbackInfo& info) {
  if (shutdown(Int(info[0]), Int(info[1]))) ThrowErrno(info.Env(), "shutdown", errno);
  return info.Env().Undefined();
}

// datagramQueue(fd, maxCount, maxTotal, maxOne, shutForReading?, creds?) -> [{ data, from, to, tos, ttl, creds }]:
// (creds: { pid, uid, gid } SCM_CREDENTIALS showed, asked of a unix socket with SO_PASSCRED; else null)
// (to, tos, ttl: the IP header fields the socket asks to be shown; null, -1 if not)
// every message queued for reading, left queued; `from` is null when unnamed.
// An error waiting to be read (POLLERR) throws code ERRPENDING, unread.
Napi::Value DatagramQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  dgram_msg* msgs = nullptr;
  long n = dgram_queue(Int(info[0]), info[1].As<Napi::Number>().Uint32Value(), info[2].As<Napi::Number>().Uint32Value(),
                       info[3].As<Napi::Number>().Uint32Value(), info.Length() > 4 && info[4].ToBoolean(), info.Length() > 5 && info[5].ToBoolean(), &msgs);
  if (n == DGRAM_ERROR_PENDING) {
    Napi::Error e = Napi::Error::New(env, "a socket error waits to be read");
    e.Set("code", Napi::String::New(env, "ERRPENDING"));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (n < 0) {
    ThrowErrno(env, "reading the queued datagrams", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("data", Napi::Buffer<uint8_t>::Copy(env, msgs[i].data, msgs[i].len));
    o.Set("from", msgs[i].from_len > sizeof(sa_family_t) ? Addr(env, &msgs[i].from, msgs[i].from_len) : env.Null());
    o.Set("to", msgs[i].to_len ? Addr(env, &msgs[i].to, msgs[i].to_len) : env.Null());
    o.Set("tos", msgs[i].tos);
    o.Set("ttl", msgs[i].ttl);
    if (msgs[i].has_creds) {
      Napi::Object c = Napi::Object::New(env);
      c.Set("pid", msgs[i].creds.pid);
      c.Set("uid", Napi::Number::New(env, msgs[i].creds.uid));
      c.Set("gid", Napi::Number::New(env, msgs[i].creds.gid));
      o.Set("creds", c);
    } else {
      o.Set("creds", env.Null());
    }
    out.Set(static_cast<uint32_t>(i), o);
  }
  dgram_free(msgs, n);
  return out;
}

// udpInject(from, to, data, tos, ttl): one datagram as if `from` had sent
// it with that TOS (traffic class) and TTL (hop limit).
Napi::Value UdpInject(const Napi::CallbackInfo& info) {
  auto f = info[0].As<Napi::Buffer<uint8_t>>();
  auto t = info[1].As<Napi::Buffer<uint8_t>>();
  auto d = info[2].As<Napi::Buffer<uint8_t>>();
  sockaddr_storage from{}, to{};
  std::memcpy(&from, f.Data(), std::min(f.Length(), sizeof from));
  std::memcpy(&to, t.Data(), std::min(t.Length(), sizeof to));
  int rc = udp_inject(reinterpret_cast<sockaddr*>(&from), reinterpret_cast<sockaddr*>(&to), d.Data(), d.Length(), Int(info[3]), Int(info[4]));
  if (rc) ThrowErrno(info.Env(), "sending a queued datagram again (raw socket)", -rc);
  return info.Env().Undefined();
}

// udpSockets(family) -> [{ ino, shutdown }]
Napi::Value UdpSockets(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockdiag_udp* all = nullptr;
  long n = sockdiag_udp_all(Int(info[0]), &all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (udp)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("ino", Napi::Number::New(env, all[i].ino));
    o.Set("shutdown", all[i].shutdown);
    out.Set(static_cast<uint32_t>(i), o);
  }
  free(all);
  return out;
}

// netlinkSockets() -> [{ ino, protocol, type, state, portid, dstPortid,
// dstGroup, flags, rmem, wmem, drops, groups: [group number] }]: every
// netlink socket of this network namespace (netlink_diag).
Napi::Value NetlinkSockets(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockdiag_netlink* all = nullptr;
  long n = sockdiag_netlink_all(&all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (netlink)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    const sockdiag_netlink& s = all[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("ino", Napi::Number::New(env, s.ino));
    o.Set("protocol", s.protocol);
    o.Set("type", s.type);
    o.Set("state", s.state);
    o.Set("portid", Napi::Number::New(env, s.portid));
    o.Set("dstPortid", Napi::Number::New(env, s.dst_portid));
    o.Set("dstGroup", Napi::Number::New(env, s.dst_group));
    o.Set("flags", Napi::Number::New(env, s.flags));
    o.Set("rmem", Napi::Number::New(env, s.rmem));
    o.Set("wmem", Napi::Number::New(env, s.wmem));
    o.Set("drops", Napi::Number::New(env, s.drops));
    Napi::Array groups = Napi::Array::New(env);
    uint32_t k = 0;
    for (uint32_t bit = 0; bit < s.ngroups; bit++)
      if ((s.groups[bit / (8 * sizeof(unsigned long))] >> (bit % (8 * sizeof(unsigned long)))) & 1)
        groups.Set(k++, Napi::Number::New(env, bit + 1));
    o.Set("groups", groups);
    out.Set(static_cast<uint32_t>(i), o);
  }
  sockdiag_netlink_free(all, n);
  return out;
}

// auditDaemonPid() -> the PID of the process registered with the kernel as
// the audit daemon (0: none), in this PID namespace, asked with AUDIT_GET
// (which needs CAP_AUDIT_CONTROL). Throws with the errno otherwise
// (ECONNREFUSED: no audit in this namespace).
Napi::Value AuditDaemonPid(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_AUDIT);
  if (fd < 0) {
    ThrowErrno(env, "socket(NETLINK_AUDIT)", errno);
    return env.Undefined();
  }
  struct timeval limit = {2, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  struct nlmsghdr req = {};
  req.nlmsg_len = sizeof req;
  req.nlmsg_type = AUDIT_GET;
  req.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  req.nlmsg_seq = 1;
  struct sockaddr_nl kernel = {};
  kernel.nl_family = AF_NETLINK;
  int err = 0;
  long pid = -1;
  if (sendto(fd, &req, sizeof req, 0, reinterpret_cast<struct sockaddr*>(&kernel), sizeof kernel) < 0) err = errno;
  // The status and the ack, in either order; another message (none is
  // sent to a socket that asked nothing else) is skipped.
  alignas(8) char buf[8192];
  for (int tries = 0; !err && pid < 0 && tries < 4; tries++) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    for (auto* h = reinterpret_cast<struct nlmsghdr*>(buf); NLMSG_OK(h, static_cast<size_t>(n)); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_seq != 1) continue;
      if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_len >= NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
        int e = -static_cast<struct nlmsgerr*>(NLMSG_DATA(h))->error;
        if (e) err = e;
      } else if (h->nlmsg_type == AUDIT_GET && h->nlmsg_len >= NLMSG_LENGTH(offsetof(struct audit_status, pid) + sizeof(uint32_t))) {
        pid = static_cast<struct audit_status*>(NLMSG_DATA(h))->pid;
      }
    }
  }
  close(fd);
  if (err || pid < 0) {
    ThrowErrno(env, "asking the kernel for the audit daemon (AUDIT_GET)", err ? err : EIO);
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(pid));
}

// tcpListeningInodes(family, port) -> [inode]: the TCP sockets listening on
// `port` in this network namespace (sock_diag).
Napi::Value TcpListeningInodes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockdiag_tcp_listener* all = nullptr;
  long n = sockdiag_tcp_listening(Int(info[0]), static_cast<uint16_t>(Int(info[1])), &all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (tcp)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) out.Set(static_cast<uint32_t>(i), Napi::Number::New(env, all[i].ino));
  free(all);
  return out;
}

// tcpListeners(family, port) -> [{ ino, uid, address, v6only? }]: the TCP
// sockets listening on `port` in this network namespace (sock_diag), each
// with its bound address (a Buffer, 4 bytes for AF_INET, 16 for AF_INET6),
// its inode's owner and, for AF_INET6, IPV6_V6ONLY, from the one answer.
Napi::Value TcpListeners(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int family = Int(info[0]);
  sockdiag_tcp_listener* all = nullptr;
  long n = sockdiag_tcp_listening(family, static_cast<uint16_t>(Int(info[1])), &all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (tcp)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("ino", Napi::Number::New(env, all[i].ino));
    o.Set("uid", Napi::Number::New(env, all[i].uid));
    o.Set("address", Napi::Buffer<uint8_t>::Copy(env, all[i].local, family == AF_INET ? 4 : 16));
    if (all[i].v6only >= 0) o.Set("v6only", Napi::Boolean::New(env, all[i].v6only == 1));
    out.Set(static_cast<uint32_t>(i), o);
  }
  free(all);
  return out;
}

// tcpEstablished(family, port, local?) -> [{ ino, remote, port }]: the
// established TCP connections whose local port is `port` in this network
// namespace (sock_diag), and whose local address is `local` if given (a
// listener's bound address; a wildcard one matches any); ino 0: not
// accepted yet.
Napi::Value TcpEstablished(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockdiag_tcp_conn* all = nullptr;
  int family = Int(info[0]);
  uint8_t local[16] = {0};
  static const uint8_t any[16] = {0};
  bool byAddress = info.Length() > 2 && info[2].IsString();
  if (byAddress) {
    std::string text = info[2].As<Napi::String>();
    if (inet_pton(family, text.c_str(), local) != 1) {
      Napi::TypeError::New(env, "tcpEstablished: not an address of the family: " + text).ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (memcmp(local, any, family == AF_INET ? 4 : 16) == 0) byAddress = false;
  }
  long n = sockdiag_tcp_established(family, static_cast<uint16_t>(Int(info[1])), byAddress ? local : nullptr, &all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (tcp)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    char text[INET6_ADDRSTRLEN] = "";
    inet_ntop(all[i].family, all[i].remote, text, sizeof text);
    Napi::Object o = Napi::Object::New(env);
    o.Set("ino", Napi::Number::New(env, all[i].ino));
    o.Set("remote", Napi::String::New(env, text));
    o.Set("port", Napi::Number::New(env, all[i].rport));
    out.Set(static_cast<uint32_t>(i), o);
  }
  free(all);
  return out;
}

// Multicast group memberships. The kernel keeps a socket's memberships in
// a list that nothing lists; but MCAST_MSFILTER read for one (interface,
// group) answers EADDRNOTAVAIL unless the socket is a member, and
// otherwise gives its source filter. The groups to ask about are those the
// interfaces have (/proc/PID/net/igmp and igmp6: every membership of a
// socket is one of its interface's).

constexpr unsigned kMaxSources = 1024;  // above igmp_max_msf and mld_max_msf defaults

size_t FilterSize(unsigned n) { return offsetof(group_filter, gf_slist) + n * sizeof(sockaddr_storage); }

bool GroupAddr(const Napi::Value& v, sockaddr_storage* out) {
  auto b = v.As<Napi::Buffer<uint8_t>>();
  if (b.Length() > sizeof *out || b.Length() < sizeof(sa_family_t)) return false;
  memset(out, 0, sizeof *out);
  memcpy(out, b.Data(), b.Length());
  return true;
}

// multicastFilter(fd, level, ifindex, group) -> { include, sources: Buffer[] }
// when the socket is a member of the group (a raw sockaddr) on that
// interface, at level IPPROTO_IP or IPPROTO_IPV6; null when it is not.
Napi::Value MulticastFilter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<uint8_t> buf(FilterSize(kMaxSources));
  auto* gf = reinterpret_cast<group_filter*>(buf.data());
  gf->gf_interface = static_cast<uint32_t>(Int(info[2]));
  if (!GroupAddr(info[3], &gf->gf_group)) {
    Napi::TypeError::New(env, "multicastFilter: a group address").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  gf->gf_numsrc = kMaxSources;
  socklen_t len = static_cast<socklen_t>(buf.size());
  if (getsockopt(Int(info[0]), Int(info[1]), MCAST_MSFILTER, gf, &len)) {
    if (errno == EADDRNOTAVAIL || errno == EOPNOTSUPP || errno == ENOPROTOOPT) return env.Null();
    ThrowErrno(env, "getsockopt(MCAST_MSFILTER)", errno);
    return env.Undefined();
  }
  if (gf->gf_numsrc > kMaxSources) {
    ThrowErrno(env, "getsockopt(MCAST_MSFILTER): more sources than appshot reads", E2BIG);
    return env.Undefined();
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("include", Napi::Boolean::New(env, gf->gf_fmode == MCAST_INCLUDE));
  Napi::Array sources = Napi::Array::New(env, gf->gf_numsrc);
  for (unsigned i = 0; i < gf->gf_numsrc; i++) {
    socklen_t n = gf->gf_slist[i].ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    sources.Set(i, Addr(env, &gf->gf_slist[i], n));
  }
  r.Set("sources", sources);
  return r;
}

// multicastJoin(fd, level, ifindex, group, include, sources: Buffer[]):
// joins the group on the interface, then sets its source filter (a join
// is any-source, EXCLUDE with none, until then).
Napi::Value MulticastJoin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]), level = Int(info[1]);
  group_req req{};
  req.gr_interface = static_cast<uint32_t>(Int(info[2]));
  bool include = info[4].As<Napi::Boolean>().Value();
  auto sources = info[5].As<Napi::Array>();
  if (!GroupAddr(info[3], &req.gr_group) || sources.Length() > kMaxSources) {
    Napi::TypeError::New(env, "multicastJoin: a group address and at most 1024 sources").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (setsockopt(fd, level, MCAST_JOIN_GROUP, &req, sizeof req)) {
    ThrowErrno(env, "setsockopt(MCAST_JOIN_GROUP)", errno);
    return env.Undefined();
  }
  if (!include && sources.Length() == 0) return env.Undefined();
  std::vector<uint8_t> buf(FilterSize(sources.Length() ? sources.Length() : 1));
  auto* gf = reinterpret_cast<group_filter*>(buf.data());
  gf->gf_interface = req.gr_interface;
  gf->gf_group = req.gr_group;
  gf->gf_fmode = include ? MCAST_INCLUDE : MCAST_EXCLUDE;
  gf->gf_numsrc = sources.Length();
  for (unsigned i = 0; i < sources.Length(); i++)
    if (!GroupAddr(sources.Get(i), &gf->gf_slist[i])) {
      Napi::TypeError::New(env, "multicastJoin: a source address").ThrowAsJavaScriptException();
      return env.Undefined();
    }
  if (setsockopt(fd, level, MCAST_MSFILTER, gf, static_cast<socklen_t>(FilterSize(gf->gf_numsrc))))
    ThrowErrno(env, "setsockopt(MCAST_MSFILTER)", errno);
  return env.Undefined();
}

// ifIndex(name) -> the index of the interface of that name in our network
// namespace, 0 for none.
Napi::Value IfIndex(const Napi::CallbackInfo& info) {
  std::string name = info[0].As<Napi::String>().Utf8Value();
  return Napi::Number::New(info.Env(), if_nametoindex(name.c_str()));
}

// ifName(index) -> the interface's name, "" when there is none.
Napi::Value IfName(const Napi::CallbackInfo& info) {
  char name[IF_NAMESIZE] = "";
  if (!if_indextoname(static_cast<unsigned>(Int(info[0])), name)) name[0] = 0;
  return Napi::String::New(info.Env(), name);
}

// getSockOptBytes(fd, level, name, room) -> Buffer: a socket option that
// is a struct or a string (SO_LINGER, SO_RCVTIMEO, TCP_CONGESTION...), as
// many bytes as the kernel gave of at most `room`.
Napi::Value GetSockOptBytes(const Napi::CallbackInfo& info) {
  std::vector<uint8_t> buf(static_cast<size_t>(Int(info[3])));
  socklen_t len = static_cast<socklen_t>(buf.size());
  if (getsockopt(Int(info[0]), Int(info[1]), Int(info[2]), buf.data(), &len)) {
    ThrowErrno(info.Env(), "getsockopt", errno);
    return info.Env().Undefined();
  }
  return Napi::Buffer<uint8_t>::Copy(info.Env(), buf.data(), len < buf.size() ? len : buf.size());
}

// getSockOptsBatch(fd, Int32Array [level, name, room]...) -> { data,
// lengths }: option i's bytes are in `data` at the sum of the rooms before
// it, `lengths[i]` of them, or -errno when the kernel refused. One
// crossing and two allocations for the hundred options a snapshot reads of
// each socket.
Napi::Value GetSockOptsBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]);
  auto triples = info[1].As<Napi::Int32Array>();
  size_t n = triples.ElementLength() / 3, total = 0;
  for (size_t i = 0; i < n; i++) {
    int room = triples[i * 3 + 2];
    if (room <= 0 || room > 4096) {
      Napi::RangeError::New(env, "getSockOptsBatch: a room of 1 to 4096 bytes").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    total += static_cast<size_t>(room);
  }
  auto data = Napi::Buffer<uint8_t>::New(env, total ? total : 1);
  auto lengths = Napi::Int32Array::New(env, n);
  size_t at = 0;
  for (size_t i = 0; i < n; i++) {
    socklen_t len = static_cast<socklen_t>(triples[i * 3 + 2]);
    socklen_t room = len;
    if (getsockopt(fd, triples[i * 3], triples[i * 3 + 1], data.Data() + at, &len))
      lengths[i] = -errno;
    else
      lengths[i] = static_cast<int32_t>(len < room ? len : room);
    at += room;
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("data", data);
  out.Set("lengths", lengths);
  return out;
}

// setSockOptBytes(fd, level, name, Buffer).
Napi::Value SetSockOptBytes(const Napi::CallbackInfo& info) {
  auto b = info[3].As<Napi::Buffer<uint8_t>>();
  if (setsockopt(Int(info[0]), Int(info[1]), Int(info[2]), b.Data(), static_cast<socklen_t>(b.Length())))
    ThrowErrno(info.Env(), "setsockopt", errno);
  return info.Env().Undefined();
}

}  // namespace

void RegisterDgram(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("sockName", SockName);
  fn("peerName", PeerName);
  fn("sockOpen", SockOpen);
  fn("sockBind", SockBind);
  fn("sockConnect", SockConnect);
  fn("socketFileOf", SocketFileOf);
  fn("socketFileClear", SocketFileClear);
  fn("socketFileFinish", SocketFileFinish);
  fn("socketFileRemove", SocketFileRemove);
  fn("socketFileMove", SocketFileMove);
  fn("socketFileTarget", SocketFileTarget);
  fn("executableNameMake", ExecutableNameMake);
  fn("executableNameClear", ExecutableNameClear);
  RegisterFsIdent(env, exports);
  fn("sockSend", SockSend);
  fn("sockShutdown", SockShutdown);
  fn("datagramQueue", DatagramQueue);
  fn("udpInject", UdpInject);
  fn("udpSockets", UdpSockets);
  fn("netlinkSockets", NetlinkSockets);
  fn("auditDaemonPid", AuditDaemonPid);
  fn("tcpListeningInodes", TcpListeningInodes);
  fn("tcpListeners", TcpListeners);
  fn("tcpEstablished", TcpEstablished);
  fn("multicastFilter", MulticastFilter);
  fn("multicastJoin", MulticastJoin);
  fn("ifIndex", IfIndex);
  fn("ifName", IfName);
  fn("getSockOptBytes", GetSockOptBytes);
  fn("getSockOptsBatch", GetSockOptsBatch);
  fn("setSockOptBytes", SetSockOptBytes);
}

}  // namespace appshot
