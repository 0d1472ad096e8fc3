/*
 * Listings of /proc: the directory of processes (/proc itself) and a
 * process's directory of threads (/proc/<pid>/task) name them by number,
 * which the kernel gives as system PIDs and TIDs. The application sees
 * them by its virtual ids, as the rest of its view does.
 *
 * The model is the PID namespace's (preload_pid.c): a listing of /proc
 * shows the application's processes under their virtual PIDs and leaves
 * every other process out. Showing an outside process under its system
 * PID would be worse than useless: the number is a virtual one to the
 * application, and /proc/<that number> names one of its own processes or
 * none (preload_proc.c), so `ps` or a scan for children would read
 * another process's files under that process's name. Outside processes
 * are left out as cgroup.procs leaves them out (preload_view.c).
 *
 * A thread listed in /proc/<pid>/task of an application's process that
 * the tables do not know yet (a pthread that never asked its TID: threads
 * are mapped when first seen, preload_core.c) is mapped here, by the same
 * rule as a snapshot maps it (src/resources/threads.ts): it is the
 * process's thread by the kernel's word, and so ours; the entries of the
 * process's threads that ended are dropped first (forget_ended_threads).
 * A task directory of a process outside the application lists nothing.
 *
 * Where the records are rewritten: glibc's readdir fills its buffer with
 * its internal getdents64, which no preload library can reach, so the
 * translation happens at every public door:
 *  - getdents64() and syscall(SYS_getdents64 / SYS_getdents): the records
 *    in the caller's buffer, in place (see rewrite()).
 *  - readdir/readdir64 and readdir_r/readdir64_r: the entry glibc returns,
 *    one at a time; an entry of an outside process is skipped.
 *  - scandir/scandirat (and their *64 names): our own loop on our readdir.
 * Not covered: glob, nftw and fts, which call glibc's readdir from inside
 * glibc; static programs and raw system calls (Go lists directories with
 * its own getdents64); a listing in progress across a snapshot (glibc's
 * buffer keeps the old node's ids).
 *
 * Which directory a descriptor is, is decided on the descriptor, never by
 * the path it was opened by: only when a batch holds an all-digit name
 * (most directories have none: no system call), then fstatfs
 * (PROC_SUPER_MAGIC), then the root's inode number (1) or the link
 * /proc/self/fd/N ("/<digits>/task"). readdir, one entry a call, keeps the
 * answer per stream (dir_memo) until closedir.
 *
 * No allocation; the system calls are raw ones.
 */
#include "preload.h"

#include <stddef.h>
#include <stdlib.h>
#include <sys/vfs.h>

#define PROC_ROOT_INO 1

enum dir_kind { DIR_OTHER = 1, DIR_PROCESSES, DIR_THREADS };

struct dir_of {
  int kind;      /* enum dir_kind */
  int32_t owner; /* DIR_THREADS: the system PID of the listed process */
  int pruned;    /* forget_ended_threads(owner) done for this batch */
};

/* A decimal id, 1 to 10 digits, nothing else: its value, else 0. */
static int32_t digits_id(const char *s) {
  long v = 0;
  int n = 0;
  for (; *s; s++, n++) {
    if (*s < '0' || *s > '9' || n >= 10) return 0;
    v = v * 10 + (*s - '0');
  }
  return v > 0 && v <= INT32_MAX ? (int32_t)v : 0;
}

