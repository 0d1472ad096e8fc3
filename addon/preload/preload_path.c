/*
 * Paths: the instance's REDIR PATH and copy-on-write rules, and every
 * path-taking wrapper (which also rewrite /proc/<vpid>, preload_proc.c).
 *
 * A rule applies to an absolute path the application passes that, once
 * normalized lexically ("//" and "/./" collapsed, "x/.." dropped), equals
 * `from` or starts with `from` + "/". Of several rules the longest `from`
 * wins. No rule applies to a path that is a rule's `to` or under it
 * (rewriting is idempotent: a `to` under a `from`, a state directory
 * under /tmp, is named so by the kernel's answers, getcwd's). A path whose normalized or rewritten form does not fit PATH_MAX
 * fails with ENAMETOOLONG (it is never let through unmatched). A path no
 * rule applies to reaches the kernel as the caller wrote it: normalization
 * is only for matching (it would change what ".." after a symlink means).
 * Relative paths, and *at() calls with a directory fd and a relative
 * path, are not rewritten: they name what the kernel finds from the
 * caller's working directory or that fd. (A working directory inside a
 * redirected tree is the rewritten one, since chdir is translated.) The
 * one exception: a virtual PID or TID at the start of a path relative to
 * a directory of /proc, a descriptor's or the working directory
 * (preload_proc.c, proc_at_path), for every wrapper here.
 *
 * /proc/<vpid>/root/REST (and /proc/self/root/REST,
 * /proc/thread-self/root/REST) of a process of the application whose root
 * is "/" is matched as /REST when a rule applies to /REST (the kernel
 * would follow the root link past the rules: jcmd finds a JVM's socket so;
 * proc_root_redirected); otherwise it is rewritten as any /proc/<vpid>
 * path. An AF_UNIX socket's absolute name is a path here too (bind,
 * connect, a send's destination; and the names the kernel answers are
 * shown as the application named them: "Socket names", at the end).
 *
 * REDIR PATH: from/rest is to/rest, for every call.
 *
 * Copy-on-write (a composite view): the private path is to/rest.
 *  - If it exists, every call uses it.
 *  - Otherwise a call that only reads (open O_RDONLY without O_CREAT or
 *    O_TRUNC, stat, access, opendir, readlink, chdir) uses the original.
 *  - An open that may write (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC; creat;
 *    fopen "w", "a", "+", judged by the flags fopen opens with; truncate)
 *    first copies the original regular file to the private path: the
 *    private parent directories are made (those the original has, with
 *    their modes: a parent that exists on neither side stays missing, and
 *    the call fails with ENOENT as it would), the contents copied
 *    (copy_file_range, or read/write; its data ranges only, holes kept,
 *    and a preallocated file allocated whole: copy_contents) into a
 *    temporary name beside it with
 *    the original's mode, then renamed into place without replacing: of two
 *    processes copying at once, one copy wins and both use it. O_TRUNC (or
 *    truncate to 0) skips the contents. An original that does not exist is
 *    not copied: the call creates the private file. An original that is not
 *    a regular file (a device, a FIFO, a directory) is used as it is.
 *  - A call that changes metadata (chmod, lchmod, chown, the utime family,
 *    setxattr and removexattr, and link's existing name) never reaches the
 *    original, which the template and every other clone share: it first
 *    makes the private side from it (copy_attr_up): a regular file copied
 *    as above (the original's mode, times and the xattrs the caller may
 *    set: copy_xattrs, as for a write's copy); a directory
 *    made with the original's mode (its entries then no longer listed, see
 *    below); a symlink the call does not follow (lchown,
 *    AT_SYMLINK_NOFOLLOW) made with the same target; a FIFO, socket or
 *    device node made anew (a device without CAP_MKNOD: EPERM), each
 *    under a temporary name and put in place as a file's copy is. Every copy
 *    (a write's too) gets the original's owner when the caller has
 *    CAP_CHOWN (chown before chmod, as cp -a); without it the copy is the
 *    caller's, and a set-user-ID or set-group-ID bit of a file someone
 *    else owns is dropped (as cp -p): no copy grants more than the
 *    original. Before copying, what the kernel would refuse on the
 *    original is refused: EPERM for a chmod, chown or utime with explicit
 *    times of a file the caller's fsuid does not own (without CAP_FOWNER,
 *    CAP_CHOWN for chown), EOPNOTSUPP for a chmod of a symlink itself,
 *    EPERM for a directory as link's source, ENODATA for removexattr (or
 *    setxattr XATTR_REPLACE) of a name the side a read sees lacks, EEXIST
 *    for setxattr XATTR_CREATE of one it has, EINVAL for flags (and nanoseconds)
 *    the kernel or glibc rejects before its lookup.
 *  - A final symlink that a call follows (every open, stat, access,
 *    chdir, chmod... without O_NOFOLLOW or AT_SYMLINK_NOFOLLOW; and with
 *    them, for a call that looks its path up rather than its parent, when
 *    a '/' follows the link's name, as the kernel then follows it) is followed
 *    here, on the side in use, when the path is under a copy-on-write
 *    rule: its target, an absolute one as it is and a relative one against
 *    the link's virtual directory (resolved by the kernel when the target
 *    has a "..", which counts from where a symlinked directory really
 *    is), is matched again (at most 40 links, then ELOOP); once one link
 *    was followed, links outside the rules are followed too, so a chain
 *    that leaves the tree and comes back is matched again. So a link the
 *    clone made or copied up, whose absolute target is an original, leads
 *    to the clone's copy of it, and a relative one copied up still finds
 *    its target.
 *  - A symlink in a middle component (every component but the last, for
 *    every call, O_NOFOLLOW or not) is resolved here too, under a
 *    copy-on-write rule: the path below `from` is walked component by
 *    component, each looked at (lstat) on the side in use: the private side
 *    while the prefix exists there, else the original (a missing private
 *    prefix means every longer one is missing too: the rest is asked of
 *    the original only). A link's target, with the components after it,
 *    is matched again as a final link's is (its target absolute as it is,
 *    relative against the link's virtual directory, ".." counted from
 *    where that directory really is; the same 40 links in all, then
 *    ELOOP); once a link led out of the rules, middle links there are
 *    followed too. So D/ld/f with ld -> D/real (absolute or relative, the
 *    template's link, one the clone made, or one it copied up) is D/real/f:
 *    a write copies D/real/f up under its own name, a chmod changes that
 *    copy, an unlink of the original is EROFS, a new name is made in the
 *    private D/real; the template's D/real is never reached, and no
 *    private directory is made in the link's place. The cost: one lstat
 *    per middle component below `from` per call under a copy-on-write
 *    rule (and one more where the private side ends; bench/cow.js). A
 *    ".." in the path as the caller wrote it is still taken lexically (it
 *    was dropped with the component before it, for matching): D/ld/../x
 *    is D/x, where the kernel would take the directory above ld's target.
 *  - mkdir, open O_CREAT|O_EXCL (fopen "x"), symlink, link's new name,
 *    mknod and mkfifo create on the private side (EEXIST, and nothing
 *    copied, if either side has the path); a rename's destination is the
 *    private side.
 *  - unlink, rmdir and a rename's source act on the private side; one that
 *    would remove a path the original has fails with EROFS, since the
 *    original would show through again (there are no whiteouts).
 *  - A directory present on both sides is listed from the private one
 *    (listings are not merged).
 *
 * Rewritten, each with the wrapper below: open, openat, creat, fopen
 * (and their 64 and fortified names), opendir, readlink, readlinkat,
 * chdir, mkdir, mkdirat, unlink, unlinkat, rmdir, remove, rename,
 * renameat, truncate, shm_open, shm_unlink, posix_spawn's file actions;
 * chmod, fchmodat, lchmod, chown, lchown, fchownat, utimensat, utimes, utime,
 * futimesat, lutimes, setxattr, lsetxattr, removexattr, lremovexattr,
 * getxattr, lgetxattr, listxattr, llistxattr; symlink, symlinkat, link,
 * linkat, mknod, mknodat, mkfifo, mkfifoat (and glibc's versioned
 * __xmknod, __xmknodat, what mknod compiled to before glibc 2.33);
 * and every way a program asks about a file without opening it, so that it
 * sees the file its open would reach (a copy-on-write path's private copy,
 * with that copy's size, mode and inode, once a write made it):
 *  - stat, lstat, fstatat, statx (and stat64, lstat64, fstatat64);
 *  - glibc's versioned __xstat, __lxstat, __fxstatat (and their 64
 *    names), what programs built against glibc before 2.33 call for
 *    stat, lstat and fstatat (its <sys/stat.h> made those inline calls
 *    to them);
 *  - access, faccessat (faccessat2 under it), euidaccess, eaccess;
 *  - syscall() with SYS_open, openat, openat2, stat, lstat, newfstatat,
 *    statx, access, faccessat, faccessat2, readlink, readlinkat, chdir,
 *    and with the metadata calls above, mknod, mknodat and symlink
 *    (do_path_syscall: one path, first or after a directory).
 * The same metadata calls made on a descriptor (fchmod, fchown, futimens,
 * fsetxattr..., and those above given AT_EMPTY_PATH or a NULL path) are
 * preload_cowfd.c's: on an original, they change the private side, and
 * the descriptor moves there (it lists what does not move).
 *
 * Not rewritten: relative paths (see above), paths the kernel follows
 * itself (a working directory inside `from`: calls relative to it reach
 * the original, through whatever links the kernel meets on their way; a
 * symlink that is `from` itself or a directory above it), calls without a
 * wrapper here: exec's path, rename with flags (renameat2), syscall() with
 * SYS_link, linkat (but AT_EMPTY_PATH: preload_cowfd.c) or symlinkat (two
 * paths, or the path third: do_path_syscall takes neither), statfs and statvfs, realpath (but for
 * /proc/<vpid>), the path calls glibc makes inside its own functions (ftw
 * and nftw, glob, fts: they reach the kernel past every wrapper), and
 * programs that make raw system calls (a syscall instruction, not
 * syscall()) or link libc statically.
 *
 * Not covered yet, under a copy-on-write rule:
 *  - A descriptor's move to the private copy (preload_cowfd.c) changes
 *    this process's descriptor table only: a copy of the descriptor in
 *    another process (fork, SCM_RIGHTS) or another number (dup) stays on
 *    the original until a metadata call through it moves it too; a
 *    memory mapping of the original stays on it; locks held through it
 *    are dropped with the old descriptor. A directory's descriptor, or a
 *    FIFO's or device's open for I/O, does not move at all: the change is
 *    the private side's, and its fstat keeps showing the original's.
 *  - A descriptor is known to be on an original by its name as the kernel
 *    gives it, symlinks resolved: under a rule whose `from` has a symlink
 *    in it, its metadata calls reach the original. So does a path call
 *    through a descriptor's /proc/self/fd/N (chmod of it: the kernel
 *    follows the magic link; no rule matches /proc). linkat of a relative
 *    source under a descriptor of an original directory makes a second
 *    name of the original's inode.
 *  - A descriptor is moved by number (dup3 over it) after the copy: a
 *    thread that closes it and gets the number again for another file
 *    while the copy is made has that one replaced. A thread that unshared
 *    its descriptor table is read through /proc/self/fd all the same, and
 *    without /proc mounted no descriptor is known to be on an original.
 *  - A directory's xattrs are not copied with it.
 *  - A chmod, utime or setxattr of a regular file copies it whole, however
 *    large.
 *  - A file the clone copied up by writing it (with write permission, not
 *    ownership) is the clone's: a later chmod of it succeeds where the
 *    kernel refuses the original. A chown that changes the owner without
 *    CAP_CHOWN, by the file's owner, copies before the kernel's EPERM;
 *    the write access that user xattrs and a utime to the current time
 *    need is checked on the copy (the caller's, when it does not own the
 *    original), not on the original.
 *  - A symlink, final or in a middle component, that leads out of the
 *    copy-on-write tree is followed out of it, as the kernel would: a
 *    chmod or write through it changes what it leads to (also when `from`
 *    itself is such a symlink).
 *  - Check and use are two system calls: path_slow looks at each
 *    component, then the kernel walks the path again for the call. A
 *    component made a symlink in between (a link put where nothing was, or
 *    where a directory was renamed away, after path_slow looked, before
 *    the call) is followed by the kernel, to an original too. Only the
 *    clone's own processes write its private tree, through these
 *    wrappers, and no clone writes the originals: so on the private side
 *    this is the application racing itself (one thread's rename or
 *    symlink landing inside another thread's call); on the original side
 *    it takes someone changing the template's files (the application the
 *    template was made from, still running, say), which changes every
 *    clone's view anyway. openat2 with RESOLVE_NO_SYMLINKS would close
 *    it for opens only, and is not used: the open wrappers hand the
 *    path to glibc's open and fopen (cancellation points; fopen builds
 *    its FILE), so each would have to open here instead, and
 *    posix_spawn's file actions open inside glibc in the child;
 *    RESOLVE_NO_SYMLINKS refuses a link anywhere, `to` and the
 *    directories above it too (a private root under a symlinked
 *    $APPSHOT_HOME or /tmp), so `to` would be opened first and the rest
 *    resolved beneath it, two more system calls per open; and glibc's
 *    open never makes openat2, so a seccomp filter that allows what
 *    glibc does may refuse it (or kill for it): the racy path would
 *    stay as the fallback. chmod, unlink, rename, mkdir and the rest
 *    have no such form at all (AT_SYMLINK_NOFOLLOW covers the last
 *    component only; O_NOFOLLOW on each component would be an openat
 *    per component, and an *at call on the last directory's
 *    descriptor).
 *  - An original the caller may not read (mode 0200 for its owner, say)
 *    cannot be copied: a metadata call on it fails with EACCES.
 *
 * Everything here runs on the caller's stack with raw system calls: no
 * allocation except an anonymous mapping while a copy falls back to
 * read/write, a symlink's target is copied up or followed, or link needs
 * its second path, and a realloc of an answer libc allocated itself
 * (getcwd's, realpath's) that a virtual id makes longer. The one PATH_MAX
 * buffer is in the slow half of a wrapper, only when a path is rewritten;
 * path_slow works in it.
 */
#include "preload.h"

#include <stdlib.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <utime.h>

/* The system calls glibc's functions make (x86-64 has the old ones): a
 * program's seccomp filter that allows what glibc does allows the
 * wrappers' calls too. */
#ifdef SYS_chmod
#define CHMOD_RAW(p, mode) SYS2(chmod, p, mode)
#define CHOWN_RAW(p, uid, gid) SYS3(chown, p, uid, gid)
#define LCHOWN_RAW(p, uid, gid) SYS3(lchown, p, uid, gid)
#define SYMLINK_RAW(target, p) SYS2(symlink, target, p)
#define LINK_RAW(a, b) SYS2(link, a, b)
#define MKDIR_RAW(p, mode) SYS2(mkdir, p, mode)
#define UNLINK_RAW(p) SYS1(unlink, p)
#define RMDIR_RAW(p) SYS1(rmdir, p)
#define RENAME_RAW(a, b) SYS2(rename, a, b)
#else
#define CHMOD_RAW(p, mode) SYS3(fchmodat, AT_FDCWD, p, mode)
#define CHOWN_RAW(p, uid, gid) SYS5(fchownat, AT_FDCWD, p, uid, gid, 0)
#define LCHOWN_RAW(p, uid, gid) SYS5(fchownat, AT_FDCWD, p, uid, gid, AT_SYMLINK_NOFOLLOW)
#define SYMLINK_RAW(target, p) SYS3(symlinkat, target, AT_FDCWD, p)
#define LINK_RAW(a, b) SYS5(linkat, AT_FDCWD, a, AT_FDCWD, b, 0)
#define MKDIR_RAW(p, mode) SYS3(mkdirat, AT_FDCWD, p, mode)
#define UNLINK_RAW(p) SYS3(unlinkat, AT_FDCWD, p, 0)
#define RMDIR_RAW(p) SYS3(unlinkat, AT_FDCWD, p, AT_REMOVEDIR)
#define RENAME_RAW(a, b) SYS4(renameat, AT_FDCWD, a, AT_FDCWD, b)
#endif

