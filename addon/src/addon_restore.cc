// Kernel objects the restore driver creates in its own process and then
// hands to the restored processes (pidfd_getfd, run inside them): pipes
// with their data, eventfds, listening sockets, memfds for shared memory,
// files at an offset. And the application's SysV objects, created under
// new system ids and keys and bound to the image's virtual ones.
#include <napi.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include <signal.h>
#include <linux/capability.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <sys/syscall.h>

#include <arpa/inet.h>
#include <spawn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "addon.h"
#include "addon_fsident.h"

extern "C" {
#include "appshot_table.h"
#include "pages.h"
#include "dgram.h"
#include "peercred.h"
}

namespace {

using appshot::Int;
using appshot::ThrowErrno;

// pidfdOpen(pid, flags) -> fd: a pidfd of a restored process, handed to it
// as the pidfd it held (resources/pidfd.ts).
Napi::Value PidfdOpen(const Napi::CallbackInfo& info) {
  int fd = static_cast<int>(syscall(SYS_pidfd_open, Int(info[0]), Int(info[1])));
  if (fd < 0) {
    ThrowErrno(info.Env(), "pidfd_open", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fd);
}

// pidfdSendSignal(pidfd, signal): the signal to the process the pidfd
// names, never to one that took its PID after it ended (ESRCH then).
Napi::Value PidfdSendSignal(const Napi::CallbackInfo& info) {
  if (syscall(SYS_pidfd_send_signal, Int(info[0]), Int(info[1]), nullptr, 0) < 0) ThrowErrno(info.Env(), "pidfd_send_signal", errno);
  return info.Env().Undefined();
}

Napi::Value Pipe(const Napi::CallbackInfo& info) {
  int p[2];
  if (pipe2(p, O_CLOEXEC)) {
    ThrowErrno(info.Env(), "pipe", errno);
    return info.Env().Undefined();
  }
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(0u, p[0]);
  a.Set(1u, p[1]);
  return a;
}

// eventfd(count, flags) -> fd
Napi::Value EventFd(const Napi::CallbackInfo& info) {
  int fd = eventfd(static_cast<unsigned>(info[0].As<Napi::Number>().Int64Value()),
                   EFD_CLOEXEC | Int(info[1]));
  if (fd < 0) ThrowErrno(info.Env(), "eventfd", errno);
  return Napi::Number::New(info.Env(), fd);
}

// memfd(name, size) -> fd
Napi::Value MemFd(const Napi::CallbackInfo& info) {
  std::string name = info[0].As<Napi::String>().Utf8Value();
  unsigned flags = info.Length() > 2 ? static_cast<unsigned>(Int(info[2])) : 0;
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | flags);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(info[1].As<Napi::Number>().Int64Value()))) {
    ThrowErrno(info.Env(), "memfd", errno);
    if (fd >= 0) close(fd);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fd);
}

// lseek(fd, offset) -> new offset. A bigint offset is taken exactly and
// the offset comes back as one: a directory's position is a cookie its
// file system chose (ext4: a 64-bit hash), which a double would round.
Napi::Value Lseek(const Napi::CallbackInfo& info) {
  bool big = info[1].IsBigInt();
  bool lossless = true;
  int64_t offset = big ? info[1].As<Napi::BigInt>().Int64Value(&lossless) : info[1].As<Napi::Number>().Int64Value();
  if (!lossless) {
    Napi::RangeError::New(info.Env(), "lseek: offset out of range").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  off_t r = lseek(Int(info[0]), static_cast<off_t>(offset), SEEK_SET);
  if (r < 0) ThrowErrno(info.Env(), "lseek", errno);
  if (big) return Napi::BigInt::New(info.Env(), static_cast<int64_t>(r));
  return Napi::Number::New(info.Env(), static_cast<double>(r));
}

// socketPair(type) -> [fd, fd]: a connected unix pair, close-on-exec.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int p[2];
  if (socketpair(AF_UNIX, Int(info[0]) | SOCK_CLOEXEC, 0, p)) {
    ThrowErrno(info.Env(), "socketpair", errno);
    return info.Env().Undefined();
  }
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(0u, p[0]);
  a.Set(1u, p[1]);
  return a;
}

// peerCred(fd) -> {uid, gid, groups}: who a connected unix socket's peer
// is, as the kernel recorded it (SO_PEERCRED's effective ids and
// SO_PEERGROUPS), for the image (peercred.c).
Napi::Value PeerCred(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Room for most processes' groups at once; more only when asked.
  std::vector<uint32_t> groups(64);
  struct peercred c;
  int rc = peercred_of(Int(info[0]), &c, groups.data(), static_cast<uint32_t>(groups.size()));
  if (rc == -ERANGE && c.ngroups <= PEERCRED_MAX_GROUPS) {
    groups.resize(c.ngroups);
    rc = peercred_of(Int(info[0]), &c, groups.data(), static_cast<uint32_t>(groups.size()));
  }
  if (rc) {
    ThrowErrno(env, "reading a unix socket's peer credentials", -rc);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("uid", Napi::Number::New(env, c.uid));
  o.Set("gid", Napi::Number::New(env, c.gid));
  Napi::Array g = Napi::Array::New(env, c.ngroups);
  for (uint32_t i = 0; i < c.ngroups; i++) g.Set(i, Napi::Number::New(env, groups[i]));
  o.Set("groups", g);
  return o;
}

// A {uid, gid, groups} object into `out` (its groups in `store`); false
// with a TypeError thrown if it is not one. null/undefined: none.
static bool PeerCredArg(const Napi::Value& v, struct peercred* out, std::vector<uint32_t>& store, bool* given) {
  *given = !(v.IsNull() || v.IsUndefined());
  if (!*given) return true;
  Napi::Env env = v.Env();
  if (!v.IsObject()) {
    Napi::TypeError::New(env, "peer credentials must be {uid, gid, groups}").ThrowAsJavaScriptException();
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  Napi::Value uid = o.Get("uid"), gid = o.Get("gid"), groups = o.Get("groups");
  if (!uid.IsNumber() || !gid.IsNumber() || !groups.IsArray() || groups.As<Napi::Array>().Length() > PEERCRED_MAX_GROUPS) {
    Napi::TypeError::New(env, "peer credentials must be {uid, gid, groups}").ThrowAsJavaScriptException();
    return false;
  }
  Napi::Array g = groups.As<Napi::Array>();
  store.resize(g.Length());
  for (uint32_t i = 0; i < g.Length(); i++) store[i] = g.Get(i).As<Napi::Number>().Uint32Value();
  out->uid = uid.As<Napi::Number>().Uint32Value();
  out->gid = gid.As<Napi::Number>().Uint32Value();
  out->ngroups = static_cast<uint32_t>(store.size());
  out->groups = store.data();
  return true;
}

// socketPairAs(type, see0?, see1?) -> [fd, fd]: a connected unix pair
// whose first end sees see0 ({uid, gid, groups}) as its peer and the
// second see1, as the kernel records them (peercred.c); null: appshot's
// own credentials. Throws EPERM where appshot cannot take them.
Napi::Value SocketPairAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct peercred c0, c1;
  std::vector<uint32_t> g0, g1;
  bool has0, has1;
  if (!PeerCredArg(info[1], &c0, g0, &has0) || !PeerCredArg(info[2], &c1, g1, &has1)) return env.Undefined();
  int p[2];
  int rc = peercred_pair(Int(info[0]), has0 ? &c0 : nullptr, has1 ? &c1 : nullptr, p);
  if (rc) {
    ThrowErrno(env, "making a unix connection with its peers' credentials", -rc);
    return env.Undefined();
  }
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, p[0]);
  a.Set(1u, p[1]);
  return a;
}

