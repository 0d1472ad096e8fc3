// appshot's Node addon: the native primitives the TypeScript drivers use.
//
// This file: reading and writing an application's translation tables (the
// layout lives in appshot_table.h, shared with the preload library and init).
// addon_trace.cc: ptrace, page data and kernel-state readers.
// Every function is synchronous and runs on the JS thread. That is on
// purpose: ptrace belongs to the thread that attached, so the drivers must
// keep to one OS thread.
#include <cstddef>
#include <napi.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <linux/futex.h>
#include <malloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/socket.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "addon.h"

extern "C" {
#include "appshot_table.h"
#include "filecopy.h"
#include "pages.h"
#include "syncs.h"
}

namespace appshot {

// An error with errno's name as `code` and `message` as it is.
static void ThrowCoded(const Napi::Env& env, const std::string& message, int err) {
  if (env.IsExceptionPending()) return;
  Napi::Error e = Napi::Error::New(env, message);
  const char* name = strerrorname_np(err);
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("errno", Napi::Number::New(env, err));
  e.ThrowAsJavaScriptException();
}

void ThrowErrno(const Napi::Env& env, const std::string& what, int err) {
  // The first error stands (addon.h).
  if (env.IsExceptionPending()) return;
  Napi::Error e = Napi::Error::New(env, what + ": " + std::strerror(err));
  const char* name = strerrorname_np(err);
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("errno", Napi::Number::New(env, err));
  e.ThrowAsJavaScriptException();
}

// A table file that could not be opened (mapped, its header looked at):
// ENOTRECOVERABLE is the guard's refusal to look unguarded, said as such.
void ThrowTablesOpen(const Napi::Env& env, const std::string& path, int err) {
  std::string what = path.empty() ? "opening tables" : "opening tables " + path;
  if (err == ENOTRECOVERABLE) what += " (its fault guard's SIGBUS handler was replaced by another: not read unguarded)";
  ThrowErrno(env, what, err);
}

void ThrowStep(const Napi::Env& env, Step s, const std::string& what, const std::string& path) {
  if (s == Step::kUnguarded) {
    const int why = g_unguarded_errno;
    if (why == ENOTRECOVERABLE)
      return ThrowErrno(env, what + " " + path + " (its fault guard's SIGBUS handler was replaced by another: not run unguarded)", why);
    if (why == EAGAIN) return ThrowErrno(env, what + " " + path + " (no room for its fault guard)", why);
    return ThrowErrno(env, what + " " + path + " (its fault guard could not be installed)", why ? why : EAGAIN);
  }
  // A fault is not only a truncation: the file is sparse (only its first
  // page is written at its creation), so the first write to any other
  // page, on a full filesystem, is a SIGBUS too, with the file still its
  // full size. Told apart so that a full disk is not blamed on the
  // application: the file its full size and its filesystem without room
  // for a table. The size alone would not do: an application that
  // truncates its file and sets its size back at once (as the tablesbus
  // fixture does) leaves it full size by now. Looked up by name, for the
  // message only: the mapping is forgotten either way.
  struct stat st;
  struct statfs fs;
  if (stat(path.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) == appshot_table_bytes() &&
      statfs(path.c_str(), &fs) == 0 &&
      static_cast<uint64_t>(fs.f_bavail) * static_cast<uint64_t>(fs.f_bsize) < appshot_table_bytes())
    return ThrowCoded(env, what + " " + path + ": no space left on the filesystem of the table file", ENOSPC);
  ThrowCoded(env, what + " " + path + ": the tables changed size under us (a process of the application truncated its table file)", EPROTO);
}

// A table file is appshot's own regular file in the state directory,
// whose owner could put anything at its name: a FIFO there must not
// block the engine (O_NONBLOCK, which a regular file ignores), a
// terminal must not become its controlling one (O_NOCTTY), nor a
// symbolic link send it elsewhere (O_NOFOLLOW) (review r404 F5).
constexpr int kTablesOpenFlags = O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY;

// appshot_table_map_fd, its look at the mapped header under the guard: the
// file may shrink between the fstat and that look.
static appshot_header* MapTablesFd(int fd, int* err) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *err = errno;
    return nullptr;
  }
  const uint64_t size = appshot_table_bytes();
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != size) {
    *err = EPROTO;
    return nullptr;
  }
  void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    *err = errno;
    return nullptr;
  }
  auto* h = static_cast<appshot_header*>(m);
  bool ours = false;
  const Step looked = Guarded(h, [&] {
    ours = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) == APPSHOT_TABLE_MAGIC && h->version == APPSHOT_TABLE_VERSION &&
           h->size == size;
  });
  if (!ours) {
    munmap(m, size);
    // Not looked at (no guard): its reason, not "not a table file".
    *err = looked == Step::kUnguarded && g_unguarded_errno ? g_unguarded_errno : EPROTO;
    return nullptr;
  }
  return h;
}

appshot_header* MapTables(const std::string& path, int* err) {
  int fd = open(path.c_str(), kTablesOpenFlags | O_RDWR);
  if (fd < 0) {
    *err = errno;
    return nullptr;
  }
  appshot_header* h = MapTablesFd(fd, err);
  close(fd);
  return h;
}

}  // namespace appshot

