// Who holds or names a table file, for the registry's look at an
// application whose supervisor is gone (procscan.c; src/registry.ts
// TablesNamers).
#include <dirent.h>
#include <napi.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "addon.h"

extern "C" {
#include "procscan.h"
}

namespace appshot {
namespace {

struct Held {
  std::string path;
  struct procscan_file file;
};

void CollectTarget(const char* target, size_t len, const struct procscan_file* file, void* arg) {
  static_cast<std::vector<Held>*>(arg)->push_back(Held{std::string(target, len), *file});
}

// "MAJOR:MINOR:INO": a file's identity as JavaScript compares it (an
// inode number may not fit a double), from statx of the file pinned.
std::string Identity(const struct procscan_file& f) {
  return std::to_string(f.dev_major) + ":" + std::to_string(f.dev_minor) + ":" + std::to_string(f.ino);
}

Napi::Object FactsObject(Napi::Env env, pid_t pid, const struct procscan_facts& f, const std::vector<Held>& held) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("pid", Napi::Number::New(env, pid));
  o.Set("start", Napi::Number::New(env, static_cast<double>(f.start)));
  Napi::Array uids = Napi::Array::New(env, 4);
  for (uint32_t i = 0; i < 4; i++) uids.Set(i, Napi::Number::New(env, f.uid[i]));
  o.Set("uids", uids);
  Napi::Array h = Napi::Array::New(env, held.size());
  for (size_t i = 0; i < held.size(); i++) {
    Napi::Object e = Napi::Object::New(env);
    e.Set("path", Napi::String::New(env, held[i].path));
    e.Set("identity", Napi::String::New(env, Identity(held[i].file)));
    e.Set("tied", Napi::Boolean::New(env, held[i].file.tied != 0));
    h.Set(static_cast<uint32_t>(i), e);
  }
  o.Set("held", h);
  return o;
}

// A process that cannot be read because it is gone, or is not ours to
// read: not looked at. Any other failure (no descriptor left, no memory)
// says nothing of it, and fails the look rather than count it as absent
// (review r418 F2: an engine out of descriptors released live apps).
// A refusal (EACCES) is "not ours" only for a caller that may not look
// into every process (procscan_refusal_is_absence: review r435 N4).
bool Absent(int err) {
  return err == -ENOENT || err == -ESRCH || (err == -EACCES && procscan_refusal_is_absence());
}

// The facts of `pid` into `out`: 1, 0 if it is not looked at (gone, not
// ours, a kernel thread), -1 with a JavaScript exception pending.
int Facts(Napi::Env env, pid_t pid, const std::string& prefix, Napi::Object* out) {
  struct procscan_facts f;
  int r = procscan_facts(pid, &f);
  if (r != 0) {
    if (Absent(r)) return 0;
    ThrowErrno(env, "reading /proc/" + std::to_string(pid), -r);
    return -1;
  }
  if (f.kthread) return 0;
  std::vector<Held> held;
  r = procscan_targets(pid, &f, prefix.c_str(), CollectTarget, &held);
  if (r == -ESRCH) return 0;
  if (r != 0) {
    ThrowErrno(env, "reading the descriptors of /proc/" + std::to_string(pid), -r);
    return -1;
  }
  *out = FactsObject(env, pid, f, held);
  return 1;
}

// processFacts(pid, prefix) -> { pid, start, uids, held } | null: its
// start time and uids, and the descriptors whose targets start with
// `prefix` (each target and the identity of the file it is); null for no
// such process, or a kernel thread.
Napi::Value ProcessFacts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Int(info[0]);
  std::string prefix = info[1].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending() || pid <= 0) return env.Null();
  Napi::Object o;
  return Facts(env, pid, prefix, &o) == 1 ? Napi::Value(o) : env.Null();
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
  errno = 0;
  int listErr = 0;
  while (struct dirent* de = readdir(d)) {
    char* end;
    long pid = std::strtol(de->d_name, &end, 10);
    if (*end || end == de->d_name || pid <= 1 || pid == self) continue;
    Napi::Object o;
    int r = Facts(env, static_cast<pid_t>(pid), prefix, &o);
    if (r < 0) break;
    if (r == 1) out.Set(n++, o);
    errno = 0;
  }
  if (!env.IsExceptionPending()) listErr = errno;
  closedir(d);
  if (env.IsExceptionPending()) return env.Null();
  if (listErr) {
    ThrowErrno(env, "listing /proc", listErr);
    return env.Null();
  }
  return out;
}

// fileIdentity(path) -> "MAJOR:MINOR:INO" | null: the identity of the file at
// `path` (its last component not followed) as processFacts reports a
// held one's; null if there is none.
Napi::Value FileIdentity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Null();
  struct procscan_file file;
  int r = procscan_file_identity(path.c_str(), &file);
  if (r == -ENOENT) return env.Null();
  if (r != 0) {
    ThrowErrno(env, "identifying " + path, -r);
    return env.Null();
  }
  return Napi::String::New(env, Identity(file));
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
  exports.Set("fileIdentity", Napi::Function::New(env, FileIdentity));
}

}  // namespace appshot