/* What directory `fd` is (see above). */
static struct dir_of classify(int fd) {
  struct dir_of d = {DIR_OTHER, 0, 0};
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0 || sf.f_type != PROC_SUPER_MAGIC) return d;
  struct stat st;
  if (SYS2(fstat, fd, &st) != 0 || !S_ISDIR(st.st_mode)) return d;
  if (st.st_ino == PROC_ROOT_INO) {
    d.kind = DIR_PROCESSES;
    return d;
  }
  char link[32] = "/proc/self/fd/", target[512];
  *put_decimal(link + 14, (unsigned long)fd) = '\0';
  long n = SYS4(readlinkat, AT_FDCWD, link, target, sizeof target - 1);
  if (n <= 5 || n >= (long)sizeof target - 1) return d; /* none, or cut */
  target[n] = '\0';
  if (memcmp(target + n - 5, "/task", 5) != 0) return d;
  /* "/<digits>/task" at the end, wherever /proc is mounted */
  long e = n - 5, s = e;
  while (s > 0 && target[s - 1] >= '0' && target[s - 1] <= '9') s--;
  if (s == e || s == 0 || target[s - 1] != '/') return d;
  target[e] = '\0';
  int32_t owner = digits_id(target + s);
  if (!owner) return d;
  d.kind = DIR_THREADS;
  d.owner = owner;
  return d;
}

/* A thread mapped because it was listed never asked its TID, so nothing
 * unmaps it when it ends (preload_core.c, thread_gone): a server whose
 * short-lived threads are listed would fill the table. Before a thread
 * is mapped on sight, the entries of `owner`'s threads that the kernel no
 * longer knows in that thread group (tgkill with signal 0: ESRCH) go,
 * each only while it is still the same pair. A scan of the table, only
 * when a thread is first seen this way. */
static void forget_ended_threads(int32_t owner) {
  /* The used slots only, found through our descriptor of the table file
   * (appshot_used.h): a read of every slot through the mapping allocated
   * the file's holes. */
  struct appshot_used u;
  appshot_used_begin(&u, g_h, __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED), APPSHOT_PID);
  for (int64_t slot; (slot = appshot_used_next(&u)) >= 0;) {
    int32_t vid, sid, of;
    uint32_t flags;
    if (!appshot_entry_at(g_h, APPSHOT_PID, (uint32_t)slot, &vid, &sid, &flags, &of) ||
        !(flags & APPSHOT_F_THREAD) || of != owner)
      continue;
    if (SYS3(tgkill, owner, sid, 0) == -ESRCH)
      appshot_unmap_pair(g_h, APPSHOT_PID, vid, sid);
  }
}

/* The virtual id of `sid` as listed in `d`, or 0: left out. */
static int32_t listed(struct dir_of *d, int32_t sid) {
  int32_t v;
  if (appshot_s2v(g_h, APPSHOT_PID, sid, &v)) return v;
  if (d->kind != DIR_THREADS || sid == d->owner ||
      !appshot_s2v(g_h, APPSHOT_PID, d->owner, &v))
    return 0;
  /* A thread of one of our processes, not mapped yet (see above). */
  if (!d->pruned) {
    forget_ended_threads(d->owner);
    d->pruned = 1;
  }
  v = appshot_map_system(g_h, APPSHOT_PID, sid, APPSHOT_F_THREAD, d->owner);
  if (v <= 0) return 0;
  appshot_set_flags(g_h, APPSHOT_PID, d->owner, APPSHOT_F_THREADS);
  return v;
}

/* --- The records of getdents64 and getdents ------------------------------
 *
 * struct linux_dirent64: d_ino, d_off (8 bytes each), d_reclen (2),
 * d_type (1), then the name and its NUL, the record padded to 8 bytes.
 * The old struct linux_dirent: d_ino, d_off, d_reclen, the name and its
 * NUL, padding, and d_type in the record's last byte. */
#define RECLEN_AT 16
#define NAME_AT(old) ((old) ? 18 : 19)

static size_t record_size(int old, size_t namelen) {
  return (NAME_AT(old) + namelen + 1 + (old ? 1 : 0) + 7) & ~(size_t)7;
}
static unsigned short reclen_of(const char *r) {
  unsigned short n;
  memcpy(&n, r + RECLEN_AT, sizeof n);
  return n;
}
static int64_t off_of(const char *r) {
  int64_t o;
  memcpy(&o, r + 8, sizeof o);
  return o;
}
static int decimal_len(uint32_t v) {
  int n = 1;
  while (v >= 10) v /= 10, n++;
  return n;
}

