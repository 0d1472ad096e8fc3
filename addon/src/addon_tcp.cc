// Established TCP connections (tcp_repair.c) and integer socket options,
// for src/resources/tcp.ts.
#include <napi.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "addon.h"

extern "C" {
#include "keeper.h"
#include "tcp_repair.h"
}

namespace appshot {
namespace {

uint32_t U32(const Napi::Value& v) { return v.As<Napi::Number>().Uint32Value(); }

// `step` is read here, once the call in the arguments has set it (the
// order in which arguments are evaluated is unspecified).
bool Failed(const Napi::Env& env, int rc, const char* const* step) {
  if (rc == 0) return false;
  ThrowErrno(env, *step ? *step : "TCP repair", -rc);
  return true;
}

// tcpRepair(fd, mode): 1 on, 0 off, -1 off without the window probe the
// kernel otherwise sends the peer.
Napi::Value TcpRepair(const Napi::CallbackInfo& info) {
  const char* step = nullptr;
  Failed(info.Env(), tcp_repair_set(Int(info[0]), Int(info[1]), &step), &step);
  return info.Env().Undefined();
}

// tcpGuardStart(binary) -> {fd, pid}: the channel to a new guardian of the
// sockets held in repair mode, and its PID; tcpGuardAdd(fd, socket, locked,
// reuse); tcpGuardDisarm(fd, pid) (tcp_repair.h).
Napi::Value TcpGuardStart(const Napi::CallbackInfo& info) {
  const char* step = nullptr;
  int guard = -1;
  pid_t pid = 0;
  std::string binary = info[0].As<Napi::String>().Utf8Value();
  if (Failed(info.Env(), tcp_guard_start(binary.c_str(), &guard, &pid, &step), &step)) return info.Env().Undefined();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("fd", guard);
  o.Set("pid", static_cast<double>(pid));
  return o;
}

Napi::Value TcpGuardAdd(const Napi::CallbackInfo& info) {
  const char* step = nullptr;
  Failed(info.Env(), tcp_guard_add(Int(info[0]), Int(info[1]), info[2].ToBoolean(), Int(info[3]), &step), &step);
  return info.Env().Undefined();
}

Napi::Value TcpGuardDisarm(const Napi::CallbackInfo& info) {
  const char* step = nullptr;
  Failed(info.Env(), tcp_guard_disarm(Int(info[0]), Int(info[1]), &step), &step);
  return info.Env().Undefined();
}

// tcpLock(fd, on): every packet to the socket dropped (1) or not (0).
Napi::Value TcpLock(const Napi::CallbackInfo& info) {
  const char* step = nullptr;
  int fd = Int(info[0]);
  Failed(info.Env(), info[1].ToBoolean() ? tcp_lock(fd, &step) : tcp_unlock(fd, &step), &step);
  return info.Env().Undefined();
}

// socketFilterLength(fd) -> the length in instructions of the classic
// packet filter the socket's owner attached (SO_ATTACH_FILTER), 0 for none.
Napi::Value SocketFilterLength(const Napi::CallbackInfo& info) {
  socklen_t len = 0;
  if (getsockopt(Int(info[0]), SOL_SOCKET, SO_GET_FILTER, nullptr, &len)) {
    ThrowErrno(info.Env(), "reading the socket's filter", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), len);
}

// tcpRead(fd) -> the connection of a socket in repair mode.
Napi::Value TcpRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  tcp_conn c;
  const char* step = nullptr;
  if (Failed(env, tcp_conn_read(Int(info[0]), &c, &step), &step)) return env.Undefined();
  Napi::Object o = Napi::Object::New(env);
  o.Set("family", c.family);
  o.Set("localAddress", c.local);
  o.Set("localPort", c.local_port);
  o.Set("peerAddress", c.peer);
  o.Set("peerPort", c.peer_port);
  o.Set("state", c.state);
  o.Set("sendSeq", c.send_seq);
  o.Set("recvSeq", c.recv_seq);
  o.Set("sendQueue", Napi::Buffer<uint8_t>::Copy(env, c.send_queue, c.send_len));
  o.Set("unsent", c.unsent);
  o.Set("recvQueue", Napi::Buffer<uint8_t>::Copy(env, c.recv_queue, c.recv_len));
  o.Set("mssClamp", c.mss_clamp);
  o.Set("options", c.options);
  o.Set("sndWscale", c.snd_wscale);
  o.Set("rcvWscale", c.rcv_wscale);
  o.Set("timestamp", c.timestamp);
  if (c.has_window) {
    Napi::Object w = Napi::Object::New(env);
    w.Set("sndWl1", c.snd_wl1);
    w.Set("sndWnd", c.snd_wnd);
    w.Set("maxWindow", c.max_window);
    w.Set("rcvWnd", c.rcv_wnd);
    w.Set("rcvWup", c.rcv_wup);
    o.Set("window", w);
  }
  free(c.send_queue);
  free(c.recv_queue);
  return o;
}

void CopyAddress(char (&dst)[INET6_ADDRSTRLEN], const Napi::Value& v) {
  std::string s = v.As<Napi::String>().Utf8Value();
  size_t n = s.size() < sizeof dst - 1 ? s.size() : sizeof dst - 1;
  s.copy(dst, n);
  dst[n] = '\0';
}

// The connection tcpRead returned (the queues point into its Buffers, valid
// for the call); false, with a JS exception, if it makes no sense.
bool ConnectionOf(const Napi::Env& env, const Napi::Value& v, tcp_conn& c) {
  auto o = v.As<Napi::Object>();
  c.family = Int(o.Get("family"));
  CopyAddress(c.local, o.Get("localAddress"));
  c.local_port = static_cast<uint16_t>(U32(o.Get("localPort")));
  CopyAddress(c.peer, o.Get("peerAddress"));
  c.peer_port = static_cast<uint16_t>(U32(o.Get("peerPort")));
  c.state = Int(o.Get("state"));
  c.send_seq = U32(o.Get("sendSeq"));
  c.recv_seq = U32(o.Get("recvSeq"));
  auto send = o.Get("sendQueue").As<Napi::Buffer<uint8_t>>();
  auto recv = o.Get("recvQueue").As<Napi::Buffer<uint8_t>>();
  c.send_queue = send.Data();
  c.send_len = static_cast<uint32_t>(send.Length());
  c.unsent = U32(o.Get("unsent"));
  c.recv_queue = recv.Data();
  c.recv_len = static_cast<uint32_t>(recv.Length());
  if (c.unsent > c.send_len) {
    Napi::RangeError::New(env, "a connection's unsent bytes exceed its send queue").ThrowAsJavaScriptException();
    return false;
  }
  c.mss_clamp = U32(o.Get("mssClamp"));
  c.options = static_cast<uint8_t>(U32(o.Get("options")));
  c.snd_wscale = static_cast<uint8_t>(U32(o.Get("sndWscale")));
  c.rcv_wscale = static_cast<uint8_t>(U32(o.Get("rcvWscale")));
  c.timestamp = U32(o.Get("timestamp"));
  Napi::Value wv = o.Get("window");
  if (wv.IsObject()) {
    auto w = wv.As<Napi::Object>();
    c.has_window = 1;
    c.snd_wl1 = U32(w.Get("sndWl1"));
    c.snd_wnd = U32(w.Get("sndWnd"));
    c.max_window = U32(w.Get("maxWindow"));
    c.rcv_wnd = U32(w.Get("rcvWnd"));
    c.rcv_wup = U32(w.Get("rcvWup"));
  }
  c.reuseport = o.Get("reuseport").ToBoolean() ? 1 : 0;
  Napi::Value owner = o.Get("owner");
  if (owner.IsObject()) {
    c.has_owner = 1;
    c.owner_uid = U32(owner.As<Napi::Object>().Get("uid"));
    c.owner_gid = U32(owner.As<Napi::Object>().Get("gid"));
  }
  return true;
}

// tcpMake(connection) -> fd: a socket in repair mode carrying the
// connection on (see tcp_conn_make); tcpRelease finishes it.
Napi::Value TcpMake(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  tcp_conn c{};
  if (!ConnectionOf(env, info[0], c)) return env.Undefined();
  int fd = -1;
  const char* step = nullptr;
  if (Failed(env, tcp_conn_make(&c, &fd, &step), &step)) return env.Undefined();
  return Napi::Number::New(env, fd);
}

// tcpRelease(fd, unsent: Buffer): repair mode off, the never-sent bytes written.
Napi::Value TcpRelease(const Napi::CallbackInfo& info) {
  auto unsent = info[1].As<Napi::Buffer<uint8_t>>();
  const char* step = nullptr;
  Failed(info.Env(), tcp_conn_release(Int(info[0]), unsent.Data(), static_cast<uint32_t>(unsent.Length()), &step), &step);
  return info.Env().Undefined();
}

// tcpRefin(connection): its peer's FIN, sent again (tcp_conn_refin).
Napi::Value TcpRefin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  tcp_conn c{};
  if (!ConnectionOf(env, info[0], c)) return env.Undefined();
  const char* step = nullptr;
  Failed(env, tcp_conn_refin(&c, &step), &step);
  return env.Undefined();
}

