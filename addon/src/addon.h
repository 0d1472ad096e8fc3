// Shared by the addon's translation units.
#ifndef APPSHOT_ADDON_H
#define APPSHOT_ADDON_H
#include <napi.h>
#include <string>
#include <type_traits>

extern "C" {
#include "appshot_table.h"
#include "tablesguard.h"
}

namespace appshot {
// Throws a JS Error carrying the errno name as `code`, like Node's own fs
// errors, so the CLI can turn it into one clear message.
// With an exception pending already (an argument of the wrong type, read
// with As<>(), leaves one), it throws nothing more: a second throw would be
// node-addon-api's fatal error, the engine's abort.
void ThrowErrno(const Napi::Env& env, const std::string& what, int err);

// A table file that could not be opened (mapped, its header looked at),
// as ThrowErrno; ENOTRECOVERABLE (the fault guard's SIGBUS handler was
// replaced: not looked at unguarded) said as such. `path` may be empty.
void ThrowTablesOpen(const Napi::Env& env, const std::string& path, int err);

// --- The fault guard of table mappings (tablesguard.h) ---------------------
//
// Every read or write of an application's tables through a mapping runs as
// a step under Guarded: the application may truncate its file at any
// moment, and a touch past its end is a SIGBUS. A step holds plain data
// moves and table calls only (tablesguard.h says why): arguments are taken
// from JS before it, JS values made after it.
enum class Step { kDone, kShrunk, kUnguarded };
// Why this thread's last step was not run (kUnguarded): tables_guard_run's
// errno, kept here because what runs between the step and its message
// (DropTableLock, munmap) may change errno.
inline thread_local int g_unguarded_errno = 0;

template <typename F>
Step Guarded(const appshot_header* h, F&& step) {
  using Body = std::remove_reference_t<F>;
  void (*call)(void*) = [](void* a) { (*static_cast<Body*>(a))(); };
  int rc = tables_guard_run(h, appshot_table_bytes(), call, static_cast<void*>(&step));
  if (rc < 0) g_unguarded_errno = errno;
  return rc == 0 ? Step::kDone : rc == 1 ? Step::kShrunk : Step::kUnguarded;
}

// A step that took the table lock ended early: the lock word let go if it
// still names this thread.
inline void DropTableLock(appshot_header* h) {
  tables_guard_drop_lock(h, appshot_table_bytes(), reinterpret_cast<unsigned*>(&h->lock));
}

// Throws for a step that did not run to its end: `what` (reading tables,
// binding...) of the table file `path`.
void ThrowStep(const Napi::Env& env, Step s, const std::string& what, const std::string& path);

// The table file at `path`, mapped for this call, its header checked under
// the guard (appshot_table_map_fd's checks); unmapped by
// appshot_table_close. Null with *err (EPROTO: no table file of this
// layout, or one that shrank as it was checked).
appshot_header* MapTables(const std::string& path, int* err);
// A JS number argument as a C int (an fd, a flag word).
inline int Int(const Napi::Value& v) { return v.As<Napi::Number>().Int32Value(); }
// socket(2), made with `owner`'s fsuid and fsgid when it is a {uid, gid}
// object (peercred.c peercred_owned_socket), else as appshot: -1 with
// errno on failure (addon_restore.cc).
int OwnedSocket(const Napi::Value& owner, int family, int type, int protocol);
// The ptrace, page-data and kernel-state readers (addon_trace.cc).
void RegisterTrace(Napi::Env env, Napi::Object exports);
// Objects the restore driver creates and hands over (addon_restore.cc).
void RegisterRestore(Napi::Env env, Napi::Object exports);
// Established TCP connections through repair mode (addon_tcp.cc).
void RegisterTcp(Napi::Env env, Napi::Object exports);
// Datagram and record sockets: names, queues, made again (addon_dgram.cc).
void RegisterDgram(Napi::Env env, Napi::Object exports);
// Kernel feature probes and native versions (addon_probe.cc).
void RegisterProbe(Napi::Env env, Napi::Object exports);
// The front door's forwarding thread (addon_forward.cc).
void RegisterForward(Napi::Env env, Napi::Object exports);
// Who holds or names a table file (addon_procscan.cc).
void RegisterProcScan(Napi::Env env, Napi::Object exports);
// io_uring counters brought to a snapshot's values (addon_iouring.cc).
void RegisterIoUring(Napi::Env env, Napi::Object exports);
}  // namespace appshot
#endif