/* A record whose id was looked up carries the answer in its name until it
 * is written out: a NUL first (no real name is empty), then the virtual id
 * as 4 bytes. The smallest record has 5 bytes of name, so it always fits,
 * and the answer is looked up once (a thread mapped on sight is mapped
 * once). */
static int noted(const char *r, int old, int32_t *vid) {
  const char *name = r + NAME_AT(old);
  if (name[0] != '\0') return 0;
  memcpy(vid, name + 1, sizeof *vid);
  return 1;
}

/* Writes the record `r` (its d_ino, d_off and type), renamed to `vid`, at
 * `at` (which may overlap `r`), in its new size. */
static size_t put_renamed(char *at, const char *r, int old, int32_t vid) {
  unsigned short was = reclen_of(r);
  char head[24];
  memcpy(head, r, NAME_AT(old));
  char type = old ? r[was - 1] : r[18];
  char name[12];
  int len = (int)(put_decimal(name, (uint32_t)vid) - name);
  size_t size = record_size(old, (size_t)len);
  memcpy(at, head, NAME_AT(old));
  unsigned short rl = (unsigned short)size;
  memcpy(at + RECLEN_AT, &rl, sizeof rl);
  memset(at + NAME_AT(old), 0, size - NAME_AT(old));
  memcpy(at + NAME_AT(old), name, (size_t)len);
  if (old) at[size - 1] = type;
  else at[18] = type;
  return size;
}

/* The records [buf, buf + n) of a listing of `d`, in a buffer of `cap`
 * bytes, rewritten in place: every id made virtual, the records of ids
 * left out removed. A virtual id may be longer than the system one: its
 * record may grow by 8 bytes. Records that no longer fit in `cap` are
 * given back to the kernel (the descriptor's offset set back to after the
 * last record kept), for the next call. Returns the new length, 0 if every
 * record was left out (the caller reads on: 0 would mean the end), or
 * -EINVAL if not even the first record fits (as the kernel answers a
 * buffer too small for one; the descriptor's offset set back to `before`,
 * where it was before the call, so that the record is not lost to a
 * caller that retries with a larger buffer: only a buffer under
 * RENAMED_MAX bytes can be too small for one renamed record).
 *
 * Three passes, none needing memory of its own: (1) look every id up and
 * note the answer in its record; (2) forward, remove the records left out
 * and write those that do not grow (each output no larger than its input:
 * the writing never overtakes the reading); (3) if some grow, move what
 * is left to the end of the buffer and write it out forward from the
 * start (what has grown so far is never more than the free space, which
 * is the room the records that fit need in all). */
static long rewrite(int fd, struct dir_of *d, char *buf, long n,
                    size_t cap, int old, int64_t before) {
  size_t minimum = record_size(old, 1);
  for (long at = 0; at < n;) {
    size_t rl = reclen_of(buf + at);
    if (rl < minimum || (size_t)(n - at) < rl) return n; /* not the kernel's */
    at += (long)rl;
  }
  /* (1) */
  for (long at = 0; at < n;) {
    char *r = buf + at;
    size_t rl = reclen_of(r);
    char *name = r + NAME_AT(old);
    int32_t sid = name[0] >= '1' && name[0] <= '9' ? digits_id(name) : 0;
    if (sid) {
      int32_t vid = listed(d, sid);
      name[0] = '\0';
      memcpy(name + 1, &vid, sizeof vid);
    }
    at += (long)rl;
  }
  /* (2) */
  size_t w = 0;
  int grows = 0;
  for (long at = 0; at < n;) {
    char *r = buf + at;
    size_t rl = reclen_of(r);
    at += (long)rl;
    int32_t vid;
    if (!noted(r, old, &vid)) {
      memmove(buf + w, r, rl);
      w += rl;
    } else if (vid <= 0) {
      continue; /* left out */
    } else if (record_size(old, (size_t)decimal_len((uint32_t)vid)) <= rl) {
      w += put_renamed(buf + w, r, old, vid);
    } else {
      memmove(buf + w, r, rl); /* (3) writes it */
      w += rl;
      grows = 1;
    }
  }
  if (!grows) return (long)w;
  /* (3): the records that fit, grown */
  size_t m = w, need = 0, keep = 0;
  int64_t resume = 0;
  for (size_t at = 0; at < m;) {
    const char *r = buf + at;
    size_t rl = reclen_of(r);
    int32_t vid;
    size_t size = noted(r, old, &vid)
                      ? record_size(old, (size_t)decimal_len((uint32_t)vid))
                      : rl;
    if (need + size > cap) break;
    need += size;
    at += rl;
    keep = at;
    resume = off_of(r);
  }
  if (keep == 0) {
    if (before >= 0 && SYS3(lseek, fd, before, SEEK_SET) < 0) return -EIO;
    return -EINVAL;
  }
  if (keep < m && SYS3(lseek, fd, resume, SEEK_SET) < 0) return -EIO;
  char *from = buf + cap - keep;
  memmove(from, buf, keep);
  w = 0;
  for (size_t at = 0; at < keep;) {
    const char *r = from + at;
    size_t rl = reclen_of(r);
    at += rl;
    int32_t vid;
    if (noted(r, old, &vid)) {
      w += put_renamed(buf + w, r, old, vid);
    } else {
      memmove(buf + w, r, rl);
      w += rl;
    }
  }
  return (long)w;
}

