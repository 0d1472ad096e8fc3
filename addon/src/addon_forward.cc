// The front door's native forwarding path (forward.c) for
// src/serve/forwarder.ts: a thread shuttles the bytes, Node hears only
// connects, refusals and closes, a batch per wake-up.
#include <napi.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <uv.h>

#include <cerrno>
#include <map>
#include <vector>

#include "addon.h"

extern "C" {
#include "forward.h"
}

namespace appshot {
namespace {

// One per process: the thread, and the channel back to the JS thread that
// started it (the only one allowed to use it).
struct Forwarder {
  fwd_loop* loop = nullptr;
  Napi::ThreadSafeFunction tsfn;
  napi_env env = nullptr;
  // Connections started and not yet refused or closed; while there are
  // any the channel keeps Node's event loop alive, as open sockets would.
  uint32_t live = 0;
  // Listeners the thread accepts on: like Node's own servers, they keep
  // the event loop alive.
  uint32_t listening = 0;
};

void Hold(Napi::Env env, Forwarder* f, int delta_live, int delta_listening) {
  bool before = f->live + f->listening > 0;
  f->live += delta_live;
  f->listening += delta_listening;
  bool after = f->live + f->listening > 0;
  if (before && !after) f->tsfn.Unref(env);
  if (!before && after) f->tsfn.Ref(env);
}
Forwarder* forwarder = nullptr;

// Numbers per event in the Float64Array handed to JS (forwarder.ts).
constexpr int kFields = 12;

// On the forwarding thread: copies the batch and queues it for JS. A
// closing channel (Node exiting) drops it: nobody is left to hear.
void Report(void* ctx, const fwd_event* events, int n) {
  auto* f = static_cast<Forwarder*>(ctx);
  auto* batch = new std::vector<fwd_event>(events, events + n);
  napi_status st = f->tsfn.NonBlockingCall(batch, [](Napi::Env env, Napi::Function callback, std::vector<fwd_event>* batch) {
    if (env == nullptr || forwarder == nullptr) {  // torn down meanwhile
      delete batch;
      return;
    }
    auto values = Napi::Float64Array::New(env, batch->size() * kFields);
    size_t i = 0;
    for (const fwd_event& e : *batch) {
      values[i++] = e.id;
      values[i++] = e.kind;
      values[i++] = e.err;
      values[i++] = static_cast<double>(e.to_instance);
      values[i++] = static_cast<double>(e.to_client);
      values[i++] = static_cast<double>(e.at_ns);  // exact below 2^53 ns: 104 days of uptime
      values[i++] = e.lid;
      values[i++] = e.fd;
      values[i++] = e.peer_ip;
      values[i++] = e.peer_port;
      values[i++] = e.port;
      values[i++] = e.pid;
      if (e.kind == FWD_FORWARDED) Hold(env, forwarder, 1, 0);
      if (e.kind == FWD_REFUSED || e.kind == FWD_CLOSED) Hold(env, forwarder, -1, 0);
    }
    delete batch;
    callback.Call({values});
  });
  if (st != napi_ok) delete batch;
}

// forwardInit(onEvents): starts the thread once; onEvents(Float64Array)
// receives every batch after that.
Napi::Value ForwardInit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (forwarder) {
    if (forwarder->env != static_cast<napi_env>(env)) Napi::Error::New(env, "the forwarder belongs to another thread").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* f = new Forwarder();
  f->env = env;
  // Finalized when Node tears the environment down: the thread is
  // stopped and every descriptor it held closed.
  f->tsfn = Napi::ThreadSafeFunction::New(env, info[0].As<Napi::Function>(), "appshot-forward", 0, 1, f, [](Napi::Env, Forwarder* f) {
    if (f->loop) fwd_loop_stop(f->loop);
    if (forwarder == f) forwarder = nullptr;
    delete f;
  });
  f->tsfn.Unref(env);
  int err = 0;
  f->loop = fwd_loop_start(Report, f, &err);
  if (!f->loop) {
    f->tsfn.Release();  // the finalizer deletes f
    ThrowErrno(env, "starting the forwarding thread", err);
    return env.Undefined();
  }
  forwarder = f;
  return env.Undefined();
}

// forwardConnect(fd, port, id) -> 1 connected already, 0 connecting (an
// event tells), -errno if nothing was started (the client's socket is then
// untouched). See fwd_connect.
Napi::Value ForwardConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) {
    Napi::Error::New(env, "forwardInit first").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint32_t port = info[1].As<Napi::Number>().Uint32Value();
  uint32_t id = info[2].As<Napi::Number>().Uint32Value();
  if (port == 0 || port > 65535) return Napi::Number::New(env, -EINVAL);
  int rc = fwd_connect(forwarder->loop, fd, static_cast<uint16_t>(port), id);
  if (rc >= 0) Hold(env, forwarder, 1, 0);
  return Napi::Number::New(env, rc);
}

// forwardListen(fd, lid, group, maxHeld) -> 0 or -errno: the thread
// accepts on a duplicate of the listening socket fd from now on (the
// caller closes its own), handing over at most maxHeld connections of the
// group that Node has not let go of (forwardUnhold).
Napi::Value ForwardListen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) return Napi::Number::New(env, -EINVAL);
  auto u32 = [&](int i) { return info[i].As<Napi::Number>().Uint32Value(); };
  int rc = fwd_listen(forwarder->loop, info[0].As<Napi::Number>().Int32Value(), u32(1), u32(2), u32(3));
  if (rc == 0) Hold(env, forwarder, 0, 1);
  return Napi::Number::New(env, rc);
}

