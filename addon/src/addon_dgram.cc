// Datagram and record sockets (dgram.c, sockdiag.c), for
// src/resources/unixdgram.ts and src/resources/udp.ts. Addresses cross as
// Buffers holding the raw struct sockaddr, which the TypeScript side reads
// and writes (src/resources/sockaddr.ts).
#include <napi.h>

#include <cerrno>
#include <cstring>

#include <sys/socket.h>
#include <unistd.h>

#include "addon.h"

extern "C" {
#include "dgram.h"
#include "sockdiag.h"
}

namespace appshot {
namespace {

int Int(const Napi::Value& v) { return v.As<Napi::Number>().Int32Value(); }

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

// sockOpen(family, type) -> fd, close-on-exec.
Napi::Value SockOpen(const Napi::CallbackInfo& info) {
  int fd = socket(Int(info[0]), Int(info[1]) | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(info.Env(), "socket", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fd);
}

// sockBind(fd, addr), sockConnect(fd, addr)
Napi::Value SockBind(const Napi::CallbackInfo& info) {
  auto a = info[1].As<Napi::Buffer<uint8_t>>();
  if (bind(Int(info[0]), reinterpret_cast<sockaddr*>(a.Data()), a.Length())) ThrowErrno(info.Env(), "bind", errno);
  return info.Env().Undefined();
}

Napi::Value SockConnect(const Napi::CallbackInfo& info) {
  auto a = info[1].As<Napi::Buffer<uint8_t>>();
  if (connect(Int(info[0]), reinterpret_cast<sockaddr*>(a.Data()), a.Length())) ThrowErrno(info.Env(), "connect", errno);
  return info.Env().Undefined();
}

// sockSend(fd, data, addr | null): one message, whole.
Napi::Value SockSend(const Napi::CallbackInfo& info) {
  auto d = info[1].As<Napi::Buffer<uint8_t>>();
  const sockaddr* to = nullptr;
  socklen_t len = 0;
  if (info[2].IsBuffer()) {
    auto a = info[2].As<Napi::Buffer<uint8_t>>();
    to = reinterpret_cast<const sockaddr*>(a.Data());
    len = a.Length();
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

// datagramQueue(fd, maxCount, maxTotal, maxOne) -> [{ data, from }]: every
// message queued for reading, left queued; `from` is null when unnamed.
Napi::Value DatagramQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  dgram_msg* msgs = nullptr;
  long n = dgram_queue(Int(info[0]), info[1].As<Napi::Number>().Uint32Value(), info[2].As<Napi::Number>().Uint32Value(),
                       info[3].As<Napi::Number>().Uint32Value(), &msgs);
  if (n < 0) {
    ThrowErrno(env, "reading the queued datagrams", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("data", Napi::Buffer<uint8_t>::Copy(env, msgs[i].data, msgs[i].len));
    o.Set("from", msgs[i].from_len > sizeof(sa_family_t) ? Addr(env, &msgs[i].from, msgs[i].from_len) : env.Null());
    out.Set(static_cast<uint32_t>(i), o);
  }
  dgram_free(msgs, n);
  return out;
}

// udpInject(from, to, data): one datagram as if `from` had sent it.
Napi::Value UdpInject(const Napi::CallbackInfo& info) {
  auto f = info[0].As<Napi::Buffer<uint8_t>>();
  auto t = info[1].As<Napi::Buffer<uint8_t>>();
  auto d = info[2].As<Napi::Buffer<uint8_t>>();
  sockaddr_storage from{}, to{};
  std::memcpy(&from, f.Data(), std::min(f.Length(), sizeof from));
  std::memcpy(&to, t.Data(), std::min(t.Length(), sizeof to));
  int rc = udp_inject(reinterpret_cast<sockaddr*>(&from), reinterpret_cast<sockaddr*>(&to), d.Data(), d.Length());
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
  fn("sockSend", SockSend);
  fn("sockShutdown", SockShutdown);
  fn("datagramQueue", DatagramQueue);
  fn("udpInject", UdpInject);
  fn("udpSockets", UdpSockets);
}

}  // namespace appshot