/* --- Matching ------------------------------------------------------------ */

/* Lexically normalizes the absolute path `in` into out: "//" and "/./"
 * collapsed, "/x/.." dropped (without looking at symlinks), a trailing '/'
 * kept. `in` may be out itself: the output never gets ahead of the input.
 * Returns the length, or -1 when it does not fit. */
static long normalize(const char *in, char out[PATH_MAX]) {
  size_t o = 0;
  const char *s = in;
  int trailing = 0;
  while (*s) {
    while (*s == '/') s++;
    if (!*s) {
      trailing = 1;
      break;
    }
    const char *e = s;
    while (*e && *e != '/') e++;
    size_t n = (size_t)(e - s);
    trailing = 0;
    if (n == 1 && s[0] == '.') {
      trailing = 1;
    } else if (n == 2 && s[0] == '.' && s[1] == '.') {
      while (o > 0 && out[o - 1] != '/') o--;
      if (o > 0) o--;
      trailing = 1;
    } else {
      if (o + 1 + n + 1 > PATH_MAX) return -1; /* '/', the name, '\0' */
      out[o++] = '/';
      memmove(out + o, s, n); /* in place: out + o <= s */
      o += n;
    }
    s = e;
  }
  if (o == 0 || trailing) {
    if (o + 2 > PATH_MAX) return -1;
    out[o++] = '/';
  }
  out[o] = '\0';
  return (long)o;
}

/* Whether the normalized path is a rule's `to` or under it: a path the
 * rules already led to, as the kernel answers it (getcwd, `pwd -P`,
 * /proc/self/fd/N, realpath). A `to` may lie under a rule's `from` (a
 * state directory under /tmp holds the private /tmp, and the clones'
 * copy-on-write copies, under the rule from=/tmp): rewriting such a path
 * again would name a file that does not exist (review r250 M3). Any
 * rule's `to`, not only the matching rule's own: a copy-on-write copy
 * under that state directory is under the /tmp rule's `from` but not its
 * `to`. */
static int under_a_to(const struct appshot_instance *in, const char *norm, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    const struct appshot_redir *r = &in->redir[i];
    size_t tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
    if (tl > 1 && r->to[0] == '/' && strncmp(norm, r->to, tl) == 0 &&
        (norm[tl] == '\0' || norm[tl] == '/'))
      return 1;
  }
  return 0;
}

/* The rule that applies to the normalized path, or NULL. None applies to
 * a path at or under a rule's `to` (under_a_to): rewriting is idempotent,
 * and such a path is what it names, for every kind of rule (a
 * copy-on-write rule's `to` is the private side, which is its own
 * already). Looked at only once a rule matched: a path under no `from`
 * costs nothing more. */
static const struct appshot_redir *match(const struct appshot_instance *in,
                                         const char *norm) {
  const struct appshot_redir *best = NULL;
  uint32_t n = in->redirs < APPSHOT_REDIRS ? in->redirs : APPSHOT_REDIRS;
  for (uint32_t i = 0; i < n; i++) {
    const struct appshot_redir *r = &in->redir[i];
    uint32_t fl = r->from_len;
    if (fl == 0 || fl >= APPSHOT_PATH_MAX || r->from[0] != '/' ||
        r->to[0] != '/' || (best && fl <= best->from_len))
      continue;
    if (strncmp(norm, r->from, fl) == 0 &&
        (norm[fl] == '\0' || norm[fl] == '/'))
      best = r;
  }
  return best && UNLIKELY(under_a_to(in, norm, n)) ? NULL : best;
}

/* --- Raw file helpers (no wrapper, no libc state) ------------------------ */

static int lexists(const char *p, struct stat *st) {
  return appshot_raw_syscall(SYS_newfstatat, AT_FDCWD, (long)p, (long)st, AT_SYMLINK_NOFOLLOW,
              0, 0) == 0;
}

/* Whether the caller has capability `cap` in its effective set (raw capget:
 * the wrapper would translate a PID it is not given). */
static int has_cap(int cap) {
  struct { uint32_t version; int pid; } hdr = {0x20080522, 0}; /* _LINUX_CAPABILITY_VERSION_3 */
  struct { uint32_t effective, permitted, inheritable; } data[2];
  if (SYS2(capget, &hdr, data) < 0) return 0;
  return (int)(data[cap / 32].effective >> (cap % 32)) & 1;
}

/* The caller's uid as the kernel compares it with an owner: the effective
 * one (the file-system uid follows it unless the program calls setfsuid,
 * which a seccomp filter such as systemd's @system-service may refuse, or
 * kill for). */
static uid_t fs_uid(void) { return (uid_t)SYS0(geteuid); }

/* What a private copy of a file of `st` may keep of its owner and mode, as
 * cp -a and cp -p do: with CAP_CHOWN the copy is given the original's owner
 * (chown before chmod: a chown clears set-id bits); without it the copy is
 * the caller's, and a set-user-ID or set-group-ID bit of a file someone
 * else owns is dropped, so that no copy ever grants more than the
 * original did. Returns the mode to give the copy; `name` relative to
 * `dirfd`, or the descriptor itself when name is "" (AT_EMPTY_PATH). */
static mode_t copy_owner(int dirfd, const char *name, const struct stat *st) {
  mode_t perm = st->st_mode & 07777;
  /* Given away only where the caller may still chmod it afterwards: with
   * CAP_CHOWN but not CAP_FOWNER, the copy stays the caller's. */
  if (has_cap(0 /* CAP_CHOWN */) && (st->st_uid == fs_uid() || has_cap(3 /* CAP_FOWNER */))) {
    if (appshot_raw_syscall(SYS_fchownat, dirfd, (long)name, st->st_uid, st->st_gid,
             AT_SYMLINK_NOFOLLOW | (*name ? 0 : AT_EMPTY_PATH), 0) == 0)
      return perm;
  }
  if (st->st_uid != fs_uid() && !S_ISDIR(st->st_mode)) perm &= ~(mode_t)(S_ISUID | S_ISGID);
  return perm;
}

/* The two sides of a copy-on-write rule share the caller's one buffer: the
 * rest of the path (what follows `from`) sits at offset k = max(fl, tl),
 * and the side in use has its prefix (`from` or `to`) written just before
 * it. Asking for a side rewrites the prefix, so a pointer to one side is
 * good until the other side is asked for; a '\0' put into the rest cuts
 * both alike. */
struct cow {
  char *buf;
  const char *from, *to;
  size_t fl, tl, k;
  int dir_only; /* the path had a trailing '/', cut from the rest */
};

static char *orig_side(const struct cow *c) {
  return (char *)memcpy(c->buf + c->k - c->fl, c->from, c->fl);
}

static char *priv_side(const struct cow *c) {
  return (char *)memcpy(c->buf + c->k - c->tl, c->to, c->tl);
}

/* Makes the directories leading to the private path (everything up to its
 * last '/'). Inside `to`: mkdir -p. Below it: the directories the original
 * has, with the original's modes; one the original does not have either
 * stops there. Errors are left to the call that follows. The rest of the
 * path is modified and restored; the side in use afterwards is either. */
static void make_parents(const struct cow *c) {
  char *end = c->buf + c->k; /* where the rest starts */
  char *pv = priv_side(c);
  for (char *s = pv + 1; s <= end && *s; s++) {
    if (*s != '/') continue;
    *s = '\0';
    SYS3(mkdirat, AT_FDCWD, pv, 0755);
    *s = '/';
  }
  if (!*end) return; /* the private path is `to` itself */
  for (char *s = end + 1; *s; s++) {
    if (*s != '/') continue;
    struct stat st;
    *s = '\0';
    if (!lexists(priv_side(c), &st)) {
      int dir = appshot_raw_syscall(SYS_newfstatat, AT_FDCWD, (long)orig_side(c), (long)&st,
                     0, 0, 0) == 0 && S_ISDIR(st.st_mode);
      if (!dir) {
        *s = '/';
        return;
      }
      pv = priv_side(c);
      if (SYS3(mkdirat, AT_FDCWD, pv, st.st_mode & 07777) == 0) /* the umask took bits: */
        SYS4(fchmodat, AT_FDCWD, pv, copy_owner(AT_FDCWD, pv, &st), 0);
    }
    *s = '/';
  }
}

enum { COPY_BUF = 64 * 1024 };

/* [pos, end) of src written at the same offsets of dst: copy_file_range
 * where the kernel can (it may share or clone blocks), else pread/pwrite
 * through *buf, an anonymous mapping made on the first range that needs it
 * (the caller unmaps it). Stops early, without error, at src's end (an
 * original that shrank meanwhile). */
static int copy_range(int src, int dst, long pos, long end, char **buf) {
  while (pos < end) {
    long want = end - pos;
    if (!*buf) {
      loff_t in = pos, out = pos;
      long n = appshot_raw_syscall(SYS_copy_file_range, src, (long)&in, dst, (long)&out,
                                   want < (1L << 30) ? want : 1L << 30, 0);
      if (n > 0) {
        pos += n;
        continue;
      }
      if (n == 0) return 0;
      if (n == -EINTR) continue;
      if (n != -EXDEV && n != -EINVAL && n != -ENOSYS && n != -EOPNOTSUPP) return (int)n;
      long m = appshot_raw_syscall(SYS_mmap, 0, COPY_BUF, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m < 0 && m > -4096) return (int)m;
      *buf = (char *)m;
    }
    if (want > COPY_BUF) want = COPY_BUF;
    long got = SYS4(pread64, src, *buf, want, pos);
    if (got == -EINTR) continue;
    if (got <= 0) return (int)got;
    for (long done = 0; done < got;) {
      long put = SYS4(pwrite64, dst, *buf + done, got - done, pos + done);
      if (put == -EINTR) continue;
      if (put < 0) return (int)put;
      done += put;
    }
    pos += got;
  }
  return 0;
}

/* src's data into the empty dst, as a sparse copy: only the ranges
 * SEEK_DATA finds are written, and the size set at the end, so a clone's
 * first write to a mostly empty file (a VM disk, a database's sparse
 * file) costs the room its data takes, not its size. A file whose blocks
 * cover its size has no holes to keep, but may have blocks fallocate
 * reserved (unwritten extents, which SEEK_DATA takes for holes): its copy
 * is allocated whole first, as the application counted on the room being
 * there (a file system without fallocate: copied as the rest). A file
 * system without SEEK_DATA (EINVAL) copies the file as one range. st:
 * src's. */
static int copy_contents(int src, int dst, const struct stat *st) {
  long size = st->st_size, r;
  if (size > 0 && (unsigned long long)st->st_blocks * 512 >= (unsigned long long)size) {
    while ((r = SYS4(fallocate, dst, 0, 0, size)) == -EINTR) {}
    if (r < 0 && r != -EOPNOTSUPP) return (int)r;
  }
  char *buf = NULL;
  int err = 0;
  for (long pos = 0; pos < size && !err;) {
    long data = SYS3(lseek, src, pos, SEEK_DATA), hole;
    if (data == -ENXIO) break; /* only a hole is left */
    if (data == -EINVAL) {
      data = pos;
      hole = size;
    } else if (data < 0) {
      err = (int)data;
      break;
    } else if ((hole = SYS3(lseek, src, data, SEEK_HOLE)) < 0) {
      err = (int)hole;
      break;
    }
    if (hole > size) hole = size;
    if (hole <= data) break; /* shrank meanwhile */
    err = copy_range(src, dst, data, hole, &buf);
    pos = hole;
  }
  if (buf) SYS2(munmap, buf, COPY_BUF);
  /* The size, with any hole at the end. */
  return err ? err : (int)SYS2(ftruncate, dst, size);
}

/* Copies src's extended attributes to dst, as cp -a does: each one the
 * caller may set (user.*, and security.*, trusted.* or an ACL as its
 * capabilities allow; one it may not is left out). Without them a
 * removexattr of a name the original has would find no such name on the
 * copy. A mapping for the names and one value, only when there are any. */
static void copy_xattrs(int src, int dst) {
  long n = SYS3(flistxattr, src, NULL, 0);
  if (n <= 0) return;
  enum { VAL = 64 * 1024 }; /* XATTR_SIZE_MAX */
  size_t size = (size_t)n + VAL;
  long m = appshot_raw_syscall(SYS_mmap, 0, (long)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m < 0 && m > -4096) return;
  char *list = (char *)m, *val = list + n;
  long got = SYS3(flistxattr, src, list, n); /* ERANGE if it grew meanwhile */
  for (char *name = list; got > 0 && name < list + got; name += strlen(name) + 1) {
    long v = SYS4(fgetxattr, src, name, val, VAL);
    if (v >= 0) SYS5(fsetxattr, dst, name, val, v, 0);
  }
  SYS2(munmap, list, size);
}

/* The copies this thread is making: a signal handler that copies while
 * the thread it interrupted is copying gets a temporary name of its own
 * (the same one would be taken for a dead copy's and removed). */
static __thread unsigned t_cow_nesting TLS_IE;

/* A copy is made under a temporary name beside the private path,
 * ".appshot-cow.<tid>" (".<n>" more when nested, t_cow_nesting; not built
 * from the name, which may be too long to take a suffix),
 * then renamed into place without replacing:
 * of two processes copying at once, one copy wins and both use it. Writes
 * that name into tmp and the private name's last component to *base (in
 * the caller's buffer: good while the private side is the one asked for),
 * and returns a descriptor (O_PATH) of their directory, or -errno. */
