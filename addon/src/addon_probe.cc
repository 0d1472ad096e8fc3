// Feature probes for `appshot check` (probe.c) and the versions `appshot
// version` reports that only the native part knows.
#include <napi.h>

#include <time.h>

#include <string>

#include "addon.h"
#include "appshot_table.h"

extern "C" {
#include "probe.h"
}

namespace appshot {
namespace {

// probeFeature(name) -> 0 if it works, else the errno the kernel answered.
Napi::Value ProbeFeature(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name = info[0].As<Napi::String>().Utf8Value();
  int rc = probe_feature(name.c_str());
  if (rc < 0) {
    Napi::Error::New(env, "no probe named " + name).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

}  // namespace

void RegisterProbe(Napi::Env env, Napi::Object exports) {
  exports.Set("probeFeature", Napi::Function::New(env, ProbeFeature));
  exports.Set("tableVersion", Napi::Number::New(env, APPSHOT_TABLE_VERSION));
  exports.Set("tableBytes", Napi::Number::New(env, static_cast<double>(appshot_table_bytes())));
  // The kernel's tick (TICK_NSEC), which it adds to every CPU-time
  // interval timer set (set_cpu_itimer) and tells as the coarse clocks'
  // resolution; HZ itself is not shown to userspace. 0 if not told.
  struct timespec tick = {0, 0};
  if (clock_getres(CLOCK_MONOTONIC_COARSE, &tick) != 0 || tick.tv_sec) tick.tv_nsec = 0;
  exports.Set("tickNanoseconds", Napi::Number::New(env, (double)tick.tv_nsec));
}

}  // namespace appshot
