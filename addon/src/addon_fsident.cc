// The JS face of fsident.c (see addon_fsident.h).
#include "addon_fsident.h"

#include <fcntl.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <unistd.h>

#include <endian.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "addon.h"
#include "testknobs.h"

namespace {

bool U32(const Napi::Value& v, uint32_t* out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 4294967295.0) || std::floor(d) != d) return false;
  *out = static_cast<uint32_t>(d);
  return true;
}

struct MqCall {
  const char* name;  // without its leading '/', as the system call takes it
  int flags;
};

int MqOp(void* arg) {
  auto* c = static_cast<MqCall*>(arg);
  int fd = static_cast<int>(syscall(SYS_mq_open, c->name, c->flags | O_CLOEXEC, 0, nullptr));
  return fd < 0 ? -errno : fd;
}

// mqOpenAs(name, flags, who?) -> fd: an existing POSIX message queue
// opened as `who`: mq_open checks the queue's mode against the caller's
// fsuid, fsgid and groups (and CAP_DAC_OVERRIDE), as for a file.
Napi::Value MqOpenAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "mqOpenAs(name, flags, who?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string name = info[0].As<Napi::String>().Utf8Value();
  FsIdentArg who(env, info[2]);
  if (who.failed()) return env.Undefined();
  int flags = info[1].As<Napi::Number>().Int32Value();
  if (flags & O_CREAT) {
    appshot::ThrowErrno(env, "mq_open " + name + " (only an existing queue is opened as another)", EINVAL);
    return env.Undefined();
  }
  MqCall c{name.c_str() + (name.size() && name[0] == '/' ? 1 : 0), flags};
  int rc = fsident_run(who.get(), nullptr, MqOp, &c);
  if (rc < 0) {
    appshot::ThrowErrno(env, "mq_open " + name, -rc);
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

}  // namespace

bool FsIdentArg::One(const Napi::Env& env, const Napi::Value& v, size_t at) {
  if (!v.IsObject()) {
    Napi::TypeError::New(env, "a filesystem identity must be an object").ThrowAsJavaScriptException();
    return false;
  }
  auto o = v.As<Napi::Object>();
  fsident& id = ids_[at];
  Napi::Value groups = o.Get("groups"), cap = o.Get("capEff");
  if (!U32(o.Get("fsuid"), &id.fsuid) || !U32(o.Get("fsgid"), &id.fsgid) || !groups.IsArray() || !cap.IsBigInt()) {
    Napi::TypeError::New(env, "a filesystem identity is { fsuid, fsgid, groups, capEff: bigint }").ThrowAsJavaScriptException();
    return false;
  }
  auto list = groups.As<Napi::Array>();
  if (list.Length() > FSIDENT_MAX_GROUPS) {
    Napi::TypeError::New(env, "a filesystem identity has too many groups").ThrowAsJavaScriptException();
    return false;
  }
  groups_[at].resize(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++)
    if (!U32(list.Get(i), &groups_[at][i])) {
      Napi::TypeError::New(env, "a filesystem identity's groups are numbers").ThrowAsJavaScriptException();
      return false;
    }
  bool lossless = false;
  id.cap_eff = cap.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) {
    Napi::TypeError::New(env, "a filesystem identity's capEff is a 64-bit set").ThrowAsJavaScriptException();
    return false;
  }
  id.ngroups = static_cast<uint32_t>(groups_[at].size());
  id.groups = groups_[at].data();
  return true;
}

FsIdentArg::FsIdentArg(const Napi::Env& env, const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return;
  failed_ = true;
  size_t n = v.IsArray() ? v.As<Napi::Array>().Length() : 1;
  if (n > FSIDENT_MAX_IDENTITIES) {
    Napi::TypeError::New(env, "too many filesystem identities").ThrowAsJavaScriptException();
    return;
  }
  ids_.resize(n);
  groups_.resize(n);
  for (size_t i = 0; i < n; i++)
    if (!One(env, v.IsArray() ? v.As<Napi::Array>().Get(static_cast<uint32_t>(i)) : v, i)) return;
  list_ = {ids_.data(), static_cast<uint32_t>(n)};
  failed_ = false;
}

namespace {

struct OpenCall {
  const char* path;
  int flags;
  unsigned mode;
  bool magic;  // refused: the name leads through a /proc magic link
  int dir;     // where a relative `path` is walked from: AT_FDCWD or ours
  bool faccessat2_refused = false;  // ExecOp: faccessat2 itself is refused here
};

// A system call this kernel or its seccomp filter refuses (ENOSYS),
// thrown with `field` set to how, for src/resources/fsident.ts.
void ThrowCallRefused(const Napi::Env& env, const std::string& message, const char* field, const std::string& how) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, "ENOSYS"));
  e.Set("errno", Napi::Number::New(env, ENOSYS));
  e.Set(field, Napi::String::New(env, how));
  e.ThrowAsJavaScriptException();
}