static long tmp_beside(const struct cow *c, char tmp[NAME_MAX + 1], const char **base) {
  char *pv = priv_side(c);
  char *slash = strrchr(pv, '/'); /* pv is absolute */
  *base = slash + 1;
  if (!**base) return -EISDIR;
  char *d = put_decimal((char *)memcpy(tmp, ".appshot-cow.", 13) + 13,
                        (unsigned long)SYS0(gettid));
  if (t_cow_nesting > 1) { /* a signal handler's copy, inside another */
    *d++ = '.';
    d = put_decimal(d, t_cow_nesting - 1);
  }
  *d = '\0';
  if (slash == pv) return SYS3(openat, AT_FDCWD, "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
  *slash = '\0';
  long dir = SYS3(openat, AT_FDCWD, pv, O_PATH | O_DIRECTORY | O_CLOEXEC);
  *slash = '/';
  return dir;
}

/* Removes a dead copy's temporary name (of any kind: names are per thread,
 * not per file). */
static void remove_dead(long dir, const char *tmp) {
  if (SYS3(unlinkat, dir, tmp, 0) == -EISDIR) SYS3(unlinkat, dir, tmp, AT_REMOVEDIR);
}

/* Puts the finished copy `tmp` in place as `base` (both in dir) unless
 * something is there already (another process's copy: then that one is
 * the copy, and 0). */
static int put_in_place(long dir, const char *tmp, const char *base, int is_dir) {
  int left = 1; /* tmp still there */
  int err = (int)appshot_raw_syscall(SYS_renameat2, dir, (long)tmp, dir, (long)base, RENAME_NOREPLACE, 0);
  if (err == 0) {
    left = 0;
  } else if (err == -EINVAL) { /* a file system without RENAME_NOREPLACE */
    err = is_dir ? -EPERM : (int)SYS5(linkat, dir, tmp, dir, base, 0);
    if (err == -EPERM) { /* no links: renamed, if nothing is there */
      struct stat st;
      err = appshot_raw_syscall(SYS_newfstatat, dir, (long)base, (long)&st, AT_SYMLINK_NOFOLLOW, 0, 0) == 0
                ? -EEXIST
                : (int)SYS4(renameat, dir, tmp, dir, base);
      if (err == 0) left = 0;
    }
  }
  if (err == -EEXIST) err = 0;
  if (left) SYS3(unlinkat, dir, tmp, is_dir ? AT_REMOVEDIR : 0);
  return err;
}

/* A write is about to go to the private path of a COW rule that does not
 * exist yet. Returns 0 to use the private path, 1 to use the original (not
 * a regular file), or -errno. Not inlined: its frame is only needed for a
 * copy. */
static NOINLINE int copy_up(const struct cow *c, int contents) {
  /* Not following a symlink: path_slow resolved those the call follows; one
   * it does not follow (O_NOFOLLOW) is left to the kernel's answer. Without
   * touching the template's atime where the caller may (O_NOATIME: owner or
   * CAP_FOWNER only). O_NONBLOCK: an original FIFO is only looked at
   * (used as it is), and a blocking read-only open of it would wait for a
   * writer, for good when there is none. */
  int fl = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK;
  long src = SYS3(openat, AT_FDCWD, orig_side(c), fl | O_NOATIME);
  if (src == -EPERM) src = SYS3(openat, AT_FDCWD, orig_side(c), fl);
  if (src == -ENOENT || src == -ENOTDIR) {
    make_parents(c); /* the call creates it, or not */
    return 0;
  }
  if (src == -ELOOP) return 1;
  if (src < 0) return (int)src;
  struct stat st;
  long r = SYS2(fstat, src, &st);
  if (r == 0 && c->dir_only && !S_ISDIR(st.st_mode)) r = -ENOTDIR;
  if (r < 0 || !S_ISREG(st.st_mode)) {
    SYS1(close, src);
    return r < 0 ? (int)r : 1;
  }
  make_parents(c);
  char tmp[NAME_MAX + 1];
  const char *base;
  t_cow_nesting++;
  long dir = tmp_beside(c, tmp, &base);
  if (dir < 0) {
    t_cow_nesting--;
    SYS1(close, src);
    return (int)dir;
  }
  long dst = -EEXIST;
  for (int i = 0; i < 2 && dst == -EEXIST; i++) {
    dst = SYS4(openat, dir, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
               0600);
    if (dst == -EEXIST) remove_dead(dir, tmp);
  }
  if (dst < 0) {
    t_cow_nesting--;
    SYS1(close, src);
    SYS1(close, dir);
    return (int)dst;
  }
  test_pause("cow-copying"); /* a signal handler's copy may come here */
  int err = contents ? copy_contents((int)src, (int)dst, &st) : 0;
  if (!err) err = (int)SYS2(fchmod, dst, copy_owner((int)dst, "", &st));
  if (!err) copy_xattrs((int)src, (int)dst);
  /* The original's times, as a chmod or chown of it would have left them
   * (a write that follows sets its own). On the temporary name: a copy
   * another process made and wrote meanwhile keeps its own. */
  if (!err) {
    struct timespec times[2] = {st.st_atim, st.st_mtim};
    SYS4(utimensat, dst, NULL, times, 0);
  }
  SYS1(close, src);
  SYS1(close, dst);
  if (!err) err = put_in_place(dir, tmp, base, 0);
  else SYS3(unlinkat, dir, tmp, 0);
  t_cow_nesting--;
  SYS1(close, dir);
  return err;
}

/* A call that changes the metadata of a COW path (PATH_ATTR, PATH_LATTR)
 * whose private side does not exist yet: the private side is made from the
 * original first, so that the call changes the clone's own file and never
 * the template's, which every other clone sees. A regular file is copied
 * (copy_up); a directory is made with the original's mode (its entries
 * stay on the original side, and are no longer listed: listings are not
 * merged); a symlink the call does not follow is made with the same
 * target; a FIFO, socket or device node is made anew (a device needs
 * CAP_MKNOD: without it the call fails with EPERM rather than reach the
 * original). Nothing on the original side: the call fails on the private
 * side as it would have on the original. Returns 0 or -errno. */
static NOINLINE int copy_attr_up(const struct cow *c, int op) {
  struct stat st;
  long r = appshot_raw_syscall(SYS_newfstatat, AT_FDCWD, (long)orig_side(c), (long)&st,
                (op & PATH_OP_MASK) == PATH_ATTR ? 0 : AT_SYMLINK_NOFOLLOW, 0, 0);
  if (r == -ENOENT) return 0; /* the call fails (or creates) privately */
  if (r < 0) return (int)r;
  if (c->dir_only && !S_ISDIR(st.st_mode)) return -ENOTDIR; /* "file/" */
  /* What the kernel would refuse on the original: refused here, nothing
   * copied (a copy would be the caller's, to change at will). */
  if ((op & PATH_NOLINK) && S_ISLNK(st.st_mode)) return -EOPNOTSUPP;
  if ((op & PATH_NODIR) && S_ISDIR(st.st_mode)) return -EPERM;
  if ((op & (PATH_OWNER | PATH_CHOWNER)) && st.st_uid != fs_uid() &&
      !has_cap(op & PATH_CHOWNER ? 0 /* CAP_CHOWN */ : 3 /* CAP_FOWNER */))
    return -EPERM;
  if (S_ISREG(st.st_mode)) {
    int rc = copy_up(c, 1);
    return rc == 1 ? -EAGAIN : rc; /* it was replaced meanwhile */
  }
  /* Made under a temporary name, given its owner, mode and times there,
   * then put in place: no other process sees it half made, nor loses a
   * change it made meanwhile to one that is already in place. A symlink's
   * target is read first, in a page of its own (not a second PATH_MAX
   * buffer on a stack that may be small), while the original side's name
   * is at hand. */
  char *target = NULL;
  if (S_ISLNK(st.st_mode)) {
    long m = appshot_raw_syscall(SYS_mmap, 0, PATH_MAX, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m < 0 && m > -4096) return (int)m;
    target = (char *)m;
    long n = SYS4(readlinkat, AT_FDCWD, orig_side(c), target, PATH_MAX - 1);
    if (n < 0) {
      SYS2(munmap, target, PATH_MAX);
      return (int)n;
    }
    target[n] = '\0';
  }
  make_parents(c);
  char tmp[NAME_MAX + 1];
  const char *base;
  t_cow_nesting++;
  long dir = tmp_beside(c, tmp, &base);
  if (dir >= 0) {
    int is_dir = S_ISDIR(st.st_mode);
    for (int i = 0; i < 2; i++) {
      if (is_dir) r = SYS3(mkdirat, dir, tmp, 0700);
      else if (target) r = SYS3(symlinkat, target, dir, tmp);
      else r = SYS4(mknodat, dir, tmp, (st.st_mode & S_IFMT) | 0600,
                    (unsigned int)st.st_rdev); /* the kernel's encoding */
      if (r != -EEXIST) break;
      remove_dead(dir, tmp);
    }
    if (r == 0) {
      /* The original's owner where the caller may give it, then its mode
       * (the umask took bits) and the times a chmod keeps. */
      mode_t perm = copy_owner((int)dir, tmp, &st);
      if (!target) SYS4(fchmodat, dir, tmp, perm, 0);
      struct timespec times[2] = {st.st_atim, st.st_mtim};
      SYS4(utimensat, dir, tmp, times, AT_SYMLINK_NOFOLLOW);
      r = put_in_place(dir, tmp, base, is_dir);
    }
    SYS1(close, dir);
  } else {
    r = dir;
  }
  t_cow_nesting--;
  if (target) SYS2(munmap, target, PATH_MAX);
  return (int)r;
}

/* --- path_slow ----------------------------------------------------------- */

/* The path as the caller gave it (with /proc/<vpid> rewritten, again: buf
 * was reused), or the path a symlink led to (in `page`). Lexical
 * normalization is only for matching: it would change what ".." after a
 * symlink means. */
static const char *original(const char *path, const char *p, char buf[PATH_MAX],
                            const char *page) {
  if (p == path) return path;
  if (p == page) return (const char *)memcpy(buf, page, strlen(page) + 1);
  return proc_path(path, buf);
}

/* The most symlinks one lookup follows, as the kernel's MAXSYMLINKS. */
enum { MAX_HOPS = 40 };

/* Whether the relative path t has a ".." component. */
static int has_dotdot(const char *t) {
  for (const char *s = t; *s; s++)
    if (s[0] == '.' && s[1] == '.' && (s == t || s[-1] == '/') && (!s[2] || s[2] == '/')) return 1;
  return 0;
}

/* Reads the symlink `link` (in the PATH_MAX buffer that starts at
 * c->buf, or at link itself when c is NULL: a link outside the rules) into
 * the page t, as an absolute path. A relative target is joined to the
 * link's directory: lexically (under a rule its virtual name, the
 * original side's) unless the target has a ".." component: the kernel
 * takes ".." from where the directory really is, which is elsewhere when
 * it was reached through a symlink (D/bin -> r/v2/bin, bin/app ->
 * ../lib/app is r/v2/lib/app, not D/lib/app). Then the directory is
 * resolved by the kernel (opened O_PATH, its /proc/self/fd name read back
 * into link's buffer) and a private one named by its virtual name. Raw
 * calls, no allocation. Returns 0 or -errno. */
static int link_target(char *link, const struct cow *c, char *t) {
  long n = SYS4(readlinkat, AT_FDCWD, link, t, PATH_MAX);
  if (n < 0) return (int)n;
  if (n >= PATH_MAX) return -ENAMETOOLONG; /* no room for its '\0' */
  t[n] = '\0';
  if (t[0] == '/') return 0;
  const char *d;
  size_t dl;
  if (!has_dotdot(t)) {
    d = c ? orig_side(c) : link; /* the link's virtual name */
    dl = (size_t)(strrchr(d, '/') - d);
  } else {
    char *slash = strrchr(link, '/'); /* link is absolute */
    long fd;
    if (slash == link) {
      fd = SYS3(openat, AT_FDCWD, "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    } else {
      *slash = '\0';
      fd = SYS3(openat, AT_FDCWD, link, O_PATH | O_DIRECTORY | O_CLOEXEC);
      *slash = '/';
    }
    if (fd < 0) return (int)fd;
    char name[32] = "/proc/self/fd/";
    *put_decimal(name + 14, (unsigned long)fd) = '\0';
    char *phys = c ? c->buf : link;
    long m = SYS4(readlinkat, AT_FDCWD, name, phys, PATH_MAX);
    SYS1(close, fd);
    if (m < 0) return (int)m;
    if (m >= PATH_MAX || phys[0] != '/') return m >= PATH_MAX ? -ENAMETOOLONG : -ENOENT;
    dl = m == 1 ? 0 : (size_t)m; /* "/": the root */
    if (c && dl >= c->tl && !memcmp(phys, c->to, c->tl) && (dl == c->tl || phys[c->tl] == '/')) {
      /* A private directory: its virtual name, for the rules to match. */
      if (dl - c->tl + c->fl >= PATH_MAX) return -ENAMETOOLONG;
      memmove(phys + c->fl, phys + c->tl, dl - c->tl);
      memcpy(phys, c->from, c->fl);
      dl = dl - c->tl + c->fl;
    }
    d = phys;
  }
  if (dl + 1 + (size_t)n >= PATH_MAX) return -ENAMETOOLONG;
  memmove(t + dl + 1, t, (size_t)n + 1);
  memcpy(t, d, dl);
  t[dl] = '/';
  return 0;
}

/* The page path_rules maps at the first symlink it follows: the target
 * being matched in its first PATH_MAX bytes, and in the second the
 * components that followed a middle-component link, carried over while
 * link_target uses the path's buffer. */
enum { LINK_PAGE = 2 * PATH_MAX };

static int map_link_page(char **page) {
  if (*page) return 0;
  long m = appshot_raw_syscall(SYS_mmap, 0, LINK_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m < 0 && m > -4096) return (int)m;
  *page = (char *)m;
  return 0;
}

/* The first symlink among the middle components of a path (every one but
 * the last, which the call itself decides whether to follow), as the
 * kernel would meet it walking the path. Under a copy-on-write rule (c) the
 * components walked are those of the rest (what follows `from`), each
 * looked at on the side in use: the private side while its prefixes exist
 * there, else the original (once a private prefix is missing, every longer
 * one is too: *priv_missing is set, and nothing private is asked again).
 * Outside the rules (c NULL, once a link was followed) `path`, an absolute
 * normalized path, is walked as it is. One lstat per component, and one
 * more where the private side ends. Stops at a component that does not
 * exist or is not a directory (the kernel fails there, or the call makes
 * it). Returns the name of the link, on its side, cut by a '\0' at *slash
 * (the '/' that followed it), or NULL. */
static char *middle_link(const struct cow *c, char *path, char **slash, int *priv_missing) {
  char *end = path + strlen(path);
  if (end > path + 1 && end[-1] == '/') end--; /* a trailing '/' (outside the rules) */
  char *last = end;
  while (last > path && *--last != '/') {
  }
  struct stat st;
  for (char *s = path + 1; s <= last; s++) {
    if (*s != '/') continue;
    *s = '\0';
    char *side = NULL;
    if (!c) {
      side = lexists(path, &st) ? path : NULL;
    } else {
      if (!*priv_missing) {
        char *pv = priv_side(c);
        if (lexists(pv, &st)) side = pv;
        else *priv_missing = 1;
      }
      if (!side && lexists(orig_side(c), &st)) side = orig_side(c);
    }
    if (side && S_ISLNK(st.st_mode)) {
      *slash = s;
      return side;
    }
    *s = '/';
    if (!side || !S_ISDIR(st.st_mode)) return NULL;
  }
  return NULL;
}

/* Into the page: the target of the middle-component link `link` (cut at
 * slash, see middle_link), made absolute as link_target makes a final
 * link's, followed by the components after it (and the trailing '/' a
 * rule's rest had cut, dir_only). They are carried in the page's second
 * half meanwhile: link_target may write the link's physical directory over
 * the path's buffer. Returns 0 or -errno. */
static int middle_target(char *link, char *slash, const struct cow *c, int dir_only, char *page) {
  char *carry = page + PATH_MAX;
  size_t n = strlen(slash + 1);
  if (n + 3 > PATH_MAX) return -ENAMETOOLONG; /* '/', the components, '/', '\0' */
  carry[0] = '/';
  memcpy(carry + 1, slash + 1, n + 1);
  if (dir_only) memcpy(carry + 1 + n, "/", 2);
  int rc = link_target(link, c, page);
  if (rc < 0) return rc;
  size_t tl = strlen(page), cl = strlen(carry);
  if (tl + cl >= PATH_MAX) return -ENAMETOOLONG;
  memcpy(page + tl, carry, cl + 1);
  return 0;
}

/* A private path returned with the trailing '/' path_rules cut. */
static const char *with_slash(const char *side, char *cut) {
  if (cut) *cut = '/';
  return side;
}

/* path_slow once a rule may apply: p is the path to match (path itself,
 * its /proc/<vpid> rewrite in buf, or where a symlink led, in *page). */
static const char *path_rules(const char *path, const char *p, int op, char buf[PATH_MAX],
                              char **page) {
  const struct appshot_instance *in = &g_h->instance;
  int base = op & PATH_OP_MASK;
  int follow = !(op & PATH_NOFOLLOW) &&
               (base == PATH_READ || base == PATH_WRITE || base == PATH_TRUNC || base == PATH_ATTR);
  /* A call that looks its path up (not one on its parent: create, remove,
   * rename): a trailing '/' makes the kernel follow a final symlink even
   * where the call would not (AT_SYMLINK_NOFOLLOW, O_NOFOLLOW, lchown),
   * so it is followed here too. */
  int lookup = base == PATH_READ || base == PATH_WRITE || base == PATH_TRUNC ||
               base == PATH_ATTR || base == PATH_LATTR;
  for (int hops = 0;; hops++) {
    /* buf = the normalized path (in place when p is buf). One that does
     * not fit cannot be matched: fail rather than let it reach the
     * original. */
    long nl = normalize(p, buf);
    if (nl < 0) {
      errno = ENAMETOOLONG;
      return NULL;
    }
    const struct appshot_redir *r = match(in, buf);
    if (!r && hops) {
      /* A link led out of the rules: the kernel would follow any further
       * link there, and one may lead back under a rule, so followed here
       * too (p is in *page): one in a middle component whatever the call,
       * a final one if the call follows it. */
      char *slash;
      char *ml = middle_link(NULL, buf, &slash, NULL);
      if (ml) {
        if (hops == MAX_HOPS) {
          errno = ELOOP;
          return NULL;
        }
        int rc = middle_target(ml, slash, NULL, 0, *page);
        if (rc < 0) {
          errno = -rc;
          return NULL;
        }
        p = *page;
        continue;
      }
    }
    if (!r && hops) {
      /* p is *page here (where the last link led). A trailing '/' is
       * taken off to look at the entry itself (lstat would follow it),
       * and put back after the target, where the kernel checks it. */
      char *pw = *page;
      size_t pl = strlen(pw), kept = pl;
      int slash = lookup && pl > 1 && pw[pl - 1] == '/';
      if (follow || slash) {
        while (slash && kept > 1 && pw[kept - 1] == '/') pw[--kept] = '\0';
        struct stat lst;
        if (lexists(pw, &lst) && S_ISLNK(lst.st_mode)) {
          if (hops == MAX_HOPS) {
            errno = ELOOP;
            return NULL;
          }
          memcpy(buf, pw, kept + 1);
          int rc = link_target(buf, NULL, *page);
          if (rc < 0) {
            errno = -rc;
            return NULL;
          }
          size_t n2 = strlen(*page);
          if (slash && n2 + 1 < PATH_MAX) memcpy(*page + n2, "/", 2);
          p = *page;
          continue;
        }
        if (kept < pl) pw[kept] = '/';
      }
    }
    if (!r) return original(path, p, buf, *page);
    size_t fl = r->from_len, tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
    size_t rl = (size_t)nl - fl;
    if (tl + rl >= PATH_MAX) {
      errno = ENAMETOOLONG;
      return NULL;
    }
    if (r->kind != APPSHOT_REDIR_COW) { /* buf = to + rest */
      memmove(buf + tl, buf + fl, rl + 1);
      return (const char *)memcpy(buf, r->to, tl);
    }

    struct cow c = {buf, r->from, r->to, fl, tl, fl > tl ? fl : tl, 0};
    memmove(buf + c.k, buf + fl, rl + 1);
    /* A trailing '/' (normalize keeps one): the lookups and copies here name
     * the entry itself, without it (a copy's name would be empty, and
     * make_parents would take the entry for a parent); it is put back on
     * the private path returned, where the kernel checks it. */
    char *cut = NULL;
    if (rl && buf[c.k + rl - 1] == '/') {
      cut = buf + c.k + rl - 1;
      *cut = '\0';
      c.dir_only = 1;
    }
    struct stat st;
    const char *pv;
    /* A symlink in a middle component, on the side in use: left to the
     * kernel, a private link (made by the clone, or copied up) or an
     * original one whose target is an original directory would lead a
     * write, unlink or chmod through it to the template's files. Its
     * target, with the components after it, is matched again, as a final
     * link's is below (the same 40 links at most). */
    int priv_missing = 0;
    char *slash;
    char *ml = middle_link(&c, buf + c.k, &slash, &priv_missing);
    if (ml) {
      if (hops == MAX_HOPS) {
        errno = ELOOP;
        return NULL;
      }
      int rc = map_link_page(page);
      if (rc == 0) rc = middle_target(ml, slash, &c, c.dir_only, *page);
      if (rc < 0) {
        errno = -rc;
        return NULL;
      }
      p = *page;
      continue;
    }
    /* Whether the private side was found (not a symlink), or is known
     * missing: the switch then asks nothing again. */
    enum { SEEN_NOTHING, SEEN_PRIVATE, SEEN_NOT_PRIVATE } seen =
        priv_missing ? SEEN_NOT_PRIVATE : SEEN_NOTHING;
    if (follow || (cut && lookup)) {
      /* A final symlink the kernel would follow: followed here, from the
       * side in use. Left to the kernel, a private link's absolute target
       * would reach the template's original (a write, a chmod), and a
       * relative one would be looked for beside the private link. Its
       * target is then matched as a path of its own: an absolute one as
       * it is, a relative one against the link's virtual directory. */
      char *side = NULL;
      if (!seen) seen = lexists(priv_side(&c), &st) ? SEEN_PRIVATE : SEEN_NOT_PRIVATE;
      if (seen == SEEN_PRIVATE) side = priv_side(&c);
      else side = lexists(orig_side(&c), &st) ? orig_side(&c) : NULL;
      if (side && S_ISLNK(st.st_mode)) {
        if (hops == MAX_HOPS) {
          errno = ELOOP;
          return NULL;
        }
        int rc = map_link_page(page);
        if (rc == 0) rc = link_target(side, &c, *page);
        if (rc < 0) {
          errno = -rc;
          return NULL;
        }
        char *t = *page;
        if (cut) { /* the kernel follows it, and wants a directory */
          size_t n2 = strlen(t);
          if (n2 + 1 < PATH_MAX) memcpy(t + n2, "/", 2);
        }
        p = t;
        continue;
      }
    }
    switch (base) {
      case PATH_READ:
        if (seen ? seen == SEEN_PRIVATE : lexists(priv_side(&c), &st)) return with_slash(priv_side(&c), cut);
        break; /* the original */
      case PATH_WRITE:
      case PATH_TRUNC: {
        if (seen ? seen == SEEN_PRIVATE : lexists(priv_side(&c), &st)) return with_slash(priv_side(&c), cut);
        int rc = copy_up(&c, base == PATH_WRITE);
        if (rc == 0) return with_slash(priv_side(&c), cut);
        if (rc < 0) {
          errno = -rc;
          return NULL;
        }
        break; /* not a regular file: the original */
      }
      case PATH_CREATE:
        /* As the kernel would answer, without creating anything on the
         * original side nor copying anything to find out. */
        if (lexists(priv_side(&c), &st) || lexists(orig_side(&c), &st)) {
          errno = EEXIST;
          return NULL;
        }
        make_parents(&c);
        return with_slash(priv_side(&c), cut);
      case PATH_REMOVE:
        if (lexists(orig_side(&c), &st)) {
          errno = EROFS;
          return NULL;
        }
        return with_slash(priv_side(&c), cut);
      case PATH_TARGET:
        if (!lexists(pv = priv_side(&c), &st)) make_parents(&c);
        return with_slash(priv_side(&c), cut);
      case PATH_ATTR:
      case PATH_LATTR: {
        /* Never the original: its metadata is every clone's. */
        if (seen ? seen == SEEN_PRIVATE : lexists(priv_side(&c), &st)) return with_slash(priv_side(&c), cut);
        int rc = copy_attr_up(&c, op);
        if (rc < 0) {
          errno = -rc;
          return NULL;
        }
        return with_slash(priv_side(&c), cut);
      }
    }
    return original(path, p, buf, *page);
  }
}

/* Whether `path` is under a copy-on-write rule (matched as path_slow
 * would first match it; nothing looked up). link's source checks are for
 * those only. buf is scribbled on. */
static int cow_rule(const char *path, char buf[PATH_MAX]) {
  const char *p = path;
  if (proc_path_may_name(path) && !(p = proc_path_letters(path, buf))) return 0;
  if (!g_h->instance.redirs || normalize(p, buf) < 0) return 0;
  const struct appshot_redir *r = match(&g_h->instance, buf);
  return r && r->kind == APPSHOT_REDIR_COW;
}

/* A path that may name /proc/<vpid> (proc_path_may_name), NULL allowed
 * (the kernel answers EFAULT for it). */
static inline int proc_prefixed(const char *path) {
  return path && path[0] == '/' && proc_path_may_name(path);
}

/* "/proc/<vpid>/root/REST" (self, thread-self) of a process of the
 * application whose root is "/", when a rule applies to "/REST": "/REST"
 * (inside path), for the rules to take as the caller's own (see
 * preload_proc.c, proc_root_rest). Else NULL: the path as it always was.
 * The root link is read only then, one system call. buf is scribbled on. */
static NOINLINE const char *proc_root_redirected(const char *path, char buf[PATH_MAX]) {
  char link[PROC_ROOT_LINK], root[2];
  const char *rest = proc_root_rest(path, link);
  if (!rest || normalize(rest, buf) < 0 || !match(&g_h->instance, buf)) return NULL;
  /* A root elsewhere (chroot) answers longer: 2 bytes, or more, cut. */
  if (SYS4(readlinkat, AT_FDCWD, link, root, sizeof root) != 1 || root[0] != '/') return NULL;
  return rest;
}

static const char *path_rules_once(const char *path, const char *p, int op, char buf[PATH_MAX]);

/* proc_root_redirected of a path with repeated slashes, "." or ".."
 * components ("/proc//self/root/tmp/x", "/proc/self/./root/tmp/x",
 * "//proc/2/root/tmp/x"): the kernel reads it as the plain path, so the
 * root is looked for in the plain one (review r250 L2: parsed as
 * written, such a path reached the real /tmp). The plain copy is in this
 * frame only (a signal handler on a small stack may open a /proc path):
 * the rules' answer is made in buf, and one that is the plain path itself
 * (read from the original side) is copied there. *taken: 0 when it is no
 * such root path (or the plain one does not fit: the kernel says so),
 * for path_slow to go on as before. */
static NOINLINE const char *proc_root_unplain(const char *path, int op, char buf[PATH_MAX], int *taken) {
  char plain[PATH_MAX];
  const char *rest;
  *taken = 0;
  if (plain_path(path, plain, 1, 0) <= 0) return NULL;
  /* A ".." kept outside /proc ("/tmp/../proc/self/root/x"): the rules
   * read it by its letters, as proc_path_letters does (r416 F4: it
   * reached the original, past the rule). */
  const char *from = strncmp(plain, "/proc/", 6) ? lexical_proc(plain) : plain;
  if (!from || !(rest = proc_root_redirected(from, buf))) return NULL;
  *taken = 1;
  const char *r = path_rules_once(rest, rest, op, buf);
  if (r && (uintptr_t)r - (uintptr_t)plain < PATH_MAX) r = strcpy(buf, r);
  return r;
}

const char *path_slow(const char *path, int op, char buf[PATH_MAX]) {
  if (op & PATH_EINVAL) {
    errno = EINVAL;
    return NULL;
  }
  const char *p = path;
  if (!(op & PATH_INROOT) && proc_path_may_name(path)) {
    const char *rest = NULL;
    int resolve = path_resolve(op);
    /* An absolute path under RESOLVE_BENEATH: the kernel refuses it
     * (EXDEV) before it reads a name. */
    if (UNLIKELY(resolve & RESOLVE_BENEATH_)) return path;
    if (UNLIKELY(resolve)) {
      /* openat2 with RESOLVE_NO_SYMLINKS, NO_MAGICLINKS or BENEATH: the
       * kernel's reading with them, whose refusal of a link the view
       * would stand in for is the answer (r432 N6). Under rules, their
       * reading below once it passes; a process's root not taken
       * through them (that stands in for its magic link: the kernel,
       * handed the path, refuses it). */
      const char *k = proc_path_resolve(path, buf, resolve);
      if (!k) return NULL;
      if (!g_h->instance.redirs) return k;
    } else if (g_h->instance.redirs && UNLIKELY(path_unplain(path))) {
      int taken;
      const char *r = proc_root_unplain(path, op, buf, &taken);
      if (taken) return r;
    } else if (g_h->instance.redirs) {
      rest = proc_root_redirected(path, buf);
    }
    if (rest) p = path = rest;
    /* Under rules, their reading (by letters) for them to match; the
     * kernel's is original()'s, when none applies (r416 F3). A letters
     * reading that fails (a number the application does not hold, by
     * letters only: "<dir>/lnk/../../../proc/<n>" through a link is the
     * tree's own directory) does not fail the call: the rules match the
     * kernel's reading then, and its errno is the one given (r432 N3). */
    else if (g_h->instance.redirs) {
      int saved = errno;
      if (!(p = proc_path_letters(path, buf)) && !(p = proc_path(path, buf))) return NULL;
      errno = saved;
    } else if (!(p = proc_path(path, buf))) return NULL;
  }
  if (!g_h->instance.redirs) return p;
  return path_rules_once(path, p, op, buf);
}

/* path_rules with the page it may map unmapped again. */
static const char *path_rules_once(const char *path, const char *p, int op, char buf[PATH_MAX]) {
  char *page = NULL; /* mapped at the first symlink followed */
  const char *r = path_rules(path, p, op, buf, &page);
  if (page) SYS2(munmap, page, LINK_PAGE); /* raw: errno kept */
  return r;
}

const char *at_path_slow(int dirfd, int kind, const char *path, int op, char buf[PATH_MAX]) {
  if (path[0] == '/') return path_slow(path, op, buf);
  /* openat2 RESOLVE_IN_ROOT: dirfd is the root, ".." stops at it. Under a
   * directory of /proc a number after it is still ours to translate
   * ("<vpid>/stat" under /proc: r403 L4), and without dots the kernel
   * walks exactly what proc_at_path reads. Nothing is joined (that makes
   * the path absolute, which IN_ROOT would read under dirfd), and a
   * directory outside /proc is not asked what lies beyond it. */
  if (op & PATH_INROOT) return kind != PROC_DIR_NONE && !rel_dotted(path) ? proc_at_path(kind, path, buf) : path;
  /* A directory outside /proc (kind NONE): nothing to join, and no
   * window was opened for it (SLOW_PATH: an open of a FIFO may block). */
  /* A link of /proc followed by a number: "self/root/proc/<vpid>" under
   * /proc, "3/<vpid>" under /proc/self/fd (r432 N1). */
  if (kind != PROC_DIR_NONE && (UNLIKELY(rel_dotted(path)) || UNLIKELY(link_before_number(path)) ||
                                (kind == PROC_DIR_INSIDE && UNLIKELY(fd_link_before_number(path))))) {
    /* openat2 RESOLVE_BENEATH refuses the joined path, absolute (EXDEV):
     * a number read in /proc's own directory ("sys/../<vpid>",
     * "self/fd/../../<vpid>" under /proc) is rewritten in place, the path
     * kept relative, as from a directory outside /proc (r442 F2). */
    if (UNLIKELY(path_resolve(op) & RESOLVE_BENEATH_) && rel_reaches_number(path)) {
      const char *r = proc_rel_join(dirfd, path, buf, path_resolve(op), 1);
      if (r != path) return r;
    }
    const char *r = proc_at_join(dirfd, path, buf, path_resolve(op));
    if (r != path) return r;
  }
  if (kind == PROC_DIR_NONE && UNLIKELY(rel_reaches_number(path))) return proc_rel_join(dirfd, path, buf, path_resolve(op), 0);
  return kind != PROC_DIR_NONE ? proc_at_path(kind, path, buf) : path;
}

/* --- The wrappers ---------------------------------------------------------
 *
 * Calls that are cancellation points or build libc objects go to the real
 * function; the others are raw system calls. Each wrapper calls `name` with
 * the path as it is unless path_hooked(); then name_slow, with the buffer
 * in its own frame, calls it with the rewritten one. */

/* Defines the function `name` (parameters PARAMS, among them `path`), with
 * the given linkage, and its slow half. ARGS: the parameters' names; dirfd:
 * the directory the path is relative to (AT_FDCWD for the calls without
 * one); CALL: the call, with the path to use in `p`. */
#define PATH_FN(linkage, rtype, name, PARAMS, ARGS, dirfd, op, err, CALL) \
  static NOINLINE rtype name##_slow PARAMS {                        \
    SLOW_PATH(p, (dirfd), path, (op), (err));                      \
    test_pause("path-rewritten");                                  \
    return CALL;                                                   \
  }                                                                \
  linkage rtype name PARAMS {                                      \
    ensure_init();                                                 \
    if (at_path_hooked((dirfd), path)) return name##_slow ARGS;    \
    const char *p = path;                                          \
    return CALL;                                                   \
  }
#define PATH_WRAPPER(...) PATH_FN(API, __VA_ARGS__)

/* A metadata call's: whether it follows a final symlink. */
static inline int attr_op(int flags) {
  return (flags & AT_SYMLINK_NOFOLLOW) ? PATH_LATTR : PATH_ATTR;
}

/* A call that reads (stat, access...): whether it follows a final symlink. */
static inline int read_op(int flags) {
  return (flags & AT_SYMLINK_NOFOLLOW) ? PATH_READ | PATH_NOFOLLOW : PATH_READ;
}

static int open_op(int flags) {
  /* Fails on an existing file: no copy needed to find out. */
  if ((flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL)) return PATH_CREATE;
  int nofollow = flags & O_NOFOLLOW ? PATH_NOFOLLOW : 0;
  if (flags & O_TRUNC) return PATH_TRUNC | nofollow;
  if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_CREAT)) return PATH_WRITE | nofollow;
  return PATH_READ | nofollow;
}