// pipeCapacity(fd, size?) -> capacity: F_GETPIPE_SZ, or F_SETPIPE_SZ first.
Napi::Value PipeCapacity(const Napi::CallbackInfo& info) {
  int fd = Int(info[0]);
  if (info.Length() > 1 && fcntl(fd, F_SETPIPE_SZ, Int(info[1])) < 0) {
    ThrowErrno(info.Env(), "F_SETPIPE_SZ", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fcntl(fd, F_GETPIPE_SZ));
}

// mkfifo(path, mode): a FIFO, for one whose path was removed (made, opened
// and removed again by resources/pipes.ts).
Napi::Value MkFifo(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (mkfifo(path.c_str(), Int(info[1]))) ThrowErrno(info.Env(), ("mkfifo " + path).c_str(), errno);
  return info.Env().Undefined();
}

// The bytes the kernel reads or writes at the argument of `request`: its
// encoded size (_IOR, _IOW...), or for the old terminal requests, which
// encode none, their struct's; 0 for a request not known here.
size_t IoctlArgBytes(unsigned long request) {
  if (_IOC_DIR(request) != _IOC_NONE && _IOC_SIZE(request)) return _IOC_SIZE(request);
  switch (request) {
    case TCGETS:
    case TCSETS:
    case TCSETSW:
    case TCSETSF:
      return 36;  // the kernel's struct termios (not glibc's, 60 bytes)
    case TIOCGWINSZ:
    case TIOCSWINSZ:
      return sizeof(struct winsize);
    case FIONREAD:
    case TIOCOUTQ:
    case TIOCPKT:
    case TIOCGPGRP:
    case TIOCSPGRP:
      return sizeof(int);
  }
  return 0;
}

// ioctl(fd, request, arg) -> its result: arg a Buffer (passed by its
// address, read and written in place) or a number (passed as it is). For
// the terminal requests of resources/ptys.ts (TCGETS, TIOCGPTN...), which
// are many and each one line. A Buffer shorter than what the request
// reads or writes is refused: the kernel would go past it (a Buffer from
// Node's pool: into the engine's neighbouring bytes), as is one for a
// request whose size is not known here.
Napi::Value Ioctl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]);
  auto request = static_cast<unsigned long>(info[1].As<Napi::Number>().Int64Value());
  long r;
  if (info[2].IsBuffer()) {
    auto buf = info[2].As<Napi::Buffer<char>>();
    size_t need = IoctlArgBytes(request);
    // FS_IOC_FIEMAP's encoded size is its header's alone: the kernel
    // writes fm_extent_count extents past it, a count it reads from the
    // buffer itself.
    if (request == FS_IOC_FIEMAP && buf.Length() >= need) {
      uint32_t count;
      memcpy(&count, buf.Data() + offsetof(struct fiemap, fm_extent_count), sizeof count);
      need += static_cast<size_t>(count) * sizeof(struct fiemap_extent);
    }
    if (!need || buf.Length() < need) {
      ThrowErrno(env, "ioctl " + std::to_string(request) + ": a buffer of " + std::to_string(buf.Length()) + " bytes" +
                          (need ? ", the request takes " + std::to_string(need) : ", for a request whose size is not known"), EINVAL);
      return env.Undefined();
    }
    r = ioctl(fd, request, buf.Data());
  } else {
    r = ioctl(fd, request, static_cast<unsigned long>(info[2].As<Napi::Number>().Int64Value()));
  }
  if (r < 0) {
    ThrowErrno(env, "ioctl", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

// One fallocateKeepSize: the descriptor and its ranges, on the thread
// fsident_run gives it; `done` ranges allocated before an error.
struct AllocateCall {
  int fd;
  const std::vector<std::pair<int64_t, int64_t>>* ranges;
  size_t done;
  bool ran;  // the op ran: the identity was taken
};

int AllocateOp(void* arg) {
  auto* c = static_cast<AllocateCall*>(arg);
  c->ran = true;
  for (; c->done < c->ranges->size(); c->done++) {
    const auto& r = (*c->ranges)[c->done];
    if (fallocate(c->fd, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(r.first), static_cast<off_t>(r.second))) return -errno;
  }
  return 0;
}

// Whether the calling thread's effective set holds `cap`.
bool HasEffective(int cap) {
  struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct d[2];
  if (syscall(SYS_capget, &h, d) != 0) return true;  // unknown: taken as held, so it is dropped
  return (d[cap / 32].effective >> (cap % 32)) & 1;
}

// `op(arg)` on `fd` as its owner would run it, where the caller holds
// CAP_SYS_RESOURCE or may take another's identity (CAP_SETUID and
// CAP_SETGID: a privileged restorer): on a thread of its own
// (fsident_run) whose fsuid and fsgid are the file's owner's, in no other
// group, without any capability (a write or fallocate on a descriptor
// open for writing needs none); an unprivileged caller has nothing to
// drop and runs it itself (its own quota, its own reserve).
//
// Where it fails before `op` ran, `*why` says what failed: the file's
// fstat, the owner's identity refused (fsident's take: setgroups,
// setfsuid, setfsgid or capset refused; a user namespace that maps no
// such uid or gid, or denies setgroups: fsident_run_told's `not_taken`),
// or no thread to take it on (pthread_create: EAGAIN, at a thread or
// memory limit).
enum class NotRun { kFstat, kOwnerNotTaken, kNoThread };
int AsOwnerIfPrivileged(int fd, int (*op)(void*), void* arg, NotRun* why) {
  if (!HasEffective(CAP_SYS_RESOURCE) && !(HasEffective(CAP_SETUID) && HasEffective(CAP_SETGID))) return op(arg);
  struct stat st;
  if (fstat(fd, &st)) {
    *why = NotRun::kFstat;
    return -errno;
  }
  struct fsident owner = {static_cast<uint32_t>(st.st_uid), static_cast<uint32_t>(st.st_gid), 0, nullptr, 0};
  struct fsident_list who = {&owner, 1};
  int not_taken = 0;
  int rc = fsident_run_told(&who, nullptr, op, arg, &not_taken);
  *why = not_taken ? NotRun::kOwnerNotTaken : NotRun::kNoThread;
  return rc;
}

// The words for a failure of AsOwnerIfPrivileged before `op` ran that is
// not the owner's identity refused: `call`'s, then what failed.
std::string NotRunWhat(const char* call, NotRun why) {
  return std::string(call) + (why == NotRun::kFstat ? ": fstat of the file" : ": a thread to take the file's owner's identity on");
}

// fallocateKeepSize(fd, ranges): blocks allocated without moving the
// file's size (FALLOC_FL_KEEP_SIZE), `ranges` [offset, length, ...] as
// BigInts (a file's can pass 2^53). Done as the file's owner would do
// it, never with CAP_SYS_RESOURCE: a restorer that has it (root) would
// otherwise pass the owner's quota (ext4 and every vfs-quota file
// system: dquot's ignore_hardlimit asks capable(CAP_SYS_RESOURCE) of
// the caller, not of whose blocks they are) and take the blocks ext4
// keeps back for root (ext4_has_free_clusters: CAP_SYS_RESOURCE, or an
// fsuid or group that is the reserve's, root's by default, which a root
// restorer without CAP_SYS_RESOURCE still is), for a claim a crafted
// image makes for free. So, where the caller holds CAP_SYS_RESOURCE or
// may take another's identity (CAP_SETUID and CAP_SETGID: a privileged
// restorer), on a thread of its own (fsident_run) whose fsuid and fsgid
// are the file's owner's, in no other group, without any capability
// (fallocate on a descriptor open for writing needs none); an
// unprivileged caller has nothing to drop and allocates as itself (its
// own quota, its own reserve). Throws with errno's code
// (EOPNOTSUPP where its file system has none, ENOSPC, EDQUOT, EPERM if
// those credentials cannot be taken).
Napi::Value FallocateKeepSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[1].IsArray() || info[1].As<Napi::Array>().Length() % 2) {
    Napi::TypeError::New(env, "fallocateKeepSize(fd, [offset, length, ...])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto list = info[1].As<Napi::Array>();
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (uint32_t i = 0; i < list.Length(); i += 2) {
    Napi::Value a = list.Get(i), b = list.Get(i + 1);
    bool offsetExact = false, lengthExact = false;
    int64_t offset = a.IsBigInt() ? a.As<Napi::BigInt>().Int64Value(&offsetExact) : -1;
    int64_t length = b.IsBigInt() ? b.As<Napi::BigInt>().Int64Value(&lengthExact) : -1;
    if (!offsetExact || !lengthExact || offset < 0 || length <= 0) {
      ThrowErrno(env, "fallocate", EINVAL);
      return env.Undefined();
    }
    ranges.emplace_back(offset, length);
  }
  AllocateCall c{Int(info[0]), &ranges, 0, false};
  NotRun why = NotRun::kNoThread;
  int rc = AsOwnerIfPrivileged(c.fd, AllocateOp, &c, &why);
  // The owner's identity could not be taken (a user namespace that maps
  // no such uid or gid, or refuses setgroups): not the kernel's answer to
  // the allocation, told apart (`ownerNotTaken`) for the caller to leave
  // the blocks unallocated rather than allocate them as itself: they are
  // a claim of the image's past the data, made only as the application
  // made it (the data, which must be there, is written as the restorer
  // without capabilities instead: copyPagesAsOwner). No thread to take it
  // on (EAGAIN), or the file's fstat failed, is no such thing: an error
  // of its own.
  if (rc < 0 && !c.ran && why != NotRun::kOwnerNotTaken) {
    ThrowErrno(env, NotRunWhat("fallocate", why), -rc);
    return env.Undefined();
  }
  if (rc < 0 && !c.ran) {
    Napi::Error e = Napi::Error::New(env, std::string("fallocate: the file's owner's identity cannot be taken here: ") + strerror(-rc));
    e.Set("code", Napi::String::New(env, strerrorname_np(-rc)));
    e.Set("ownerNotTaken", Napi::Boolean::New(env, true));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (rc < 0) ThrowErrno(env, "fallocate", -rc);
  return env.Undefined();
}

// One copyPagesAsOwner: the whole copy on fsident_run's one thread.
struct CopyCall {
  int fd;
  int pages;
  int64_t offset;                                      // where the data starts in `pages`
  const std::vector<std::pair<int64_t, int64_t>>* runs;  // (position in `fd`, bytes), in order
  bool ran;
  bool ended_early;  // `pages` ended before the runs' bytes
  bool reading;      // the error was the read's
};

int CopyOp(void* arg) {
  auto* c = static_cast<CopyCall*>(arg);
  c->ran = true;
  std::vector<char> buf(size_t{1} << 20);
  int64_t at = c->offset;
  for (const auto& r : *c->runs) {
    int64_t pos = r.first;
    for (int64_t left = r.second; left > 0;) {
      ssize_t got = pread(c->pages, buf.data(), static_cast<size_t>(std::min<int64_t>(left, static_cast<int64_t>(buf.size()))), static_cast<off_t>(at));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        c->reading = true;
        c->ended_early = got == 0;
        return got == 0 ? -EIO : -errno;
      }
      for (ssize_t done = 0; done < got;) {
        ssize_t n = pwrite(c->fd, buf.data() + done, static_cast<size_t>(got - done), static_cast<off_t>(pos + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        if (n == 0) return -EIO;
        done += n;
      }
      at += got;
      pos += got;
      left -= got;
    }
  }
  return 0;
}

// copyPagesAsOwner(fd, pagesFd, offset, runs) -> true, or false where
// written as the caller: the image's page data from `offset` of
// `pagesFd` written into `fd`, run after run (`runs`: [page, count, ...]
// as a PageRef's, the data of one run after the other's), all of it, as
// fallocateKeepSize allocates: where the caller is privileged, on one
// thread whose fsuid and fsgid are the file's owner's, without any
// capability, so that the owner's quota and ext4's root reserve hold as
// they held the application (a root restorer's write passes both:
// review r393, a deleted file's data). One thread for the whole file,
// whatever its runs (one per extent of a sparse file; an image chooses
// how many): ~0.1 ms a thread (r415 F4). Where the owner's identity
// cannot be taken (a user namespace: NotRun::kOwnerNotTaken), as the
// caller's own ids, still without any capability (outside the initial
// user namespace CAP_SYS_RESOURCE is none of the kernel's quota checks
// anyway): false.
// The data must be there, as it was; the blocks past it are a claim that
// fallocateKeepSize leaves unmade there instead. Throws errno's code
// (EDQUOT, ENOSPC); `endedEarly` where `pagesFd` ends before the runs do;
// `ownerNotTaken` where the fallback's write failed.
Napi::Value CopyPagesAsOwner(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsArray()) {
    Napi::TypeError::New(env, "copyPagesAsOwner(fd, pagesFd, offset, runs)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  constexpr double kMax = 9007199254740992.0;  // 2^53: exact, and far below off_t's end
  double offset = info[2].As<Napi::Number>().DoubleValue();
  auto list = info[3].As<Napi::Array>();
  bool ok = offset >= 0 && offset < kMax && offset == std::floor(offset) && list.Length() % 2 == 0;
  std::vector<std::pair<int64_t, int64_t>> runs;
  double total = 0;
  for (uint32_t i = 0; ok && i < list.Length(); i += 2) {
    Napi::Value page = list[i], count = list[i + 1];
    ok = page.IsNumber() && count.IsNumber();
    if (!ok) break;
    double p = page.As<Napi::Number>().DoubleValue(), n = count.As<Napi::Number>().DoubleValue();
    ok = p >= 0 && n >= 0 && p == std::floor(p) && n == std::floor(n) && (p + n) * 4096 < kMax;
    total += n * 4096;
    ok = ok && offset + total < kMax;
    if (ok) runs.emplace_back(static_cast<int64_t>(p) * 4096, static_cast<int64_t>(n) * 4096);
  }
  if (!ok) {
    ThrowErrno(env, "copyPagesAsOwner", EINVAL);
    return env.Undefined();
  }
  CopyCall c{Int(info[0]), Int(info[1]), static_cast<int64_t>(offset), &runs, false, false, false};
  NotRun why = NotRun::kNoThread;
  int rc = AsOwnerIfPrivileged(c.fd, CopyOp, &c, &why);
  bool asOwner = true;
  if (rc < 0 && !c.ran && why != NotRun::kOwnerNotTaken) {
    ThrowErrno(env, NotRunWhat("copyPagesAsOwner", why), -rc);
    return env.Undefined();
  }
  if (rc < 0 && !c.ran) {
    // As itself, without any capability: its own groups, taken as they are.
    asOwner = false;
    std::vector<uint32_t> groups(static_cast<size_t>(std::max<long>(0, syscall(SYS_getgroups, 0, nullptr))));
    long n = groups.empty() ? 0 : syscall(SYS_getgroups, groups.size(), groups.data());
    if (n < 0) {
      ThrowErrno(env, "getgroups", errno);
      return env.Undefined();
    }
    struct fsident self = {static_cast<uint32_t>(syscall(SYS_setfsuid, -1)), static_cast<uint32_t>(syscall(SYS_setfsgid, -1)), static_cast<uint32_t>(n), groups.data(), 0};
    struct fsident_list who = {&self, 1};
    int not_taken = 0;
    rc = fsident_run_told(&who, nullptr, CopyOp, &c, &not_taken);
    if (rc < 0 && !c.ran) {
      ThrowErrno(env, not_taken ? "copyPagesAsOwner: the restorer's own ids without capabilities cannot be taken here" : "copyPagesAsOwner: a thread without capabilities", -rc);
      return env.Undefined();
    }
  }
  if (rc < 0) {
    std::string what = c.reading ? "read of the image's page data" : asOwner ? "pwrite" : "pwrite as the restorer's ids without capabilities (the file's owner's identity cannot be taken here)";
    Napi::Error e = Napi::Error::New(env, what + ": " + (c.ended_early ? std::string("it ends early") : std::string(strerror(-rc))));
    e.Set("code", Napi::String::New(env, strerrorname_np(-rc)));
    e.Set("errno", Napi::Number::New(env, -rc));
    if (c.ended_early) e.Set("endedEarly", Napi::Boolean::New(env, true));
    if (!asOwner) e.Set("ownerNotTaken", Napi::Boolean::New(env, true));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Boolean::New(env, asOwner);
}

// futimensNs(fd, atimeNs, mtimeNs): a file's access and modification times
// to the nanosecond (Node's futimes stops at the microsecond), BigInts of
// nanoseconds since the epoch (before it: negative).
Napi::Value FutimensNs(const Napi::CallbackInfo& info) {
  struct timespec ts[2];
  for (int i = 0; i < 2; i++) {
    bool lossless = true;
    int64_t ns = info[1 + i].As<Napi::BigInt>().Int64Value(&lossless);
    if (!lossless) {
      ThrowErrno(info.Env(), "futimens", EINVAL);
      return info.Env().Undefined();
    }
    // Floor division: tv_nsec must be 0..999999999 for a time before 1970 too.
    int64_t sec = ns / 1000000000;
    int64_t rem = ns % 1000000000;
    if (rem < 0) {
      rem += 1000000000;
      sec -= 1;
    }
    ts[i].tv_sec = static_cast<time_t>(sec);
    ts[i].tv_nsec = static_cast<long>(rem);
  }
  if (futimens(Int(info[0]), ts)) ThrowErrno(info.Env(), "futimens", errno);
  return info.Env().Undefined();
}

// setStatusFlags(fd, flags): O_APPEND, O_NONBLOCK... of the description.
Napi::Value SetStatusFlags(const Napi::CallbackInfo& info) {
  if (fcntl(Int(info[0]), F_SETFL, Int(info[1]))) ThrowErrno(info.Env(), "fcntl F_SETFL", errno);
  return info.Env().Undefined();
}

// fileHandlePath(mountPath, handleType, handleHex) -> the path of the inode
// a file handle names (an inotify watch's, from fdinfo), as the kernel names
// it now. open_by_handle_at needs CAP_DAC_READ_SEARCH.
Napi::Value FileHandlePath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string mount = info[0].As<Napi::String>().Utf8Value();
  std::string hex = info[2].As<Napi::String>().Utf8Value();
  std::vector<unsigned char> buf(sizeof(struct file_handle) + hex.size() / 2);
  auto* fh = reinterpret_cast<struct file_handle*>(buf.data());
  fh->handle_bytes = hex.size() / 2;
  fh->handle_type = Int(info[1]);
  for (size_t i = 0; i < fh->handle_bytes; i++) fh->f_handle[i] = std::stoi(hex.substr(2 * i, 2), nullptr, 16);
  int mfd = open(mount.c_str(), O_RDONLY | O_CLOEXEC);  // not O_PATH: open_by_handle_at refuses those
  if (mfd < 0) {
    ThrowErrno(env, ("open " + mount).c_str(), errno);
    return env.Undefined();
  }
  int fd = open_by_handle_at(mfd, fh, O_PATH | O_CLOEXEC);
  int err = errno;
  close(mfd);
  if (fd < 0) {
    ThrowErrno(env, "open_by_handle_at", err);
    return env.Undefined();
  }
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  err = errno;
  close(fd);
  if (n < 0) {
    ThrowErrno(env, "readlink", err);
    return env.Undefined();
  }
  return Napi::String::New(env, path, n);
}

// fileSeals(fd) -> F_GET_SEALS of a memfd, or -1 for a file without seals.
Napi::Value FileSeals(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), fcntl(Int(info[0]), F_GET_SEALS));
}

// addSeals(fd, seals): F_ADD_SEALS.
Napi::Value AddSeals(const Napi::CallbackInfo& info) {
  if (fcntl(Int(info[0]), F_ADD_SEALS, Int(info[1]))) ThrowErrno(info.Env(), "F_ADD_SEALS", errno);
  return info.Env().Undefined();
}

}  // namespace

namespace appshot {
int OwnedSocket(const Napi::Value& owner, int family, int type, int protocol) {
  if (!owner.IsObject()) return socket(family, type, protocol);
  Napi::Object o = owner.As<Napi::Object>();
  return peercred_owned_socket(family, type, protocol, o.Get("uid").As<Napi::Number>().Uint32Value(), o.Get("gid").As<Napi::Number>().Uint32Value());
}
}  // namespace appshot

namespace {

using appshot::OwnedSocket;
using appshot::DropTableLock;
using appshot::Guarded;
using appshot::MapTables;
using appshot::Step;
using appshot::ThrowStep;

// listenSocket({family, type, address, port, backlog, reuseaddr, reuseport, v6only, early?, peerCred?}) -> fd
// peerCred: a unix listener listens with those credentials (peercred.c).
Napi::Value ListenSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto o = info[0].As<Napi::Object>();
  int family = Int(o.Get("family")), type = Int(o.Get("type"));
  std::string address = o.Get("address").As<Napi::String>().Utf8Value();
  int port = Int(o.Get("port")), backlog = Int(o.Get("backlog"));
  int fd = OwnedSocket(o.Has("owner") ? o.Get("owner") : env.Undefined(), family, type | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(env, "socket", errno);
    return env.Undefined();
  }
  int one = 1;
  bool reuseaddr = o.Get("reuseaddr").ToBoolean();
  // Bound with SO_REUSEADDR whatever the application chose, then given its
  // own choice back: the connections the ended original closed (in
  // TIME_WAIT, or FIN_WAIT after snapshot --tcp-close) must not keep its
  // port from it, as they would a server that did not set it, restarting.
  // A live listener there still conflicts (EADDRINUSE), as it should.
  bool inet = family == AF_INET || family == AF_INET6;
  if (reuseaddr || inet) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (o.Get("reuseport").ToBoolean()) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (family == AF_INET6) {
    int v6 = o.Get("v6only").ToBoolean() ? 1 : 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6, sizeof v6);
  }
  // Options that decide what the bind may do (SO_BINDTODEVICE,
  // IP_FREEBIND, IP_LOCAL_PORT_RANGE...): [{ level, name, bytes }].
  Napi::Value early = o.Get("early");
  if (early.IsArray()) {
    auto list = early.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      auto e = list.Get(i).As<Napi::Object>();
      auto b = e.Get("bytes").As<Napi::Buffer<uint8_t>>();
      int level = Int(e.Get("level")), name = Int(e.Get("name"));
      if (setsockopt(fd, level, name, b.Data(), static_cast<socklen_t>(b.Length()))) {
        int err = errno;
        close(fd);
        ThrowErrno(env, "setsockopt " + std::to_string(level) + "/" + std::to_string(name), err);
        return env.Undefined();
      }
    }
  }
  int rc;
  // A unix bind's error, kept from the calls made before it is thrown.
  int bindErr = 0;
  std::string what = address + ":" + std::to_string(port);
  if (family == AF_INET) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    // An image is untrusted: an address that does not parse would bind
    // the wildcard (sin_addr left zero), the application's port then open
    // on every interface.
    if (inet_pton(AF_INET, address.c_str(), &a.sin_addr) != 1) {
      close(fd);
      Napi::Error::New(env, "not an IPv4 address: '" + address + "'").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    rc = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  } else if (family == AF_INET6) {
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(port);
    // Likewise: '127.0.0.1' given as IPv6 would bind '::', dual-stack.
    if (inet_pton(AF_INET6, address.c_str(), &a.sin6_addr) != 1) {
      close(fd);
      Napi::Error::New(env, "not an IPv6 address: '" + address + "'").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    rc = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  } else {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    what = address;
    // "@name" is an abstract address, as /proc/net/unix shows it.
    std::string path = address;
    // A socket file the ended original left there is the caller's to
    // remove first (sockets.ts: only a socket file, through its
    // directory). Not here: connect() answers ECONNREFUSED for any file,
    // and the name is the image's, which may be anyone's file.
    bool abstract = !path.empty() && path[0] == '@';
    if (abstract) path[0] = '\0';
    // An abstract name may fill all of sun_path (no NUL ends it: its
    // length is the bind's); a path needs room for its NUL. Refused here
    // too, whatever the caller checked: bind is told path.size() bytes.
    if (path.size() > sizeof a.sun_path - (abstract ? 0 : 1)) {
      close(fd);
      ThrowErrno(env, "binding " + what, ENAMETOOLONG);
      return env.Undefined();
    }
    std::memcpy(a.sun_path, path.data(), path.size());
    // A relative name is resolved where the application bound it.
    std::string dir = o.Has("dir") && o.Get("dir").IsString() ? o.Get("dir").As<Napi::String>().Utf8Value() : "";
    // As the application's process (`as`, fsident.c): its name, its rights.
    FsIdentArg who(env, o.Has("as") ? o.Get("as") : env.Undefined());
    if (who.failed()) {
      close(fd);
      return env.Undefined();
    }
    int b = bind_in(fd, reinterpret_cast<sockaddr*>(&a),
                    static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size()), dir.c_str(), who.get());
    bindErr = -b;
    rc = b ? -1 : 0;
  }
  // listen: false binds only (a clone held by the engine on a multiplexed
  // port: listening, it would take its share of the port's connections
  // while it cannot answer them); listenNow listens once it is let go.
  bool now = !o.Has("listen") || o.Get("listen").ToBoolean();
  struct peercred as;
  std::vector<uint32_t> asGroups;
  bool hasAs = false;
  if (family == AF_UNIX && o.Has("peerCred") && !PeerCredArg(o.Get("peerCred"), &as, asGroups, &hasAs)) {
    close(fd);
    return env.Undefined();
  }
  int listenErr = 0;
  if (!rc && now && hasAs) listenErr = -peercred_listen(fd, backlog > 0 ? backlog : SOMAXCONN, &as);
  else if (!rc && now && listen(fd, backlog > 0 ? backlog : SOMAXCONN)) listenErr = errno;
  if (rc || listenErr) {
    int e = rc ? (bindErr ? bindErr : errno) : listenErr;
    close(fd);
    ThrowErrno(env, (now ? "listening on " : "binding ") + what, e);
    return env.Undefined();
  }
  int zero = 0;
  if (now && inet && !reuseaddr) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &zero, sizeof zero);
  return Napi::Number::New(env, fd);
}