// forwardRoute(lid, port, capacity, seen, pid) -> connections forwarded
// under the grant that Node has not heard of yet (fwd_route); pid: the
// instance's process, watched (0: none).
Napi::Value ForwardRoute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) return Napi::Number::New(env, -EINVAL);
  auto u32 = [&](int i) { return info[i].As<Napi::Number>().Uint32Value(); };
  int32_t pid = info.Length() > 4 ? info[4].As<Napi::Number>().Int32Value() : 0;
  int64_t rc = fwd_route(forwarder->loop, u32(0), static_cast<uint16_t>(u32(1)), u32(2), u32(3), pid);
  return Napi::Number::New(env, static_cast<double>(rc));
}

// forwardUnhold(lid, n): Node let go of n connections handed over on it.
Napi::Value ForwardUnhold(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) return env.Undefined();
  fwd_unhold(forwarder->loop, info[0].As<Napi::Number>().Uint32Value(), info[1].As<Napi::Number>().Uint32Value());
  return env.Undefined();
}

// forwardUnlisten(lid): the thread stops accepting on it.
Napi::Value ForwardUnlisten(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) return env.Undefined();
  fwd_unlisten(forwarder->loop, info[0].As<Napi::Number>().Uint32Value());
  Hold(env, forwarder, 0, -1);
  return env.Undefined();
}

// forwardShut(ids: Uint32Array, lids: Uint32Array, shut) -> how many
// connections of those ids or forwarded under those listeners are still
// open; with shut, they are ended (fwd_shut). Their closes are reported as
// any other. Sorts both arrays.
Napi::Value ForwardShut(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!forwarder) return Napi::Number::New(env, 0);
  auto ids = info[0].As<Napi::Uint32Array>();
  auto lids = info[1].As<Napi::Uint32Array>();
  int n = fwd_shut(forwarder->loop, ids.Data(), ids.ElementLength(), lids.Data(), lids.ElementLength(), info[2].ToBoolean().Value());
  return Napi::Number::New(env, n);
}

}  // namespace

// A listener serve shares with its instance (server.ts): watched for a
// connection waiting in its accept queue, never accepted on. On Node's own
// event loop (uv_poll), not the forwarding thread: nothing is moved, and
// the one event (a connection waits) is for this thread anyway. Level-
// triggered and one-shot: stopped at each report, until watchAgain.
int FdArg(const Napi::Value& v) { return v.As<Napi::Number>().Int32Value(); }

struct ReadableWatch {
  uv_poll_t poll;
  Napi::FunctionReference callback;
  uint32_t id;
};
std::map<uint32_t, ReadableWatch*> watches;
uint32_t lastWatch = 0;