// tcpState(fd) -> tcpi_state.
Napi::Value TcpState(const Napi::CallbackInfo& info) {
  int state = tcp_state(Int(info[0]));
  if (state < 0) {
    ThrowErrno(info.Env(), "reading TCP_INFO", -state);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), state);
}

// tcpResetSocket(family) -> fd of a connection that was reset.
Napi::Value TcpResetSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = -1;
  const char* step = nullptr;
  if (Failed(env, tcp_reset_socket(Int(info[0]), &fd, &step), &step)) return env.Undefined();
  return Napi::Number::New(env, fd);
}

// getSockOpt(fd, level, name) -> int; setSockOpt(fd, level, name, value).
Napi::Value GetSockOpt(const Napi::CallbackInfo& info) {
  int v = 0;
  socklen_t len = sizeof v;
  if (getsockopt(Int(info[0]), Int(info[1]), Int(info[2]), &v, &len)) {
    ThrowErrno(info.Env(), "getsockopt", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), v);
}

Napi::Value SetSockOpt(const Napi::CallbackInfo& info) {
  int v = Int(info[3]);
  if (setsockopt(Int(info[0]), Int(info[1]), Int(info[2]), &v, sizeof v)) ThrowErrno(info.Env(), "setsockopt", errno);
  return info.Env().Undefined();
}