// listenNow(fd, backlog, reuseaddr): a socket listenSocket bound with
// listen: false starts listening, SO_REUSEADDR as the application had it.
Napi::Value ListenNow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]), backlog = Int(info[1]);
  if (listen(fd, backlog > 0 ? backlog : SOMAXCONN)) {
    ThrowErrno(env, "listen", errno);
    return env.Undefined();
  }
  int zero = 0;
  if (!info[2].ToBoolean()) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &zero, sizeof zero);
  return env.Undefined();
}

// --- SysV

// The new tables of a restore, mapped for one call (addon.cc MapTables).
// Null with errno set on failure.
class Tables {
 public:
  explicit Tables(const std::string& path) : path_(path) {
    int err = 0;
    h_ = MapTables(path, &err);
    if (!h_) errno = err;
  }
  ~Tables() { appshot_table_close(h_); }
  appshot_header* h() const { return h_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  appshot_header* h_;
};

// APPSHOT_TEST_KILL_AT (src/killpoint.ts) inside a native call: the restore
// kills itself there with SIGKILL, for the tests of what it leaves
// (test/atomic.test.ts).
static void NativeKillPoint(const char* name) {
  const char* at = getenv("APPSHOT_TEST_KILL_AT");
  if (at && strcmp(at, name) == 0) kill(getpid(), SIGKILL);
}

// Creates an object for a virtual key: a fresh system key of this AID's
// (as the preload library would make), or IPC_PRIVATE. `get` is semget,
// shmget or msgget with its size argument bound. Binds the key and the id.
//
// The key is bound before the object is made under it: a restore killed
// (kill -9) once the kernel has made the object and before its id is bound
// leaves an object no id table names, which the release (init's, or the
// next command's) finds by its key (appshot_ipc_remove_owned with a key
// kind). Made first and bound after, such an object had no record
// anywhere, and stayed until reboot. A private object has no key to be
// found by: the window between its making and its id's binding (a few
// instructions, the lock held) remains.
template <typename Get>
int CreateBound(appshot_header* h, appshot_kind id_kind, appshot_kind key_kind, int32_t vid,
                int32_t vkey, Get get) {
  struct appshot_held saved;
  if (appshot_lock(h, &saved)) return -1;
  int sid = -1;
  if (vkey == IPC_PRIVATE) {
    sid = get(IPC_PRIVATE);
  } else {
    for (uint32_t attempt = 0; attempt < 64; attempt++) {
      int32_t skey = appshot_system_key(h, vkey, attempt);
      if (appshot_bind_locked(h, key_kind, vkey, skey, 0, 0)) {
        int32_t bound;
        // The system key is another virtual key's: the next one, as an
        // object made under it (EEXIST) would have meant.
        if (errno == EEXIST && !appshot_v2s(h, key_kind, vkey, &bound)) continue;
        int e = errno;
        appshot_unlock(h, &saved);
        errno = e;
        return -1;
      }
      sid = get(skey);
      if (sid >= 0) break;
      // Nothing made under it: the key names nothing of ours.
      int e = errno;
      appshot_unmap_system_locked(h, key_kind, skey);
      errno = e;
      if (e != EEXIST) break;
    }
  }
  if (sid >= 0) NativeKillPoint("restore: sysv object made");
  if (sid >= 0 && appshot_bind_locked(h, id_kind, vid, sid, 0, 0)) {
    int e = errno;
    appshot_unlock(h, &saved);
    errno = e;
    return -2 - sid;
  }
  int e = errno;
  appshot_unlock(h, &saved);
  errno = e;
  return sid;
}

// CreateBound as a step under the fault guard (addon.h Guarded): the
// application may shrink its file under it. A step ended early leaves the
// lock let go and the object it made, if any, removed (`remove`); -1 with
// *step saying why.
template <typename Get, typename Remove>
int CreateBoundGuarded(appshot_header* h, appshot_kind id_kind, appshot_kind key_kind, int32_t vid, int32_t vkey,
                       Get get, Remove remove, Step* step) {
  volatile int made = -1;  // read after a jump out of the step
  int sid = -1, err = 0;
  *step = Guarded(h, [&] {
    sid = CreateBound(h, id_kind, key_kind, vid, vkey, [&](key_t k) {
      int id = get(k);
      if (id >= 0) made = id;
      return id;
    });
    err = errno;
  });
  if (*step == Step::kDone) {
    errno = err;
    return sid;
  }
  if (*step == Step::kShrunk) DropTableLock(h);
  if (made >= 0) remove(made);
  return -1;
}

// restoreSem(tablesPath, vid, vkey, mode, values[]) -> system id
Napi::Value RestoreSem(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Tables t(info[0].As<Napi::String>().Utf8Value());
  if (!t.h()) {
    appshot::ThrowTablesOpen(env, "", errno);
    return env.Undefined();
  }
  int vid = Int(info[1]), vkey = Int(info[2]), mode = Int(info[3]);
  auto arr = info[4].As<Napi::Array>();
  std::vector<unsigned short> values(arr.Length());
  for (uint32_t i = 0; i < arr.Length(); i++) values[i] = static_cast<unsigned short>(Int(arr.Get(i)));
  if (env.IsExceptionPending()) return env.Undefined();
  Step step;
  int sid = CreateBoundGuarded(
      t.h(), APPSHOT_SEMID, APPSHOT_SEMKEY, vid, vkey,
      [&](key_t k) { return semget(k, static_cast<int>(values.size()), IPC_CREAT | IPC_EXCL | 0600); },
      [](int id) { semctl(id, 0, IPC_RMID); }, &step);
  if (step != Step::kDone) {
    ThrowStep(env, step, "restoring semaphore set " + std::to_string(vid) + " into tables", t.path());
    return env.Undefined();
  }
  if (sid < -1) {
    semctl(-2 - sid, 0, IPC_RMID);
    sid = -1;
  }
  union semun { int val; struct semid_ds* buf; unsigned short* array; } arg;
  arg.array = values.data();
  if (sid < 0 || (values.size() && semctl(sid, 0, SETALL, arg))) {
    int e = errno;
    if (sid >= 0) semctl(sid, 0, IPC_RMID);
    ThrowErrno(env, "restoring semaphore set " + std::to_string(vid), e);
    return env.Undefined();
  }
  // Filled under 0600; its own mode (read-only, say) only now. A failure
  // is said, never passed over.
  struct semid_ds ds;
  arg.buf = &ds;
  const char* stage = "reading";
  bool given = semctl(sid, 0, IPC_STAT, arg) == 0;
  if (given) {
    stage = "giving its mode (IPC_SET) to";
    ds.sem_perm.mode = mode;
    given = semctl(sid, 0, IPC_SET, arg) == 0;
  }
  if (!given) {
    int e = errno;
    semctl(sid, 0, IPC_RMID);
    ThrowErrno(env, std::string(stage) + " semaphore set " + std::to_string(vid), e);
    return env.Undefined();
  }
  return Napi::Number::New(env, sid);
}

// The stored pages of a segment of `size` bytes, attached at `at`, from
// page file `fd`: `runs` (first page, count) of its pages, stored one
// after another from `offset`. Read in pieces of a bounded buffer, never
// one the segment's size (review r363 findings 9 and 10: the engine held
// a buffer of each segment's size, and a single read of 2 GiB or more was
// refused); a page of zeros is left as the kernel made it, zero and
// taking no memory (a snapshot stores a segment's untouched pages as
// zeros). Pages stored in a hole of the page file are skipped without
// being read (pages_data_from, as the page check does): a crafted image of
// a few KiB, one run over a hole of up to shmmax, had the engine read and
// compare every byte of it in this one synchronous call, an hour a TiB
// (review r376 finding 3). Returns 0, or an errno: EINVAL for a run
// outside the segment, EIO for page data that ends early.
static int FillSegment(uint8_t* at, uint64_t size, int fd, uint64_t offset, const std::vector<uint64_t>& runs) {
  constexpr uint64_t kPage = 4096;
  constexpr size_t kPiece = 1 << 20;
  const uint64_t pages = (size + kPage - 1) / kPage;
  if (runs.size() % 2) return EINVAL;
  for (size_t i = 0; i < runs.size(); i += 2)
    if (runs[i] > pages || runs[i + 1] > pages - runs[i]) return EINVAL;
  std::vector<uint8_t> buf(kPiece);
  // Its own description of the file: lseek moves the position `fd` may
  // share with the caller. -1: holes are read as any page.
  const int seek_fd = pages_seek_fd(fd);
  struct Closer {
    int fd;
    ~Closer() {
      if (fd >= 0) close(fd);
    }
  } closer{seek_fd};
  uint64_t from = offset;
  for (size_t i = 0; i < runs.size(); i += 2) {
    uint64_t to = runs[i] * kPage;
    uint64_t left = runs[i + 1] * kPage;
    while (left > 0) {
      // Whole pages up to the next data are a hole: zeros, left as the
      // kernel made them.
      uint64_t hole = (pages_data_from(seek_fd, from, from + left) - from) / kPage * kPage;
      if (hole > 0) {
        from += hole;
        to += hole;
        left -= hole;
        continue;
      }
      size_t want = static_cast<size_t>(std::min<uint64_t>(left, kPiece));
      size_t got = 0;
      while (got < want) {
        ssize_t n = pread(fd, buf.data() + got, want - got, static_cast<off_t>(from + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return EIO;
        got += static_cast<size_t>(n);
      }
      for (size_t p = 0; p < want; p += kPage) {
        const uint8_t* page = buf.data() + p;
        if (page[0] == 0 && std::memcmp(page, page + 1, kPage - 1) == 0) continue;
        uint64_t dest = to + p;  // < size: its page is one of the segment's
        std::memcpy(at + dest, page, static_cast<size_t>(std::min<uint64_t>(kPage, size - dest)));
      }
      from += want;
      to += want;
      left -= want;
    }
  }
  return 0;
}

// Whether a file system of type `magic` (statfs f_type) is known to
// show a file's holes through lseek(SEEK_DATA/SEEK_HOLE) (review r399
// M3): decided by the file system, not by whether one file has a hole,
// since a dense file has none to find (a compressed ZFS page file of no
// all-zero record), and the bytes on disk another reports may be made up
// from the size (sshfs, many FUSE file systems: st_blocks the size
// rounded up). ext2/3 share ext4's magic: mounted by the ext4 driver
// (the distributions' default) they show holes. Not here: overlay (it
// passes lseek to the file system below, which may not), NFS (only 4.2
// shows holes), FUSE and the rest: the bound of sysv.ts applies there.
static bool ShowsHoles(unsigned long magic) {
  switch (magic) {
    case 0xEF53UL:      // ext4 (ext2, ext3)
    case 0x58465342UL:  // xfs
    case 0x9123683EUL:  // btrfs
    case 0x01021994UL:  // tmpfs
    case 0xF2F52010UL:  // f2fs
    case 0x2FC12FC1UL:  // zfs
    case 0xCA451A4EUL:  // bcachefs
      return true;
    default:
      return false;
  }
}

// pageFileHoles(fd) -> { size, allocated, holesSeen }: page file `fd`'s
// size, the bytes it has on disk (st_blocks, as its file system reports
// them), and whether its holes are seen: its file system is one known to
// show them (ShowsHoles), and FillSegment has a description of its own to
// look for them with (pages_seek_fd). Where they are not seen,
// FillSegment reads what a segment stores in a hole byte by byte, in one
// synchronous call (review r379 L3): sysv.ts weighs that against what the
// file has on disk before any segment is made.
Napi::Value PageFileHoles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  bool seen = false;
  const int seek_fd = pages_seek_fd(fd);
  if (seek_fd >= 0) {
    struct statfs fs;
    seen = fstatfs(seek_fd, &fs) == 0 && ShowsHoles(static_cast<unsigned long>(fs.f_type));
    close(seek_fd);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ThrowErrno(env, "fstat of the page file", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, static_cast<double>(st.st_size)));
  o.Set("allocated", Napi::Number::New(env, static_cast<double>(st.st_blocks) * 512));
  o.Set("holesSeen", Napi::Boolean::New(env, seen));
  return o;
}

// A whole number from 0 to 2^53 (a page number, count or offset as the
// image gives it), or false.
static bool WholeNumber(const Napi::Value& v, uint64_t* out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740992.0) || d != static_cast<double>(static_cast<uint64_t>(d))) return false;
  *out = static_cast<uint64_t>(d);
  return true;
}

