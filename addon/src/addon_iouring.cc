// io_uring counters brought to a snapshot's values (iouring.c).
#include <napi.h>

#include "addon.h"

extern "C" {
#include "iouring.h"
}

namespace appshot {
namespace {

// ioUringAdvance({pid, fd, sqEntries, cqEntries, ringBytes, sqeBytes,
//   arrayOffset, sqeSize, sqHead, cqTail}) -> calls (io_uring_enter calls
// made); throws with the reason.
Napi::Value IoUringAdvance(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].As<Napi::Object>();
  auto num = [&](const char* k) { return o.Get(k).As<Napi::Number>(); };
  struct iouring_advance a = {};
  a.pid = num("pid").Int32Value();
  a.fd = num("fd").Int32Value();
  a.sq_entries = num("sqEntries").Uint32Value();
  a.cq_entries = num("cqEntries").Uint32Value();
  a.ring_bytes = static_cast<unsigned long>(num("ringBytes").Int64Value());
  a.sqe_bytes = static_cast<unsigned long>(num("sqeBytes").Int64Value());
  a.array_offset = num("arrayOffset").Int64Value();
  a.sqe_size = num("sqeSize").Uint32Value();
  a.sq_head = num("sqHead").Uint32Value();
  a.cq_tail = num("cqTail").Uint32Value();
  if (iouring_advance(&a) != 0) {
    Napi::Error::New(env, a.error).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, a.calls);
}

// ioUringHasEventfd(pid, fd) -> 1 (an eventfd registered), 0, or -errno.
Napi::Value IoUringHasEventfd(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), iouring_has_eventfd(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value()));
}

}  // namespace

void RegisterIoUring(Napi::Env env, Napi::Object exports) {
  exports.Set("ioUringAdvance", Napi::Function::New(env, IoUringAdvance));
  exports.Set("ioUringHasEventfd", Napi::Function::New(env, IoUringHasEventfd));
}

}  // namespace appshot