// keepConnections(binary, path, imageId, holdSeconds, fds): an
// appshot-keeper holds `fds` (keeper.c).
Napi::Value KeepConnections(const Napi::CallbackInfo& info) {
  std::string binary = info[0].As<Napi::String>().Utf8Value();
  std::string path = info[1].As<Napi::String>().Utf8Value();
  std::string id = info[2].As<Napi::String>().Utf8Value();
  long hold = static_cast<long>(info[3].As<Napi::Number>().Int64Value());
  Napi::Array list = info[4].As<Napi::Array>();
  std::vector<int> fds(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) fds[i] = Int(list.Get(i));
  const char* step = nullptr;
  Failed(info.Env(), keeper_start(binary.c_str(), path.c_str(), id.c_str(), hold, fds.data(), fds.size(), &step), &step);
  return info.Env().Undefined();
}

// takeConnections(path, imageId, waitMs = 10000) -> { fds: the kept
// sockets of image `imageId` ([] if the keeper dropped them for another
// image), control: the connection for keeperDone (-1 with none) }, or
// null if no keeper listens at `path`. Throws (EAGAIN) when the keeper
// has not answered within waitMs.
Napi::Value TakeConnections(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::string id = info[1].As<Napi::String>().Utf8Value();
  int wait_ms = info.Length() > 2 && info[2].IsNumber() ? Int(info[2]) : 10000;
  int* fds = nullptr;
  int none = 0, control = -1;
  const char* step = nullptr;
  long n = keeper_take(path.c_str(), id.c_str(), wait_ms, &fds, &control, &none, &step);
  if (n < 0) {
    ThrowErrno(env, step, static_cast<int>(-n));
    return env.Undefined();
  }
  if (none) return env.Null();
  Napi::Array list = Napi::Array::New(env, static_cast<size_t>(n));
  for (long i = 0; i < n; i++) list.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  free(fds);
  Napi::Object out = Napi::Object::New(env);
  out.Set("fds", list);
  out.Set("control", Napi::Number::New(env, control));
  return out;
}