// restoreShm(tablesPath, vid, vkey, mode, size, pagesFd, offset, runs: number[])
// -> system id: the segment made and bound, filled from the page file
// (FillSegment), given its mode, and locked if the mode says so.
Napi::Value RestoreShm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Tables t(info[0].As<Napi::String>().Utf8Value());
  if (!t.h()) {
    appshot::ThrowTablesOpen(env, "", errno);
    return env.Undefined();
  }
  int vid = Int(info[1]), vkey = Int(info[2]), mode = Int(info[3]);
  size_t size = static_cast<size_t>(info[4].As<Napi::Number>().Int64Value());
  int pagesFd = Int(info[5]);
  uint64_t offset = 0;
  std::vector<uint64_t> runs;
  bool numbers = WholeNumber(info[6], &offset) && info[7].IsArray();
  if (numbers) {
    auto arr = info[7].As<Napi::Array>();
    runs.resize(arr.Length());
    for (uint32_t i = 0; i < arr.Length() && numbers; i++) numbers = WholeNumber(arr.Get(i), &runs[i]);
  }
  if (!numbers) {
    ThrowErrno(env, "restoring shared memory segment " + std::to_string(vid) + ": its page offset and runs", EINVAL);
    return env.Undefined();
  }
  if (env.IsExceptionPending()) return env.Undefined();
  Step step;
  int sid = CreateBoundGuarded(
      t.h(), APPSHOT_SHMID, APPSHOT_SHMKEY, vid, vkey, [&](key_t k) { return shmget(k, size, IPC_CREAT | IPC_EXCL | 0600); },
      [](int id) { shmctl(id, IPC_RMID, nullptr); }, &step);
  if (step != Step::kDone) {
    ThrowStep(env, step, "restoring shared memory segment " + std::to_string(vid) + " into tables", t.path());
    return env.Undefined();
  }
  if (sid < -1) {
    shmctl(-2 - sid, IPC_RMID, nullptr);
    sid = -1;
  }
  const std::string segment = "shared memory segment " + std::to_string(vid);
  auto fail = [&](const std::string& what, int e) {
    if (sid >= 0) shmctl(sid, IPC_RMID, nullptr);
    ThrowErrno(env, what, e);
    return env.Undefined();
  };
  if (sid < 0) return fail("restoring " + segment, errno);
  // Filled before its own mode is given (a read-only one would refuse
  // this restorer's write attach).
  if (!runs.empty()) {
    void* at = shmat(sid, nullptr, 0);
    if (at == reinterpret_cast<void*>(-1)) return fail("restoring " + segment, errno);
    int e = FillSegment(static_cast<uint8_t*>(at), size, pagesFd, offset, runs);
    shmdt(at);
    if (e) return fail("filling " + segment + " from the image's page data", e);
  }
  struct shmid_ds ds;
  if (shmctl(sid, IPC_STAT, &ds) != 0) return fail("reading " + segment + " (IPC_STAT)", errno);
  ds.shm_perm.mode = mode;  // IPC_SET takes the permission bits only
  if (shmctl(sid, IPC_SET, &ds) != 0) return fail("giving " + segment + " its mode (IPC_SET)", errno);
  // Locked in memory (SHM_LOCK) as it was: the caller has checked that
  // the image's processes could have; the kernel checks this restorer
  // may (CAP_IPC_LOCK, or its RLIMIT_MEMLOCK).
  if ((mode & SHM_LOCKED) && shmctl(sid, SHM_LOCK, nullptr) != 0) return fail("locking " + segment + " in memory (SHM_LOCK)", errno);
  return Napi::Number::New(env, sid);
}