/* Whether a batch names anything by number: most directories do not, and
 * are left at that, without a system call. */
static int has_number(const char *buf, long n, int old) {
  for (long at = 0; at + NAME_AT(old) < n;) {
    const char *name = buf + at + NAME_AT(old);
    if (name[0] >= '1' && name[0] <= '9') return 1;
    unsigned short rl = reclen_of(buf + at);
    if (rl == 0) return 0;
    at += rl;
  }
  return 0;
}

/* The largest record a renamed one can need: a 10-digit id. A buffer at
 * least this large holds any first record. */
#define RENAMED_MAX 32

/* getdents64 (nr SYS_getdents64) or getdents (SYS_getdents), translated:
 * the kernel's convention, -errno. */
static long do_getdents(long nr, int fd, void *buf, size_t count) {
  int old = nr == SYS_getdents;
  ID_WINDOW(); /* system ids in the buffer until they are translated */
  for (;;) {
    /* A buffer too small for a renamed record: where to go back to (one
     * more system call, only for such buffers). */
    int64_t before = count < RENAMED_MAX ? SYS3(lseek, fd, 0, SEEK_CUR) : -1;
    long n = appshot_raw_syscall(nr, fd, (long)buf, (long)count, 0, 0, 0);
    if (n <= 0 || !has_number(buf, n, old)) return n;
    struct dir_of d = classify(fd);
    if (d.kind == DIR_OTHER) return n;
    n = rewrite(fd, &d, buf, n, count, old, before);
    if (n != 0) return n;
    /* every one left out: the next batch */
  }
}

API ssize_t getdents64(int fd, void *buf, size_t count) {
  ensure_init();
  if (!g_h) return libc_ret(SYS3(getdents64, fd, buf, count));
  return libc_ret(do_getdents(SYS_getdents64, fd, buf, count));
}

long do_getdents_syscall(long nr, long fd, long buf, long count) {
  return libc_ret(do_getdents(nr, (int)fd, (void *)buf, (size_t)count));
}

/* --- readdir ---------------------------------------------------------------
 *
 * One entry a call: the kind of a stream's directory is kept, per
 * descriptor number and stream, from its first numbered entry until
 * closedir. Descriptors above the memo's size are classified again at
 * each numbered entry. */
#define DIR_MEMO 1024
static struct {
  uintptr_t dir; /* the stream; written last */
  struct dir_of of;
} dir_memo[DIR_MEMO];

static struct dir_of dir_kind(DIR *dir) {
  int fd = dirfd(dir);
  if (fd < 0) return (struct dir_of){DIR_OTHER, 0, 0};
  if (fd < DIR_MEMO &&
      __atomic_load_n(&dir_memo[fd].dir, __ATOMIC_ACQUIRE) == (uintptr_t)dir)
    return dir_memo[fd].of;
  struct dir_of d = classify(fd);
  if (fd < DIR_MEMO) {
    dir_memo[fd].of = d;
    __atomic_store_n(&dir_memo[fd].dir, (uintptr_t)dir, __ATOMIC_RELEASE);
  }
  return d;
}