/* chmod's (fchmodat's flags, as glibc checks them): the caller must own
 * the file; AT_SYMLINK_NOFOLLOW on a symlink is EOPNOTSUPP. */
static inline int chmod_op(int flags) {
  if (flags & ~AT_SYMLINK_NOFOLLOW) return PATH_EINVAL;
  return flags ? PATH_LATTR | PATH_OWNER | PATH_NOLINK : PATH_ATTR | PATH_OWNER;
}

/* The utime family's: explicit times need the owner (or CAP_FOWNER), the
 * current time only write access; flags and nanoseconds the kernel refuses
 * before its lookup. */
static inline int nsec_ok(long ns) {
  return (ns >= 0 && ns < 1000000000L) || ns == UTIME_NOW || ns == UTIME_OMIT;
}
static int utimens_op(const struct timespec *t, int flags) {
  if (flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH)) return PATH_EINVAL;
  if (t && (!nsec_ok(t[0].tv_nsec) || !nsec_ok(t[1].tv_nsec))) return PATH_EINVAL;
  /* Only an explicit time needs the owner: UTIME_NOW and UTIME_OMIT in
   * any mix need write access at most. */
  int explicit_time = t && ((t[0].tv_nsec != UTIME_NOW && t[0].tv_nsec != UTIME_OMIT) ||
                            (t[1].tv_nsec != UTIME_NOW && t[1].tv_nsec != UTIME_OMIT));
  return attr_op(flags) | (explicit_time ? PATH_OWNER : 0);
}
static inline int times_op(const void *times, int nofollow) {
  return (nofollow ? PATH_LATTR : PATH_ATTR) | (times ? PATH_OWNER : 0);
}