// Whether this process's mapping at `at` is of huge pages (SHM_HUGETLB):
// its KernelPageSize in /proc/self/smaps above 4 kB. True where that
// cannot be read (the caller then reads every page, as before).
static bool HugeMapping(const void* at) {
  FILE* f = fopen("/proc/self/smaps", "re");
  if (!f) return true;
  char line[512];
  bool ours = false, huge = true;
  const unsigned long want = reinterpret_cast<unsigned long>(at);
  while (fgets(line, sizeof line, f)) {
    unsigned long start, end;
    unsigned long kb;
    if (std::sscanf(line, "%lx-%lx ", &start, &end) == 2 && std::strchr(line, '-') < std::strchr(line, ' ')) {
      if (ours) break;
      ours = start == want;
    } else if (ours && std::sscanf(line, "KernelPageSize: %lu kB", &kb) == 1) {
      huge = kb != 4;
      break;
    }
  }
  fclose(f);
  return huge;
}

// Whether the `len` bytes at `p` are all zero.
static bool AllZero(const uint8_t* p, size_t len) { return len == 0 || (p[0] == 0 && std::memcmp(p, p + 1, len - 1) == 0); }

// shmReadPieces(shmid, piece: Buffer, onRun(bytes, firstPage)) -> its
// IPC_STAT ({ perm, size, cpid, lpid, locked, destroyed }): at snapshot,
// segment `shmid` attached read-only, and each run of its pages that are
// not all zero copied into `piece` (at most its length, whole pages) and
// handed to onRun (how many bytes of `piece`, the run's first page), in
// page order, then detached. One buffer of the caller's for all of it:
// a copy a run (16 MiB each) left a segment's worth of buffers for the
// collector, 2 GiB of engine memory for a segment of 1 GiB. Where no file
// of the segment can be read (sysv.ts streamSegment: no process of the
// image maps it, or map_files is closed to this snapshotter): the page
// file takes what onRun gives, never a buffer of the segment's size in
// the engine (shmRead copied all of it: a segment above Node's largest
// buffer, 4 GiB, could not be snapshotted; review r376 finding 5).
// Snapshot code, here beside the segment's restore: both sides of a
// segment's stored runs.
Napi::Value ShmReadPieces(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int id = Int(info[0]);
  auto piece = info[1].As<Napi::Buffer<uint8_t>>();
  auto onRun = info[2].As<Napi::Function>();
  if (env.IsExceptionPending()) return env.Undefined();
  constexpr uint64_t kPage = 4096;
  const uint64_t room = piece.Length() / kPage * kPage;
  if (room == 0) {
    ThrowErrno(env, "reading shared memory segment " + std::to_string(id) + ": a buffer of less than a page", EINVAL);
    return env.Undefined();
  }
  struct shmid_ds ds;
  if (shmctl(id, IPC_STAT, &ds)) {
    ThrowErrno(env, "shmctl IPC_STAT " + std::to_string(id), errno);
    return env.Undefined();
  }
  void* at = shmat(id, nullptr, SHM_RDONLY);
  if (at == reinterpret_cast<void*>(-1)) {
    ThrowErrno(env, "shmat " + std::to_string(id), errno);
    return env.Undefined();
  }
  struct Detach {
    void* at;
    ~Detach() { shmdt(at); }
  } detach{at};
  // The segment attached is the one stated: an id removed and made again
  // between the two (its sequence wrapped) would have the reads go past
  // the mapping, and the caller's check of whose it is (isOwn) be of
  // another object (review r399 L2).
  struct shmid_ds now;
  if (shmctl(id, IPC_STAT, &now) != 0 || now.shm_segsz != ds.shm_segsz || now.shm_cpid != ds.shm_cpid || now.shm_ctime != ds.shm_ctime) {
    ThrowErrno(env, "shared memory segment " + std::to_string(id) + " changed between its stat and its attach", EIDRM);
    return env.Undefined();
  }
  const uint8_t* base = static_cast<const uint8_t*>(at);
  const uint64_t size = ds.shm_segsz;
  const uint64_t pages = (size + kPage - 1) / kPage;
  // The pages the segment has: a read of one it never had makes it (a
  // shared tmpfs mapping gets no zero page), so a 64 GiB segment barely
  // used became 64 GiB of memory charged to the engine, kept by the
  // segment (review r399 M2). mincore tells which pages its file has in
  // memory; that is every page it has only where none is in swap (a page
  // swapped out, not in the swap cache, is not "in core" yet holds data).
  // The namespace's swapped segment pages (SHM_INFO shm_swp, what
  // /proc/sysvipc/shm sums) are 0 before and after the pass: then the
  // pages mincore does not show were never made, zeros, skipped exactly.
  // Otherwise every page is read (sysv.ts refused first where the pages
  // never made, its size less rss and swap, were more than the snapshot
  // may take). Not for SHM_HUGETLB: mincore answers from this mapping's
  // own page table there (empty, just attached), and a huge page comes
  // from the pool the segment reserved, not new memory.
  auto swapped = []() -> long {
    struct shm_info si;
    return shmctl(0, SHM_INFO, reinterpret_cast<struct shmid_ds*>(&si)) < 0 ? -1 : static_cast<long>(si.shm_swp);
  };
  const bool skipAbsent = swapped() == 0 && !HugeMapping(at);
  std::vector<unsigned char> core;
  uint64_t coreFrom = 0;
  constexpr uint64_t kCoreSpan = 1 << 16;  // pages a mincore call (256 MiB)
  // Whether page `n` is to be read: always, or where mincore shows it.
  auto present = [&](uint64_t n) {
    if (!skipAbsent) return true;
    if (core.empty() || n < coreFrom || n >= coreFrom + core.size()) {
      coreFrom = n;
      core.assign(static_cast<size_t>(std::min<uint64_t>(kCoreSpan, pages - n)), 1);
      // A failure reads them all (as without mincore).
      if (mincore(const_cast<uint8_t*>(base) + n * kPage, core.size() * kPage, core.data()) != 0) std::fill(core.begin(), core.end(), 1);
    }
    return (core[static_cast<size_t>(n - coreFrom)] & 1) != 0;
  };
  // The bytes of page `n` that are the segment's (the last may be short).
  auto length = [&](uint64_t n) { return static_cast<size_t>(std::min<uint64_t>(kPage, size - n * kPage)); };
  auto stored = [&](uint64_t n) { return present(n) && !AllZero(base + n * kPage, length(n)); };
  for (uint64_t n = 0; n < pages;) {
    if (!stored(n)) {
      n++;
      continue;
    }
    uint64_t end = n + 1;
    while (end < pages && (end - n) * kPage < room && stored(end)) end++;
    uint64_t bytes = std::min<uint64_t>(end * kPage, size) - n * kPage;
    std::memcpy(piece.Data(), base + n * kPage, static_cast<size_t>(bytes));
    onRun.Call({Napi::Number::New(env, static_cast<double>(bytes)), Napi::Number::New(env, static_cast<double>(n))});
    if (env.IsExceptionPending()) return env.Undefined();
    n = end;
  }
  if (skipAbsent && swapped() != 0) {
    ThrowErrno(env, "reading shared memory segment " + std::to_string(id) + ": segment pages went to swap while it was read, so pages left out as never made may hold data; snapshot again", EAGAIN);
    return env.Undefined();
  }
  Napi::Object perm = Napi::Object::New(env);
  perm.Set("key", Napi::Number::New(env, ds.shm_perm.__key));
  perm.Set("uid", Napi::Number::New(env, ds.shm_perm.uid));
  perm.Set("gid", Napi::Number::New(env, ds.shm_perm.gid));
  perm.Set("cuid", Napi::Number::New(env, ds.shm_perm.cuid));
  perm.Set("cgid", Napi::Number::New(env, ds.shm_perm.cgid));
  perm.Set("mode", Napi::Number::New(env, ds.shm_perm.mode & 0777));
  Napi::Object o = Napi::Object::New(env);
  o.Set("perm", perm);
  o.Set("size", Napi::Number::New(env, static_cast<double>(size)));
  o.Set("cpid", Napi::Number::New(env, ds.shm_cpid));
  o.Set("lpid", Napi::Number::New(env, ds.shm_lpid));
  o.Set("locked", Napi::Boolean::New(env, (ds.shm_perm.mode & SHM_LOCKED) != 0));
  o.Set("destroyed", Napi::Boolean::New(env, (ds.shm_perm.mode & SHM_DEST) != 0));
  return o;
}

// lockShmAs(sid, uid, gid, memlock, mayRaise): SHM_LOCK of segment `sid`
// done by a child that took the user `uid`/`gid` (no supplementary groups,
// no capabilities) and an RLIMIT_MEMLOCK of `memlock` bytes, so that the
// kernel checks the lock and charges it to that user, as when the owner
// locked it, and not to a restorer whose CAP_IPC_LOCK has no limit (N
// restores of one image would pin N times what the owner may). Without
// `mayRaise` (CAP_SYS_RESOURCE) the limit is at most this process's hard
// one, which is all setrlimit lets it set. Throws naming the step that
// failed, with its errno.
Napi::Value LockShmAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sid = Int(info[0]);
  uid_t uid = static_cast<uid_t>(info[1].As<Napi::Number>().Uint32Value());
  gid_t gid = static_cast<gid_t>(info[2].As<Napi::Number>().Uint32Value());
  double memlock = info[3].As<Napi::Number>().DoubleValue();
  bool mayRaise = info[4].ToBoolean();
  struct rlimit own;
  if (getrlimit(RLIMIT_MEMLOCK, &own) != 0) {
    ThrowErrno(env, "getrlimit(RLIMIT_MEMLOCK)", errno);
    return env.Undefined();
  }
  rlim_t want = memlock >= static_cast<double>(RLIM_INFINITY) ? RLIM_INFINITY : static_cast<rlim_t>(memlock);
  if (!mayRaise && own.rlim_max != RLIM_INFINITY && (want == RLIM_INFINITY || want > own.rlim_max)) want = own.rlim_max;
  static const char* const kSteps[] = {"setrlimit(RLIMIT_MEMLOCK)", "setgroups", "setresgid", "setresuid", "capset", "SHM_LOCK"};
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) {
    ThrowErrno(env, "pipe", errno);
    return env.Undefined();
  }
  pid_t pid = fork();
  if (pid == 0) {
    // One thread here: the raw calls change this process's ids alone.
    // Writes which step failed and its errno; nothing if all went well.
    auto fail = [&](int step) {
      int failed[2] = {step, errno};
      ssize_t w = write(report[1], failed, sizeof failed);
      _exit(w == static_cast<ssize_t>(sizeof failed) ? 1 : 2);
    };
    struct rlimit rl = {want, want};
    if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0) fail(0);
    if (syscall(SYS_setgroups, 0, nullptr) != 0) fail(1);
    if (syscall(SYS_setresgid, gid, gid, gid) != 0) fail(2);
    if (syscall(SYS_setresuid, uid, uid, uid) != 0) fail(3);
    // Capabilities go too: the kernel drops them only on a change from
    // uid 0, and with CAP_IPC_LOCK the lock would have no limit.
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct none[2] = {};
    if (syscall(SYS_capset, &h, none) != 0) fail(4);
    if (shmctl(sid, SHM_LOCK, nullptr) != 0) fail(5);
    _exit(0);
  }
  int forked = errno;
  close(report[1]);
  if (pid < 0) {
    close(report[0]);
    ThrowErrno(env, "fork (to lock a shared memory segment as its owner)", forked);
    return env.Undefined();
  }
  int failed[2] = {-1, 0};
  ssize_t got;
  while ((got = read(report[0], failed, sizeof failed)) < 0 && errno == EINTR) {
  }
  close(report[0]);
  int status = -1;  // not an exit: unless waitpid says otherwise
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (got == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) return env.Undefined();
  std::string as = "as uid " + std::to_string(uid) + " with an RLIMIT_MEMLOCK of " + (want == RLIM_INFINITY ? std::string("unlimited") : std::to_string(want) + " bytes");
  bool told = got == static_cast<ssize_t>(sizeof failed) && failed[0] >= 0 && failed[0] <= 5;
  if (!told)
    ThrowErrno(env, "locking shared memory segment in memory (SHM_LOCK) " + as + ": its child ended with status " + std::to_string(status), EIO);
  else if (failed[0] == 5)
    ThrowErrno(env, "locking shared memory segment in memory (SHM_LOCK) " + as, failed[1]);
  else
    ThrowErrno(env, std::string("taking its owner's ids to lock it (") + kSteps[failed[0]] + "), " + as, failed[1]);
  return env.Undefined();
}