// An open refused by fsident_open, thrown: a magic link met (`magic`) and
// a kernel without openat2 (or faccessat2: `faccessat2`, ExecOp's) each
// said in words, not as the bare errno (ELOOP reads as a loop of
// symlinks, ENOSYS as nothing at all); the error's `magicLink` is for
// src/resources/fsident.ts, which words the refusal with what the name
// was of.
void ThrowOpen(const Napi::Env& env, const std::string& path, int rc, bool magic, bool faccessat2 = false) {
  if (magic) {
    Napi::Error e = Napi::Error::New(env, "open '" + path + "': it leads through a /proc magic link (a process's fd, cwd, root or exe), which a restore never follows");
    e.Set("code", Napi::String::New(env, "ELOOP"));
    e.Set("errno", Napi::Number::New(env, ELOOP));
    e.Set("magicLink", Napi::Boolean::New(env, true));
    e.ThrowAsJavaScriptException();
    return;
  }
  // A system call refused whatever it is asked (fsident_openat2_refused,
  // fsident_faccessat2_refused): said so, with `openat2Refused` or
  // `faccessat2Refused` for src/resources/fsident.ts, which words it with
  // what the name was of, never as a credential. Only where the probe
  // says so: another ENOSYS is the bare errno (r392 F4).
  int why = faccessat2 && rc == -ENOSYS ? -fsident_faccessat2_refused() : 0;
  if (faccessat2 && why) {
    std::string how = why == EPERM ? "faccessat2 is blocked on this system (seccomp?)" : "faccessat2 is missing or blocked on this system (Linux < 5.8, or seccomp?)";
    return ThrowCallRefused(env, "'" + path + "': " + how + ", by which alone a restore checks that a process may run its executable", "faccessat2Refused", how);
  }
  why = rc == -ENOSYS ? -fsident_openat2_refused() : 0;
  if (why) {
    std::string how = why == EPERM ? "openat2 is blocked on this system (seccomp?)" : "openat2 is missing or blocked on this system (Linux < 5.6, or seccomp?)";
    return ThrowCallRefused(env, "open '" + path + "': " + how + ", by which alone a restore opens an image's names", "openat2Refused", how);
  }
  appshot::ThrowErrno(env, "open '" + path + "'", -rc);
}

int OpenOp(void* arg) {
  auto* c = static_cast<OpenCall*>(arg);
  // Never a controlling terminal for appshot: a name from an image, or one
  // the application's user replaced with a symlink to a pty of theirs,
  // would otherwise make it the terminal of a restorer that has none (the
  // engine, serve under a service manager), whose master could then send
  // its process group SIGINT or SIGQUIT.
  int fd = fsident_openat(c->dir, c->path, c->flags | O_CLOEXEC | O_NOCTTY, c->mode);
  // Told here, as this identity, on this thread: not retried as another.
  if (fd == -ELOOP && fsident_through_magic_link(c->dir, c->path, c->flags)) {
    c->magic = true;
    return -ELOOP;
  }
  return fd;
}