namespace {

using appshot::Guarded;
using appshot::Step;
using appshot::ThrowErrno;
using appshot::ThrowStep;

bool ParseKind(const Napi::Env& env, const Napi::Value& v, appshot_kind* out) {
  std::string name = v.As<Napi::String>().Utf8Value();
  for (int k = 0; k < APPSHOT_KINDS; k++)
    if (name == appshot_kind_name(static_cast<appshot_kind>(k))) {
      *out = static_cast<appshot_kind>(k);
      return true;
    }
  Napi::TypeError::New(env, "unknown resource kind: " + name)
      .ThrowAsJavaScriptException();
  return false;
}

// Copies a string into a fixed NUL-terminated field (the caller checked
// that it fits).
template <size_t N>
void CopyString(char (&dst)[N], const std::string& src) {
  size_t n = src.size() < N - 1 ? src.size() : N - 1;
  std::memcpy(dst, src.data(), n);
  dst[n] = '\0';
}

// A few table files kept mapped between reads (readTables) and writes
// (OpenTables): the engine reads the same applications' tables over and
// over (a snapshot's freeze, its frozen window, every look at a
// registration), and mapping the file anew each time cost its page faults
// and an munmap's TLB shootdown across the engine's threads, most of a
// read. The file is opened each time and taken from here only if it is the
// same file (device and inode) as the one mapped: a replaced or recreated
// file is mapped afresh. Each entry holds its file's memory until it is
// evicted (kCachedTables at most).
struct CachedTables {
  dev_t dev;
  ino_t ino;
  appshot_header* h;
  size_t size;
};
constexpr size_t kCachedTables = 8;
std::vector<CachedTables> g_cached_tables;

appshot_header* MappedTables(const std::string& path, int* err) {
  int fd = open(path.c_str(), appshot::kTablesOpenFlags | O_RDWR);
  if (fd < 0) {
    *err = errno;
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *err = errno;
    close(fd);
    return nullptr;
  }
  for (size_t i = 0; i < g_cached_tables.size(); i++) {
    CachedTables c = g_cached_tables[i];
    if (c.dev != st.st_dev || c.ino != st.st_ino) continue;
    g_cached_tables.erase(g_cached_tables.begin() + i);
    // The file is the application's, to truncate or overwrite in place:
    // checked again as a file mapped afresh is (MapTablesFd). If it
    // changed, mapped afresh below, which refuses it if it is no table
    // file any more. Checked once a call, this only sends a file that
    // changed layout away early: the file may shrink right after, and
    // every later touch of the mapping is a step under the guard.
    bool same = false;
    if (static_cast<uint64_t>(st.st_size) == c.size)
      Guarded(c.h, [&] {
        same = __atomic_load_n(&c.h->magic, __ATOMIC_ACQUIRE) == APPSHOT_TABLE_MAGIC &&
               c.h->version == APPSHOT_TABLE_VERSION && c.h->size == c.size;
      });
    if (!same) {
      munmap(c.h, c.size);
      break;
    }
    // The most recent last, so that eviction takes the oldest.
    g_cached_tables.push_back(c);
    close(fd);
    return c.h;
  }
  appshot_header* h = appshot::MapTablesFd(fd, err);
  close(fd);
  if (!h) return nullptr;
  if (g_cached_tables.size() >= kCachedTables) {
    munmap(g_cached_tables.front().h, g_cached_tables.front().size);
    g_cached_tables.erase(g_cached_tables.begin());
  }
  g_cached_tables.push_back({st.st_dev, st.st_ino, h, static_cast<size_t>(appshot_table_bytes())});
  return h;
}

// A kept mapping whose file shrank under a step: mapped afresh next time
// (the file checked again).
void ForgetMappedTables(appshot_header* h) {
  for (size_t i = 0; i < g_cached_tables.size(); i++)
    if (g_cached_tables[i].h == h) {
      munmap(h, g_cached_tables[i].size);
      g_cached_tables.erase(g_cached_tables.begin() + i);
      return;
    }
}

// A step on a kept mapping that did not run to its end: the lock let go
// if the step held it, the mapping forgotten, and the error thrown.
void StepFailed(const Napi::Env& env, appshot_header* h, Step s, const std::string& what, const std::string& path) {
  if (s == Step::kShrunk) {
    appshot::DropTableLock(h);
    ForgetMappedTables(h);
  }
  ThrowStep(env, s, what, path);
}

// A table file for one call, taken from the mappings kept (MappedTables):
// a restore writes its new tables a dozen times (its instance section,
// each PID and port bound, each socket noted), and mapping the file for
// each write, then unmapping it, cost each its page faults and an
// munmap's TLB shootdown across the engine's threads.
class OpenTables {
 public:
  explicit OpenTables(const std::string& path) : h_(MappedTables(path, &err_)) {}
  appshot_header* get() const { return h_; }
  int err() const { return err_; }