// keeperDone(control): the restore committed; the keeper lets go.
Napi::Value KeeperDone(const Napi::CallbackInfo& info) {
  keeper_done(Int(info[0]));
  return info.Env().Undefined();
}

// "address:port" of an IPv4 or IPv6 socket address, "" for another family.
std::string Endpoint(const sockaddr_storage& ss, int* port) {
  char text[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
    *port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
    *port = ntohs(a->sin6_port);
  } else {
    *port = 0;
  }
  return text;
}

// tcpEndpoint(fd) -> { state, address, port, remote, backlog }: a TCP
// socket as the kernel sees it, asked of the socket itself: its state
// (TCP_INFO), its own address, its peer's ("address:port") and, listening, its backlog (tcpi_sacked is
// sk_max_ack_backlog then). Reading /proc/net/tcp for this costs as much
// as the host has sockets (thousands of TIME_WAIT on a busy server) inside
// the frozen window; this costs four calls per socket of the application.
Napi::Value TcpEndpoint(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]);
  struct tcp_info ti = {};
  socklen_t tl = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) < 0) {
    ThrowErrno(env, "reading TCP_INFO", errno);
    return env.Undefined();
  }
  sockaddr_storage local = {}, peer = {};
  socklen_t ll = sizeof local, pl = sizeof peer;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) < 0) {
    ThrowErrno(env, "reading the socket's address", errno);
    return env.Undefined();
  }
  int port = 0, peerPort = 0;
  std::string address = Endpoint(local, &port);
  // Not connected: the unspecified address and port 0, as /proc/net/tcp
  // shows it.
  std::string remote = local.ss_family == AF_INET6 ? "::" : "0.0.0.0";
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) == 0) remote = Endpoint(peer, &peerPort);
  remote += ":" + std::to_string(peerPort);
  Napi::Object o = Napi::Object::New(env);
  o.Set("state", static_cast<int>(ti.tcpi_state));
  o.Set("address", address);
  o.Set("port", port);
  o.Set("remote", remote);
  o.Set("backlog", ti.tcpi_state == TCP_LISTEN ? static_cast<double>(ti.tcpi_sacked) : 0);
  return o;
}

}  // namespace

void RegisterTcp(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("tcpRepair", TcpRepair);
  fn("tcpLock", TcpLock);
  fn("tcpGuardStart", TcpGuardStart);
  fn("tcpGuardAdd", TcpGuardAdd);
  fn("tcpGuardDisarm", TcpGuardDisarm);
  fn("socketFilterLength", SocketFilterLength);
  fn("tcpRead", TcpRead);
  fn("tcpMake", TcpMake);
  fn("tcpRelease", TcpRelease);
  fn("tcpRefin", TcpRefin);
  fn("tcpState", TcpState);
  fn("tcpResetSocket", TcpResetSocket);
  fn("getSockOpt", GetSockOpt);
  fn("setSockOpt", SetSockOpt);
  fn("keepConnections", KeepConnections);
  fn("takeConnections", TakeConnections);
  fn("keeperDone", KeeperDone);
  fn("tcpEndpoint", TcpEndpoint);
}

}  // namespace appshot