/* chown's: the kernel checks the flags first; chown(-1, -1) changes
 * nothing and anyone may make it. */
static inline int chown_op(int flags, uid_t uid, gid_t gid) {
  if (flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH)) return PATH_EINVAL;
  return attr_op(flags) | (uid == (uid_t)-1 && gid == (gid_t)-1 ? 0 : PATH_CHOWNER);
}


/* posix_spawn's file actions run in the child, inside glibc, past every
 * wrapper: their paths are rewritten here, when they are recorded (glibc
 * keeps its own copy of the path). These return an error number. */
PATH_WRAPPER(int, posix_spawn_file_actions_addopen,
             (posix_spawn_file_actions_t *fa, int fd, const char *path, int flags, mode_t mode),
             (fa, fd, path, flags, mode), AT_FDCWD, open_op(flags), errno,
             REAL(posix_spawn_file_actions_addopen)(fa, fd, p, flags, mode))
PATH_WRAPPER(int, posix_spawn_file_actions_addchdir_np,
             (posix_spawn_file_actions_t *fa, const char *path), (fa, path), AT_FDCWD, PATH_READ, errno,
             REAL(posix_spawn_file_actions_addchdir_np)(fa, p))

/* The open flags glibc's fopen derives from `mode`: 'r', 'w' or 'a', then
 * up to six more characters up to a ',' of which '+' and 'x' matter here.
 * A mode fopen rejects (EINVAL) opens nothing: read. */
static int fopen_flags(const char *mode) {
  int fl;
  switch (mode ? mode[0] : 0) {
    case 'r': fl = O_RDONLY; break;
    case 'w': fl = O_WRONLY | O_CREAT | O_TRUNC; break;
    case 'a': fl = O_WRONLY | O_CREAT | O_APPEND; break;
    default: return O_RDONLY;
  }
  for (int i = 1; i < 7 && mode[i] && mode[i] != ','; i++) {
    if (mode[i] == '+') fl = (fl & ~O_ACCMODE) | O_RDWR;
    else if (mode[i] == 'x') fl |= O_EXCL;
  }
  return fl;
}

/* The directory argument of a wrapper whose call creates or removes
 * (mkdir, unlink, creat, truncate...): never a directory of /proc, whose
 * process directories hold nothing such a call can make or remove, so a
 * relative name that starts with a digit ("123.tmp" under a directory
 * descriptor, as rm -r removes it) costs no look at the directory. */
#define NO_PROC_DIR (-1)

/* The mode argument exists only when the flags create a file. */
#define OPEN_MODE(flags, mode)                          \
  mode_t mode = 0;                                      \
  if ((flags) & (O_CREAT | __O_TMPFILE)) {              \
    va_list ap;                                         \
    va_start(ap, flags);                                \
    mode = va_arg(ap, mode_t);                          \
    va_end(ap);                                         \
  }

/* open & co.: the variadic ones take their mode first, then share the
 * non-variadic shape. */
PATH_FN(static inline, int, open_m, (const char *path, int flags, mode_t mode),
             (path, flags, mode), AT_FDCWD, open_op(flags), -1,
             REAL(open)(p, flags, mode))
PATH_FN(static inline, int, open64_m, (const char *path, int flags, mode_t mode),
             (path, flags, mode), AT_FDCWD, open_op(flags), -1,
             REAL(open64)(p, flags, mode))
PATH_FN(static inline, int, openat_m, (int fd, const char *path, int flags, mode_t mode),
             (fd, path, flags, mode), fd, open_op(flags), -1,
             REAL(openat)(fd, p, flags, mode))
PATH_FN(static inline, int, openat64_m,
             (int fd, const char *path, int flags, mode_t mode),
             (fd, path, flags, mode), fd, open_op(flags), -1,
             REAL(openat64)(fd, p, flags, mode))

API int open(const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  int fd = open_m(path, flags, mode);
  if (fd >= 0 && (flags & O_ACCMODE) != O_RDONLY) cgroup_procs_opened(fd, path);
  return view_opened(fd, path, flags);
}

API int open64(const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  int fd = open64_m(path, flags, mode);
  if (fd >= 0 && (flags & O_ACCMODE) != O_RDONLY) cgroup_procs_opened(fd, path);
  return view_opened(fd, path, flags);
}

API int openat(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  int got = openat_m(fd, path, flags, mode);
  if (got >= 0 && (flags & O_ACCMODE) != O_RDONLY) cgroup_procs_opened(got, path);
  return view_opened(got, path, flags);
}

API int openat64(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  int got = openat64_m(fd, path, flags, mode);
  if (got >= 0 && (flags & O_ACCMODE) != O_RDONLY) cgroup_procs_opened(got, path);
  return view_opened(got, path, flags);
}

/* The fortified opens (no O_CREAT): reads may need a translated view. */
PATH_FN(static inline, int, open_2_m, (const char *path, int flags),
        (path, flags), AT_FDCWD, open_op(flags), -1, REAL(__open_2)(p, flags))
PATH_FN(static inline, int, open64_2_m, (const char *path, int flags),
        (path, flags), AT_FDCWD, open_op(flags), -1, REAL(__open64_2)(p, flags))
PATH_FN(static inline, int, openat_2_m, (int fd, const char *path, int flags),
        (fd, path, flags), fd, open_op(flags), -1, REAL(__openat_2)(fd, p, flags))
PATH_FN(static inline, int, openat64_2_m,
        (int fd, const char *path, int flags), (fd, path, flags), fd,
        open_op(flags), -1, REAL(__openat64_2)(fd, p, flags))
API int __open_2(const char *path, int flags) {
  return view_opened(open_2_m(path, flags), path, flags);
}
API int __open64_2(const char *path, int flags) {
  return view_opened(open64_2_m(path, flags), path, flags);
}
API int __openat_2(int fd, const char *path, int flags) {
  return view_opened(openat_2_m(fd, path, flags), path, flags);
}
API int __openat64_2(int fd, const char *path, int flags) {
  return view_opened(openat64_2_m(fd, path, flags), path, flags);
}
PATH_WRAPPER(int, creat, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             PATH_TRUNC, -1, REAL(creat)(p, mode))
PATH_WRAPPER(int, creat64, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             PATH_TRUNC, -1, REAL(creat64)(p, mode))
PATH_FN(static inline, FILE *, fopen_m, (const char *path, const char *mode),
        (path, mode), AT_FDCWD, open_op(fopen_flags(mode)), NULL, REAL(fopen)(p, mode))
PATH_FN(static inline, FILE *, fopen64_m,
        (const char *path, const char *mode), (path, mode), AT_FDCWD,
        open_op(fopen_flags(mode)), NULL, REAL(fopen64)(p, mode))

/* A stream opened for reading whose file needs a translated view gets it
 * under its descriptor before anything was read through it ("r+" too:
 * view_fill says for which files). */
static FILE *fopen_view(FILE *f, const char *path, const char *mode) {
  if (!f) return f;
  long r = view_fill(fileno(f), path, fopen_flags(mode));
  if (r == 0) return f;
  fclose(f);
  errno = (int)-r;
  return NULL;
}
API FILE *fopen(const char *path, const char *mode) {
  return fopen_view(fopen_m(path, mode), path, mode);
}
API FILE *fopen64(const char *path, const char *mode) {
  return fopen_view(fopen64_m(path, mode), path, mode);
}
PATH_WRAPPER(DIR *, opendir, (const char *path), (path), AT_FDCWD, PATH_READ, NULL,
             REAL(opendir)(p))
PATH_WRAPPER(int, stat, (const char *restrict path, struct stat *restrict st),
             (path, st), AT_FDCWD, PATH_READ, -1, REAL(stat)(p, st))
PATH_WRAPPER(int, stat64,
             (const char *restrict path, struct stat64 *restrict st),
             (path, st), AT_FDCWD, PATH_READ, -1, REAL(stat64)(p, st))
PATH_WRAPPER(int, lstat, (const char *restrict path, struct stat *restrict st),
             (path, st), AT_FDCWD, PATH_READ | PATH_NOFOLLOW, -1, REAL(lstat)(p, st))
PATH_WRAPPER(int, lstat64,
             (const char *restrict path, struct stat64 *restrict st),
             (path, st), AT_FDCWD, PATH_READ | PATH_NOFOLLOW, -1, REAL(lstat64)(p, st))
PATH_WRAPPER(int, fstatat,
             (int fd, const char *restrict path, struct stat *restrict st,
              int flags),
             (fd, path, st, flags), fd, read_op(flags), -1,
             REAL(fstatat)(fd, p, st, flags))
PATH_WRAPPER(int, fstatat64,
             (int fd, const char *restrict path, struct stat64 *restrict st,
              int flags),
             (fd, path, st, flags), fd, read_op(flags), -1,
             REAL(fstatat64)(fd, p, st, flags))
PATH_WRAPPER(int, statx,
             (int fd, const char *restrict path, int flags, unsigned int mask,
              struct statx *restrict st),
             (fd, path, flags, mask, st), fd, read_op(flags), -1,
             REAL(statx)(fd, p, flags, mask, st))
PATH_WRAPPER(int, access, (const char *path, int mode), (path, mode), AT_FDCWD,
             PATH_READ, -1, REAL(access)(p, mode))
PATH_WRAPPER(int, faccessat, (int fd, const char *path, int mode, int flags),
             (fd, path, mode, flags), fd, read_op(flags), -1,
             REAL(faccessat)(fd, p, mode, flags))
/* glibc's own euidaccess calls its access or stat past the wrappers. */
PATH_WRAPPER(int, euidaccess, (const char *path, int mode), (path, mode), AT_FDCWD,
             PATH_READ, -1, REAL(euidaccess)(p, mode))
PATH_WRAPPER(int, eaccess, (const char *path, int mode), (path, mode), AT_FDCWD,
             PATH_READ, -1, REAL(eaccess)(p, mode))
/* The versioned stat calls that programs built against glibc before 2.33
 * make in place of stat, lstat and fstatat (and their 64 names): each is
 * glibc's, with the path rewritten. One version each (GLIBC_2.2.5, the
 * *at ones GLIBC_2.4), so unversioned here (preload.map). */
PATH_WRAPPER(int, __xstat, (int ver, const char *path, struct stat *st),
             (ver, path, st), AT_FDCWD, PATH_READ, -1, REAL(__xstat)(ver, p, st))
PATH_WRAPPER(int, __xstat64, (int ver, const char *path, struct stat64 *st),
             (ver, path, st), AT_FDCWD, PATH_READ, -1, REAL(__xstat64)(ver, p, st))
PATH_WRAPPER(int, __lxstat, (int ver, const char *path, struct stat *st),
             (ver, path, st), AT_FDCWD, PATH_READ | PATH_NOFOLLOW, -1, REAL(__lxstat)(ver, p, st))
PATH_WRAPPER(int, __lxstat64, (int ver, const char *path, struct stat64 *st),
             (ver, path, st), AT_FDCWD, PATH_READ | PATH_NOFOLLOW, -1, REAL(__lxstat64)(ver, p, st))
PATH_WRAPPER(int, __fxstatat,
             (int ver, int fd, const char *path, struct stat *st, int flags),
             (ver, fd, path, st, flags), fd, read_op(flags), -1,
             REAL(__fxstatat)(ver, fd, p, st, flags))
PATH_WRAPPER(int, __fxstatat64,
             (int ver, int fd, const char *path, struct stat64 *st, int flags),
             (ver, fd, path, st, flags), fd, read_op(flags), -1,
             REAL(__fxstatat64)(ver, fd, p, st, flags))
PATH_FN(static inline, ssize_t, readlink_m,
        (const char *restrict path, char *restrict out, size_t size),
        (path, out, size), AT_FDCWD, PATH_READ | PATH_NOFOLLOW, -1, REAL(readlink)(p, out, size))