 private:
  int err_ = 0;
  appshot_header* h_;
};

// The tables at `path` opened for one call (OpenTables); null, with the
// error thrown (ThrowTablesOpen, naming `named`: "" for no path), if they
// could not be.
appshot_header* TablesOrThrow(const Napi::Env& env, const std::string& path, const std::string& named) {
  OpenTables t(path);
  if (!t.get()) appshot::ThrowTablesOpen(env, named, t.err());
  return t.get();
}

// The writers' common arguments: (path, kind, ...). Opens the tables for one
// call; on failure throws and returns null.
appshot_header* OpenWithKind(const Napi::CallbackInfo& info, appshot_kind* kind) {
  Napi::Env env = info.Env();
  if (!ParseKind(env, info[1], kind)) return nullptr;
  return TablesOrThrow(env, info[0].As<Napi::String>().Utf8Value(), "");
}

// createTables(path, aid, salt: bigint)
Napi::Value CreateTables(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::string aid = info[1].As<Napi::String>().Utf8Value();
  bool lossless;
  uint64_t salt = info[2].As<Napi::BigInt>().Uint64Value(&lossless);
  if (env.IsExceptionPending()) return env.Undefined();
  // Not guarded: the file is made here (O_EXCL, 0600) and no process of
  // the application holds it yet.
  appshot_header* h = appshot_table_create(path.c_str(), aid.c_str(), salt);
  if (!h) {
    ThrowErrno(env, "creating tables " + path, errno);
    return env.Undefined();
  }
  CopyString(h->instance.tables_path, path);
  appshot_table_close(h);
  return env.Undefined();
}

static const char* const kReseed[] = {"seeded", "always", "never"};

// The identity section from { id, generation, reseedLibc, libcSeeded };
// false (an exception pending) when it is malformed.
static bool SetIdentity(Napi::Env env, Napi::Object o, appshot_identity& out) {
  std::string id = o.Get("id").As<Napi::String>().Utf8Value();
  if (id.size() != 32 || id.find_first_not_of("0123456789abcdef") != std::string::npos) {
    Napi::RangeError::New(env, "an instance identity is 32 lowercase hex digits: " + id).ThrowAsJavaScriptException();
    return false;
  }
  for (int i = 0; i < 2; i++) out.id[i] = std::stoull(id.substr(i * 16, 16), nullptr, 16);
  out.generation = static_cast<uint64_t>(o.Get("generation").As<Napi::Number>().Int64Value());
  std::string reseed = o.Get("reseedLibc").As<Napi::String>().Utf8Value();
  out.reseed_libc = APPSHOT_RESEED_SEEDED;
  for (uint32_t i = 0; i < 3; i++)
    if (reseed == kReseed[i]) out.reseed_libc = i;
  out.libc_seeded = o.Get("libcSeeded").ToBoolean() ? 1 : 0;
  return true;
}

// setInstance(path, { redirs: [{kind: 'path'|'cow', from, to}], env: ["N=v"],
//   identity?: { id: 32 hex digits, generation, reseedLibc: 'seeded'|'always'|'never', libcSeeded } })
// Replaces the instance section. Only while no process of the application
// runs (before run starts it, before a restore resumes it): readers take no
// lock. Throws, writing nothing, when an entry does not fit.
Napi::Value SetInstance(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto o = info[1].As<Napi::Object>();
  auto redirs = o.Get("redirs").As<Napi::Array>();
  auto envs = o.Get("env").As<Napi::Array>();
  appshot_instance inst{};
  CopyString(inst.tables_path, path);
  if (redirs.Length() > APPSHOT_REDIRS || envs.Length() > APPSHOT_ENVS) {
    Napi::RangeError::New(env, "at most " + std::to_string(APPSHOT_REDIRS) + " path rules and " +
                                   std::to_string(APPSHOT_ENVS) + " SET ENV rules per application")
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  for (uint32_t i = 0; i < redirs.Length(); i++) {
    auto r = redirs.Get(i).As<Napi::Object>();
    std::string kind = r.Get("kind").As<Napi::String>().Utf8Value();
    std::string from = r.Get("from").As<Napi::String>().Utf8Value();
    std::string to = r.Get("to").As<Napi::String>().Utf8Value();
    if (from.size() >= APPSHOT_PATH_MAX || to.size() >= APPSHOT_PATH_MAX) {
      Napi::RangeError::New(env, "path longer than " + std::to_string(APPSHOT_PATH_MAX - 1) + " bytes: " +
                                     (from.size() >= APPSHOT_PATH_MAX ? from : to))
          .ThrowAsJavaScriptException();
      return env.Undefined();
    }
    appshot_redir& d = inst.redir[i];
    d.kind = kind == "cow" ? APPSHOT_REDIR_COW : APPSHOT_REDIR_PATH;
    d.from_len = static_cast<uint32_t>(from.size());
    CopyString(d.from, from);
    CopyString(d.to, to);
  }
  for (uint32_t i = 0; i < envs.Length(); i++) {
    std::string e = envs.Get(i).As<Napi::String>().Utf8Value();
    if (e.size() >= APPSHOT_ENV_LEN) {
      Napi::RangeError::New(env, "SET ENV longer than " + std::to_string(APPSHOT_ENV_LEN - 1) + " bytes: " + e)
          .ThrowAsJavaScriptException();
      return env.Undefined();
    }
    CopyString(inst.env[i], e);
  }
  inst.redirs = redirs.Length();
  inst.envs = envs.Length();
  Napi::Value identity = o.Get("identity");
  if (identity.IsObject() && !SetIdentity(env, identity.As<Napi::Object>(), inst.identity)) return env.Undefined();
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  Step done = Guarded(h, [&] { h->instance = inst; });
  if (done != Step::kDone) StepFailed(env, h, done, "writing the instance of tables", path);
  return env.Undefined();
}

// A string field of the table file, which the application can fill to its
// last byte: read up to its size, never past it for a NUL.
static Napi::String FileString(Napi::Env env, const char* field, size_t size) {
  return Napi::String::New(env, field, strnlen(field, size));
}

// What readTables takes through the mapping, copied under the guard (the
// JS values are made from the copy, after each step).
struct TableRow {
  int32_t vid, sid, owner;
  uint32_t flags;
};
struct WaitCopy {
  uint32_t slot;
  int32_t holder;
  uint32_t moved;
  uint8_t out[APPSHOT_WAIT_OUT];
  uint8_t carried[APPSHOT_WAIT_OUT];
};
struct TablesCopy {
  char aid[sizeof(appshot_header::aid)];
  int32_t init_pid;
  uint32_t repairs;
  appshot_instance instance;
  uint32_t libc_seeded;
  uint32_t notes;
  appshot_socket_note note[APPSHOT_SOCKET_NOTES];
  uint32_t lost;
  uint8_t lost_seen[APPSHOT_LOST_SEEN_BITS / 8];
  uint32_t waits;
  WaitCopy wait[APPSHOT_WAIT_SLOTS];
};

// readTables(path) -> { aid, initPid, repairs, tables: { kind: [entry] } }
Napi::Value ReadTables(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Undefined();
  int err = 0;
  appshot_header* h = MappedTables(path, &err);
  if (!h) {
    appshot::ThrowTablesOpen(env, path, err);
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  Napi::Object tables = Napi::Object::New(env);
  // The used slots are found in a copy of each entry array read with
  // pread, not through the mapping: read through a shared mapping, each
  // page of a tmpfs hole is allocated (a table file of a few entries took
  // ~460 KiB of memory after one `ps`, instead of ~40) and faulted in
  // (~1.4 ms a read of a file not mapped yet); pread reads holes as zeros.
  // Each used slot is then read through the mapping, ordered as writers
  // store it (appshot_entry_at), its page allocated already.
  int fd = open(path.c_str(), appshot::kTablesOpenFlags | O_RDONLY);
  if (fd < 0) {
    appshot::ThrowTablesOpen(env, path, errno);
    return env.Undefined();
  }
  static std::vector<appshot_entry> copy;
  static std::vector<TableRow> found;
  for (int k = 0; k < APPSHOT_KINDS; k++) {
    auto kind = static_cast<appshot_kind>(k);
    const uint32_t capacity = appshot_capacity(kind);
    copy.resize(capacity);
    found.resize(capacity);
    if (int rc = pages_pread_whole(fd, appshot_entries_offset(kind), copy.data(), capacity * sizeof(appshot_entry))) {
      // Truncated since it was mapped (EPROTO: no table file any more).
      close(fd);
      ThrowErrno(env, "reading tables " + path, rc == -ENODATA ? EPROTO : -rc);
      return env.Undefined();
    }
    uint32_t n = 0;
    const appshot_entry* used = copy.data();
    TableRow* rows = found.data();
    Step done = Guarded(h, [&] {
      for (uint32_t s = 0; s < capacity; s++) {
        if (!used[s].stored) continue;
        TableRow& r = rows[n];
        if (appshot_entry_at(h, kind, s, &r.vid, &r.sid, &r.flags, &r.owner)) n++;
      }
    });
    if (done != Step::kDone) {
      close(fd);
      StepFailed(env, h, done, "reading tables", path);
      return env.Undefined();
    }
    Napi::Array list = Napi::Array::New(env);
    for (uint32_t i = 0; i < n; i++) {
      Napi::Object row = Napi::Object::New(env);
      row.Set("virtual", Napi::Number::New(env, rows[i].vid));
      row.Set("system", Napi::Number::New(env, rows[i].sid));
      row.Set("flags", Napi::Number::New(env, rows[i].flags));
      row.Set("owner", Napi::Number::New(env, rows[i].owner));
      list.Set(i, row);
    }
    tables.Set(appshot_kind_name(kind), list);
  }
  close(fd);
  // The rest of what is read through the mapping, in one step.
  static TablesCopy* c = new TablesCopy();
  Step done = Guarded(h, [&] {
    std::memcpy(c->aid, h->aid, sizeof c->aid);
    c->init_pid = h->init_pid;
    c->repairs = h->repairs;
    std::memcpy(&c->instance, &h->instance, sizeof c->instance);
    c->libc_seeded = __atomic_load_n(&h->instance.identity.libc_seeded, __ATOMIC_RELAXED);
    // What the preload library noted of sockets (appshot_table.h).
    c->notes = 0;
    for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
      const appshot_socket_note& e = h->sockets.note[i];
      uint64_t ino = __atomic_load_n(&e.ino, __ATOMIC_ACQUIRE);
      if (!ino || !__atomic_load_n(&e.ready, __ATOMIC_ACQUIRE)) continue;
      appshot_socket_note& to = c->note[c->notes++];
      std::memcpy(&to, &e, sizeof to);
      to.ino = ino;
    }
    // The count before the marks (a mark seen with a count of 0 is
    // harmless), and the marks only when some note was lost.
    c->lost = __atomic_load_n(&h->sockets.lost, __ATOMIC_ACQUIRE);
    if (c->lost) appshot_lost_copy(h, c->lost_seen);
    // Wait calls in flight (appshot_table.h): read while the application
    // is frozen, for the image.
    const appshot_waits* w = appshot_waits_of(h);
    c->waits = 0;
    for (uint32_t i = 0; i < APPSHOT_WAIT_SLOTS; i++) {
      const appshot_wait_slot& slot = w->slot[i];
      int32_t holder = __atomic_load_n(&slot.holder, __ATOMIC_ACQUIRE);
      if (holder <= 0) continue;
      WaitCopy& to = c->wait[c->waits++];
      to.slot = i;
      to.holder = holder;
      to.moved = slot.moved;
      std::memcpy(to.out, slot.out, APPSHOT_WAIT_OUT);
      std::memcpy(to.carried, slot.carried, APPSHOT_WAIT_OUT);
    }
  });
  if (done != Step::kDone) {
    StepFailed(env, h, done, "reading tables", path);
    return env.Undefined();
  }
  out.Set("aid", FileString(env, c->aid, sizeof c->aid));
  out.Set("initPid", Napi::Number::New(env, c->init_pid));
  out.Set("repairs", Napi::Number::New(env, c->repairs));
  out.Set("tables", tables);
  const appshot_instance& in = c->instance;
  Napi::Object inst = Napi::Object::New(env);
  inst.Set("tablesPath", FileString(env, in.tables_path, sizeof in.tables_path));
  Napi::Array redirs = Napi::Array::New(env);
  for (uint32_t i = 0; i < in.redirs && i < APPSHOT_REDIRS; i++) {
    Napi::Object r = Napi::Object::New(env);
    r.Set("kind", in.redir[i].kind == APPSHOT_REDIR_COW ? "cow" : "path");
    r.Set("from", FileString(env, in.redir[i].from, sizeof in.redir[i].from));
    r.Set("to", FileString(env, in.redir[i].to, sizeof in.redir[i].to));
    redirs.Set(i, r);
  }
  inst.Set("redirs", redirs);
  Napi::Array envs = Napi::Array::New(env);
  for (uint32_t i = 0; i < in.envs && i < APPSHOT_ENVS; i++) envs.Set(i, FileString(env, in.env[i], sizeof in.env[i]));
  inst.Set("env", envs);
  Napi::Object identity = Napi::Object::New(env);
  char id[33];
  snprintf(id, sizeof id, "%016llx%016llx", (unsigned long long)in.identity.id[0], (unsigned long long)in.identity.id[1]);
  identity.Set("id", id);
  identity.Set("generation", Napi::Number::New(env, static_cast<double>(in.identity.generation)));
  identity.Set("reseedLibc", kReseed[in.identity.reseed_libc < 3 ? in.identity.reseed_libc : 0]);
  identity.Set("libcSeeded", Napi::Boolean::New(env, c->libc_seeded != 0));
  inst.Set("identity", identity);
  out.Set("instance", inst);
  Napi::Object sockets = Napi::Object::New(env);
  Napi::Array notes = Napi::Array::New(env);
  for (uint32_t i = 0; i < c->notes; i++) {
    const appshot_socket_note& e = c->note[i];
    Napi::Object n = Napi::Object::New(env);
    n.Set("ino", Napi::BigInt::New(env, e.ino));
    n.Set("level", Napi::Number::New(env, e.level));
    n.Set("name", Napi::Number::New(env, e.name));
    n.Set("value", Napi::Number::New(env, e.value));
    n.Set("maker", Napi::Number::New(env, e.maker));
    n.Set("port", Napi::Number::New(env, e.port));
    n.Set("kind", e.type == SOCK_STREAM ? "tcp" : e.type == SOCK_DGRAM ? "udp" : "");
    notes.Set(i, n);
  }
  sockets.Set("notes", notes);
  sockets.Set("lost", Napi::Number::New(env, c->lost));
  if (c->lost) sockets.Set("lostSeen", Napi::Buffer<uint8_t>::Copy(env, c->lost_seen, sizeof c->lost_seen));
  out.Set("sockets", sockets);
  Napi::Array waits = Napi::Array::New(env);
  for (uint32_t i = 0; i < c->waits; i++) {
    const WaitCopy& slot = c->wait[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("slot", Napi::Number::New(env, slot.slot));
    o.Set("holder", Napi::Number::New(env, slot.holder));
    o.Set("moved", Napi::Number::New(env, slot.moved));
    o.Set("out", Napi::Buffer<uint8_t>::Copy(env, slot.out, APPSHOT_WAIT_OUT));
    o.Set("carried", Napi::Buffer<uint8_t>::Copy(env, slot.carried, APPSHOT_WAIT_OUT));
    waits.Set(i, o);
  }
  out.Set("waits", waits);
  return out;
}

// carryWaits(path, waits: [{slot, holder, moved, out, carried}], prior: [{virtual, system}])
// A restore's half of "wait calls across a restore" (appshot_table.h): the
// image's wait slots and the previous node's PIDs, written into new tables
// before any restored process runs. Throws, writing nothing, on a slot that
// does not fit.
Napi::Value CarryWaits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto waits = info[1].As<Napi::Array>();
  auto prior = info[2].As<Napi::Array>();
  for (uint32_t i = 0; i < waits.Length(); i++) {
    auto o = waits.Get(i).As<Napi::Object>();
    if (o.Get("out").As<Napi::Buffer<uint8_t>>().Length() != APPSHOT_WAIT_OUT ||
        o.Get("carried").As<Napi::Buffer<uint8_t>>().Length() != APPSHOT_WAIT_OUT ||
        o.Get("slot").As<Napi::Number>().Uint32Value() >= APPSHOT_WAIT_SLOTS ||
        o.Get("holder").As<Napi::Number>().Int32Value() <= 0) {
      Napi::RangeError::New(env, "a wait slot that does not fit these tables").ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  if (prior.Length() > APPSHOT_PID_CAPACITY) {
    Napi::RangeError::New(env, "more PIDs than the tables hold").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  // Taken from JS first: the writes are a step under the fault guard.
  struct PriorIn {
    int32_t vid, sid;
  };
  struct WaitIn {
    uint32_t slot;
    int32_t holder;
    uint32_t moved;
    const uint8_t* out;
    const uint8_t* carried;
  };
  std::vector<PriorIn> priors(prior.Length());
  for (uint32_t i = 0; i < prior.Length(); i++) {
    auto e = prior.Get(i).As<Napi::Object>();
    priors[i] = {e.Get("virtual").As<Napi::Number>().Int32Value(), e.Get("system").As<Napi::Number>().Int32Value()};
  }
  std::vector<WaitIn> slots(waits.Length());
  for (uint32_t i = 0; i < waits.Length(); i++) {
    auto o = waits.Get(i).As<Napi::Object>();
    slots[i] = {o.Get("slot").As<Napi::Number>().Uint32Value(), o.Get("holder").As<Napi::Number>().Int32Value(),
                o.Get("moved").As<Napi::Number>().Uint32Value(), o.Get("out").As<Napi::Buffer<uint8_t>>().Data(),
                o.Get("carried").As<Napi::Buffer<uint8_t>>().Data()};
  }
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  int failed = 0;
  const PriorIn* pv = priors.data();
  const WaitIn* wv = slots.data();
  const size_t np = priors.size(), nw = slots.size();
  Step done = Guarded(h, [&] {
    for (size_t i = 0; i < np; i++) appshot_prior_add(h, pv[i].vid, pv[i].sid);
    for (size_t i = 0; i < nw && !failed; i++)
      if (appshot_wait_carry(h, wv[i].slot, wv[i].holder, wv[i].moved, wv[i].out, wv[i].carried) != 0) failed = errno;
  });
  if (done != Step::kDone)
    StepFailed(env, h, done, "carrying wait slots into tables", path);
  else if (failed)
    ThrowErrno(env, "carrying wait slot", failed);
  return env.Undefined();
}

// forgetSocketNotes(path, [ino]): the notes of sockets that are closed.
Napi::Value ForgetSocketNotes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto list = info[1].As<Napi::Array>();
  std::vector<uint64_t> inos(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    bool lossless;
    inos[i] = list.Get(i).As<Napi::BigInt>().Uint64Value(&lossless);
  }
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  const uint64_t* iv = inos.data();
  const size_t n = inos.size();
  Step done = Guarded(h, [&] {
    for (size_t i = 0; i < n; i++) appshot_forget_socket(h, iv[i]);
  });
  if (done != Step::kDone) StepFailed(env, h, done, "forgetting socket notes of tables", path);
  return env.Undefined();
}

// socketNoteLost(lostSeen, ino, port, kind): whether a note that found no
// room may have been of socket `ino` (port 0), or of the reuseport group of
// `kind` ("tcp", "udp") on `port` (ino 0n).
Napi::Value SocketNoteLost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto seen = info[0].As<Napi::Buffer<uint8_t>>();
  if (seen.Length() != APPSHOT_LOST_SEEN_BITS / 8) {
    Napi::TypeError::New(env, "socketNoteLost: a filter of another size").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  bool lossless;
  uint64_t ino = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  uint16_t port = static_cast<uint16_t>(info[2].As<Napi::Number>().Uint32Value());
  std::string kind = info[3].As<Napi::String>().Utf8Value();
  uint8_t type = kind == "tcp" ? SOCK_STREAM : kind == "udp" ? SOCK_DGRAM : 0;
  return Napi::Boolean::New(env, appshot_lost_maybe(seen.Data(), ino, port, type) != 0);
}

// forgetLostNotes(path): no lost note was of a socket still open.
Napi::Value ForgetLostNotes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  Step done = Guarded(h, [&] { appshot_forget_lost(h); });
  if (done != Step::kDone) StepFailed(env, h, done, "forgetting lost notes of tables", path);
  return env.Undefined();
}

// noteSocket(path, { ino, level, name, value, port, kind, maker? }): what
// the preload library would have noted of a socket the restore made (or of
// a dnotify watch, level APPSHOT_NOTE_DNOTIFY, made by process `maker`).
Napi::Value NoteSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto o = info[1].As<Napi::Object>();
  bool lossless;
  uint64_t ino = o.Get("ino").As<Napi::BigInt>().Uint64Value(&lossless);
  std::string kind = o.Get("kind").As<Napi::String>().Utf8Value();
  int32_t level = o.Get("level").As<Napi::Number>().Int32Value();
  int32_t maker = o.Has("maker") && o.Get("maker").IsNumber() ? o.Get("maker").As<Napi::Number>().Int32Value() : 0;
  int32_t value = o.Get("value").As<Napi::Number>().Int32Value();
  int32_t name = level == APPSHOT_NOTE_DNOTIFY ? 0 : o.Get("name").As<Napi::Number>().Int32Value();
  uint16_t port = level == APPSHOT_NOTE_DNOTIFY ? 0 : static_cast<uint16_t>(o.Get("port").As<Napi::Number>().Uint32Value());
  uint8_t type = kind == "tcp" ? SOCK_STREAM : kind == "udp" ? SOCK_DGRAM : 0;
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  Step done = Guarded(h, [&] {
    if (level == APPSHOT_NOTE_DNOTIFY)
      appshot_note_dnotify(h, ino, value, maker);
    else
      appshot_note_socket(h, ino, level, name, value, port, type);
  });
  if (done != Step::kDone) StepFailed(env, h, done, "noting a socket in tables", path);
  return env.Undefined();
}

// How long the engine and the CLI wait for an application's table lock
// (appshot_set_lock_patience): its holder lets go within microseconds, or
// is a thread a snapshot stopped, which the freezer lets run on until it
// has; only a lock word the application wrote itself waits this long.
constexpr unsigned kTableLockPatienceMs = 2000;

// A table writer's failure: ETIMEDOUT said as what it is.
void ThrowTableWrite(const Napi::Env& env, const std::string& what, const std::string& path, int err) {
  if (err != ETIMEDOUT) return ThrowErrno(env, what, err);
  ThrowErrno(env, what + ": the table file " + path + " stayed locked for " +
                      std::to_string(kTableLockPatienceMs / 1000) +
                      " s by a thread that does not let go (its lock word written by the application?)",
             err);
}

// noteQueueNotify(path, { ino, signo, value: bigint, owner }): what the
// preload library would have noted of a message queue's notification
// registration the restore made (appshot_note_mq_notify keeps the value in
// the note's two 32-bit fields).
Napi::Value NoteQueueNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto o = info[1].As<Napi::Object>();
  bool lossless;
  uint64_t ino = o.Get("ino").As<Napi::BigInt>().Uint64Value(&lossless);
  uint64_t value = o.Get("value").As<Napi::BigInt>().Uint64Value(&lossless);
  int32_t signo = o.Get("signo").As<Napi::Number>().Int32Value();
  int32_t owner = o.Get("owner").As<Napi::Number>().Int32Value();
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = TablesOrThrow(env, path, path);
  if (!h) return env.Undefined();
  Step done = Guarded(h, [&] { appshot_note_mq_notify(h, ino, signo, value, owner); });
  if (done != Step::kDone) StepFailed(env, h, done, "noting a queue's notification in tables", path);
  return env.Undefined();
}

// bind(path, kind, virtual, system, flags?, owner?)
Napi::Value Bind(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  appshot_kind kind;
  int32_t vid = info[2].As<Napi::Number>().Int32Value();
  int32_t sid = info[3].As<Napi::Number>().Int32Value();
  uint32_t flags = info.Length() > 4 ? info[4].As<Napi::Number>().Uint32Value() : 0;
  int32_t owner = info.Length() > 5 ? info[5].As<Napi::Number>().Int32Value() : 0;
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = OpenWithKind(info, &kind);
  if (!h) return env.Undefined();
  int rc = 0, err = 0;
  Step done = Guarded(h, [&] {
    rc = appshot_bind(h, kind, vid, sid, flags, owner);
    err = errno;
  });
  std::string what = "binding " + std::to_string(vid) + " to " + std::to_string(sid);
  if (done != Step::kDone)
    StepFailed(env, h, done, what + " in tables", info[0].As<Napi::String>().Utf8Value());
  else if (rc != 0)
    ThrowTableWrite(env, what, info[0].As<Napi::String>().Utf8Value(), err);
  return env.Undefined();
}

// mapSystem(path, kind, system, flags?, owner?) -> virtual: the virtual id of a system id,
// allocated now if the table has none (the "first sight" rule).
Napi::Value MapSystem(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  appshot_kind kind;
  int32_t sid = info[2].As<Napi::Number>().Int32Value();
  uint32_t flags = info.Length() > 3 ? info[3].As<Napi::Number>().Uint32Value() : 0;
  int32_t owner = info.Length() > 4 ? info[4].As<Napi::Number>().Int32Value() : 0;
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = OpenWithKind(info, &kind);
  if (!h) return env.Undefined();
  int32_t vid = -1;
  int err = 0;
  Step done = Guarded(h, [&] {
    vid = appshot_map_system(h, kind, sid, flags, owner);
    err = errno;
  });
  if (done != Step::kDone) {
    StepFailed(env, h, done, "mapping " + std::to_string(sid) + " in tables", info[0].As<Napi::String>().Utf8Value());
    return env.Undefined();
  }
  if (vid < 0) {
    ThrowTableWrite(env, "mapping " + std::to_string(sid), info[0].As<Napi::String>().Utf8Value(), err);
    return env.Undefined();
  }
  return Napi::Number::New(env, vid);
}

// repairTablesIfDead(path) -> { repaired, holder }: appshot_repair_if_dead.
// repaired: the last holder of the lock had died holding it, and the
// repair (a dead creator's object adopted) is made; holder: the system TID
// in the lock word of a live holder (the lock was busy), else 0.
Napi::Value RepairTablesIfDead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  appshot_header* h = TablesOrThrow(env, path, "");
  if (!h) return env.Undefined();
  int rc = -1;
  int holder = 0;
  Step done = Guarded(h, [&] {
    rc = appshot_repair_if_dead(h);
    if (rc < 0 && errno == EBUSY) {
      // The lock word: the holder's TID under the robust bits.
      holder = __atomic_load_n(&h->lock, __ATOMIC_ACQUIRE) & FUTEX_TID_MASK;
      if (holder == 0) holder = -1;  // let go meanwhile, or a word that names nobody
    }
  });
  if (done != Step::kDone) {
    StepFailed(env, h, done, "repairing the lock of tables", path);
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("repaired", Napi::Boolean::New(env, rc == 1));
  out.Set("holder", Napi::Number::New(env, holder));
  return out;
}

// unmapSystem(path, kind, system) -> boolean
Napi::Value UnmapSystem(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  appshot_kind kind;
  int32_t sid = info[2].As<Napi::Number>().Int32Value();
  if (env.IsExceptionPending()) return env.Undefined();
  appshot_header* h = OpenWithKind(info, &kind);
  if (!h) return env.Undefined();
  int rc = 0;
  Step done = Guarded(h, [&] { rc = appshot_unmap_system(h, kind, sid); });
  if (done != Step::kDone) {
    StepFailed(env, h, done, "unmapping " + std::to_string(sid) + " in tables", info[0].As<Napi::String>().Utf8Value());
    return env.Undefined();
  }
  return Napi::Boolean::New(env, rc != 0);
}

// removeIpcObject(kind, system) -> boolean: IPC_RMID on a system id. Used
// when an application's supervisor died before it could clean up.
Napi::Value RemoveIpcObject(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  appshot_kind kind;
  if (!ParseKind(env, info[0], &kind)) return env.Undefined();
  int32_t sid = info[1].As<Napi::Number>().Int32Value();
  int rc = -1;
  switch (kind) {
    case APPSHOT_SEMID: rc = semctl(sid, 0, IPC_RMID); break;
    case APPSHOT_SHMID: rc = shmctl(sid, IPC_RMID, nullptr); break;
    case APPSHOT_MSGID: rc = msgctl(sid, IPC_RMID, nullptr); break;
    default: break;
  }
  return Napi::Boolean::New(env, rc == 0);
}

// setIpcOwner(kind, system, uid, gid, mode): IPC_SET of a restored object's
// owner and mode, as the image recorded them. Throws with the errno on
// failure (EPERM: the restorer may not give it to that user).
Napi::Value SetIpcOwner(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  appshot_kind kind;
  if (!ParseKind(env, info[0], &kind)) return env.Undefined();
  int32_t sid = info[1].As<Napi::Number>().Int32Value();
  uid_t uid = info[2].As<Napi::Number>().Uint32Value();
  gid_t gid = info[3].As<Napi::Number>().Uint32Value();
  mode_t mode = info[4].As<Napi::Number>().Uint32Value() & 0777;
  int rc = -1;
  switch (kind) {
    case APPSHOT_SEMID: {
      struct semid_ds ds;
      union semun { int val; struct semid_ds* buf; unsigned short* array; } arg;
      arg.buf = &ds;
      if ((rc = semctl(sid, 0, IPC_STAT, arg)) == 0) {
        ds.sem_perm.uid = uid, ds.sem_perm.gid = gid, ds.sem_perm.mode = mode;
        rc = semctl(sid, 0, IPC_SET, arg);
      }
      break;
    }
    case APPSHOT_SHMID: {
      struct shmid_ds ds;
      if ((rc = shmctl(sid, IPC_STAT, &ds)) == 0) {
        ds.shm_perm.uid = uid, ds.shm_perm.gid = gid, ds.shm_perm.mode = mode;
        rc = shmctl(sid, IPC_SET, &ds);
      }
      break;
    }
    case APPSHOT_MSGID: {
      struct msqid_ds ds;
      if ((rc = msgctl(sid, IPC_STAT, &ds)) == 0) {
        ds.msg_perm.uid = uid, ds.msg_perm.gid = gid, ds.msg_perm.mode = mode;
        rc = msgctl(sid, IPC_SET, &ds);
      }
      break;
    }
    default: errno = EINVAL; break;
  }
  if (rc != 0) ThrowErrno(env, "setting the owner of SysV object " + std::to_string(sid), errno);
  return env.Undefined();
}

// ipcClock() -> seconds: now, on the clock the kernel stamps SysV objects'
// ctime with (appshot_ipc_clock): what an application's tablesCreated is
// read from, so that every object made after it compares as made since.
Napi::Value IpcClock(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(appshot_ipc_clock()));
}