/* The entry `e` (in glibc's buffer, of d_reclen bytes, or the caller's
 * struct of readdir_r, `whole`) as the application sees it: NULL if it is
 * left out, `e` renamed in place, or, where the virtual id does not fit in
 * glibc's record, a copy in `spare`. */
static struct dirent64 *entry_seen(DIR *dir, struct dirent64 *e, int whole,
                                   struct dirent64 *spare) {
  int32_t sid = e->d_name[0] >= '1' && e->d_name[0] <= '9' ? digits_id(e->d_name) : 0;
  if (LIKELY(!sid)) return e;
  struct dir_of d = dir_kind(dir);
  if (d.kind == DIR_OTHER) return e;
  int32_t vid = listed(&d, sid);
  if (vid <= 0) return NULL;
  char name[12];
  int len = (int)(put_decimal(name, (uint32_t)vid) - name);
  size_t room = whole ? sizeof e->d_name
                      : e->d_reclen - offsetof(struct dirent64, d_name);
  if ((size_t)len + 1 > room) {
    memcpy(spare, e, offsetof(struct dirent64, d_name));
    spare->d_reclen = (unsigned short)record_size(0, (size_t)len);
    e = spare;
  }
  memcpy(e->d_name, name, (size_t)len);
  e->d_name[len] = '\0';
  return e;
}

/* A virtual id longer than the system one, in a record too short for it
 * (a system PID under 10000 with a virtual one above): valid until this
 * thread's next such entry, not only its next readdir of the same stream.
 * Rare, and only for that entry. */
static __thread struct dirent64 t_spare_entry TLS_IE;

static struct dirent64 *readdir_seen(DIR *dir) {
  ensure_init();
  struct dirent64 *(*real)(DIR *) = (struct dirent64 * (*)(DIR *)) real_fn[R_readdir64];
  if (!g_h) return real(dir);
  ID_WINDOW(); /* a system id read, not yet translated */
  int err = errno;
  for (;;) {
    struct dirent64 *e = real(dir);
    if (!e) return NULL; /* errno: the end (kept) or an error (set) */
    e = entry_seen(dir, e, 0, &t_spare_entry);
    if (e) return e;
    errno = err;
  }
}

API struct dirent *readdir(DIR *dir) { return (struct dirent *)readdir_seen(dir); }
API struct dirent64 *readdir64(DIR *dir) { return readdir_seen(dir); }

static int readdir_r_seen(DIR *dir, struct dirent64 *entry,
                          struct dirent64 **result) {
  ensure_init();
  int (*real)(DIR *, struct dirent64 *, struct dirent64 **) =
      (int (*)(DIR *, struct dirent64 *, struct dirent64 **))real_fn[R_readdir64_r];
  if (!g_h) return real(dir, entry, result);
  ID_WINDOW();
  for (;;) {
    int r = real(dir, entry, result);
    if (r != 0 || !*result) return r;
    /* glibc copies the entry into the caller's whole struct */
    if (entry_seen(dir, *result, 1, NULL)) return 0;
  }
}

API int readdir_r(DIR *dir, struct dirent *entry, struct dirent **result) {
  return readdir_r_seen(dir, (struct dirent64 *)entry, (struct dirent64 **)result);
}
API int readdir64_r(DIR *dir, struct dirent64 *entry, struct dirent64 **result) {
  return readdir_r_seen(dir, entry, result);
}

API int closedir(DIR *dir) {
  ensure_init();
  uintptr_t key = (uintptr_t)dir; /* glibc's closedir refuses NULL itself */
  if (key) {
    int fd = dirfd(dir);
    if (fd >= 0 && fd < DIR_MEMO)
      __atomic_compare_exchange_n(&dir_memo[fd].dir, &key, 0, 0,
                                  __ATOMIC_RELEASE, __ATOMIC_RELAXED);
  }
  return REAL(closedir)(dir);
}