PATH_FN(static inline, ssize_t, readlinkat_m,
        (int fd, const char *restrict path, char *restrict out, size_t size),
        (fd, path, out, size), fd, PATH_READ | PATH_NOFOLLOW, -1, REAL(readlinkat)(fd, p, out, size))

/* --- Answers that hold a system PID ----------------------------------------
 *
 * readlink of /proc/self or of a link into /proc/<pid>, getcwd inside
 * /proc/<pid>, realpath of either: the kernel answers with system ids,
 * made virtual here (preload_proc.c). From the call to the rewrite the
 * thread holds a system id: a translation window, for a path under /proc
 * or /dev/fd, or a relative one (the only links whose answer may be
 * rewritten). */
static inline int answer_may_hold_ids(const char *path) {
  return g_h && path && (path[0] != '/' || !strncmp(path, "/proc/", 6) || !strncmp(path, "/dev/fd/", 8) || UNLIKELY(path_unplain(path)));
}
#define ANSWER_WINDOW(path) ID_WINDOW_IF(answer_may_hold_ids(path))

/* An answer that filled the caller's buffer may be a longer one cut, whose
 * ids would be cut too: read whole, made virtual, then cut. One PATH_MAX
 * buffer on the stack, only then (crash handlers readlink /proc/self/exe
 * on small alternate signal stacks): a path that names the caller itself
 * (/proc/self, /proc/thread-self, /dev/fd) is read again by the kernel as
 * it is, not through the wrapper's slow half and its buffer. */
static NOINLINE long link_answer_whole(int dirfd, const char *path, char *out, size_t size) {
  char whole[PATH_MAX];
  int as_is = !strncmp(path, "/proc/self", 10) || !strncmp(path, "/proc/thread-self", 17) || !strncmp(path, "/dev/fd/", 8);
  long n = as_is ? libc_ret(SYS4(readlinkat, dirfd, path, whole, sizeof whole)) : readlinkat_m(dirfd, path, whole, sizeof whole);
  n = proc_link_answer(dirfd, path, whole, n, sizeof whole);
  if (n > (long)size) n = (long)size;
  if (n > 0) memcpy(out, whole, (size_t)n);
  return n;
}
/* readlink's answer n (of the link `path` under dirfd) into out[size],
 * with virtual ids: of a plain name (no repeated slash, no "." component
 * but a last one). */
static long link_answer_plain(int dirfd, const char *path, char *out, long n, size_t size) {
  if (n > 0 && (size_t)n == size && answer_may_hold_ids(path)) return link_answer_whole(dirfd, path, out, size);
  return proc_link_answer(dirfd, path, out, n, size);
}
/* Whether `path` has a repeated slash or a "." component, leading ones
 * of a relative path included ("./self" under /proc). */
static inline int name_unplain(const char *path) {
  return (path[0] == '.' && path[1] == '/') || path_unplain(path);
}
/* The answer of a name the kernel reads as a plainer one ("//proc/self",
 * "/proc//self/cwd", "/dev//fd/3", "self//cwd" or "./self" under /proc):
 * the plain name's (plain_path, as open and stat rewrite it, and as the
 * views are chosen), else the ids in it go back as the system's. A ".."
 * plain_path keeps stays: the answer is then of a link the kernel
 * resolved past it, no link of /proc's known by name. Its own frame:
 * the plain copy costs the stack only here. */
static NOINLINE long link_answer_unplain(int dirfd, const char *path, char *out, long n, size_t size) {
  char plain[PATH_MAX];
  if (path[0] != '/')
    while (path[0] == '.' && path[1] == '/') /* "./": the directory itself */
      for (path += 2; *path == '/'; path++) {}
  int saved = errno; /* the readlink succeeded: a failure to make the name plain is no error of its (r388 L3) */
  if (plain_path(path, plain, 0, 0) <= 0) {
    errno = saved;
    return n; /* too long (not a link of /proc's), or a directory in it gone */
  }
  return link_answer_plain(dirfd, plain, out, n, size);
}
static long link_answer(int dirfd, const char *path, char *out, long n, size_t size) {
  if (n > 0 && path && g_h && UNLIKELY(name_unplain(path))) return link_answer_unplain(dirfd, path, out, n, size);
  return link_answer_plain(dirfd, path, out, n, size);
}

API ssize_t readlink(const char *restrict path, char *restrict out, size_t size) {
  ensure_init();
  ANSWER_WINDOW(path);
  ssize_t n = readlink_m(path, out, size);
  test_pause("link-answered"); /* the kernel's answer, still in system ids */
  return link_answer(AT_FDCWD, path, out, n, size);
}
API ssize_t readlinkat(int fd, const char *restrict path, char *restrict out, size_t size) {
  ensure_init();
  ANSWER_WINDOW(path);
  return link_answer(fd, path, out, readlinkat_m(fd, path, out, size), size);
}
/* What _FORTIFY_SOURCE builds call (Debian builds its packages so): the
 * same, after glibc's check of the buffer's size. */
API ssize_t __readlink_chk(const char *path, char *out, size_t size, size_t outlen) {
  if (size > outlen) __chk_fail();
  return readlink(path, out, size);
}
API ssize_t __readlinkat_chk(int fd, const char *path, char *out, size_t size, size_t outlen) {
  if (size > outlen) __chk_fail();
  return readlinkat(fd, path, out, size);
}

/* r (getcwd's or realpath's answer, not NULL) with virtual ids, at most
 * `limit` bytes with its terminator (errno `too_long` if it no longer
 * fits: the caller's buffer, or what it asked libc to allocate): in the
 * caller's buffer `given`, or in the one libc allocated, grown if it must
 * be. Room for the ids to grow past PATH_MAX, to tell that. */
static NOINLINE char *virtual_answer_slow(char *r, char *given, size_t limit, int too_long) {
  char tmp[PATH_MAX + 32];
  size_t was = strlen(r);
  if (was >= PATH_MAX) return r;
  memcpy(tmp, r, was);
  size_t len = proc_answer_to_virtual(tmp, was, sizeof tmp - 1);
  tmp[len] = '\0';
  if (len + 1 > limit) {
    if (!given) free(r);
    errno = too_long;
    return NULL;
  }
  if (!given && len > was) {
    char *grown = realloc(r, len + 1);
    if (!grown) {
      free(r);
      errno = ENOMEM;
      return NULL;
    }
    r = grown;
  }
  return memcpy(r, tmp, len + 1);
}
static inline char *virtual_answer(char *r, char *given, size_t limit, int too_long) {
  if (!r || !g_h || strncmp(r, "/proc/", 6) || r[6] < '0' || r[6] > '9') return r;
  return virtual_answer_slow(r, given, limit, too_long);
}

/* getcwd and realpath open their window whatever they are asked: a
 * working directory in /proc is not always known (a thread with its own,
 * a raw chdir), and realpath of another path may end there (/dev/fd). */
API char *getcwd(char *buf, size_t size) {
  ensure_init();
  ID_WINDOW();
  /* getcwd(NULL, 0) allocates what it needs; else `size` is the bound. */
  return virtual_answer(REAL(getcwd)(buf, size), buf, size ? size : PATH_MAX, ERANGE);
}
/* glibc's own get_current_dir_name calls its getcwd past the wrapper. */
API char *get_current_dir_name(void) {
  ensure_init();
  ID_WINDOW();
  return virtual_answer(REAL(get_current_dir_name)(), NULL, PATH_MAX, ERANGE);
}
API char *__getcwd_chk(char *buf, size_t size, size_t buflen) {
  if (size > buflen) __chk_fail();
  return getcwd(buf, size);
}

/* realpath resolves inside glibc, past every wrapper: a /proc/<vpid> path
 * (absolute, or relative to a working directory in /proc) is given to it
 * with the system ids. No other rule applies to it (its answer would name
 * a redirection's private side). */
static NOINLINE char *realpath_proc(const char *path, char *resolved) {
  char buf[PATH_MAX];
  const char *p = path[0] == '/' ? proc_path(path, buf) : at_path_slow(AT_FDCWD, proc_dir_kind(AT_FDCWD), path, PATH_READ, buf);
  return p ? REAL(realpath)(p, resolved) : NULL;
}
API SYMVER("realpath@@GLIBC_2.3")
char *appshot_current_realpath(const char *restrict path, char *restrict resolved) {
  ensure_init();
  ID_WINDOW();
  int proc = g_h && path && ((path[0] == '/' && proc_path_may_name(path)) || proc_at_hooked(AT_FDCWD, path));
  char *r = proc ? realpath_proc(path, resolved) : REAL(realpath)(path, resolved);
  return virtual_answer(r, resolved, PATH_MAX, ENAMETOOLONG);
}
API char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen) {
  if (resolvedlen < PATH_MAX) __chk_fail();
  return appshot_current_realpath(path, resolved);
}
/* realpath@GLIBC_2.2.5, before 2.3, allocated nothing: a null `resolved`
 * is EINVAL. glibc's function of that version is that check, then the
 * current one: so is this, with the current wrapper. */
COMPAT_VERSION("realpath@GLIBC_2.2.5")
char *appshot_compat_realpath_2_2_5(const char *restrict path, char *restrict resolved) {
  if (!resolved) {
    errno = EINVAL;
    return NULL;
  }
  return appshot_current_realpath(path, resolved);
}
API char *canonicalize_file_name(const char *path) { return appshot_current_realpath(path, NULL); }
PATH_FN(static inline, int, chdir_m, (const char *path), (path), AT_FDCWD, PATH_READ, -1,
        REAL(chdir)(p))
/* Whether the working directory is inside /proc is found again when a
 * relative path needs it (cwd_in_proc). */
API int chdir(const char *path) {
  int r = chdir_m(path);
  cwd_moved();
  return r;
}
API int fchdir(int fd) {
  ensure_init();
  long r = SYS1(fchdir, fd);
  cwd_moved();
  return (int)libc_ret(r);
}
PATH_WRAPPER(int, mkdir, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             PATH_CREATE, -1, (int)libc_ret(MKDIR_RAW(p, mode)))
PATH_WRAPPER(int, mkdirat, (int fd, const char *path, mode_t mode),
             (fd, path, mode), NO_PROC_DIR, PATH_CREATE, -1,
             (int)libc_ret(SYS3(mkdirat, fd, p, mode)))
PATH_WRAPPER(int, unlink, (const char *path), (path), NO_PROC_DIR, PATH_REMOVE, -1,
             (int)libc_ret(UNLINK_RAW(p)))
PATH_WRAPPER(int, unlinkat, (int fd, const char *path, int flags),
             (fd, path, flags), NO_PROC_DIR, PATH_REMOVE, -1,
             (int)libc_ret(SYS3(unlinkat, fd, p, flags)))
PATH_WRAPPER(int, rmdir, (const char *path), (path), NO_PROC_DIR, PATH_REMOVE, -1,
             (int)libc_ret(RMDIR_RAW(p)))

/* --- Through syscall() ----------------------------------------------------
 *
 * The same paths for a program that makes the call with syscall(): openat2
 * above all (glibc has no function for it), and open, stat, readlink...
 * The kernel's call, with the kernel's arguments and conventions, but the
 * path the wrappers would hand it; an open's descriptor gets the view its
 * text needs (preload_view.c). */
static NOINLINE long xattr_slow(int set, int nofollow, const char *path, const char *name,
                                const void *value, size_t size, int flags); /* below */

static NOINLINE long path_syscall_slow(long nr, long a, long b, long c, long d, long e, int dirfd,
                                       int at, int op) {
  long v[5] = {a, b, c, d, e};
  const char *path = (const char *)v[at];
  if (nr == SYS_utimensat) op = utimens_op((const struct timespec *)c, (int)d);
  SLOW_PATH(p, dirfd, path, op, -1);
  v[at] = (long)p; /* by position: another argument may be the same string */
  return libc_ret(appshot_raw_syscall(nr, v[0], v[1], v[2], v[3], v[4], 0));
}

long do_path_syscall(long nr, long a, long b, long c, long d, long e) {
  int dirfd = AT_FDCWD, flags = -1; /* flags: an open's, else -1 */
  int op = PATH_READ, at = 0;       /* at: the path's argument, 0 or 1 */
  int inroot = 0;                   /* openat2's RESOLVE_IN_ROOT */
  int resolve = 0;                  /* its other resolve flags, as op bits */
  switch (nr) {
    /* Calls that change metadata or make a name (the wrappers above): the
     * path first, or after a directory. */
    case SYS_chmod: op = PATH_ATTR | PATH_OWNER; break;
    case SYS_chown: op = chown_op(0, (uid_t)b, (gid_t)c); break;
    case SYS_utime:
    case SYS_utimes: op = times_op((const void *)b, 0); break;
    case SYS_setxattr:
    case SYS_lsetxattr:
    case SYS_removexattr:
    case SYS_lremovexattr: {
      int set = nr == SYS_setxattr || nr == SYS_lsetxattr;
      int nofollow = nr == SYS_lsetxattr || nr == SYS_lremovexattr;
      if (path_hooked((const char *)a))
        return xattr_slow(set, nofollow, (const char *)a, (const char *)b, (const void *)c, (size_t)d,
                          (int)e);
      return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, 0));
    }
    case SYS_lchown: op = chown_op(AT_SYMLINK_NOFOLLOW, (uid_t)b, (gid_t)c); break;
    case SYS_getxattr:
    case SYS_listxattr: break;
    case SYS_lgetxattr:
    case SYS_llistxattr: op = PATH_READ | PATH_NOFOLLOW; break;
    case SYS_mknod: op = PATH_CREATE; break;
    case SYS_symlink: op = PATH_CREATE; at = 1; break;
    case SYS_mknodat: op = PATH_CREATE; dirfd = (int)a; at = 1; break;
    case SYS_fchmodat: op = PATH_ATTR | PATH_OWNER; dirfd = (int)a; at = 1; break;
    case SYS_futimesat: op = times_op((const void *)c, 0); dirfd = (int)a; at = 1; break;
    case SYS_fchmodat2:
      op = (d & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH)) ? PATH_EINVAL : chmod_op((int)d & AT_SYMLINK_NOFOLLOW);
      dirfd = (int)a;
      at = 1;
      break;
    case SYS_utimensat: dirfd = (int)a; at = 1; break; /* op: reads times, slow path only */
    case SYS_fchownat: op = chown_op((int)e, (uid_t)c, (gid_t)d); dirfd = (int)a; at = 1; break;
    case SYS_fchdir: {
      long r = appshot_raw_syscall(nr, a, 0, 0, 0, 0, 0);
      cwd_moved();
      return libc_ret(r);
    }
    case SYS_open: flags = (int)b; break;
    case SYS_lstat:
    case SYS_readlink: op = PATH_READ | PATH_NOFOLLOW; break;
    case SYS_stat:
    case SYS_access:
    case SYS_chdir: break;
    case SYS_openat2: {
      const struct { uint64_t flags, mode, resolve; } *how = (const void *)c;
      flags = how && (size_t)d >= sizeof how->flags ? (int)how->flags : O_RDONLY;
      inroot = how && (size_t)d >= sizeof *how && (how->resolve & 0x10 /* RESOLVE_IN_ROOT */);
      /* NO_MAGICLINKS, NO_SYMLINKS, BENEATH: kept by the /proc view (r432 N6) */
      if (how && (size_t)d >= sizeof *how) resolve = (int)(how->resolve & 0xe) << PATH_RESOLVE_SHIFT;
      dirfd = (int)a;
      at = 1;
      break;
    }
    case SYS_openat: flags = (int)c; dirfd = (int)a; at = 1; break;
    case SYS_newfstatat: op = read_op((int)d); dirfd = (int)a; at = 1; break;
    case SYS_statx: op = read_op((int)c); dirfd = (int)a; at = 1; break;
    case SYS_faccessat2: op = read_op((int)d); dirfd = (int)a; at = 1; break;
    case SYS_readlinkat: op = PATH_READ | PATH_NOFOLLOW; dirfd = (int)a; at = 1; break;
    default: /* faccessat */
      dirfd = (int)a;
      at = 1;
  }
  const char *path = (const char *)(at ? b : a);
  if (flags != -1) op = open_op(flags) | (inroot ? PATH_INROOT : 0) | resolve;
  int link = nr == SYS_readlink || nr == SYS_readlinkat;
  ID_WINDOW_IF(link && answer_may_hold_ids(path));
  long r = path && at_path_hooked(dirfd, path) ? path_syscall_slow(nr, a, b, c, d, e, dirfd, at, op)
                                               : libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, 0));
  if (link) return nr == SYS_readlink ? link_answer(dirfd, path, (char *)b, r, (size_t)c)
                                      : link_answer(dirfd, path, (char *)c, r, (size_t)d);
  if (nr == SYS_chdir) cwd_moved();
  if (flags == -1 || r < 0) return r;
  if ((flags & O_ACCMODE) != O_RDONLY) cgroup_procs_opened((int)r, path);
  return view_opened((int)r, path, flags);
}