// removeIpcOwned(tables, kind, system, salt, created, initPid) -> boolean:
// IPC_RMID on a system id found in the tables, only if the kernel confirms
// the object is the application's (appshot_ipc_owned): the tables are
// writable by every process of the application, whatever its uid. `salt`
// and `created` are the registry's copies, not the file's.
// The arguments removeIpcOwned and ipcOwned share: (tables, kind, system,
// salt, created, initPid).
struct IpcOwnershipQuestion {
  std::string path;
  appshot_kind kind;
  int32_t sid;
  uint64_t salt;
  int64_t created;
  pid_t init_pid;
};

static bool ParseIpcOwnershipQuestion(const Napi::CallbackInfo& info, IpcOwnershipQuestion* q) {
  q->path = info[0].As<Napi::String>().Utf8Value();
  if (!ParseKind(info.Env(), info[1], &q->kind)) return false;
  q->sid = info[2].As<Napi::Number>().Int32Value();
  bool lossless;
  q->salt = info[3].As<Napi::BigInt>().Uint64Value(&lossless);
  q->created = info[4].As<Napi::Number>().Int64Value();
  q->init_pid = info[5].As<Napi::Number>().Int32Value();
  return !info.Env().IsExceptionPending();
}

// Asks `question` (appshot_ipc_owned or appshot_ipc_remove_owned, which
// take the same arguments) of the object the call names, with the tables
// mapped and guarded when they can be (both work without them): whether
// it answered 1; a fault in the tables is thrown as `before` SID `after`.
using IpcOwnershipFn = int (*)(const appshot_header*, appshot_kind, int32_t, uint64_t, int64_t, pid_t, const char*);
static Napi::Value AskIpcOwnership(const Napi::CallbackInfo& info, IpcOwnershipFn question, const char* before, const char* after) {
  Napi::Env env = info.Env();
  IpcOwnershipQuestion q;
  if (!ParseIpcOwnershipQuestion(info, &q)) return env.Undefined();
  int err = 0;
  appshot_header* h = appshot::MapTables(q.path, &err);
  int answer = 0;
  Step done = Step::kDone;
  if (h)
    done = Guarded(h, [&] { answer = question(h, q.kind, q.sid, q.salt, q.created, q.init_pid, q.path.c_str()); });
  else
    answer = question(nullptr, q.kind, q.sid, q.salt, q.created, q.init_pid, q.path.c_str());
  if (h) appshot_table_close(h);
  if (done != Step::kDone) {
    ThrowStep(env, done, before + std::to_string(q.sid) + after, q.path);
    return env.Undefined();
  }
  return Napi::Boolean::New(env, answer == 1);
}