/* --- scandir ---------------------------------------------------------------
 *
 * glibc's scandir reads the directory with its internal readdir, out of
 * reach, and libuv lists a directory with it (Node's fs.readdir). Ours
 * is the same loop on our readdir, so that the filter, the sort and the
 * caller see the names the application sees. It allocates the list, as
 * its contract is (malloc, freed by the caller); never used in a signal
 * handler. The directory is opened by our openat (a path under
 * /proc/<vpid> made the system's). */

typedef int (*scan_filter)(const struct dirent64 *);
typedef int (*scan_compare)(const struct dirent64 **, const struct dirent64 **);

static int scan(int dfd, const char *path, struct dirent64 ***list,
                scan_filter filter, scan_compare compare) {
  int fd = openat(dfd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  DIR *dir = fdopendir(fd);
  if (!dir) {
    int err = errno;
    SYS1(close, fd);
    errno = err;
    return -1;
  }
  int saved = errno, err = 0;
  struct dirent64 **v = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    errno = 0;
    struct dirent64 *e = readdir_seen(dir);
    if (!e) {
      err = errno;
      break;
    }
    if (filter) {
      errno = 0; /* as glibc: the filter's errno is not ours */
      if (!filter(e)) continue;
    }
    if (n == cap) {
      size_t more = cap ? cap * 2 : 16;
      struct dirent64 **w = realloc(v, more * sizeof *v);
      if (!w) {
        err = ENOMEM;
        break;
      }
      v = w;
      cap = more;
    }
    /* As large as its d_reclen says (glibc's scandir copies that much, and
     * a caller may copy d_reclen bytes of an entry); the name ends before. */
    size_t used = offsetof(struct dirent64, d_name) + strlen(e->d_name) + 1;
    size_t size = e->d_reclen > used ? e->d_reclen : used;
    struct dirent64 *copy = malloc(size);
    if (!copy) {
      err = ENOMEM;
      break;
    }
    memcpy(copy, e, used);
    memset((char *)copy + used, 0, size - used);
    copy->d_reclen = (unsigned short)size;
    v[n++] = copy;
  }
  closedir(dir);
  if (err) {
    while (n) free(v[--n]);
    free(v);
    errno = err;
    return -1;
  }
  if (compare && n > 1)
    qsort(v, n, sizeof *v, (int (*)(const void *, const void *))compare);
  *list = v;
  errno = saved;
  return (int)n;
}

API int scandir64(const char *path, struct dirent64 ***list,
                  scan_filter filter, scan_compare compare) {
  ensure_init();
  if (!g_h) return ((int (*)(const char *, struct dirent64 ***, scan_filter,
                             scan_compare))real_fn[R_scandir64])(path, list, filter, compare);
  return scan(AT_FDCWD, path, list, filter, compare);
}
API int scandirat64(int dfd, const char *path, struct dirent64 ***list,
                    scan_filter filter, scan_compare compare) {
  ensure_init();
  if (!g_h) return ((int (*)(int, const char *, struct dirent64 ***, scan_filter,
                             scan_compare))real_fn[R_scandirat64])(dfd, path, list, filter, compare);
  return scan(dfd, path, list, filter, compare);
}
/* struct dirent is struct dirent64 on x86-64 (the same records, and glibc
 * makes the one an alias of the other). */
API int scandir(const char *path, struct dirent ***list,
                int (*filter)(const struct dirent *),
                int (*compare)(const struct dirent **, const struct dirent **)) {
  return scandir64(path, (struct dirent64 ***)list, (scan_filter)filter,
                   (scan_compare)compare);
}
API int scandirat(int dfd, const char *path, struct dirent ***list,
                  int (*filter)(const struct dirent *),
                  int (*compare)(const struct dirent **, const struct dirent **)) {
  return scandirat64(dfd, path, (struct dirent64 ***)list, (scan_filter)filter,
                     (scan_compare)compare);
}