// touchSysv(kind, sid, semnum): this restorer made the last user of a
// restored object, as the kernel records it: segment `sid` attached and
// detached (shm_lpid), or semaphore `semnum` of set `sid` raised and
// lowered by one in one semop, without SEM_UNDO (sempid; its value, and
// every process's adjustment, as they were). The restored processes have
// not run: nobody waits on the semaphore. So that the field names no
// process of the application, and the PID the image recorded for it is
// shown in its place (src/resources/sysv.ts settleSysvPids).
Napi::Value TouchSysv(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string kind = info[0].As<Napi::String>().Utf8Value();
  int sid = Int(info[1]), semnum = Int(info[2]);
  if (kind == "shmid") {
    void* at = shmat(sid, nullptr, SHM_RDONLY);
    if (at == reinterpret_cast<void*>(-1)) {
      ThrowErrno(env, "attaching shared memory segment " + std::to_string(sid), errno);
      return env.Undefined();
    }
    shmdt(at);
    return env.Undefined();
  }
  // struct sembuf's sem_num is 16 bits: a larger number would wrap to
  // another semaphore of the set.
  if (semnum < 0 || semnum > 65535) {
    ThrowErrno(env, "semaphore " + std::to_string(semnum) + " of set " + std::to_string(sid), ERANGE);
    return env.Undefined();
  }
  int value = semctl(sid, semnum, GETVAL);
  if (value < 0) {
    ThrowErrno(env, "reading semaphore " + std::to_string(semnum) + " of set " + std::to_string(sid), errno);
    return env.Undefined();
  }
  // The side with room: SEMVMX is 32767.
  short first = value < 32767 ? 1 : -1;
  struct sembuf ops[2] = {{static_cast<unsigned short>(semnum), first, IPC_NOWAIT},
                          {static_cast<unsigned short>(semnum), static_cast<short>(-first), IPC_NOWAIT}};
  if (semop(sid, ops, 2) != 0) ThrowErrno(env, "operating on semaphore " + std::to_string(semnum) + " of set " + std::to_string(sid), errno);
  return env.Undefined();
}

// restoreMsg(tablesPath, vid, vkey, mode, qbytes, messages: [{type, data}]) -> system id
Napi::Value RestoreMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Tables t(info[0].As<Napi::String>().Utf8Value());
  if (!t.h()) {
    appshot::ThrowTablesOpen(env, "", errno);
    return env.Undefined();
  }
  int vid = Int(info[1]), vkey = Int(info[2]), mode = Int(info[3]);
  if (env.IsExceptionPending()) return env.Undefined();
  Step step;
  int sid = CreateBoundGuarded(
      t.h(), APPSHOT_MSGID, APPSHOT_MSGKEY, vid, vkey, [&](key_t k) { return msgget(k, IPC_CREAT | IPC_EXCL | 0600); },
      [](int id) { msgctl(id, IPC_RMID, nullptr); }, &step);
  if (step != Step::kDone) {
    ThrowStep(env, step, "restoring message queue " + std::to_string(vid) + " into tables", t.path());
    return env.Undefined();
  }
  if (sid < -1) {
    msgctl(-2 - sid, IPC_RMID, nullptr);
    sid = -1;
  }
  auto fail = [&](const char* what) {
    int e = errno;
    if (sid >= 0) msgctl(sid, IPC_RMID, nullptr);
    ThrowErrno(env, std::string(what) + " of message queue " + std::to_string(vid), e);
    return env.Undefined();
  };
  if (sid < 0) return fail("creating");
  // Its size (msg_qbytes) before it is refilled: the kernel takes one
  // above msgmnb only from CAP_SYS_RESOURCE, which the caller has weighed
  // (sysv.ts queueSizes: the image's size, or msgmnb where its messages
  // fit and the image's may not be given). A failure is said, never passed over: the
  // queue would hold less than it did, and its refill fail on a message
  // that does not say why.
  struct msqid_ds ds;
  if (msgctl(sid, IPC_STAT, &ds) != 0) return fail("reading (IPC_STAT)");
  ds.msg_qbytes = static_cast<msglen_t>(info[4].As<Napi::Number>().Int64Value());
  if (msgctl(sid, IPC_SET, &ds) != 0) {
    int e = errno;
    std::string what = "setting the size (msg_qbytes " + std::to_string(ds.msg_qbytes) + ")";
    errno = e;
    return fail(what.c_str());
  }
  auto messages = info[5].As<Napi::Array>();
  for (uint32_t i = 0; i < messages.Length(); i++) {
    auto m = messages.Get(i).As<Napi::Object>();
    auto data = m.Get("data").As<Napi::Buffer<uint8_t>>();
    std::vector<uint8_t> buf(sizeof(long) + data.Length());
    long type = m.Get("type").As<Napi::Number>().Int64Value();
    std::memcpy(buf.data(), &type, sizeof type);
    std::memcpy(buf.data() + sizeof type, data.Data(), data.Length());
    if (msgsnd(sid, buf.data(), data.Length(), IPC_NOWAIT)) return fail("refilling");
  }
  if (msgctl(sid, IPC_STAT, &ds) != 0) return fail("reading (IPC_STAT)");
  ds.msg_perm.mode = mode;
  if (msgctl(sid, IPC_SET, &ds) != 0) return fail("giving its mode (IPC_SET)");
  return Napi::Number::New(env, sid);
}

// msgLimits() -> { msgmnb, msgmax }: this IPC namespace's limits for
// message queues, from msgctl(IPC_INFO), which needs neither /proc/sys
// nor any permission: the size (msg_qbytes) msgget gives a queue and the
// most IPC_SET may give one without CAP_SYS_RESOURCE, and the largest
// message (review r399 L1: a default assumed where /proc/sys was hidden
// could be above the real limit).
Napi::Value MsgLimits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct msginfo mi;
  if (msgctl(0, IPC_INFO, reinterpret_cast<struct msqid_ds*>(&mi)) < 0) {
    ThrowErrno(env, "msgctl IPC_INFO", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("msgmnb", Napi::Number::New(env, mi.msgmnb));
  o.Set("msgmax", Napi::Number::New(env, mi.msgmax));
  return o;
}

// new PagesCheck(fd, size, chunkSize, table, threads = cores): checks a
// page file against its chunk digests (the image's signed manifest) on a
// thread per core (or `threads`: tests and benches),
// from its first chunk on, while the restore goes on; see pages_check in
// pages.h. The restore copies a chunk only once it is checked
// (writePageRuns), and waits for all of them before the application runs.
class PagesCheck : public Napi::ObjectWrap<PagesCheck> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PagesCheck",
                       {InstanceMethod("wait", &PagesCheck::Wait),
                        InstanceMethod("checked", &PagesCheck::Checked),
                        InstanceMethod("byLanes", &PagesCheck::ByLanes),
                        InstanceMethod("stop", &PagesCheck::Stop)});
  }

  explicit PagesCheck(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PagesCheck>(info) {
    Napi::Env env = info.Env();
    int fd = info[0].As<Napi::Number>().Int32Value();
    uint64_t size = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
    uint32_t chunk = info[2].As<Napi::Number>().Uint32Value();
    auto table = info[3].As<Napi::Buffer<uint8_t>>();
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (info.Length() > 4 && info[4].IsNumber()) cores = info[4].As<Napi::Number>().Int32Value();
    int err = 0;
    check_ = pages_check_start(fd, size, chunk, table.Data(), table.Length(), cores > 0 ? static_cast<int>(cores) : 1, &err);
    if (!check_) ThrowErrno(env, "checking page data", -err);
  }

  ~PagesCheck() override { Release(); }

  // Waits up to timeoutMs (negative: for ever) for the chunks touching
  // [offset, offset + length): { state: 'good' | 'pending' | 'bad', chunk,
  // errno }; `chunk`: the first that failed (bad), `errno` 0 when its
  // bytes differ, else why it could not be read.
  static Napi::Object Verdict(Napi::Env env, int rc, uint64_t bad) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("state", rc == 0 ? "good" : rc == 1 ? "pending" : "bad");
    o.Set("chunk", Napi::Number::New(env, rc < 0 ? static_cast<double>(bad) : -1));
    o.Set("errno", Napi::Number::New(env, rc < 0 && rc != -EBADMSG ? -rc : 0));
    return o;
  }

  int WaitRange(uint64_t off, uint64_t len, int timeout_ms, uint64_t* bad) {
    if (!check_) {
      *bad = 0;
      return -ECANCELED;
    }
    return pages_check_wait(check_, off, len, timeout_ms, bad);
  }

 private:
  // wait(timeoutMs, offset = 0, length = all)
  Napi::Value Wait(const Napi::CallbackInfo& info) {
    int timeout = info[0].As<Napi::Number>().Int32Value();
    uint64_t off = info.Length() > 1 ? static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value()) : 0;
    uint64_t len = info.Length() > 2 ? static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value()) : UINT64_MAX;
    uint64_t bad = 0;
    int rc = WaitRange(off, len, timeout, &bad);
    return Verdict(info.Env(), rc, bad);
  }

  Napi::Value Checked(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), check_ ? static_cast<double>(pages_check_done(check_)) : 0);
  }

  // Chunks the sixteen-lane code found good (the rest: OpenSSL's).
  Napi::Value ByLanes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), check_ ? static_cast<double>(pages_check_by_lanes(check_)) : 0);
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  void Release() {
    if (check_) pages_check_stop(check_);
    check_ = nullptr;
  }

  pages_check* check_ = nullptr;
};

// writePageRuns(pid, fds[], runs, checks?): copies page data from an
// image's page files into a stopped process. `checks[i]`, if given, is
// page file i's PagesCheck: no byte of a chunk is copied before the chunk
// is checked, and a chunk that fails ends the copy (an error whose code
// is EBADMSG and whose `chunk` names it). `runs` holds [file index, file offset,
// address, length] per run. Each page file is mapped once and whole, and
// the runs go to the process in as few process_vm_writev calls as IOV_MAX
// allows: a server's memory is a hundred small runs, and a mapping and a
// copy for each cost more than the bytes. Each byte is copied once, page
// cache to process. The image is untrusted: a run outside its page file is
// refused (it would otherwise read past the end of the mapping).
// Few bytes in all (a clone's: the pages of its writable mappings not
// mapped from the page file, ~70 KiB of a 16 MiB template) are read into a
// buffer kept between calls instead: mapping the whole file, faulting in
// the pages read and unmapping it cost ~0.45 ms a clone, the copy itself a
// few microseconds.
constexpr uint64_t kReadInstead = 1 << 20;
static std::vector<char> g_read_buffer;