Napi::Value RemoveIpcOwned(const Napi::CallbackInfo& info) {
  return AskIpcOwnership(info, appshot_ipc_remove_owned, "removing SysV object ", " named in tables");
}

// ipcOwned(tables, kind, system, salt, created, initPid) -> boolean: whether
// the kernel confirms a system id found in the tables is the application's
// (appshot_ipc_owned), as removeIpcOwned asks before removing it: what a
// snapshot reads of an object, it reads with appshot's rights, which may be
// more than the application's.
Napi::Value IpcOwned(const Napi::CallbackInfo& info) {
  return AskIpcOwnership(info, appshot_ipc_owned, "asking whether SysV object ", " is the application's, of tables");
}

// signalMember(pid, signal, initPid, tables) -> boolean: sends the signal
// only if pid is a process of the application (appshot_signal_member).
Napi::Value SignalMember(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = info[0].As<Napi::Number>().Int32Value();
  int sig = info[1].As<Napi::Number>().Int32Value();
  pid_t init_pid = info[2].As<Napi::Number>().Int32Value();
  std::string path = info[3].As<Napi::String>().Utf8Value();
  return Napi::Boolean::New(env, appshot_signal_member(pid, sig, init_pid, path.c_str()) == 0);
}

// pidBelongs(pid, initPid, tables) -> boolean (appshot_pid_belongs).
Napi::Value PidBelongs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = info[0].As<Napi::Number>().Int32Value();
  pid_t init_pid = info[1].As<Napi::Number>().Int32Value();
  std::string path = info[2].As<Napi::String>().Utf8Value();
  return Napi::Boolean::New(env, appshot_pid_belongs(pid, init_pid, path.c_str()) == 1);
}