// openAs(path, flags, mode, who?, dir?) -> fd: open(2) as `who`
// (fsident.c), so that a name from an image opens what its process could
// open, no more, and never through a /proc magic link; `dir`: our
// descriptor of a directory (opened as the process) that a relative
// `path` is walked from, which /proc/self/fd/N/name cannot be.
Napi::Value OpenAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool at = info.Length() > 4 && !info[4].IsUndefined();
  if (!info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber() || (at && !info[4].IsNumber())) {
    Napi::TypeError::New(env, "openAs(path, flags, mode, who?, dir?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  FsIdentArg who(env, info[3]);
  if (who.failed()) return env.Undefined();
  int dir = at ? info[4].As<Napi::Number>().Int32Value() : AT_FDCWD;
  OpenCall c{path.c_str(), info[1].As<Napi::Number>().Int32Value(), info[2].As<Napi::Number>().Uint32Value(), false, dir};
  int rc = fsident_run(who.get(), nullptr, OpenOp, &c);
  if (rc < 0) {
    ThrowOpen(env, path, rc, c.magic);
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

// The executable of a process as that process reaches it: the name walked
// with its identity (a retry as another without following symlinks), a
// regular file it may execute (what PR_SET_MM_MAP asks of the caller,
// MAY_EXEC; a program run as nobody may be 0711, which it cannot read).
// The answer is an O_PATH descriptor: the caller reopens it for the
// descriptor prctl takes (fdget refuses O_PATH), which walks no name.
int ExecOp(void* arg) {
  auto* c = static_cast<OpenCall*>(arg);
  int fd = fsident_open(c->path, O_PATH | O_CLOEXEC, 0);
  if (fd == -ELOOP && fsident_through_magic_link(AT_FDCWD, c->path, O_PATH)) c->magic = true;
  if (fd < 0) return fd;
  struct stat st;
  int rc = 0;
  if (fstat(fd, &st) != 0) rc = -errno;
  else if (!S_ISREG(st.st_mode)) rc = -EACCES;
  // AT_EACCESS: the check by the thread's fsuid, fsgid and capabilities,
  // not by its real ids.
  else if (syscall(SYS_faccessat2, fd, "", X_OK, AT_EACCESS | AT_EMPTY_PATH) != 0) {
    rc = -errno;
    // faccessat2 itself refused (a kernel before 5.8, a seccomp filter):
    // -ENOSYS, told so (ThrowOpen), not a credential's refusal tried as
    // every other identity, nor a missing file (r392 F4).
    if ((rc == -EPERM || rc == -ENOSYS) && fsident_faccessat2_refused()) {
      rc = -ENOSYS;
      c->faccessat2_refused = true;
    }
  }
  if (rc) {
    close(fd);
    return rc;
  }
  return fd;
}

// openExecAs(path, who?) -> an O_PATH fd of the executable (ExecOp).
Napi::Value OpenExecAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) {
    Napi::TypeError::New(env, "openExecAs(path, who?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  FsIdentArg who(env, info[1]);
  if (who.failed()) return env.Undefined();
  OpenCall c{path.c_str(), 0, 0, false, AT_FDCWD};
  int rc = fsident_run(who.get(), nullptr, ExecOp, &c);
  if (rc < 0) {
    ThrowOpen(env, path, rc, c.magic, c.faccessat2_refused);
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

// Why a retry identity that reached the very inode was still refused
// (SameAsHeldStrictly), for the line that tells it.
enum class Unproven { kNone, kNoMountId, kHardLink, kHardLinkAcl, kNoStats, kPlaceable };

// Why a directory on the way counts as one the holder's user may have
// used to put the watched at its name (MayHavePlaced), for the line.
enum class Placeable {
  kNo,
  kByRights,    // its mode, owner or the holder's capabilities let them change it
  kByAcl,       // its access ACL lets them change it
  kAclUnread,   // its access ACL could not be read or parsed: not shown closed to them
  kNameMoved,   // the walk did not lead to the very file again ("." or "..", a component gone, another file)
};

struct WatchCall {
  int fd;
  int held;        // our O_PATH descriptor of the watched (openAs, checked)
  std::string at;  // /proc/self/fd/N of `held`
  const char* name;  // the image's name `held` was opened by; nullptr: not given
  bool fanotify;
  uint32_t flags;  // fanotify_mark's
  uint64_t mask;
  const fsident* holder;  // the first identity tried: the holder's; nullptr: none
  const char* mnt_id_knob;  // APPSHOT_TEST_MNT_ID (appshot_test_knob), or nullptr
  Unproven unproven;        // set by a retry identity's refusal
  uint32_t nlink;           // and, for kHardLink, what it saw
  uint32_t owner;
  std::string changeable;   // kPlaceable: the directory its user may change
  Placeable placeable;      // and why
  bool dir;                 // the watched is a directory
};

// The mount id of what our descriptor `fd` holds: statx's (5.8), else
// /proc/self/fdinfo's (3.15), or false. `statx_too` false: fdinfo's only
// (the test knob). fdinfo is read as this thread's identity: the file is
// the restorer's (0400, its euid's), so an identity of another fsuid
// without CAP_DAC_OVERRIDE cannot, and then it is false. From 5.8 statx
// tells every filesystem's, and a restore needs 5.8 (faccessat2): the
// fdinfo branch runs under a kernel's emulation (gVisor and the like)
// and the test knob, nowhere to be counted on (r392 F7).
bool MountIdOf(int fd, const struct statx& st, bool statx_too, uint64_t* id) {
  if (statx_too && (st.stx_mask & STATX_MNT_ID)) {
    *id = st.stx_mnt_id;
    return true;
  }
  return fsident_fdinfo_mount_id(fd, id) == 0;
}

// Whether `who` may read a file of `st`'s owner, group and mode by its
// mode bits alone, as the kernel's generic check picks the class: the
// owner's bits for its owner, the group's for a member, the others'.
// Where the file has an access ACL, the group bits are its mask, not
// the group's entry, and a named user's entry (user:<holder>:---) is
// not in the mode at all: only GrantsAll tells.
bool InGroup(const fsident& who, uint32_t gid) {
  if (gid == who.fsgid) return true;
  for (uint32_t i = 0; i < who.ngroups; i++)
    if (who.groups[i] == gid) return true;
  return false;
}

bool ReadableByMode(const fsident& who, const struct statx& st) {
  if (st.stx_uid == who.fsuid) return st.stx_mode & S_IRUSR;
  return st.stx_mode & (InGroup(who, st.stx_gid) ? S_IRGRP : S_IROTH);
}

// What the kernel's generic permission check, capabilities aside, gives.
enum class Grant { kYes, kNo, kUnknown };

// Filesystems that keep no POSIX ACL at all, whose EOPNOTSUPP for
// system.posix_acl_access therefore means "none": procfs, sysfs,
// squashfs, iso9660, vfat. NFS, CIFS, FUSE and the like answer it too
// and may still decide by ACLs of their own (NFSv4's): no proof there.
// fstatfs takes an O_PATH descriptor (3.12).
bool KeepsNoAcl(int fd) {
  struct statfs s;
  if (fstatfs(fd, &s) != 0) return false;
  switch (static_cast<uint64_t>(s.f_type)) {
    case 0x9fa0: case 0x62656572: case 0x73717368: case 0x9660: case 0x4d44:
      return true;
    default:
      return false;
  }
}

// Whether `who` passes the kernel's generic check for all of `want`
// (4 read, 2 write, 1 search) on the file our descriptor `fd` holds
// (`st`'s owner, group, mode), capabilities aside: by its access ACL
// where it has one, evaluated as posix_acl_permission does (the owner's
// entry; a named user's and the mask; the owning group's and named
// groups', any that grants, and the mask; none matched, the others'),
// else by its mode bits (also where its mode's group bits, the mask, are
// empty: the kernel reads no ACL then). `*acl`: an ACL decided.
// kUnknown: the ACL could not be read or parsed, or the filesystem
// answers EOPNOTSUPP and may keep ACLs of another kind. Read through our own /proc/self/fd/N, a magic
// link followed on purpose: fgetxattr takes no O_PATH descriptor
// (EBADF). Reading a system.* attribute asks no permission of the
// caller, so any identity's thread gets the answer; its ids are given in
// the caller's user namespace, the one `who`'s are in.
Grant GrantsAll(const fsident& who, const struct statx& st, int fd, unsigned want, bool* acl) {
  *acl = false;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  std::vector<unsigned char> buf(512);
  ssize_t n;
  for (;;) {
    n = getxattr(path, "system.posix_acl_access", buf.data(), buf.size());
    if (n >= 0 || errno != ERANGE || buf.size() >= (1u << 20)) break;
    buf.resize(buf.size() * 8);
  }
  auto byMode = [&] {
    unsigned bits = st.stx_uid == who.fsuid ? (st.stx_mode >> 6) & 7 : InGroup(who, st.stx_gid) ? (st.stx_mode >> 3) & 7 : st.stx_mode & 7;
    return (bits & want) == want ? Grant::kYes : Grant::kNo;
  };
  if (n < 0) {
    if (errno != ENODATA && !(errno == EOPNOTSUPP && KeepsNoAcl(fd))) return Grant::kUnknown;
    return byMode();
  }
  // The mode's group bits are the ACL's mask (or its owning group's
  // entry), and where they are empty the kernel reads no ACL: its
  // acl_permission_check asks `IS_POSIXACL(inode) && (mode & S_IRWXG)`
  // first, else judges by the mode bits, so a named user outside the
  // owning group gets the others' bits, not its masked entry (r426 F1).
  // Then the ACL decides nothing, and `*acl` stays false: the words are
  // the mode's. (The mode's owner bits are the ACL's owner entry, so the
  // owner is judged alike either way.)
  if ((st.stx_mode & S_IRWXG) == 0) return byMode();
  *acl = true;
  // struct posix_acl_xattr_header { le32 version (2) } then entries of
  // { le16 tag, le16 perm, le32 id }, in the order the kernel keeps
  // (posix_acl_valid): owner, named users, group, named groups, mask,
  // others; the tags' values rise in that order.
  constexpr uint16_t kUserObj = 1, kUser = 2, kGroupObj = 4, kGroup = 8, kMask = 0x10, kOther = 0x20;
  struct Entry {
    uint16_t tag, perm;
    uint32_t id;
  };
  std::vector<Entry> e;
  uint32_t version;
  if (n < 4 || (n - 4) % 8 != 0) return Grant::kUnknown;
  memcpy(&version, buf.data(), 4);
  if (le32toh(version) != 2) return Grant::kUnknown;
  for (ssize_t at = 4; at < n; at += 8) {
    Entry x;
    memcpy(&x.tag, &buf[at], 2);
    memcpy(&x.perm, &buf[at + 2], 2);
    memcpy(&x.id, &buf[at + 4], 4);
    x.tag = le16toh(x.tag), x.perm = le16toh(x.perm), x.id = le32toh(x.id);
    bool known = x.tag == kUserObj || x.tag == kUser || x.tag == kGroupObj || x.tag == kGroup || x.tag == kMask || x.tag == kOther;
    if (!known || (!e.empty() && x.tag < e.back().tag) || (!e.empty() && x.tag == e.back().tag && x.tag != kUser && x.tag != kGroup)) return Grant::kUnknown;
    e.push_back(x);
  }
  auto granted = [&](unsigned perm) { return (perm & want) == want ? Grant::kYes : Grant::kNo; };
  auto masked = [&](size_t i) {
    for (size_t m = i + 1; m < e.size(); m++)
      if (e[m].tag == kMask) return granted(e[i].perm & e[m].perm);
    return granted(e[i].perm);
  };
  bool found = false;
  for (size_t i = 0; i < e.size(); i++) {
    switch (e[i].tag) {
      case kUserObj:
        if (st.stx_uid == who.fsuid) return granted(e[i].perm);
        break;
      case kUser:
        if (e[i].id == who.fsuid) return masked(i);
        break;
      case kGroupObj:
      case kGroup:
        if (InGroup(who, e[i].tag == kGroupObj ? st.stx_gid : e[i].id)) {
          found = true;
          if ((e[i].perm & want) == want) return masked(i);
        }
        break;
      case kMask:
        break;
      case kOther:
        return found ? Grant::kNo : granted(e[i].perm);
    }
  }
  return Grant::kUnknown;
}

constexpr uint64_t kCap(int cap) { return uint64_t{1} << cap; }

// Whether `who` may change directory `d` (our descriptor `fd` of it):
// make, remove or rename an entry there (write and search, may_create),
// or give itself that right (its owner; CAP_FOWNER), or pass the check
// (CAP_DAC_OVERRIDE). `who` is the holder process's identity as the
// image recorded it, not all its user may take: groups of /etc/group the
// process dropped (newgrp, the user's other sessions) and its real and
// saved ids are not counted (r415 F2: said in the README).
Placeable MayChangeDirectory(const fsident& who, const struct statx& d, int fd) {
  if (who.cap_eff & (kCap(CAP_DAC_OVERRIDE) | kCap(CAP_FOWNER))) return Placeable::kByRights;
  if (d.stx_uid == who.fsuid) return Placeable::kByRights;
  bool acl = false;
  switch (GrantsAll(who, d, fd, 2 | 1, &acl)) {
    case Grant::kYes:
      return acl ? Placeable::kByAcl : Placeable::kByRights;
    case Grant::kUnknown:
      return Placeable::kAclUnread;
    default:
      return Placeable::kNo;
  }
}

// Whether `who`'s user may have put the file or directory `file`
// (statx'd) at the image's name `name` (absolute, walked already without
// symlinks): a link made or a file or directory renamed into a directory
// on the way they may change (its original name removed since, a link
// has one link: r392 F6; a directory is renamed with no right on itself
// where it stays in its parent: r415 F1), or a directory of the way
// renamed into place. The directories are walked again one component at
// a time from "/", each opened beneath the one before without following
// anything, and the last must be the very file; anything else (".",
// "..", a component gone or another file since) is no proof
// (kNameMoved), with `changeable` where the walk was. The name's own
// directory counts whatever it is; one further up, sticky and not
// theirs (nor CAP_FOWNER's), does not: there they may rename only what
// is theirs, and an entry of theirs is a directory they may change, met
// next.
Placeable MayHavePlaced(const fsident& who, const char* name, const struct statx& file, std::string* changeable) {
  std::string path = name, walked;
  std::vector<std::string> parts;
  for (size_t at = 0; at < path.size();) {
    size_t end = path.find('/', at);
    if (end == std::string::npos) end = path.size();
    if (end > at) parts.push_back(path.substr(at, end - at));
    at = end + 1;
  }
  *changeable = "/";
  if (parts.empty()) return Placeable::kNameMoved;
  int dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return Placeable::kNameMoved;
  Placeable placed = Placeable::kNo;
  for (size_t i = 0; i < parts.size() && placed == Placeable::kNo; i++) {
    *changeable = walked.empty() ? "/" : walked;
    struct statx d;
    const unsigned need = STATX_TYPE | STATX_MODE | STATX_UID | STATX_GID;
    if (parts[i] == "." || parts[i] == ".." || statx(dir, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, need, &d) != 0 || (d.stx_mask & need) != need ||
        !S_ISDIR(d.stx_mode)) {
      placed = Placeable::kNameMoved;
      break;
    }
    bool own_directory = i + 1 == parts.size();
    // Sticky: only the owner of an entry or of the directory renames it,
    // or CAP_FOWNER (check_sticky).
    bool sticky = (d.stx_mode & S_ISVTX) && d.stx_uid != who.fsuid && !(who.cap_eff & kCap(CAP_FOWNER));
    if (own_directory || !sticky) placed = MayChangeDirectory(who, d, dir);
    if (placed != Placeable::kNo) break;
    int next = openat(dir, parts[i].c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
    close(dir);
    dir = next;
    walked += "/" + parts[i];
    if (dir < 0) placed = Placeable::kNameMoved;
  }
  if (dir >= 0) {
    struct statx f;
    if (placed == Placeable::kNo && (statx(dir, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_INO, &f) != 0 || f.stx_ino != file.stx_ino ||
                                     f.stx_dev_major != file.stx_dev_major || f.stx_dev_minor != file.stx_dev_minor)) {
      *changeable = walked;
      placed = Placeable::kNameMoved;
    }
    close(dir);
  }
  return placed;
}

// In a retry as another identity than the holder's (fsident_strict):
// whether this identity reaches the very inode `held` holds, on the same
// mount, by walking the image's name itself without following any
// symlink (fsident_open), 0, or -EACCES. `held` was opened by the first
// identity that could: usually the holder, whose walk follows symlinks
// and needs search permission only (O_PATH), so it succeeds where the
// watch, which needs read permission, is then refused. Watched through
// /proc/self/fd/N as the retry identity, a root master's read right
// would apply to whatever a symlink the holder's user planted chose (a
// 1733 directory of PHP sessions inside a 0711 one, /etc/shadow):
// review29 H2's rule, that a retry walks no symlink, undone (r375 M1).
// Not reached so, it is refused as this identity: the holder's refusal
// is the one told. O_NOFOLLOW whatever the watch: a trailing symlink is
// then the link itself, the very one only where `held` is it too (an
// inode mark on the link); one the holder followed (a mount or
// filesystem mark) is another inode, refused as every other symlink is.
int SameAsHeldStrictly(WatchCall* c) {
  if (!c->name || c->name[0] != '/') return -EACCES;
  int mine = fsident_open(c->name, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
  if (mine < 0) return -EACCES;
  struct statx a, b;
  const unsigned want = STATX_BASIC_STATS | STATX_MNT_ID;
  bool same = statx(c->held, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, want, &a) == 0 && statx(mine, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, want, &b) == 0 &&
              a.stx_dev_major == b.stx_dev_major && a.stx_dev_minor == b.stx_dev_minor && a.stx_ino == b.stx_ino;
  // The mount too: a mount mark is on it, and no more than the holder's
  // walk chose may be marked. statx tells it from 5.8, fdinfo from 3.15
  // (openat2, without which nothing here runs, is 5.6). Both descriptors
  // are open, so the number (reused once a mount is gone) names one
  // mount each. statx's, where both tell, are compared whatever the test
  // knob says: a knob only makes a check stricter (r392 F2). The knob
  // takes a mark's retry mount id from fdinfo only ("fdinfo": checked
  // against statx's for `held`) or from neither ("none").
  if (same) {
    bool statx_told = (a.stx_mask & STATX_MNT_ID) && (b.stx_mask & STATX_MNT_ID);
    uint64_t x = 0, y = 0;
    if (statx_told && a.stx_mnt_id != b.stx_mnt_id) {
      same = false;
    } else if (c->fanotify && (c->flags & (FAN_MARK_MOUNT | FAN_MARK_FILESYSTEM))) {
      // A mount or filesystem mark is refused where neither tells: the
      // inode alone does not say which mount's events it would report.
      const char* knob = c->mnt_id_knob ? c->mnt_id_knob : "";
      bool told = strcmp(knob, "none") != 0 && MountIdOf(c->held, a, true, &x) && MountIdOf(mine, b, strcmp(knob, "fdinfo") != 0, &y);
      if (told) same = x == y;
      else {
        same = false;
        c->unproven = Unproven::kNoMountId;
      }
    } else if (!statx_told && MountIdOf(c->held, a, true, &x) && MountIdOf(mine, b, true, &y)) {
      // An inode's watch or mark is on the inode, which dev and ino name:
      // fdinfo's ids compared where they can be read, nothing more asked
      // where they cannot.
      same = x == y;
    }
  }
  // A hard link the holder's user made to a file they may not read (as
  // fs.protected_hardlinks=0 lets anyone, of any file on the same
  // filesystem: a root-only one linked into their own directory) is the
  // very inode, reached with no symlink: a root master's retry would
  // then watch a file of which the holder's user chose nothing but the
  // name, and its access and modify events (when /etc/shadow is read or
  // written) would reach them. A file of one name only was not linked;
  // one of more is watched as another only where the holder owns it (it
  // may give itself the right to read it) or the kernel's generic check
  // lets it read it, by its access ACL where it has one (GrantsAll: an
  // ACL is exactly what refuses a holder its mode bits let read,
  // user:<holder>:---, r392 F1), else by its mode bits (then the
  // kernel's refusal of the holder came from a security module, whose
  // domain is the engine's for every identity). A link count is not
  // all: a file its user renamed to the name (from a directory they may
  // write), or a link whose original name was removed since, has one
  // link; so a file the holder is not shown to read is watched as
  // another only where its user could not have put it there, no
  // directory on the way theirs to change (MayHavePlaced, r392 F6). A
  // directory cannot be hard-linked but can be renamed, and a rename
  // within one parent asks no right on the directory moved: root's 0700
  // one, renamed to the name in a directory its user may write, would
  // have a root watch report the names made in it (r415 F1). So the
  // same rule for directories, the link count aside. statx must have
  // told what the rule reads: a filesystem that did not fill a field (a
  // network one's getattr may clear what it did not fetch) leaves it 0,
  // and an nlink of 0 would pass (r392 F5).
  bool dir = (a.stx_mask & STATX_TYPE) && S_ISDIR(a.stx_mode);
  const unsigned rule_needs = STATX_TYPE | STATX_MODE | STATX_UID | STATX_GID | (dir ? 0 : STATX_NLINK);
  c->dir = dir;
  if (same && (a.stx_mask & rule_needs) != rule_needs) {
    same = false;
    c->unproven = Unproven::kNoStats;
  } else if (same && !(c->holder && a.stx_uid == c->holder->fsuid)) {
    bool by_mode = c->holder && ReadableByMode(*c->holder, a);
    bool acl = false;
    if (!c->holder || GrantsAll(*c->holder, a, c->held, 4, &acl) != Grant::kYes) {
      // Not shown to be the holder's to read: only a file of one link,
      // or a directory, that its user could not have put at the name.
      c->nlink = a.stx_nlink;
      c->owner = a.stx_uid;
      if (!c->holder || (!dir && a.stx_nlink > 1)) {
        same = false;
        c->unproven = by_mode ? Unproven::kHardLinkAcl : Unproven::kHardLink;
      } else if ((c->placeable = MayHavePlaced(*c->holder, c->name, a, &c->changeable)) != Placeable::kNo) {
        same = false;
        c->unproven = Unproven::kPlaceable;
      }
    }
  }
  close(mine);
  return same ? 0 : -EACCES;
}

// The watch or mark on what our O_PATH descriptor holds: the name was
// walked already, as the process, by openAs (fsident_open: no magic
// link, no symlink in a retry), and what it led to checked
// (src/resources/procpaths.ts refuseOutsideApplication); the kernel walks
// no name of the image's again, only our own /proc/self/fd/N, a magic
// link followed on purpose to that very descriptor (so never
// IN_DONT_FOLLOW nor FAN_MARK_DONT_FOLLOW: those would mark the link
// itself; a symlink watched as itself was opened O_NOFOLLOW). The
// kernel checks read permission on it (inotify_find_inode,
// fanotify_find_path) as this thread: the identity. A retry identity
// must first reach that inode by the name itself (SameAsHeldStrictly).
int WatchOp(void* arg) {
  auto* c = static_cast<WatchCall*>(arg);
  if (fsident_strict()) {
    int rc = SameAsHeldStrictly(c);
    if (rc < 0) return rc;
  }
  if (c->fanotify) return fanotify_mark(c->fd, c->flags & ~FAN_MARK_DONT_FOLLOW, c->mask, AT_FDCWD, c->at.c_str()) == 0 ? 0 : -errno;
  int wd = inotify_add_watch(c->fd, c->at.c_str(), static_cast<uint32_t>(c->mask) & ~IN_DONT_FOLLOW);
  return wd < 0 ? -errno : wd;
}

// Where and why MayHavePlaced found the name one the holder's user may
// have given, for the line: each cause worded as what was seen.
std::string PlaceableWhy(const WatchCall& c) {
  switch (c.placeable) {
    case Placeable::kByAcl:
      return "under " + c.changeable + ", a directory whose access ACL lets its user change it";
    case Placeable::kAclUnread:
      return "under " + c.changeable + ", a directory with an access ACL (or on a filesystem that could not show it has none) not shown to refuse its user a change";
    case Placeable::kNameMoved:
      return "and its name, walked again at " + c.changeable + ", did not lead to it (\".\" or \"..\", a component gone or another file since)";
    default:
      return "under " + c.changeable + ", a directory its user may change";
  }
}

// inotifyAddWatchAs(fd, at, mask, who?, shown?) -> wd;
// fanotifyMarkAs(fd, flags, mask: bigint, at, who?, shown?): a watch or
// mark added to our descriptor of the process's instance or group, on
// what our O_PATH descriptor `at` holds, as the process would have added
// it. `shown`: the image's name `at` was opened by, for the error's
// message, and walked again by a retry identity (SameAsHeldStrictly;
// without it, no retry identity's watch is made).
Napi::Value Watch(const Napi::CallbackInfo& info, bool fanotify) {
  Napi::Env env = info.Env();
  size_t at = fanotify ? 3 : 1;
  bool ok = info[0].IsNumber() && info[at].IsNumber() && (fanotify ? info[1].IsNumber() && info[2].IsBigInt() : info[2].IsNumber());
  if (!ok) {
    Napi::TypeError::New(env, fanotify ? "fanotifyMarkAs(fd, flags, mask: bigint, at, who?, shown?)" : "inotifyAddWatchAs(fd, at, mask, who?, shown?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  FsIdentArg who(env, info[fanotify ? 4 : 3]);
  if (who.failed()) return env.Undefined();
  Napi::Value shownArg = info[fanotify ? 5 : 4];
  int held = info[at].As<Napi::Number>().Int32Value();
  bool named = shownArg.IsString();
  std::string shown = named ? shownArg.As<Napi::String>().Utf8Value() : "descriptor " + std::to_string(held);
  const fsident_list* ids = who.get();
  WatchCall c{info[0].As<Napi::Number>().Int32Value(), held, "/proc/self/fd/" + std::to_string(held), named ? shown.c_str() : nullptr, fanotify, 0, 0,
              ids ? &ids->ids[0] : nullptr, appshot_test_knob("APPSHOT_TEST_MNT_ID"), Unproven::kNone, 0, 0, "", Placeable::kNo, false};
  if (fanotify) {
    bool lossless = false;
    c.flags = info[1].As<Napi::Number>().Uint32Value();
    c.mask = info[2].As<Napi::BigInt>().Uint64Value(&lossless);
  } else {
    c.mask = info[2].As<Napi::Number>().Uint32Value();
  }
  int rc = fsident_run(who.get(), nullptr, WatchOp, &c);
  if (rc < 0) {
    std::string what = (fanotify ? "fanotify_mark '" : "inotify_add_watch '") + shown + "'";
    // Refused as every identity, one of which reached the very inode but
    // could not show it may watch it: why, for the line
    // (src/resources/fsident.ts refusedAsProcess).
    std::string why;
    bool refused = rc == -EACCES || rc == -EPERM;
    if (refused && c.unproven == Unproven::kNoMountId)
      why = "another identity reaches it, but this kernel tells no mount id (statx STATX_MNT_ID, Linux 5.8, nor /proc/self/fdinfo) by which to show the mark would be on the very mount";
    else if (refused && c.unproven == Unproven::kHardLink)
      why = "another identity reaches it, but it is a file of " + std::to_string(c.nlink) + " hard links, of uid " + std::to_string(c.owner) +
            ", which the holder neither owns nor may read: a link its user may have made";
    else if (refused && c.unproven == Unproven::kHardLinkAcl)
      why = "another identity reaches it, but it is a file of " + std::to_string(c.nlink) + " hard links, of uid " + std::to_string(c.owner) +
            ", which the holder does not own, and whose access ACL (or a filesystem that could not show it has none) may refuse the holder what its mode bits grant: a link its user may have made";
    else if (refused && c.unproven == Unproven::kPlaceable)
      why = "another identity reaches it, but it is " + std::string(c.dir ? "a directory" : "a file") + " of uid " + std::to_string(c.owner) +
            ", which the holder is not shown to own or read, " + PlaceableWhy(c) + ": a name its user may have given it (" +
            (c.dir ? "a directory renamed there" : "a file renamed there, or linked there and its first name removed") + ")";
    else if (refused && c.unproven == Unproven::kNoStats)
      why = c.dir ? "another identity reaches it, but the filesystem did not tell its owner and mode (statx), by which to show the holder's user did not put it there"
                  : "another identity reaches it, but the filesystem did not tell its link count, owner and mode (statx), by which to show the holder's user did not link it";
    if (why.empty()) {
      appshot::ThrowErrno(env, what, -rc);
      return env.Undefined();
    }
    Napi::Error e = Napi::Error::New(env, what + ": " + std::strerror(-rc) + " (" + why + ")");
    e.Set("code", Napi::String::New(env, strerrorname_np(-rc)));
    e.Set("errno", Napi::Number::New(env, -rc));
    e.Set("retryRefused", Napi::String::New(env, why));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

Napi::Value InotifyAddWatchAs(const Napi::CallbackInfo& info) { return Watch(info, false); }
Napi::Value FanotifyMarkAs(const Napi::CallbackInfo& info) { return Watch(info, true); }

// inotifySkipWds(fd, path, next, upTo) -> the number the instance gives
// next: the watch descriptors from `next` up to `upTo` (not included)
// spent by adding and removing a watch on `path`, a directory nothing in
// the instance watches, on our descriptor of the process's instance (the
// restore's, inotify.ts). Here each number costs two system calls of this
// process, where two calls injected into the restored one cost ~0.5 ms:
// a program that had removed thousands of watches is restored in
// milliseconds, not seconds. Each removal queues an IN_IGNORED event; the
// instance is non-blocking until the restore ends, and the events are read
// out as they come (the queue holds 16384 by default) and at the end.
void DrainInotify(int fd) {
  char buf[4096];
  int queued = 0;
  // FIONREAD first: a read never blocks, whatever the description's flags.
  while (ioctl(fd, FIONREAD, &queued) == 0 && queued > 0 && read(fd, buf, sizeof buf) > 0) {
  }
}

Napi::Value InotifySkipWds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t next = 0, up_to = 0;
  if (!info[0].IsNumber() || !info[1].IsString() || !U32(info[2], &next) || !U32(info[3], &up_to)) {
    Napi::TypeError::New(env, "inotifySkipWds(fd, path, next, upTo)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::string path = info[1].As<Napi::String>().Utf8Value();
  unsigned spent = 0;
  while (next < up_to) {
    int wd = inotify_add_watch(fd, path.c_str(), IN_ATTRIB | IN_DONT_FOLLOW);
    if (wd < 0 || inotify_rm_watch(fd, wd) < 0) {
      int err = errno;
      DrainInotify(fd);
      appshot::ThrowErrno(env, "skipping inotify watch descriptor " + std::to_string(next) + " on '" + path + "'", err);
      return env.Undefined();
    }
    // The kernel hands numbers out increasing from the last it gave; one
    // below means it wrapped (past INT_MAX), which no image reaches.
    if (static_cast<uint32_t>(wd) < next) {
      DrainInotify(fd);
      appshot::ThrowErrno(env, "skipping inotify watch descriptor " + std::to_string(next) + ": got " + std::to_string(wd), ERANGE);
      return env.Undefined();
    }
    next = static_cast<uint32_t>(wd) + 1;
    if (++spent % 1024 == 0) DrainInotify(fd);
  }
  DrainInotify(fd);
  return Napi::Number::New(env, next);
}

// xattrNames(path) -> the names of the extended attributes of the file at
// `path` (followed: /proc/PID/fd/N is the file a descriptor holds), as
// listxattr gives them; [] where the file system keeps none.
Napi::Value XattrNames(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) {
    Napi::TypeError::New(env, "xattrNames(path)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  std::string names(4096, '\0');
  ssize_t n;
  while ((n = listxattr(path.c_str(), &names[0], names.size())) < 0 && errno == ERANGE && names.size() < (1u << 20)) names.resize(names.size() * 4);
  Napi::Array out = Napi::Array::New(env);
  if (n < 0) {
    if (errno == ENOTSUP) return out;
    appshot::ThrowErrno(env, "listxattr " + path, errno);
    return env.Undefined();
  }
  uint32_t k = 0;
  for (size_t at = 0; at < static_cast<size_t>(n);) {
    std::string name(names.c_str() + at);
    at += name.size() + 1;
    if (!name.empty()) out.Set(k++, Napi::String::New(env, name));
  }
  return out;
}

// inodeFlags(path) -> FS_IOC_GETFLAGS of the file at `path` (opened
// read-only, followed: /proc/PID/fd/N), -errno where it cannot say.
Napi::Value InodeFlags(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) {
    Napi::TypeError::New(env, "inodeFlags(path)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return Napi::Number::New(env, -errno);
  int flags = 0;
  int r = ioctl(fd, FS_IOC_GETFLAGS, &flags);
  int err = errno;
  close(fd);
  return Napi::Number::New(env, r < 0 ? -err : flags);
}

}  // namespace

void RegisterFsIdent(Napi::Env env, Napi::Object exports) {
  exports.Set("openAs", Napi::Function::New(env, OpenAs, "openAs"));
  exports.Set("openExecAs", Napi::Function::New(env, OpenExecAs, "openExecAs"));
  exports.Set("inotifyAddWatchAs", Napi::Function::New(env, InotifyAddWatchAs, "inotifyAddWatchAs"));
  exports.Set("inotifySkipWds", Napi::Function::New(env, InotifySkipWds, "inotifySkipWds"));
  exports.Set("mqOpenAs", Napi::Function::New(env, MqOpenAs, "mqOpenAs"));
  exports.Set("fanotifyMarkAs", Napi::Function::New(env, FanotifyMarkAs, "fanotifyMarkAs"));
  exports.Set("xattrNames", Napi::Function::New(env, XattrNames, "xattrNames"));
  exports.Set("inodeFlags", Napi::Function::New(env, InodeFlags, "inodeFlags"));
}