Napi::Value WritePageRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Int(info[0]);
  Napi::Array fdList = info[1].As<Napi::Array>();
  Napi::Float64Array runs = info[2].As<Napi::Float64Array>();
  struct PageFile {
    int fd;
    void* base = nullptr;
    uint64_t size = 0;
  };
  std::vector<PageFile> files;
  for (uint32_t i = 0; i < fdList.Length(); i++) files.push_back({Int(fdList.Get(i))});
  std::vector<PagesCheck*> checks(files.size(), nullptr);
  if (info.Length() > 3 && info[3].IsArray()) {
    auto list = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length() && i < checks.size(); i++)
      if (list.Get(i).IsObject()) checks[i] = PagesCheck::Unwrap(list.Get(i).As<Napi::Object>());
  }
  auto unmapAll = [&] {
    for (auto& f : files)
      if (f.base && f.base != MAP_FAILED) munmap(f.base, f.size);
  };
  // The bytes asked for in all (runs out of range are refused below).
  double asked = 0;
  for (size_t at = 3; at < runs.ElementLength(); at += 4) asked += runs[at] > 0 ? runs[at] : 0;
  const bool readThem = asked <= kReadInstead;
  if (readThem && g_read_buffer.size() < asked) g_read_buffer.resize(kReadInstead);
  uint64_t used = 0;
  constexpr size_t kBatch = 1024;  // IOV_MAX on Linux
  struct iovec local[kBatch], remote[kBatch];
  size_t n = 0, expected = 0;
  auto flush = [&]() -> bool {
    if (!n) return true;
    ssize_t w = process_vm_writev(pid, local, n, remote, n, 0);
    int e = errno;
    if (w != static_cast<ssize_t>(expected)) {
      ThrowErrno(env, "writing memory of process " + std::to_string(pid), w < 0 ? e : EIO);
      return false;
    }
    n = expected = 0;
    return true;
  };
  for (size_t at = 0; at + 4 <= runs.ElementLength(); at += 4) {
    double fileIndex = runs[at], off = runs[at + 1], addr = runs[at + 2], len = runs[at + 3];
    // Written so that NaN fails each test too (every comparison with it is
    // false), and nothing converts out of a 64-bit range.
    constexpr double k2to64 = 18446744073709551616.0;
    if (!(fileIndex >= 0 && fileIndex < files.size()) || !(off >= 0 && off < k2to64) || !(len >= 0 && len < k2to64) ||
        !(addr >= 0 && addr < k2to64)) {
      unmapAll();
      ThrowErrno(env, "page data run out of range", EINVAL);
      return env.Undefined();
    }
    PageFile& f = files[static_cast<size_t>(fileIndex)];
    if (!f.base) {
      struct stat st;
      if (fstat(f.fd, &st) < 0) {
        int e = errno;
        unmapAll();
        ThrowErrno(env, "reading a page file", e);
        return env.Undefined();
      }
      f.size = static_cast<uint64_t>(st.st_size);
      // Read, not mapped: marked so (never dereferenced).
      if (readThem) f.base = MAP_FAILED;
      else if (f.size) f.base = mmap(nullptr, f.size, PROT_READ, MAP_PRIVATE, f.fd, 0);
      if (!readThem && f.base == MAP_FAILED) {
        int e = errno;
        f.base = nullptr;
        unmapAll();
        ThrowErrno(env, "mapping page data", e);
        return env.Undefined();
      }
    }
    uint64_t o = static_cast<uint64_t>(off), l = static_cast<uint64_t>(len);
    if (o > f.size || l > f.size - o) {
      unmapAll();
      ThrowErrno(env, "page data beyond the end of its page file", EINVAL);
      return env.Undefined();
    }
    if (!l) continue;
    if (PagesCheck* check = checks[static_cast<size_t>(fileIndex)]) {
      uint64_t bad = 0;
      int rc = check->WaitRange(o, l, -1, &bad);
      if (rc) {
        unmapAll();
        Napi::Error err = Napi::Error::New(env, "page data failed its check");
        err.Set("code", rc == -EBADMSG ? "EBADMSG" : "ECHECK");
        err.Set("chunk", Napi::Number::New(env, static_cast<double>(bad)));
        err.Set("file", Napi::Number::New(env, fileIndex));
        err.Set("errno", Napi::Number::New(env, rc == -EBADMSG ? 0 : -rc));
        err.ThrowAsJavaScriptException();
        return env.Undefined();
      }
    }
    char* from;
    if (readThem) {
      from = g_read_buffer.data() + used;
      if (int rc = pages_pread_whole(f.fd, o, from, l)) {
        // Shorter than its size said (truncated meanwhile): as beyond the end.
        unmapAll();
        ThrowErrno(env, rc == -ENODATA ? "page data beyond the end of its page file" : "reading a page file", rc == -ENODATA ? EINVAL : -rc);
        return env.Undefined();
      }
      used += l;
    } else {
      from = static_cast<char*>(f.base) + o;
    }
    local[n] = {from, l};
    remote[n] = {reinterpret_cast<void*>(static_cast<uintptr_t>(addr)), l};
    n++;
    expected += l;
    if (n == kBatch && !flush()) {
      unmapAll();
      return env.Undefined();
    }
  }
  bool ok = flush();
  unmapAll();
  (void)ok;
  return env.Undefined();
}

// What spawnDetached started, for reapDetached: a resident engine outlives
// the appshot-init processes it starts, which Node does not wait for.
std::vector<pid_t> detached_children;

// reapDetached() -> how many of them had ended and were waited for now
// (zombies otherwise, until the engine leaves).
Napi::Value ReapDetached(const Napi::CallbackInfo& info) {
  int reaped = 0;
  for (size_t i = 0; i < detached_children.size();) {
    int st;
    pid_t r = waitpid(detached_children[i], &st, WNOHANG);
    if (r == detached_children[i] || (r < 0 && errno == ECHILD)) {
      detached_children[i] = detached_children.back();
      detached_children.pop_back();
      reaped += r > 0;
    } else {
      i++;
    }
  }
  return Napi::Number::New(info.Env(), reaped);
}

// spawnDetached(path, argv[], outFd) -> { pid, statusFd, lifelineFd }:
// starts a program in a session of its own with stdin /dev/null, stdout and
// stderr on outFd, a status pipe on fd 3 whose read end is returned, and a
// lifeline on fd 4: the read end of a pipe whose only write end is returned
// (close-on-exec here), so the program sees end-of-file on fd 4 when we
// close it or die. posix_spawn here costs a fraction of
// child_process.spawn, and this is on a restore's critical path
// (appshot-init with its seeds).
struct Spawned {
  pid_t pid = -1;
  int status_fd = -1;
  int lifeline_fd = -1;
};

// A program we start runs in a session of its own (not ended with the
// terminal or the command's process group), no signal blocked and every
// one at its default: Node ignores SIGPIPE and blocks others, which a
// child would otherwise inherit. `attr` is initialised here.
static void OwnSessionDefaultSignals(posix_spawnattr_t* attr) {
  posix_spawnattr_init(attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(attr, &none);
  posix_spawnattr_setsigdefault(attr, &all);
  posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
}

// The work of spawnDetached, on any thread: 0 or an errno, with `what`
// saying which step failed.
int SpawnDetachedNow(const std::string& path, std::vector<std::string> args, int out, char** envp, Spawned* got, std::string* what) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int p[2];
  if (pipe2(p, O_CLOEXEC)) {
    *what = "pipe";
    return errno;
  }
  int life[2];
  if (pipe2(life, O_CLOEXEC)) {
    int e = errno;
    close(p[0]);
    close(p[1]);
    *what = "pipe";
    return e;
  }
  // dup2 onto its own number would keep close-on-exec set, and each end
  // must survive the other's dup2: both are moved above 10 first.
  int status_w = fcntl(p[1], F_DUPFD_CLOEXEC, 10);
  int life_r = fcntl(life[0], F_DUPFD_CLOEXEC, 10);
  if (status_w < 0 || life_r < 0) {
    // Out of descriptors: init would start without its status pipe or
    // lifeline, and take a missing lifeline for an abandoned restore.
    int e = errno;
    for (int fd : {p[0], p[1], life[0], life[1], status_w, life_r})
      if (fd >= 0) close(fd);
    *what = "pipe";
    return e;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out, 1);
  posix_spawn_file_actions_adddup2(&fa, out, 2);
  posix_spawn_file_actions_adddup2(&fa, status_w, 3);
  posix_spawn_file_actions_adddup2(&fa, life_r, 4);
  posix_spawnattr_t attr;
  OwnSessionDefaultSignals(&attr);
  pid_t pid;
  int rc = posix_spawn(&pid, path.c_str(), &fa, &attr, argv.data(), envp);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(p[1]);
  close(status_w);
  close(life[0]);
  close(life_r);
  if (rc) {
    close(p[0]);
    close(life[1]);
    *what = "starting " + path;
    return rc;
  }
  got->pid = pid;
  got->status_fd = p[0];
  got->lifeline_fd = life[1];
  return 0;
}

Napi::Object SpawnedObject(Napi::Env env, const Spawned& got) {
  detached_children.push_back(got.pid);
  Napi::Object o = Napi::Object::New(env);
  o.Set("pid", got.pid);
  o.Set("statusFd", got.status_fd);
  o.Set("lifelineFd", got.lifeline_fd);
  return o;
}

std::vector<std::string> Strings(const Napi::Array& arr) {
  std::vector<std::string> args;
  for (uint32_t i = 0; i < arr.Length(); i++) args.push_back(arr.Get(i).As<Napi::String>().Utf8Value());
  return args;
}

Napi::Value SpawnDetached(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Spawned got;
  std::string what;
  int rc = SpawnDetachedNow(info[0].As<Napi::String>().Utf8Value(), Strings(info[1].As<Napi::Array>()), Int(info[2]), environ, &got, &what);
  if (rc) {
    ThrowErrno(env, what, rc);
    return env.Undefined();
  }
  return SpawnedObject(env, got);
}

// spawnQuiet(path, argv[]) -> pid: starts a program in a session of its
// own, every signal at its default and none blocked, with /dev/null for
// its standard descriptors and nothing else of ours (all of Node's and
// ours are close-on-exec); reaped by reapDetached in the engine and
// serve, by init once a command's process has left. For the snapshot's
// witness (ptrace/witness.ts): child_process.spawn forks the whole
// engine, 5-11 ms of a snapshot's held window where posix_spawn (which
// shares our memory until the exec) takes a fraction of one.
Napi::Value SpawnQuiet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::vector<std::string> args = Strings(info[1].As<Napi::Array>());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawnattr_t attr;
  OwnSessionDefaultSignals(&attr);
  pid_t pid;
  int rc = posix_spawn(&pid, path.c_str(), &fa, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc) {
    ThrowErrno(env, "starting " + path, rc);
    return env.Undefined();
  }
  detached_children.push_back(pid);
  return Napi::Number::New(env, pid);
}

// spawnDetachedAsync(path, argv[], outFd) -> Promise of what spawnDetached
// returns: the same, done on a thread of the pool, so that the caller's
// thread does not wait the while the kernel takes to start the program
// (posix_spawn holds its caller until the exec). For what is started
// ahead of time (standbys, restore/standby.ts). outFd must stay open until
// the promise settles. The environment is the caller's as it is now.
class SpawnWorker : public Napi::AsyncWorker {
 public:
  SpawnWorker(Napi::Env env, std::string path, std::vector<std::string> args, int out)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), path_(std::move(path)), args_(std::move(args)), out_(out) {
    for (char** e = environ; *e; e++) env_.emplace_back(*e);
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    std::vector<char*> envp;
    for (auto& e : env_) envp.push_back(e.data());
    envp.push_back(nullptr);
    rc_ = SpawnDetachedNow(path_, args_, out_, envp.data(), &got_, &what_);
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (rc_) {
      Napi::Error e = Napi::Error::New(env, what_ + ": " + strerror(rc_));
      deferred_.Reject(e.Value());
      return;
    }
    deferred_.Resolve(SpawnedObject(env, got_));
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string path_;
  std::vector<std::string> args_;
  std::vector<std::string> env_;
  int out_;
  int rc_ = 0;
  std::string what_;
  Spawned got_;
};