void OnReadable(uv_poll_t* handle, int status, int) {
  auto* w = static_cast<ReadableWatch*>(handle->data);
  uv_poll_stop(handle);
  Napi::Env env = w->callback.Env();
  Napi::HandleScope scope(env);
  // An error (the socket closed under it) is told as readiness: the
  // caller looks at the listener and finds out.
  w->callback.MakeCallback(Napi::Object::New(env), {Napi::Number::New(env, status)});
}

// watchReadable(fd, callback) -> id: callback(status) once the listener
// has a connection waiting (accept would not block); then not again
// until watchAgain(id).
Napi::Value WatchReadable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) {
    Napi::Error::New(env, "watchReadable: no event loop").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* w = new ReadableWatch();
  w->id = ++lastWatch;
  w->callback = Napi::Persistent(info[1].As<Napi::Function>());
  w->poll.data = w;
  int rc = uv_poll_init(loop, &w->poll, FdArg(info[0]));
  if (rc == 0) rc = uv_poll_start(&w->poll, UV_READABLE, OnReadable);
  if (rc != 0) {
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), [](uv_handle_t* h) { delete static_cast<ReadableWatch*>(h->data); });
    ThrowErrno(env, "watching the listener", -rc);
    return env.Undefined();
  }
  watches[w->id] = w;
  return Napi::Number::New(env, w->id);
}

Napi::Value WatchAgain(const Napi::CallbackInfo& info) {
  auto it = watches.find(static_cast<uint32_t>(FdArg(info[0])));
  if (it != watches.end()) uv_poll_start(&it->second->poll, UV_READABLE, OnReadable);
  return info.Env().Undefined();
}

// Stops watching for good (the descriptor is the caller's, left open).
Napi::Value Unwatch(const Napi::CallbackInfo& info) {
  auto it = watches.find(static_cast<uint32_t>(FdArg(info[0])));
  if (it == watches.end()) return info.Env().Undefined();
  ReadableWatch* w = it->second;
  watches.erase(it);
  uv_poll_stop(&w->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), [](uv_handle_t* h) { delete static_cast<ReadableWatch*>(h->data); });
  return info.Env().Undefined();
}

// listenQueue(fd) -> connections waiting in a listening TCP socket's accept
// queue (TCP_INFO's tcpi_unacked is sk_ack_backlog while listening).
Napi::Value ListenQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct tcp_info ti = {};
  socklen_t tl = sizeof ti;
  if (getsockopt(FdArg(info[0]), IPPROTO_TCP, TCP_INFO, &ti, &tl) < 0) {
    ThrowErrno(env, "reading TCP_INFO", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, ti.tcpi_state == 10 /* TCP_LISTEN */ ? ti.tcpi_unacked : 0);
}

// dupFd(fd) -> a duplicate, close-on-exec (a listener kept after the Node
// server that made it is closed).
Napi::Value DupFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = fcntl(FdArg(info[0]), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(env, "dup", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

void RegisterForward(Napi::Env env, Napi::Object exports) {
  exports.Set("watchReadable", Napi::Function::New(env, WatchReadable));
  exports.Set("watchAgain", Napi::Function::New(env, WatchAgain));
  exports.Set("unwatch", Napi::Function::New(env, Unwatch));
  exports.Set("listenQueue", Napi::Function::New(env, ListenQueue));
  exports.Set("dupFd", Napi::Function::New(env, DupFd));
  exports.Set("forwardInit", Napi::Function::New(env, ForwardInit));
  exports.Set("forwardConnect", Napi::Function::New(env, ForwardConnect));
  exports.Set("forwardListen", Napi::Function::New(env, ForwardListen));
  exports.Set("forwardRoute", Napi::Function::New(env, ForwardRoute));
  exports.Set("forwardUnlisten", Napi::Function::New(env, ForwardUnlisten));
  exports.Set("forwardUnhold", Napi::Function::New(env, ForwardUnhold));
  exports.Set("forwardShut", Napi::Function::New(env, ForwardShut));
}

}  // namespace appshot