/* glibc's remove() calls unlink and rmdir internally, past our wrappers. */
static int do_remove(const char *p) {
  long r = UNLINK_RAW(p);
  if (r == -EISDIR) r = RMDIR_RAW(p);
  return (int)libc_ret(r);
}
PATH_WRAPPER(int, remove, (const char *path), (path), NO_PROC_DIR, PATH_REMOVE, -1,
             do_remove(p))

PATH_WRAPPER(int, truncate, (const char *path, off_t length), (path, length), NO_PROC_DIR,
             length ? PATH_WRITE : PATH_TRUNC, -1,
             (int)libc_ret(SYS2(truncate, p, length)))
PATH_WRAPPER(int, truncate64, (const char *path, off64_t length),
             (path, length), NO_PROC_DIR, length ? PATH_WRITE : PATH_TRUNC, -1,
             (int)libc_ret(SYS2(truncate, p, length)))

/* --- Metadata and new names -------------------------------------------------
 *
 * Calls that change a file without opening it: under a copy-on-write rule
 * they act on the private side, made from the original first (PATH_ATTR:
 * copy_attr_up), so that a clone never changes what its template and every
 * other clone share; what the kernel would refuse on the original (a file
 * the caller does not own, bad flags) is refused first, nothing copied.
 * Those that read metadata (getxattr, listxattr) see the side an open
 * would. Raw system calls, the ones glibc's functions make (a program's
 * seccomp filter allows those): chmod, chown, lchown, symlink and link
 * where the architecture has them, utimensat for the utime family; but
 * glibc's own fchmodat with flags (it emulates AT_SYMLINK_NOFOLLOW on
 * kernels without fchmodat2) and lutimes (its checked conversion). */
PATH_WRAPPER(int, chmod, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             PATH_ATTR | PATH_OWNER, -1, (int)libc_ret(CHMOD_RAW(p, mode)))
PATH_FN(HIDDEN, int, fchmodat_path, (int fd, const char *path, mode_t mode, int flags),
             (fd, path, mode, flags), NO_PROC_DIR, chmod_op(flags), -1,
             flags ? REAL(fchmodat)(fd, p, mode, flags)
                   : (int)libc_ret(SYS3(fchmodat, fd, p, mode)))
/* glibc's lchmod calls its own fchmodat, past the wrapper above. */
PATH_WRAPPER(int, lchmod, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             chmod_op(AT_SYMLINK_NOFOLLOW), -1,
             REAL(fchmodat)(AT_FDCWD, p, mode, AT_SYMLINK_NOFOLLOW))
PATH_WRAPPER(int, chown, (const char *path, uid_t uid, gid_t gid), (path, uid, gid),
             NO_PROC_DIR, chown_op(0, uid, gid), -1, (int)libc_ret(CHOWN_RAW(p, uid, gid)))
PATH_WRAPPER(int, lchown, (const char *path, uid_t uid, gid_t gid), (path, uid, gid),
             NO_PROC_DIR, chown_op(AT_SYMLINK_NOFOLLOW, uid, gid), -1,
             (int)libc_ret(LCHOWN_RAW(p, uid, gid)))
PATH_FN(HIDDEN, int, fchownat_path, (int fd, const char *path, uid_t uid, gid_t gid, int flags),
             (fd, path, uid, gid, flags), NO_PROC_DIR, chown_op(flags, uid, gid), -1,
             (int)libc_ret(SYS5(fchownat, fd, p, uid, gid, flags)))
/* utimensat's path may be NULL (the descriptor itself): glibc's function
 * refuses that with EINVAL (syscall() keeps the kernel's meaning). */
PATH_FN(static inline, int, utimensat_m,
        (int fd, const char *path, const struct timespec times[2], int flags),
        (fd, path, times, flags), NO_PROC_DIR, utimens_op(times, flags), -1,
        (int)libc_ret(SYS4(utimensat, fd, p, times, flags)))
int utimensat_path(int fd, const char *path, const struct timespec times[2], int flags) {
  /* <sys/stat.h> declares path nonnull: the compiler would drop the test. */
  __asm__("" : "+r"(path));
  if (!path) {
    errno = EINVAL;
    return -1;
  }
  return utimensat_m(fd, path, times, flags);
}
/* utimes, utime and futimesat: utimensat with the times converted, as
 * glibc's (a bad tv_usec is a bad tv_nsec to the kernel: EINVAL). */
static int timeval_op(const struct timeval *tv) {
  if (tv && (tv[0].tv_usec < 0 || tv[0].tv_usec >= 1000000 || tv[1].tv_usec < 0 ||
             tv[1].tv_usec >= 1000000))
    return PATH_EINVAL;
  return times_op(tv, 0);
}
static int utimes_raw(int fd, const char *p, const struct timeval *tv) {
  struct timespec ts[2];
  if (tv) {
    ts[0] = (struct timespec){tv[0].tv_sec, tv[0].tv_usec * 1000};
    ts[1] = (struct timespec){tv[1].tv_sec, tv[1].tv_usec * 1000};
  }
  return (int)libc_ret(SYS4(utimensat, fd, p, tv ? ts : NULL, 0));
}
static int utime_raw(const char *p, const struct utimbuf *t) {
  struct timespec ts[2];
  if (t) {
    ts[0] = (struct timespec){t->actime, 0};
    ts[1] = (struct timespec){t->modtime, 0};
  }
  return (int)libc_ret(SYS4(utimensat, AT_FDCWD, p, t ? ts : NULL, 0));
}
PATH_WRAPPER(int, utimes, (const char *path, const struct timeval times[2]),
             (path, times), NO_PROC_DIR, timeval_op(times), -1,
             utimes_raw(AT_FDCWD, p, times))
PATH_WRAPPER(int, utime, (const char *path, const struct utimbuf *times),
             (path, times), NO_PROC_DIR, times_op(times, 0), -1, utime_raw(p, times))
PATH_FN(HIDDEN, int, futimesat_path, (int fd, const char *path, const struct timeval times[2]),
             (fd, path, times), NO_PROC_DIR, timeval_op(times), -1,
             utimes_raw(fd, p, times))
PATH_WRAPPER(int, lutimes, (const char *path, const struct timeval times[2]),
             (path, times), NO_PROC_DIR, (timeval_op(times) & ~PATH_OP_MASK) | PATH_LATTR, -1,
             REAL(lutimes)(p, times))
/* setxattr and removexattr: what the file's xattrs decide (XATTR_CREATE
 * of a name it has: EEXIST; XATTR_REPLACE, or removexattr, of a name it
 * lacks: ENODATA) is asked of the side a read sees before anything is
 * copied up (a directory's copy would hide its entries for nothing). */
static NOINLINE long xattr_slow(int set, int nofollow, const char *path, const char *name,
                                const void *value, size_t size, int flags) {
  if (set && (flags & ~(XATTR_CREATE | XATTR_REPLACE))) return libc_ret(-EINVAL);
  SLOW_PATH(p, AT_FDCWD, path, PATH_READ | (nofollow ? PATH_NOFOLLOW : 0), -1);
  if (!set || flags) {
    long r = nofollow ? SYS4(lgetxattr, p, name, NULL, 0) : SYS4(getxattr, p, name, NULL, 0);
    if (set && r >= 0 && (flags & XATTR_CREATE)) return libc_ret(-EEXIST);
    if (set && r == -ENODATA && !(flags & XATTR_REPLACE)) r = 0;
    if (r == -ENODATA || r == -ENOENT || r == -ENOTDIR || r == -EOPNOTSUPP || r == -ERANGE)
      return libc_ret(r);
  }
  if (!(p = at_path_slow(AT_FDCWD, p_kind, path, nofollow ? PATH_LATTR : PATH_ATTR, p_buf))) return -1;
  if (set)
    return libc_ret(nofollow ? SYS5(lsetxattr, p, name, value, size, flags)
                             : SYS5(setxattr, p, name, value, size, flags));
  return libc_ret(nofollow ? SYS2(lremovexattr, p, name) : SYS2(removexattr, p, name));
}
API int setxattr(const char *path, const char *name, const void *value, size_t size, int flags) {
  ensure_init();
  if (UNLIKELY(path_hooked(path))) return (int)xattr_slow(1, 0, path, name, value, size, flags);
  return (int)libc_ret(SYS5(setxattr, path, name, value, size, flags));
}
API int lsetxattr(const char *path, const char *name, const void *value, size_t size, int flags) {
  ensure_init();
  if (UNLIKELY(path_hooked(path))) return (int)xattr_slow(1, 1, path, name, value, size, flags);
  return (int)libc_ret(SYS5(lsetxattr, path, name, value, size, flags));
}
API int removexattr(const char *path, const char *name) {
  ensure_init();
  if (UNLIKELY(path_hooked(path))) return (int)xattr_slow(0, 0, path, name, NULL, 0, 0);
  return (int)libc_ret(SYS2(removexattr, path, name));
}
API int lremovexattr(const char *path, const char *name) {
  ensure_init();
  if (UNLIKELY(path_hooked(path))) return (int)xattr_slow(0, 1, path, name, NULL, 0, 0);
  return (int)libc_ret(SYS2(lremovexattr, path, name));
}
PATH_WRAPPER(ssize_t, getxattr,
             (const char *path, const char *name, void *value, size_t size),
             (path, name, value, size), NO_PROC_DIR, PATH_READ, -1,
             libc_ret(SYS4(getxattr, p, name, value, size)))
PATH_WRAPPER(ssize_t, lgetxattr,
             (const char *path, const char *name, void *value, size_t size),
             (path, name, value, size), NO_PROC_DIR, PATH_READ | PATH_NOFOLLOW, -1,
             libc_ret(SYS4(lgetxattr, p, name, value, size)))
PATH_WRAPPER(ssize_t, listxattr, (const char *path, char *list, size_t size),
             (path, list, size), NO_PROC_DIR, PATH_READ, -1,
             libc_ret(SYS3(listxattr, p, list, size)))
PATH_WRAPPER(ssize_t, llistxattr, (const char *path, char *list, size_t size),
             (path, list, size), NO_PROC_DIR, PATH_READ | PATH_NOFOLLOW, -1,
             libc_ret(SYS3(llistxattr, p, list, size)))

/* New names: created on the private side, like mkdir (EEXIST if either
 * side has the path). A symlink's target is its contents, not rewritten. */
PATH_WRAPPER(int, symlink, (const char *target, const char *path), (target, path),
             NO_PROC_DIR, PATH_CREATE, -1, (int)libc_ret(SYMLINK_RAW(target, p)))
PATH_WRAPPER(int, symlinkat, (const char *target, int fd, const char *path),
             (target, fd, path), NO_PROC_DIR, PATH_CREATE, -1,
             (int)libc_ret(SYS3(symlinkat, target, fd, p)))
/* glibc's mknodat: the kernel takes a 32-bit device number, same layout. */
static int mknodat_raw(int fd, const char *p, mode_t mode, dev_t dev) {
  if ((unsigned int)dev != dev) {
    errno = EINVAL;
    return -1;
  }
  return (int)libc_ret(SYS4(mknodat, fd, p, mode, (unsigned int)dev));
}
PATH_WRAPPER(int, mknod, (const char *path, mode_t mode, dev_t dev), (path, mode, dev),
             NO_PROC_DIR, PATH_CREATE, -1, mknodat_raw(AT_FDCWD, p, mode, dev))
PATH_WRAPPER(int, mknodat, (int fd, const char *path, mode_t mode, dev_t dev),
             (fd, path, mode, dev), NO_PROC_DIR, PATH_CREATE, -1, mknodat_raw(fd, p, mode, dev))
PATH_WRAPPER(int, mkfifo, (const char *path, mode_t mode), (path, mode), NO_PROC_DIR,
             PATH_CREATE, -1, mknodat_raw(AT_FDCWD, p, S_IFIFO | mode, 0))
PATH_WRAPPER(int, mkfifoat, (int fd, const char *path, mode_t mode), (fd, path, mode),
             NO_PROC_DIR, PATH_CREATE, -1, mknodat_raw(fd, p, S_IFIFO | mode, 0))
/* What mknod and mknodat compiled to before glibc 2.33 (as __xstat for
 * stat): version 0 (_MKNOD_VER) only, as glibc's. */
static int xmknodat_raw(int ver, int fd, const char *p, mode_t mode, const dev_t *dev) {
  if (ver != 0) {
    errno = EINVAL;
    return -1;
  }
  return mknodat_raw(fd, p, mode, *dev);
}
PATH_WRAPPER(int, __xmknod, (int ver, const char *path, mode_t mode, dev_t *dev),
             (ver, path, mode, dev), NO_PROC_DIR, PATH_CREATE, -1,
             xmknodat_raw(ver, AT_FDCWD, p, mode, dev))
PATH_WRAPPER(int, __xmknodat, (int ver, int fd, const char *path, mode_t mode, dev_t *dev),
             (ver, fd, path, mode, dev), NO_PROC_DIR, PATH_CREATE, -1,
             xmknodat_raw(ver, fd, p, mode, dev))

/* link: two paths, either or both hooked. The new name is made on the
 * private side; an existing one under a copy-on-write rule is copied up
 * first (PATH_ATTR), so that the new name never shares the template's
 * inode, which a write through it would change. What the kernel refuses
 * (bad flags, a missing or directory source, an existing new name) is
 * refused before anything is made or copied. Everything else (no rule, a
 * REDIR rule) is the kernel's to answer: one rewrite per path, nothing
 * checked. One PATH_MAX buffer on the stack (link is async-signal-safe;
 * alternate signal stacks are small); a page is mapped for the call only
 * when both paths are rewritten. */