// lockFile(path) -> fd: the file, made if need be, under an exclusive
// flock (waiting for it). Closing the fd unlocks it, and so does the end of
// the process, however it ends: no lock outlives its holder.
Napi::Value LockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    ThrowErrno(env, "opening " + path, errno);
    return env.Undefined();
  }
  while (flock(fd, LOCK_EX) != 0) {
    if (errno == EINTR) continue;
    int err = errno;
    close(fd);
    ThrowErrno(env, "locking " + path, err);
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

// tryLockFile(path) -> fd, or -1 if another process holds it: the file,
// made if need be (0600), under an exclusive flock taken without waiting.
// The resident engine holds its state directory's this way for its whole
// life: the kernel drops it when the engine ends, however it ends.
Napi::Value TryLockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    ThrowErrno(env, "opening " + path, errno);
    return env.Undefined();
  }
  while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    int err = errno;
    close(fd);
    if (err == EWOULDBLOCK) return Napi::Number::New(env, -1);
    ThrowErrno(env, "locking " + path, err);
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

// renameNoReplace(from, to): renames `from` to `to` only if nothing is
// at `to` (renameat2 RENAME_NOREPLACE), atomically: a directory made
// ahead of time takes a name that mkdir would have claimed, and fails
// as mkdir would (EEXIST) if the name is taken, never replacing an empty
// directory of that name as rename(2) does. Throws with the errno's code
// (EINVAL: a file system without it).
Napi::Value RenameNoReplace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string from = info[0].As<Napi::String>().Utf8Value();
  std::string to = info[1].As<Napi::String>().Utf8Value();
  if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) ThrowErrno(env, "renaming " + from + " to " + to, errno);
  return env.Undefined();
}