Napi::Value SpawnDetachedAsync(const Napi::CallbackInfo& info) {
  auto* w = new SpawnWorker(info.Env(), info[0].As<Napi::String>().Utf8Value(), Strings(info[1].As<Napi::Array>()), Int(info[2]));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// POSIX message queues (resources/mqueue.ts), by their system calls: glibc
// names a queue "/NAME", the kernel "NAME".
struct MqAttr {
  long flags, maxmsg, msgsize, curmsgs, pad[4];
};

const char* MqName(const std::string& name) { return name.c_str() + (name[0] == '/' ? 1 : 0); }

// mqOpen(name, flags, mode, maxmsg, msgsize) -> fd, close-on-exec; maxmsg
// 0: the system's default attributes (or an existing queue's).
Napi::Value MqOpen(const Napi::CallbackInfo& info) {
  std::string name = info[0].As<Napi::String>().Utf8Value();
  MqAttr attr{};
  attr.maxmsg = info[3].As<Napi::Number>().Int64Value();
  attr.msgsize = info[4].As<Napi::Number>().Int64Value();
  int fd = static_cast<int>(syscall(SYS_mq_open, MqName(name), Int(info[1]) | O_CLOEXEC, Int(info[2]), attr.maxmsg ? &attr : nullptr));
  if (fd < 0) {
    ThrowErrno(info.Env(), "mq_open " + name, errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value MqUnlink(const Napi::CallbackInfo& info) {
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (syscall(SYS_mq_unlink, MqName(name))) ThrowErrno(info.Env(), "mq_unlink " + name, errno);
  return info.Env().Undefined();
}

// mqAttributes(fd) -> {maxmsg, msgsize, curmsgs}
Napi::Value MqAttributes(const Napi::CallbackInfo& info) {
  MqAttr attr{};
  if (syscall(SYS_mq_getsetattr, Int(info[0]), nullptr, &attr)) {
    ThrowErrno(info.Env(), "mq_getsetattr", errno);
    return info.Env().Undefined();
  }
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("maxmsg", Napi::Number::New(info.Env(), static_cast<double>(attr.maxmsg)));
  o.Set("msgsize", Napi::Number::New(info.Env(), static_cast<double>(attr.msgsize)));
  o.Set("curmsgs", Napi::Number::New(info.Env(), static_cast<double>(attr.curmsgs)));
  return o;
}

struct MqMessage {
  unsigned priority;
  std::vector<char> data;
};

// Sends `messages` in order, without waiting; the first errno, 0 if all went.
int MqSendAll(int fd, const std::vector<MqMessage>& messages, size_t from = 0) {
  struct timespec now {};
  for (size_t i = from; i < messages.size(); i++)
    if (syscall(SYS_mq_timedsend, fd, messages[i].data.data(), messages[i].data.size(), messages[i].priority, &now)) return errno;
  return 0;
}

// The messages a rotation took, laid end to end in memory of its own
// (mmap, grown with mremap: the process that fills it is a fork of a
// process with threads, where only async-signal-safe calls are sound):
// each record is {priority, length} (two 32-bit words) then the bytes,
// padded to 8.
struct MqArena {
  char* base = nullptr;
  size_t used = 0, room = 0;
  // Room for a record of up to `bytes` at the end; false if none can be had.
  bool Reserve(size_t bytes) {
    size_t need = used + 8 + ((bytes + 7) & ~size_t{7});
    if (need <= room) return true;
    size_t grown = room ? room : 1 << 16;
    while (grown < need) grown *= 2;
    void* p = base ? mremap(base, room, grown, MREMAP_MAYMOVE) : mmap(nullptr, grown, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    base = static_cast<char*>(p);
    room = grown;
    return true;
  }
  void Commit(unsigned priority, size_t bytes) {
    uint32_t head[2] = {priority, static_cast<uint32_t>(bytes)};
    memcpy(base + used, head, 8);
    used += 8 + ((bytes + 7) & ~size_t{7});
  }
};

// What the rotation's process writes after the messages (the same stream
// as the arena's records): a record of priority ~0 and these two errnos.
constexpr uint32_t kMqEnd = ~0u;

// Writes all of `bytes` to `fd`; false if the reader is gone.
bool WriteAll(int fd, const char* bytes, size_t n) {
  while (n) {
    ssize_t w = write(fd, bytes, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    bytes += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// The rotation itself, in a process of its own that appshot's death does
// not end (see MqTakeAndGiveBack): every message received, then all sent
// back in that order; those that no longer fit (a sender outside took the
// room) sent by a child of its own that waits for room as the sender did.
// Then the records, and the end record, written to `out`. Only
// async-signal-safe calls.
[[noreturn]] void RotateQueue(int fd, size_t msgsize, int out, int appshotAlive, bool killAppshotWhenTaken) {
  // Out of appshot's session and deaf to what ends a command (Ctrl-C, a
  // hang-up, a signal to its process group): once it has taken the
  // messages, nothing but SIGKILL keeps it from giving them back.
  setsid();
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2}) sigaction(sig, &ignore, nullptr);
  int low = fd < out ? fd : out, high = fd < out ? out : fd;
  int keep[3] = {low, high, appshotAlive};
  // Every descriptor but the three closed (they are in any order).
  for (int i = 0; i < 3; i++)
    for (int j = i + 1; j < 3; j++)
      if (keep[j] < keep[i]) {
        int t = keep[i];
        keep[i] = keep[j];
        keep[j] = t;
      }
  if (keep[0] > 0) syscall(SYS_close_range, 0, keep[0] - 1, 0);
  if (keep[1] > keep[0] + 1) syscall(SYS_close_range, keep[0] + 1, keep[1] - 1, 0);
  if (keep[2] > keep[1] + 1) syscall(SYS_close_range, keep[1] + 1, keep[2] - 1, 0);
  syscall(SYS_close_range, keep[2] + 1, ~0U, 0);

  MqArena taken;
  struct timespec now {};
  int32_t received = 0, back = 0;
  for (;;) {
    if (!taken.Reserve(msgsize)) {
      received = ENOMEM;
      break;
    }
    unsigned priority = 0;
    ssize_t n = syscall(SYS_mq_timedreceive, fd, taken.base + taken.used + 8, msgsize, &priority, &now);
    if (n < 0) {
      if (errno != EAGAIN && errno != ETIMEDOUT) received = errno;
      break;
    }
    taken.Commit(priority, static_cast<size_t>(n));
  }
  if (killAppshotWhenTaken) {
    // Test only (APPSHOT_TEST_KILL_AT): appshot killed while the messages
    // are out of the queue, and gone (every descriptor of its closed)
    // before any is sent back.
    kill(getppid(), SIGKILL);
    char c;
    while (read(appshotAlive, &c, 1) < 0 && errno == EINTR) {
    }
  }
  // Back whatever happened: a queue left short would be a loss.
  size_t at = 0;
  for (; at < taken.used;) {
    uint32_t head[2];
    memcpy(head, taken.base + at, 8);
    if (syscall(SYS_mq_timedsend, fd, taken.base + at + 8, head[1], head[0], &now)) {
      back = errno;
      break;
    }
    at += 8 + ((head[1] + size_t{7}) & ~size_t{7});
  }
  // Full again before all went back: senders outside were waiting for
  // room, and each receive let one's message in (the kernel hands a
  // waiting sender's message to a full queue as soon as one is taken).
  // Those that do not fit wait for room as their senders did.
  if ((back == EAGAIN || back == ETIMEDOUT) && at < taken.used) {
    pid_t waiter = fork();
    if (waiter == 0) {
      char path[32] = "/proc/self/fd/";
      char digits[12];
      int n = 0;
      for (unsigned v = static_cast<unsigned>(fd); n == 0 || v; v /= 10) digits[n++] = static_cast<char>('0' + v % 10);
      for (size_t p = strlen(path); n;) path[p++] = digits[--n], path[p] = 0;
      int wfd = open(path, O_WRONLY | O_CLOEXEC);
      if (wfd < 0) _exit(1);
      // Nothing else held: the stream's pipe would keep appshot waiting
      // for its end as long as this waits for room.
      if (wfd > 0) syscall(SYS_close_range, 0, wfd - 1, 0);
      syscall(SYS_close_range, wfd + 1, ~0U, 0);
      for (; at < taken.used;) {
        uint32_t head[2];
        memcpy(head, taken.base + at, 8);
        while (syscall(SYS_mq_timedsend, wfd, taken.base + at + 8, head[1], head[0], nullptr))
          if (errno != EINTR) _exit(1);
        at += 8 + ((head[1] + size_t{7}) & ~size_t{7});
      }
      _exit(0);
    }
    back = waiter < 0 ? errno : 0;
  }
  uint32_t end[4] = {kMqEnd, 0, static_cast<uint32_t>(received), static_cast<uint32_t>(back)};
  if (WriteAll(out, taken.base, taken.used)) WriteAll(out, reinterpret_cast<const char*>(end), sizeof end);
  _exit(0);
}

// mqTakeAndGiveBack(fd, msgsize, killWhenTaken) -> [{priority, data}]:
// every message of the queue, received (there is no other way to read
// one) and at once sent back in the order received, which is the queue's
// own (priority, then arrival): the queue ends as it was. `fd` is
// appshot's own description, readable and writable, non-blocking.
//
// The queue outlives appshot, and while its messages are out of it only
// the process holding them can put them back. So that appshot killed
// (kill -9) at that instant loses none, that process is not appshot: a
// fork of it, in a session of its own, which gives them back whatever
// becomes of appshot, then passes them on through a pipe (read here until
// it ends). killWhenTaken (test only) has it kill appshot once it holds
// them, and wait for appshot to be gone before it gives them back.
Napi::Value MqTakeAndGiveBack(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int(info[0]);
  size_t msgsize = static_cast<size_t>(info[1].As<Napi::Number>().Int64Value());
  bool killWhenTaken = info.Length() > 2 && info[2].ToBoolean();
  int data[2], alive[2];
  if (pipe2(data, O_CLOEXEC)) {
    ThrowErrno(env, "pipe", errno);
    return env.Undefined();
  }
  if (pipe2(alive, O_CLOEXEC)) {
    int err = errno;
    close(data[0]);
    close(data[1]);
    ThrowErrno(env, "pipe", err);
    return env.Undefined();
  }
  pid_t pid = fork();
  if (pid == 0) RotateQueue(fd, msgsize, data[1], alive[0], killWhenTaken);
  int forked = errno;
  close(data[1]);
  close(alive[0]);
  std::vector<char> stream;
  if (pid > 0) {
    char chunk[1 << 16];
    for (;;) {
      ssize_t n = read(data[0], chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      stream.insert(stream.end(), chunk, chunk + n);
    }
    while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  close(data[0]);
  close(alive[1]);
  if (pid < 0) {
    ThrowErrno(env, "fork (to read the messages of a message queue)", forked);
    return env.Undefined();
  }
  std::vector<MqMessage> taken;
  size_t at = 0;
  int received = -1, back = -1;
  while (at + 8 <= stream.size()) {
    uint32_t head[2];
    memcpy(head, stream.data() + at, 8);
    if (head[0] == kMqEnd) {
      if (at + 16 == stream.size()) {
        uint32_t errs[2];
        memcpy(errs, stream.data() + at + 8, 8);
        received = static_cast<int>(errs[0]);
        back = static_cast<int>(errs[1]);
      }
      break;
    }
    size_t bytes = head[1], next = at + 8 + ((bytes + 7) & ~size_t{7});
    if (bytes > msgsize || next > stream.size()) break;
    taken.push_back({head[0], std::vector<char>(stream.begin() + at + 8, stream.begin() + at + 8 + bytes)});
    at = next;
  }
  if (received < 0) {
    Napi::Error::New(env, "the process that read the messages of a message queue ended before it said they were all back").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (back) {
    ThrowErrno(env, "sending the messages of a message queue back (some are lost)", back);
    return env.Undefined();
  }
  if (received) {
    ThrowErrno(env, "mq_timedreceive", received);
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, taken.size());
  for (size_t i = 0; i < taken.size(); i++) {
    Napi::Object m = Napi::Object::New(env);
    m.Set("priority", Napi::Number::New(env, taken[i].priority));
    m.Set("data", Napi::Buffer<char>::Copy(env, taken[i].data.data(), taken[i].data.size()));
    out.Set(static_cast<uint32_t>(i), m);
  }
  return out;
}

// mqSend(fd, [{priority, data}]): each sent in order, none waited for.
Napi::Value MqSend(const Napi::CallbackInfo& info) {
  auto list = info[1].As<Napi::Array>();
  std::vector<MqMessage> messages(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    auto m = list.Get(i).As<Napi::Object>();
    auto data = m.Get("data").As<Napi::Buffer<char>>();
    messages[i].priority = static_cast<unsigned>(m.Get("priority").As<Napi::Number>().Uint32Value());
    messages[i].data.assign(data.Data(), data.Data() + data.Length());
  }
  int err = MqSendAll(Int(info[0]), messages);
  if (err) ThrowErrno(info.Env(), "mq_timedsend", err);
  return info.Env().Undefined();
}

}  // namespace

namespace appshot {

void RegisterRestore(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("pipe", Pipe);
  fn("pidfdOpen", PidfdOpen);
  fn("pidfdSendSignal", PidfdSendSignal);
  fn("socketPair", SocketPair);
  fn("socketPairAs", SocketPairAs);
  fn("peerCred", PeerCred);
  fn("pipeCapacity", PipeCapacity);
  fn("spawnDetached", SpawnDetached);
  fn("spawnQuiet", SpawnQuiet);
  fn("reapDetached", ReapDetached);
  fn("spawnDetachedAsync", SpawnDetachedAsync);
  fn("writePageRuns", WritePageRuns);
  exports.Set("PagesCheck", PagesCheck::Define(env));
  fn("eventfd", EventFd);
  fn("memfd", MemFd);
  fn("lseek", Lseek);
  fn("setStatusFlags", SetStatusFlags);
  fn("ioctl", Ioctl);
  fn("fallocateKeepSize", FallocateKeepSize);
  fn("copyPagesAsOwner", CopyPagesAsOwner);
  fn("futimensNs", FutimensNs);
  fn("mkfifo", MkFifo);
  fn("fileHandlePath", FileHandlePath);
  fn("fileSeals", FileSeals);
  fn("addSeals", AddSeals);
  fn("listenSocket", ListenSocket);
  fn("listenNow", ListenNow);
  fn("restoreSem", RestoreSem);
  fn("restoreShm", RestoreShm);
  fn("shmReadPieces", ShmReadPieces);
  fn("pageFileHoles", PageFileHoles);
  fn("lockShmAs", LockShmAs);
  fn("restoreMsg", RestoreMsg);
  fn("msgLimits", MsgLimits);
  fn("touchSysv", TouchSysv);
  fn("mqOpen", MqOpen);
  fn("mqUnlink", MqUnlink);
  fn("mqAttributes", MqAttributes);
  fn("mqTakeAndGiveBack", MqTakeAndGiveBack);
  fn("mqSend", MqSend);
}

}  // namespace appshot
