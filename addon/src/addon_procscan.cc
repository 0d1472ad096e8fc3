// Who holds or names a table file, for the registry's look at an
// application whose supervisor is gone (procscan.c; src/registry.ts
// TablesNamers).
#include <dirent.h>
#include <napi.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include "addon.h"

extern "C" {
#include "procscan.h"
}

namespace appshot {
namespace {

void CollectTarget(const char* target, size_t len, void* arg) {
  static_cast<std::vector<std::string>*>(arg)->emplace_back(target, len);
}

Napi::Object FactsObject(Napi::Env env, pid_t pid, const struct procscan_facts& f, const std::vector<std::string>& held) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("pid", Napi::Number::New(env, pid));
  o.Set("start", Napi::Number::New(env, static_cast<double>(f.start)));
  Napi::Array uids = Napi::Array::New(env, 4);
  for (uint32_t i = 0; i < 4; i++) uids.Set(i, Napi::Number::New(env, f.uid[i]));
  o.Set("uids", uids);
  Napi::Array h = Napi::Array::New(env, held.size());
  for (size_t i = 0; i < held.size(); i++) h.Set(static_cast<uint32_t>(i), Napi::String::New(env, held[i]));
  o.Set("held", h);
  return o;
}

// processFacts(pid, prefix) -> { pid, start, uids, held } | null: its
// start time and uids, and the targets of its descriptors that start
// with `prefix`; null for no such process, or a kernel thread.
Napi::Value ProcessFacts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Int(info[0]);
  std::string prefix = info[1].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Null();
  struct procscan_facts f;
  if (pid <= 0 || procscan_facts(pid, &f) != 0 || f.kthread) return env.Null();
  std::vector<std::string> held;
  procscan_targets(pid, prefix.c_str(), CollectTarget, &held);
  return FactsObject(env, pid, f, held);
}

// processesFacts(prefix) -> processFacts of every process but this one and
// PID 1, in one pass over /proc.
Napi::Value ProcessesFacts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string prefix = info[0].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Null();
  Napi::Array out = Napi::Array::New(env);
  DIR* d = opendir("/proc");
  if (!d) {
    ThrowErrno(env, "listing /proc", errno);
    return env.Null();
  }
  const pid_t self = getpid();
  uint32_t n = 0;
  std::vector<std::string> held;
  while (struct dirent* de = readdir(d)) {
    char* end;
    long pid = std::strtol(de->d_name, &end, 10);
    if (*end || end == de->d_name || pid <= 1 || pid == self) continue;
    struct procscan_facts f;
    if (procscan_facts(static_cast<pid_t>(pid), &f) != 0 || f.kthread) continue;
    held.clear();
    procscan_targets(static_cast<pid_t>(pid), prefix.c_str(), CollectTarget, &held);
    out.Set(n++, FactsObject(env, static_cast<pid_t>(pid), f, held));
  }
  closedir(d);
  return out;
}

// environValue(pid, start, name) -> string | null: `name`'s value in the
// environment of the process `pid` that started at `start` (a process
// given the PID since is not asked, nor answered for); null if it is not
// there or cannot be read.
Napi::Value EnvironValue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Int(info[0]);
  double start = info[1].As<Napi::Number>().DoubleValue();
  std::string name = info[2].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Null();
  auto same = [&] {
    struct procscan_facts f;
    return procscan_facts(pid, &f) == 0 && static_cast<double>(f.start) == start;
  };
  // Checked after the read only: a process given the PID before the read
  // started after the one asked about, and so has another start time.
  if (pid <= 0) return env.Null();
  std::vector<char> value(8192);
  long len = procscan_environ_value(pid, name.c_str(), value.data(), value.size());
  if (len < 0 || !same()) return env.Null();
  return Napi::String::New(env, value.data(), static_cast<size_t>(len));
}

}  // namespace

void RegisterProcScan(Napi::Env env, Napi::Object exports) {
  exports.Set("processFacts", Napi::Function::New(env, ProcessFacts));
  exports.Set("processesFacts", Napi::Function::New(env, ProcessesFacts));
  exports.Set("environValue", Napi::Function::New(env, EnvironValue));
}

}  // namespace appshot