// fsyncStart(fds) -> handle: fsync of each descriptor, all at once, each
// on a thread of its own; fsyncWait(handle, what) waits for all of them
// and throws the first one's error (errno's code), naming `what`. The
// descriptors must stay open until the wait (the caller's finally). For
// syncs that depend on nothing of each other (the image commit's: see
// commitImageDir): together, the file system can share one journal
// commit and one device flush among them.
struct FsyncGroup {
  std::vector<fsync_job> jobs;
  bool waited = false;
  ~FsyncGroup() {
    for (auto& j : jobs) fsync_job_wait(&j);
  }
};

Napi::Value FsyncStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array fds = info[0].As<Napi::Array>();
  auto* g = new FsyncGroup();
  g->jobs.resize(fds.Length());
  for (uint32_t i = 0; i < fds.Length(); i++) fsync_job_start(&g->jobs[i], fds.Get(i).As<Napi::Number>().Int32Value());
  return Napi::External<FsyncGroup>::New(env, g, [](Napi::Env, FsyncGroup* group) { delete group; });
}

Napi::Value FsyncWait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  FsyncGroup* g = info[0].As<Napi::External<FsyncGroup>>().Data();
  std::string what = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "syncing";
  int rc = 0;
  for (auto& j : g->jobs) {
    int r = fsync_job_wait(&j);
    if (!rc) rc = r;
  }
  if (rc) ThrowErrno(env, what, -rc);
  return env.Undefined();
}