static NOINLINE int linkat_slow(int fd1, const char *from, int fd2, const char *to,
                                int flags, int raw_link) {
  if (flags & ~(AT_SYMLINK_FOLLOW | AT_EMPTY_PATH)) {
    errno = EINVAL;
    return -1;
  }
  ID_WINDOW_IF(proc_prefixed(from) || proc_prefixed(to));
  char a_buf[PATH_MAX];
  char *page = NULL;
  int follow = flags & AT_SYMLINK_FOLLOW, r = -1;
  const char *a = from, *b = to;
  int cow = path_hooked(from) && cow_rule(from, a_buf);
  if (cow) {
    /* The source as a read sees it: missing or a directory, nothing made. */
    struct stat st;
    if (!(a = path_slow(from, PATH_READ | (follow ? 0 : PATH_NOFOLLOW), a_buf))) goto out;
    long e = appshot_raw_syscall(SYS_newfstatat, fd1, (long)a, (long)&st, follow ? 0 : AT_SYMLINK_NOFOLLOW, 0, 0);
    if (e == 0 && S_ISDIR(st.st_mode)) e = -EPERM;
    if (e < 0) {
      r = (int)libc_ret(e);
      goto out;
    }
  } else if (path_hooked(from) && !(a = path_slow(from, PATH_READ, a_buf))) {
    goto out; /* no copy-on-write rule: the rewrite whatever the op */
  }
  /* The new name next: EEXIST copies nothing. a_buf is free when the
   * source was not rewritten and will not be again. */
  if (path_hooked(to)) {
    char *b_buf = a_buf;
    if (cow || a != from) {
      long m = appshot_raw_syscall(SYS_mmap, 0, PATH_MAX, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m < 0 && m > -4096) {
        errno = (int)-m;
        return -1;
      }
      b_buf = page = (char *)m;
    }
    if (!(b = path_slow(to, PATH_CREATE, b_buf))) goto out;
  }
  if (cow && !(a = path_slow(from, (follow ? PATH_ATTR : PATH_LATTR) | PATH_NODIR, a_buf)))
    goto out;
  r = (int)libc_ret(raw_link ? LINK_RAW(a, b) : SYS5(linkat, fd1, a, fd2, b, flags));
out:
  if (page) SYS2(munmap, page, PATH_MAX); /* raw: errno kept */
  return r;
}
int linkat_path(int fd1, const char *from, int fd2, const char *to, int flags) {
  ensure_init();
  if (UNLIKELY(path_hooked(from) || path_hooked(to)))
    return linkat_slow(fd1, from, fd2, to, flags, 0);
  return (int)libc_ret(SYS5(linkat, fd1, from, fd2, to, flags));
}
API int link(const char *from, const char *to) {
  ensure_init();
  if (UNLIKELY(path_hooked(from) || path_hooked(to)))
    return linkat_slow(AT_FDCWD, from, AT_FDCWD, to, 0, 1);
  return (int)libc_ret(LINK_RAW(from, to));
}

/* rename: two paths, either or both hooked. One PATH_MAX buffer on the
 * stack (rename is async-signal-safe); a page is mapped for the call only
 * when both paths are rewritten (a temporary file renamed into place under
 * a REDIR rule, or where no rule matches, costs glibc's one system call). */
static NOINLINE int renameat_slow(int fd1, const char *from, int fd2,
                                  const char *to, int raw_rename) {
  /* /proc/<vpid> paths: see SLOW_PATH */
  ID_WINDOW_IF(proc_prefixed(from) || proc_prefixed(to));
  char a_buf[PATH_MAX];
  char *page = NULL;
  const char *a = from, *b = to;
  int r = -1;
  if (path_hooked(from) && !(a = path_slow(from, PATH_REMOVE, a_buf))) return -1;
  if (path_hooked(to)) {
    char *b_buf = a_buf; /* free when the source was not rewritten */
    if (a != from) {
      long m = appshot_raw_syscall(SYS_mmap, 0, PATH_MAX, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m < 0 && m > -4096) {
        errno = (int)-m;
        return -1;
      }
      b_buf = page = (char *)m;
    }
    b = path_slow(to, PATH_TARGET, b_buf);
  }
  if (b) r = (int)libc_ret(raw_rename ? RENAME_RAW(a, b) : SYS4(renameat, fd1, a, fd2, b));
  if (page) SYS2(munmap, page, PATH_MAX); /* raw: errno kept */
  return r;
}

API int renameat(int fd1, const char *from, int fd2, const char *to) {
  ensure_init();
  if (UNLIKELY(path_hooked(from) || path_hooked(to)))
    return renameat_slow(fd1, from, fd2, to, 0);
  return (int)libc_ret(SYS4(renameat, fd1, from, fd2, to));
}

API int rename(const char *from, const char *to) {
  ensure_init();
  if (UNLIKELY(path_hooked(from) || path_hooked(to)))
    return renameat_slow(AT_FDCWD, from, AT_FDCWD, to, 1);
  return (int)libc_ret(RENAME_RAW(from, to));
}

/* POSIX shared memory: glibc's shm_open and shm_unlink open and unlink
 * /dev/shm/NAME with its internal calls, past the wrappers above. A clone
 * whose rules send /dev/shm to copies of its own (PostgreSQL's dynamic
 * shared memory, opened by name in every backend) must reach them by name
 * too, and must not unlink its template's. Same names, flags and errors as
 * glibc: one component after any leading slashes, O_NOFOLLOW|O_CLOEXEC. */
#define SHM_DIR "/dev/shm/"

static int shm_path(const char *name, char *buf) {
  while (*name == '/') name++;
  size_t n = strlen(name);
  if (n == 0 || strchr(name, '/') || (n == 1 && name[0] == '.') ||
      (n == 2 && name[0] == '.' && name[1] == '.')) {
    errno = EINVAL;
    return -1;
  }
  if (n > NAME_MAX) {
    errno = ENAMETOOLONG;
    return -1;
  }
  memcpy(buf, SHM_DIR, sizeof SHM_DIR - 1);
  memcpy(buf + sizeof SHM_DIR - 1, name, n + 1);
  return 0;
}

API int shm_open(const char *name, int oflag, mode_t mode) {
  char path[sizeof SHM_DIR + NAME_MAX];
  if (shm_path(name, path) != 0) return -1;
  return open_m(path, oflag | O_NOFOLLOW | O_CLOEXEC, mode);
}

API int shm_unlink(const char *name) {
  char path[sizeof SHM_DIR + NAME_MAX];
  if (shm_path(name, path) != 0) return -1;
  int r = unlink(path);
  if (r < 0 && errno == EPERM) errno = EACCES; /* as glibc says it */
  return r;
}

/* --- For descriptors (preload_cowfd.c) ------------------------------------
 *
 * A metadata call on a descriptor open on an original is made on the
 * private side, as a path call's: these give preload_cowfd.c the same
 * matching, refusals and copy, by the descriptor's name as the kernel
 * gives it (readlink of /proc/self/fd/N: absolute, symlinks resolved). */

int cow_fd_named(const char *name) {
  const struct appshot_redir *r = match(&g_h->instance, name);
  if (!r || r->kind != APPSHOT_REDIR_COW) return 0;
  /* A private side inside `from` is the clone's own already. */
  size_t tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
  return strncmp(name, r->to, tl) || (name[tl] != '\0' && name[tl] != '/');
}

int cow_fd_private(char buf[PATH_MAX], int op, const struct stat *fd_st, const char **priv) {
  const struct appshot_redir *r = match(&g_h->instance, buf);
  if (!r || r->kind != APPSHOT_REDIR_COW) return 1;
  size_t fl = r->from_len, tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
  size_t rl = strlen(buf) - fl;
  if (tl + rl >= PATH_MAX || fl + rl >= PATH_MAX) return -ENAMETOOLONG;
  struct cow c = {buf, r->from, r->to, fl, tl, fl > tl ? fl : tl, 0};
  memmove(buf + c.k, buf + fl, rl + 1);
  /* The very inode the descriptor is open on, under that name now: not
   * one renamed or replaced since, whose copy would be of another file. */
  struct stat st;
  if (!lexists(orig_side(&c), &st) || st.st_dev != fd_st->st_dev || st.st_ino != fd_st->st_ino)
    return 1;
  if (!lexists(priv_side(&c), &st)) {
    int rc = copy_attr_up(&c, op);
    if (rc < 0) return rc;
  }
  *priv = priv_side(&c);
  return 0;
}

int path_chmod_op(int flags) { return chmod_op(flags); }
int path_chown_op(int flags, uid_t uid, gid_t gid) { return chown_op(flags, uid, gid); }
int path_utimens_op(const struct timespec *t, int flags) { return utimens_op(t, flags); }

/* --- Socket names ---------------------------------------------------------
 *
 * An AF_UNIX socket's name is a path: a program that names its socket
 * after its PID in a shared directory (the JVM's /tmp/.java_pid<pid>,
 * which jcmd reaches as /proc/<pid>/root/tmp/.java_pid<pid>) needs it
 * where its files go. bind, connect and the destinations of sendto,
 * sendmsg and sendmmsg (preload_net.c) take an absolute name as the path
 * calls take a path (path_slow: /proc/<vpid> rewritten, REDIR PATH and
 * copy-on-write rules; bind's name is made on the private side, the
 * others are looked up as a read would). An abstract name (a leading
 * NUL), a relative one and an unnamed address go through as they are. A
 * rewritten name that sun_path cannot hold fails with ENAMETOOLONG.
 *
 * The names the kernel answers (getsockname, getpeername, accept's and
 * accept4's peer, recvfrom's, recvmsg's and recvmmsg's sender:
 * preload_net.c) are the rewritten ones: a name under a rule's `to` is
 * shown as the application named it, from + the rest (unix_name_answered),
 * when that name is the one the rule rewrites back to it. So the program
 * sees the names it used, a datagram server answers a client at the
 * client's own name (rewritten again on the way out), and a name kept
 * across a snapshot and a clone is the clone's, not the template's
 * private directory. Not for an answer cut short by the caller's buffer
 * (the kernel's part of the name cannot be read back), nor through
 * syscall() with SYS_sendto, bind, connect, getsockname, getpeername,
 * accept or recvfrom. */

/* The name in the sockaddr_un at a (len bytes, already ours to read). */
static int unix_name_in(const struct sockaddr_un *a, socklen_t len, char name[UNIX_NAME_MAX + 1]) {
  const size_t off = offsetof(struct sockaddr_un, sun_path);
  if (len <= off || a->sun_family != AF_UNIX) return 0;
  size_t n = len - off < UNIX_NAME_MAX ? len - off : UNIX_NAME_MAX;
  memcpy(name, a->sun_path, n);
  name[n] = '\0';
  return name[0] == '/';
}

/* The caller's address, read as the kernel reads it (copy_in): one the
 * kernel would refuse with EFAULT is no name here (review r250 L3: read
 * as it was, it killed the program with SIGSEGV), and one longer than a
 * sockaddr_un (EINVAL) neither (L4): the call goes to the kernel as it
 * is. A system that refuses the copy itself (a seccomp filter that
 * forbids process_vm_readv) has it read plainly, as before. */
int unix_name_of(const struct sockaddr *addr, socklen_t len, char name[UNIX_NAME_MAX + 1]) {
  struct sockaddr_un a;
  if (!addr || len <= offsetof(struct sockaddr_un, sun_path) || len > sizeof a) return 0;
  long rc = read_in(&a, addr, len);
  if (rc == -EFAULT) return 0;
  if (rc < 0) memcpy(&a, addr, len);
  return unix_name_in(&a, len, name);
}

int unix_path_hooked(const struct sockaddr *addr, socklen_t len) {
  char name[UNIX_NAME_MAX + 1];
  return unix_name_of(addr, len, name) && path_hooked(name);
}

socklen_t unix_answer_room(const socklen_t *lenp) {
  socklen_t cap;
  long rc = read_in(&cap, lenp, sizeof cap);
  if (rc == -EFAULT) return 0;
  if (rc < 0) cap = *lenp;
  return cap;
}

/* The address of name p into a: its length, or 0 (errno set). A name of
 * sun_path's whole size goes without a terminator, as the kernel takes
 * it. */
socklen_t unix_addr_of(const char *p, struct sockaddr_un *a) {
  size_t n = strlen(p);
  if (n > sizeof a->sun_path) {
    errno = ENAMETOOLONG;
    return 0;
  }
  memset(a, 0, offsetof(struct sockaddr_un, sun_path));
  a->sun_family = AF_UNIX;
  memcpy(a->sun_path, p, n < sizeof a->sun_path ? n + 1 : n);
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (n < sizeof a->sun_path ? n + 1 : n));
}

int unix_bind_slow(int fd, const struct sockaddr *addr, socklen_t len) {
  char path[UNIX_NAME_MAX + 1];
  /* Unreadable now (unmapped by another thread since): the kernel's. */
  if (!unix_name_of(addr, len, path)) return (int)libc_ret(SYS3(bind, fd, addr, len));
  SLOW_PATH(p, AT_FDCWD, path, PATH_TARGET, -1);
  /* Not rewritten: the caller's own address, as the kernel takes it (a
   * 108-byte name without a terminator, say: L4). */
  if (p == path) return (int)libc_ret(SYS3(bind, fd, addr, len));
  struct sockaddr_un a;
  socklen_t n = unix_addr_of(p, &a);
  return n ? (int)libc_ret(SYS3(bind, fd, &a, n)) : -1;
}

void unix_name_answered(struct sockaddr *addr, socklen_t cap, socklen_t *lenp) {
  char name[UNIX_NAME_MAX + 1];
  /* The kernel just wrote it (the call succeeded): plain reads. */
  if (*lenp > sizeof(struct sockaddr_un) || !unix_name_in((const struct sockaddr_un *)addr, *lenp, name)) return;
  const struct appshot_instance *in = &g_h->instance;
  const struct appshot_redir *best = NULL;
  size_t best_tl = 0;
  uint32_t n = in->redirs < APPSHOT_REDIRS ? in->redirs : APPSHOT_REDIRS;
  for (uint32_t i = 0; i < n; i++) { /* the longest `to` the name is under */
    const struct appshot_redir *r = &in->redir[i];
    size_t tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
    if (r->from_len == 0 || r->from_len >= APPSHOT_PATH_MAX || r->from[0] != '/' || r->to[0] != '/' ||
        tl <= best_tl || strncmp(name, r->to, tl) || (name[tl] != '\0' && name[tl] != '/'))
      continue;
    best = r;
    best_tl = tl;
  }
  if (!best) return;
  size_t fl = best->from_len, rl = strlen(name + best_tl);
  char back[UNIX_NAME_MAX + 1];
  if (fl + rl > UNIX_NAME_MAX) return; /* no such name could have been bound */
  memcpy(back, best->from, fl);
  memcpy(back + fl, name + best_tl, rl + 1);
  /* Only the name that rule takes to this one: not one a longer rule
   * inside `from` takes elsewhere. */
  if (match(in, back) != best) return;
  struct sockaddr_un a;
  socklen_t al = unix_addr_of(back, &a);
  /* As the kernel answers: what fits the caller's buffer, and the whole
   * length (from may be longer than to). */
  memcpy(addr, &a, al < cap ? al : cap);
  *lenp = al;
}

static NOINLINE int unix_connect_slow(int fd, const struct sockaddr *addr, socklen_t len) {
  char path[UNIX_NAME_MAX + 1];
  if (!unix_name_of(addr, len, path)) return REAL(connect)(fd, addr, len);
  SLOW_PATH(p, AT_FDCWD, path, PATH_READ, -1);
  if (p == path) return REAL(connect)(fd, addr, len); /* as unix_bind_slow */
  struct sockaddr_un a;
  socklen_t n = unix_addr_of(p, &a);
  return n ? REAL(connect)(fd, (struct sockaddr *)&a, n) : -1;
}

/* glibc's: a cancellation point. */
API int connect(int fd, __CONST_SOCKADDR_ARG addr_arg, socklen_t len) {
  const struct sockaddr *addr = addr_arg.__sockaddr__;
  ensure_init();
  if (UNLIKELY(unix_name_hooked(addr, len))) return unix_connect_slow(fd, addr, len);
  return REAL(connect)(fd, addr_arg, len);
}