// sessionKeyringSerial() -> the serial of this process's session keyring
// (its user's default one if it has none of its own), 0 without keyrings.
// An application inherits it from whoever runs it (harness.ts).
Napi::Value SessionKeyringSerial(const Napi::CallbackInfo& info) {
  long serial = syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* KEY_SPEC_SESSION_KEYRING */, 0);
  return Napi::Number::New(info.Env(), serial > 0 ? static_cast<double>(serial) : 0);
}

// copyFileData(in, out): the regular file open at `in` copied into `out`
// (empty, open for writing), its holes left holes (filecopy.c).
Napi::Value CopyFileData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* step = nullptr;
  long rc = file_copy_data(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value(), &step);
  if (rc) ThrowErrno(env, step, static_cast<int>(-rc));
  return env.Undefined();
}

// peerCredentials(fd) -> {pid, uid, gid}: who is at the other end of a
// connected unix socket, as the kernel recorded it at connect()
// (SO_PEERCRED): the engine serves only its own user.
Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    ThrowErrno(env, "SO_PEERCRED", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("pid", Napi::Number::New(env, cred.pid));
  o.Set("uid", Napi::Number::New(env, cred.uid));
  o.Set("gid", Napi::Number::New(env, cred.gid));
  return o;
}

// mallocArenas(n): at most n malloc arenas in this process from now on
// (mallopt M_ARENA_MAX). A resident process (appshot serve) does its
// heavy work (a restore, an image decoded, V8's compilers on its worker
// threads) in bursts between long idle stretches; each thread that
// mallocs gets an arena of its own by default, and what a burst freed in
// one stays that thread's, resident, until the process ends.
Napi::Value MallocArenas(const Napi::CallbackInfo& info) {
  int n = info[0].As<Napi::Number>().Int32Value();
  return Napi::Boolean::New(info.Env(), n > 0 && mallopt(M_ARENA_MAX, n) == 1);
}

// trimMemory() -> whether any memory went back to the kernel: the free
// pages of every malloc arena returned (malloc_trim(0) madvises them
// away, wherever in the arena they are), so that what a burst of work
// freed stops counting as the process's resident memory.
Napi::Value TrimMemory(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), malloc_trim(0) == 1);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  appshot_set_lock_patience(kTableLockPatienceMs);
  // Every touch of a table mapping here is a step under the fault guard
  // (addon.h Guarded): its SIGBUS handler, and a lock that leaves SIGBUS
  // deliverable while held.
  if (tables_guard_install() != 0) {
    ThrowErrno(env, "installing the tables' SIGBUS guard", errno);
    return exports;
  }
  appshot_set_lock_spares_faults(1);
  exports.Set("removeIpcObject", Napi::Function::New(env, RemoveIpcObject));
  exports.Set("removeIpcOwned", Napi::Function::New(env, RemoveIpcOwned));
  exports.Set("ipcOwned", Napi::Function::New(env, IpcOwned));
  exports.Set("ipcClock", Napi::Function::New(env, IpcClock));
  exports.Set("setIpcOwner", Napi::Function::New(env, SetIpcOwner));
  exports.Set("signalMember", Napi::Function::New(env, SignalMember));
  exports.Set("pidBelongs", Napi::Function::New(env, PidBelongs));
  exports.Set("createTables", Napi::Function::New(env, CreateTables));
  exports.Set("readTables", Napi::Function::New(env, ReadTables));
  exports.Set("repairTablesIfDead", Napi::Function::New(env, RepairTablesIfDead));
  // Where a tables file keeps its lock's futex word (the mutex's first
  // field): a snapshot checks that no thread it stopped holds it.
  exports.Set("tablesLockOffset", Napi::Number::New(env, static_cast<double>(offsetof(struct appshot_header, lock))));
  exports.Set("tablesIpcPidsOffset", Napi::Number::New(env, static_cast<double>(appshot_ipc_pids_offset())));
  exports.Set("carryWaits", Napi::Function::New(env, CarryWaits));
  exports.Set("noteSocket", Napi::Function::New(env, NoteSocket));
  exports.Set("noteQueueNotify", Napi::Function::New(env, NoteQueueNotify));
  exports.Set("forgetSocketNotes", Napi::Function::New(env, ForgetSocketNotes));
  exports.Set("socketNoteLost", Napi::Function::New(env, SocketNoteLost));
  exports.Set("forgetLostNotes", Napi::Function::New(env, ForgetLostNotes));
  exports.Set("setInstance", Napi::Function::New(env, SetInstance));
  exports.Set("lockFile", Napi::Function::New(env, LockFile));
  exports.Set("tryLockFile", Napi::Function::New(env, TryLockFile));
  exports.Set("renameNoReplace", Napi::Function::New(env, RenameNoReplace));
  exports.Set("fsyncStart", Napi::Function::New(env, FsyncStart));
  exports.Set("fsyncWait", Napi::Function::New(env, FsyncWait));
  exports.Set("copyFileData", Napi::Function::New(env, CopyFileData));
  exports.Set("sessionKeyringSerial", Napi::Function::New(env, SessionKeyringSerial));
  exports.Set("peerCredentials", Napi::Function::New(env, PeerCredentials));
  exports.Set("mallocArenas", Napi::Function::New(env, MallocArenas));
  exports.Set("trimMemory", Napi::Function::New(env, TrimMemory));
  exports.Set("bind", Napi::Function::New(env, Bind));
  exports.Set("mapSystem", Napi::Function::New(env, MapSystem));
  exports.Set("unmapSystem", Napi::Function::New(env, UnmapSystem));
  Napi::Object flags = Napi::Object::New(env);
  flags.Set("INIT", Napi::Number::New(env, APPSHOT_F_INIT));
  flags.Set("THREAD", Napi::Number::New(env, APPSHOT_F_THREAD));
  flags.Set("THREADS", Napi::Number::New(env, APPSHOT_F_THREADS));
  exports.Set("flags", flags);
  appshot::RegisterTrace(env, exports);
  appshot::RegisterRestore(env, exports);
  appshot::RegisterTcp(env, exports);
  appshot::RegisterDgram(env, exports);
  appshot::RegisterProbe(env, exports);
  appshot::RegisterForward(env, exports);
  appshot::RegisterIoUring(env, exports);
  appshot::RegisterProcScan(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(appshot, Init)
