/*
 * Files whose text names processes by system PID, read by the application:
 * /proc/locks, /proc/<pid>/fdinfo/<fd> (its "lock:" lines and a pidfd's
 * "Pid:" and "NSpid:"), a process's or thread's own stat and status
 * (/proc/<pid|self|thread-self>[/task/<tid>]/stat|status: what ps, pgrep,
 * pstree and top read), a thread's children (task/<tid>/children, the
 * PIDs of the children it forked, space-separated: one outside the
 * application left out) and a process's or thread's sched (its first line
 * "comm (<pid>, #threads: n)"), a process's POSIX timers (each one's
 * "notify: signal/pid.<pid>" or ".../tid.<tid>", its target), and a
 * cgroup's cgroup.procs, cgroup.threads and (cgroup v1) tasks. And the
 * SysV objects' lists, /proc/sysvipc/shm, sem and msg (what ipcs reads):
 * system ids, keys and PIDs, every application's objects (sysv_line).
 *
 * When one of them is opened for reading (open & co., fopen "r";
 * read-write too: root opens the files nobody may write so, and a
 * cgroup's list and sched are written through, below), the
 * descriptor the application gets holds the file's text as of the open,
 * every PID in it translated: the whole file is read from the kernel, line
 * by line, into an anonymous memory file (memfd), which is then reopened
 * read-only in the place of the kernel's descriptor (same number, same
 * close-on-exec and O_NONBLOCK). A translated line can be longer or shorter
 * than the kernel's, so translating on read() would break the offsets that
 * lseek, pread and stdio count on; a copy keeps them consistent. What the
 * application gives up: the text is as of the open, not of each read (a
 * program re-reading the same descriptor after lseek(0) sees the old text),
 * and fstat shows a memfd.
 *
 * A process outside the application (not in the tables):
 *  - in a lock line, a pidfd's "Pid:", and the ids of stat and status
 *    (the parent, process group, session, terminal's foreground group,
 *    tracer), 0, as the kernel shows a process outside the reader's PID
 *    namespace (and as F_GETLK's l_pid, getppid, getpgid, getsid and
 *    tcgetpgrp show it, preload_pid.c). The application's first process
 *    is init's child, and init is virtual PID 1: its parent shows as 1,
 *    as getppid() says; init's own parent, outside, as 0. The kernel's
 *    -1 (no terminal's group) and 0 stay as they are;
 *  - in a cgroup's list, the line is left out, as cgroup v1 leaves out the
 *    processes a PID namespace does not see: a program that signals every
 *    PID it reads there must not be handed 0 (its own process group).
 *
 * Which file an open reached is the descriptor's to say, whatever name
 * opened it (view_of_descriptor): its file system, and for /proc's files
 * its link, the path the kernel resolved, with system ids, which also
 * says whose file it is. A name cannot say: a ".." after a directory
 * whose parent no name tells (/proc/sys/../self/stat), a symbolic link to
 * /proc or into it (/proc/self/root/proc/..., a link of the application's
 * own to /proc/self), a name relative to a directory descriptor or a
 * working directory inside /proc opened any of those ways, a descriptor
 * reopened through /proc/self/fd/<n>, syscall() (openat2 among them): the
 * kernel resolves them all to one file. The descriptor is asked only when
 * the last name is one of the files' (or a number: fdinfo/<n>, fd/<n>),
 * so an open of any other name costs a few compares (viewed_name). Not
 * covered: a static program or raw system calls; a symbolic link to one
 * of the files under another name. A file that cannot be copied (no
 * memory for the memfd, too many descriptors) fails the open with that
 * error rather than show system PIDs.
 *
 * No allocation: the copy goes through buffers on the stack of a function
 * that runs only for these files.
 */
#include "preload.h"

#include <sys/mman.h>
#include <sys/vfs.h>

#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270

enum view {
  VIEW_NONE, VIEW_LOCKS, VIEW_FDINFO, VIEW_PIDLIST, VIEW_STAT, VIEW_STATUS,
  VIEW_CHILDREN, VIEW_SCHED, VIEW_TIMERS, VIEW_SYSV_SEM, VIEW_SYSV_SHM,
  VIEW_SYSV_MSG
};

/* Whose file of /proc a view is, by the system ids its link names: the
 * process, and the thread for a file under task/<tid> (0 for the
 * process's own). */
struct view_owner {
  int32_t pid, tid;
};

/* --- Translating one line ------------------------------------------------ */

static int is_blank(char c) { return c == ' ' || c == '\t'; }

/* A decimal PID, possibly negative, in [s, e). */
static int parse_int(const char *s, const char *e, long *out) {
  int neg = 0;
  if (s < e && *s == '-') {
    neg = 1;
    s++;
  }
  if (s == e || e - s > 10) return 0;
  long v = 0;
  for (; s < e; s++) {
    if (*s < '0' || *s > '9') return 0;
    v = v * 10 + (*s - '0');
  }
  *out = neg ? -v : v;
  return 1;
}

/* Copies [s, ns) to *o, then `v` in decimal. */
static char *put_up_to_number(char *o, const char *s, const char *ns, long v) {
  memcpy(o, s, (size_t)(ns - s));
  o += ns - s;
  if (v < 0) {
    *o++ = '-';
    v = -v;
  }
  return put_decimal(o, (unsigned long)v);
}

/* Copies [s, e) to *o, replacing the number at [ns, ne) by `v`. */
static char *put_replaced(char *o, const char *s, const char *e,
                          const char *ns, const char *ne, long v) {
  o = put_up_to_number(o, s, ns, v);
  memcpy(o, ne, (size_t)(e - ne));
  return o + (e - ne);
}

/* A system PID as the application sees it: 0 outside it; 0 and negative
 * numbers (OFD locks say -1) as they are. */
static long shown(long sys) {
  return sys > 0 && sys <= INT32_MAX ? s2v_or0(APPSHOT_PID, (int32_t)sys) : sys;
}

/* A lock line (/proc/locks, or fdinfo's "lock:\t" ones): the holder's PID
 * is the field before the one that names the file, "MAJ:MIN:INO" (two
 * colons) or "<none>:0". Returns the end of the output. */
static char *lock_line(char *o, const char *s, const char *e) {
  const char *ps = NULL, *pe = NULL; /* the previous field */
  for (const char *t = s; t < e;) {
    while (t < e && is_blank(*t)) t++;
    const char *te = t;
    int colons = 0;
    while (te < e && !is_blank(*te)) colons += *te++ == ':';
    if (te == t) break;
    if ((colons == 2 || (te - t > 6 && !memcmp(t, "<none>", 6))) && ps) {
      long v;
      if (parse_int(ps, pe, &v)) return put_replaced(o, s, e, ps, pe, shown(v));
      break;
    }
    ps = t;
    pe = te;
    t = te;
  }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* "Pid:\t<n>" or "NSpid:\t<n>..." of a pidfd: the first number. */
static char *pid_field_line(char *o, const char *s, const char *e,
                            size_t label) {
  const char *ns = s + label;
  while (ns < e && is_blank(*ns)) ns++;
  const char *ne = ns;
  while (ne < e && !is_blank(*ne) && *ne != '\n') ne++;
  long v;
  if (parse_int(ns, ne, &v)) return put_replaced(o, s, e, ns, ne, shown(v));
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* The id of a process or thread in its own stat or status: as shown(), but
 * the caller's own thread, which the tables learn only when it first asks
 * its TID (preload_core.c), is mapped as gettid() would map it (a thread
 * reading /proc/thread-self/stat before ever calling gettid()). */
static long shown_task(long sys) {
  long v = shown(sys);
  if (v == 0 && sys > 0 && sys == SYS0(gettid)) return self_vtid();
  return v;
}

/* The number in [*t, e) up to the next blank, which *t is moved past. */
static int next_field(const char **t, const char *e, const char **ns,
                      const char **ne) {
  const char *p = *t;
  while (p < e && *p == ' ') p++;
  *ns = p;
  while (p < e && *p != ' ' && *p != '\n') p++;
  *ne = p;
  *t = p;
  return p > *ns;
}

/* A stat file, whole (comm may hold blanks, ')' and '\n': it ends at the
 * last ')'): "pid (comm) state ppid pgrp session tty_nr tpgid ...", the
 * ids in fields 1, 4, 5, 6 and 8; with `cpu` (the caller's own file, after
 * a restore: preload_cputime.c), the CPU times in fields 14-17 (utime,
 * stime, cutime, cstime, in clock ticks) with those nanoseconds added.
 * Not in that shape: copied as it is. */
static char *stat_text(char *o, const char *s, const char *e, const int64_t *cpu) {
  const char *close = e;
  while (close > s && close[-1] != ')') close--;
  struct { const char *s, *e; long v; } id[5];
  int n = 0, ok = close > s + 3;
  const char *t = s, *fs = s, *fe = s;
  ok = ok && next_field(&t, close, &fs, &fe) && parse_int(fs, fe, &id[0].v);
  id[n].s = fs, id[n].e = fe, n++;
  t = close;
  ok = ok && next_field(&t, e, &fs, &fe); /* the state */
  for (int field = 4; ok && field <= 8; field++) {
    long v;
    ok = next_field(&t, e, &fs, &fe) && parse_int(fs, fe, &v);
    if (field == 7) continue; /* tty_nr */
    id[n].s = fs, id[n].e = fe, id[n].v = v, n++;
  }
  /* The CPU times: left as they are if not in that shape (the ids are
   * translated all the same). */
  struct { const char *s, *e; long v; } times[4];
  int nt = 0, times_ok = ok && cpu;
  for (int field = 9; times_ok && field <= 17; field++) {
    long v;
    times_ok = next_field(&t, e, &fs, &fe) && parse_int(fs, fe, &v) && v >= 0;
    if (!times_ok || field < 14) continue;
    int64_t ticks = (int64_t)v + cpu[nt] / 10000000LL; /* USER_HZ */
    times[nt].s = fs, times[nt].e = fe, times[nt].v = ticks < 0 ? 0 : (long)ticks, nt++;
  }
  if (!times_ok) nt = 0;
  if (!ok) {
    memcpy(o, s, (size_t)(e - s));
    return o + (e - s);
  }
  for (int i = 0; i < n; i++) {
    o = put_up_to_number(o, s, id[i].s, i ? shown(id[i].v) : shown_task(id[i].v));
    s = id[i].e;
  }
  for (int i = 0; i < nt; i++) {
    o = put_up_to_number(o, s, times[i].s, times[i].v);
    s = times[i].e;
  }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* A status line: "Tgid:", "Pid:", "PPid:", "TracerPid:" and the first
 * number of "NStgid:", "NSpid:", "NSpgid:", "NSsid:" (the one of /proc's
 * PID namespace, the tables' ids; deeper namespaces' ones stay), and
 * "Ngid:" (a NUMA group's leader thread, 0 for none). The rest, "Name:"
 * (escaped: no '\n' in it) included, as it is. */
static char *status_line(char *o, const char *s, const char *e) {
  static const struct { char name[11]; unsigned char len, task; } ids[] = {
      {"Tgid:", 5, 1},   {"Ngid:", 5, 0},   {"Pid:", 4, 1},
      {"PPid:", 5, 0},   {"TracerPid:", 10, 0}, {"NStgid:", 7, 1},
      {"NSpid:", 6, 1},  {"NSpgid:", 7, 0}, {"NSsid:", 6, 0},
  };
  if (e - s > 4 && (s[0] == 'T' || s[0] == 'N' || s[0] == 'P'))
    for (unsigned i = 0; i < sizeof ids / sizeof ids[0]; i++) {
      size_t n = ids[i].len;
      if ((size_t)(e - s) <= n || memcmp(s, ids[i].name, n)) continue;
      const char *ns = s + n, *ne;
      while (ns < e && is_blank(*ns)) ns++;
      ne = ns;
      while (ne < e && !is_blank(*ne) && *ne != '\n') ne++;
      long v;
      if (!parse_int(ns, ne, &v)) break;
      return put_replaced(o, s, e, ns, ne, ids[i].task ? shown_task(v) : shown(v));
    }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* The first line of a sched file, "comm (pid, #threads: n)\n" (comm may
 * hold anything, even that shape: the last one counts), its pid that of
 * the process or thread. Any other line as it is. */
static char *sched_line(char *o, const char *s, const char *e) {
  static const char tail[] = ", #threads: ";
  enum { TAIL = sizeof tail - 1 };
  if (e - s > TAIL + 4 && e[-1] == '\n' && e[-2] == ')')
    for (const char *t = e - 2 - TAIL; t > s; t--) {
      if (*t != ',' || memcmp(t, tail, TAIL)) continue;
      const char *ns = t;
      while (ns > s && ns[-1] >= '0' && ns[-1] <= '9') ns--;
      long v;
      if (ns > s && ns[-1] == '(' && parse_int(ns, t, &v))
        return put_replaced(o, s, e, ns, t, shown_task(v));
    }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* A timers line: "notify: <how>/pid.<pid>" (the process) or
 * ".../tid.<tid>" (SIGEV_THREAD_ID: the thread), the timer's target. Any
 * other line as it is. */
static char *timers_line(char *o, const char *s, const char *e) {
  if (e - s > 13 && !memcmp(s, "notify: ", 8)) {
    const char *dot = s + 8;
    while (dot < e && *dot != '.' && *dot != '\n') dot++;
    const char *ns = dot + 1, *ne = ns;
    while (ne < e && *ne != '\n') ne++;
    long v;
    if (dot - s > 3 && dot < e && (!memcmp(dot - 3, "pid", 3) || !memcmp(dot - 3, "tid", 3)) && parse_int(ns, ne, &v))
      return put_replaced(o, s, e, ns, ne, dot[-3] == 't' ? shown_task(v) : shown(v));
  }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* The columns of /proc/sysvipc/shm, sem or msg a line's translation
 * rewrites, found by the names of the file's first line (the header): the
 * kernel prints one name per column, each right-aligned over its numbers
 * ("       key      shmid perms ..."), and the columns have been added to
 * and may move (rss and swap came late). Each column's role: the key, the
 * id, and the two PIDs (a segment's cpid and lpid, a queue's lspid and
 * lrpid: the APPSHOT_IPC_* fields 0 and 1; a set has none). */
enum { SYSV_KEY, SYSV_ID, SYSV_PID0, SYSV_PID1, SYSV_ROLES };
struct sysv_columns {
  unsigned char header_seen;
  unsigned char n;                      /* columns found, in column order: */
  unsigned char index[SYSV_ROLES];      /* each one's place in a line */
  unsigned char role[SYSV_ROLES];       /* and what it holds */
};

/* The role of the header's name [s, e) in the file of view `v`, or -1. */
static int sysv_role(enum view v, const char *s, const char *e) {
  static const struct { char name[6]; unsigned char len; unsigned char role; enum view v; } names[] = {
      {"key", 3, SYSV_KEY, VIEW_NONE},       {"shmid", 5, SYSV_ID, VIEW_SYSV_SHM},
      {"semid", 5, SYSV_ID, VIEW_SYSV_SEM},  {"msqid", 5, SYSV_ID, VIEW_SYSV_MSG},
      {"cpid", 4, SYSV_PID0, VIEW_SYSV_SHM}, {"lpid", 4, SYSV_PID1, VIEW_SYSV_SHM},
      {"lspid", 5, SYSV_PID0, VIEW_SYSV_MSG}, {"lrpid", 5, SYSV_PID1, VIEW_SYSV_MSG},
  };
  for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++)
    if ((names[i].v == VIEW_NONE || names[i].v == v) && (size_t)(e - s) == names[i].len &&
        !memcmp(s, names[i].name, names[i].len))
      return names[i].role;
  return -1;
}

/* Reads the header [s, e) into *c: the columns it names, in order. A
 * name given twice: the first. */
static void sysv_header(enum view v, struct sysv_columns *c, const char *s, const char *e) {
  unsigned seen = 0;
  c->header_seen = 1;
  c->n = 0;
  for (unsigned field = 0; field < 256;  field++) {
    while (s < e && is_blank(*s)) s++;
    const char *ts = s;
    while (s < e && !is_blank(*s) && *s != '\n') s++;
    if (s == ts) break;
    int role = sysv_role(v, ts, s);
    if (role < 0 || (seen & (1u << role))) continue;
    seen |= 1u << role;
    c->index[c->n] = (unsigned char)field;
    c->role[c->n++] = (unsigned char)role;
  }
}

/* A line of /proc/sysvipc/shm, sem or msg (the kernel's sysvipc_*_proc_show),
 * its columns those the header named (sysv_header): the object of another
 * application, or of none, left out; the application's with its virtual
 * id, its key as it made it and its PIDs as IPC_STAT shows them
 * (ipc_view_line). Each number is printed as the kernel would,
 * right-aligned in its width (the key and the id "%10d", a PID "%5u")
 * after the same separating blanks, so the columns stay under the
 * header's. The header as it is. A line without a key and an id where the
 * header put them, or a header that names no key or no id (a layout this
 * does not know): left out, as nothing tells whose object it is. */
static char *sysv_line(enum view v, struct sysv_columns *c, char *o, const char *s, const char *e) {
  if (!c->header_seen) {
    sysv_header(v, c, s, e);
    memcpy(o, s, (size_t)(e - s));
    return o + (e - s);
  }
  struct { const char *gap, *s, *e; long v; } f[SYSV_ROLES]; /* the blanks before, the number */
  int at[SYSV_ROLES] = {-1, -1, -1, -1}; /* each role's entry in f */
  const char *t = s;
  int n = 0;
  for (unsigned field = 0; n < c->n; field++) {
    const char *gap = t;
    while (t < e && is_blank(*t)) t++;
    const char *ts = t;
    while (t < e && !is_blank(*t) && *t != '\n') t++;
    if (t == ts) break;
    if (field != c->index[n]) continue;
    f[n].gap = gap, f[n].s = ts, f[n].e = t;
    if (!parse_int(ts, t, &f[n].v)) break;
    at[c->role[n]] = n;
    n++;
  }
  if (n < c->n || at[SYSV_KEY] < 0 || at[SYSV_ID] < 0) return o; /* not in the header's shape */
  long sid = f[at[SYSV_ID]].v;
  int32_t vid, pid[2] = {0, 0};
  key_t key = (key_t)f[at[SYSV_KEY]].v;
  for (int r = SYSV_PID0; r <= SYSV_PID1; r++)
    if (at[r] >= 0) pid[r - SYSV_PID0] = (int32_t)f[at[r]].v;
  int npids = v == VIEW_SYSV_SEM ? 0 : 2;
  if (sid < 0 || sid > INT32_MAX ||
      !ipc_view_line(v == VIEW_SYSV_SHM   ? APPSHOT_SHMID
                     : v == VIEW_SYSV_SEM ? APPSHOT_SEMID
                                          : APPSHOT_MSGID,
                     (int32_t)sid, &vid, &key, pid, npids))
    return o; /* not the application's */
  static const unsigned char width[SYSV_ROLES] = {10, 10, 5, 5};
  for (int i = 0; i < n; i++) {
    int role = c->role[i];
    long shown_v = role == SYSV_KEY ? key : role == SYSV_ID ? vid : pid[role - SYSV_PID0];
    memcpy(o, s, (size_t)(f[i].gap - s));
    o += f[i].gap - s;
    /* The kernel's separator: the blanks before the number but its padding. */
    long len = f[i].e - f[i].s, blanks = f[i].s - f[i].gap;
    long sep = blanks - (len < width[role] ? width[role] - len : 0);
    char num[24], *ne = put_up_to_number(num, num, num, shown_v);
    long pad = width[role] - (ne - num);
    for (long k = 0; k < sep + (pad > 0 ? pad : 0); k++) *o++ = ' ';
    memcpy(o, num, (size_t)(ne - num));
    o += ne - num;
    s = f[i].e;
  }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* What the translation of a file's lines carries from one to the next:
 * what a stat file's CPU times get added (stat_text), or NULL; the columns
 * the header of a /proc/sysvipc file named (sysv_line). */
struct view_state {
  const int64_t *cpu;
  struct sysv_columns sysv;
};

/* One line [s, e), its '\n' included if it has one (a stat file: the
 * whole text; a children file: one "<pid> " item), translated into o (room for e - s + LINE_ROOM bytes).
 * Returns the end of the output. */
static char *translate_line(enum view v, struct view_state *st, char *o, const char *s,
                            const char *e) {
  switch (v) {
    case VIEW_LOCKS: return lock_line(o, s, e);
    case VIEW_FDINFO:
      if (e - s > 5 && !memcmp(s, "lock:", 5)) return lock_line(o, s, e);
      if (e - s > 4 && !memcmp(s, "Pid:", 4)) return pid_field_line(o, s, e, 4);
      if (e - s > 6 && !memcmp(s, "NSpid:", 6))
        return pid_field_line(o, s, e, 6);
      break;
    case VIEW_PIDLIST:
    case VIEW_CHILDREN: { /* "<pid>\n" lines; "<pid> " items */
      const char *ne = s;
      while (ne < e && *ne != '\n' && *ne != ' ') ne++;
      long sys;
      if (parse_int(s, ne, &sys) && sys > 0) {
        long virt = shown(sys);
        if (virt <= 0) return o; /* outside the application: left out */
        return put_replaced(o, s, e, s, ne, virt);
      }
      break;
    }
    case VIEW_STAT: return stat_text(o, s, e, st->cpu);
    case VIEW_STATUS: return status_line(o, s, e);
    case VIEW_SCHED: return sched_line(o, s, e);
    case VIEW_TIMERS: return timers_line(o, s, e);
    case VIEW_SYSV_SEM:
    case VIEW_SYSV_SHM:
    case VIEW_SYSV_MSG: return sysv_line(v, &st->sysv, o, s, e);
    case VIEW_NONE: break;
  }
  memcpy(o, s, (size_t)(e - s));
  return o + (e - s);
}

/* --- Counting the application's SysV objects (ipcs -u) ------------------ */

/* The unsigned decimal [s, e) into *out: 1, or 0 when it is not one. */
static int parse_count(const char *s, const char *e, unsigned long long *out) {
  if (s == e || e - s > 19) return 0;
  unsigned long long v = 0;
  for (; s < e; s++) {
    if (*s < '0' || *s > '9') return 0;
    v = v * 10 + (unsigned long long)(*s - '0');
  }
  *out = v;
  return 1;
}

/* The index of the header's column `name` in [s, e), or -1. */
static int header_index(const char *s, const char *e, const char *name) {
  size_t len = strlen(name);
  for (int field = 0;; field++) {
    while (s < e && is_blank(*s)) s++;
    const char *ts = s;
    while (s < e && !is_blank(*s) && *s != '\n') s++;
    if (s == ts) return -1;
    if ((size_t)(s - ts) == len && !memcmp(ts, name, len)) return field;
  }
}

/* Adds the line [s, e) of /proc/sysvipc/<kind> to *u if its object is the
 * application's: its id at column col[0], the numbers summed at col[1..]. */
static void usage_line(enum appshot_kind kind, const int *col, int ncol, const char *s, const char *e,
                       struct sysv_usage *u, unsigned long page) {
  unsigned long long v[4];
  int found = 0;
  for (int field = 0; found < ncol; field++) {
    while (s < e && is_blank(*s)) s++;
    const char *ts = s;
    while (s < e && !is_blank(*s) && *s != '\n') s++;
    if (s == ts) return;
    for (int i = 0; i < ncol; i++)
      if (col[i] == field) {
        if (!parse_count(ts, s, &v[i])) return;
        found++;
      }
  }
  int32_t vid;
  if (v[0] > INT32_MAX || !appshot_s2v(g_h, kind, (int32_t)v[0], &vid)) return;
  u->objects++;
  if (kind == APPSHOT_SHMID) { /* pages: the kernel's numpages, rss and swap */
    u->sum[0] += (v[1] + page - 1) / page;
    u->sum[1] += v[2] / page;
    u->sum[2] += v[3] / page;
  } else {
    for (int i = 1; i < ncol; i++) u->sum[i - 1] += v[i];
  }
}

int sysv_usage(enum appshot_kind kind, struct sysv_usage *u) {
  static const char *const shm[] = {"shmid", "size", "rss", "swap"}, *const sem[] = {"semid", "nsems"},
                           *const msg[] = {"msqid", "qnum", "cbytes"};
  const char *const *names = kind == APPSHOT_SHMID ? shm : kind == APPSHOT_SEMID ? sem : msg;
  int ncol = kind == APPSHOT_SHMID ? 4 : kind == APPSHOT_SEMID ? 2 : 3;
  const char *path = kind == APPSHOT_SHMID   ? "/proc/sysvipc/shm"
                     : kind == APPSHOT_SEMID ? "/proc/sysvipc/sem"
                                             : "/proc/sysvipc/msg";
  unsigned long page = (unsigned long)getpagesize();
  memset(u, 0, sizeof *u);
  long fd = SYS3(openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  enum { RAW = 2048 };
  char raw[RAW];
  int col[4], header = 0, ok = 1;
  size_t have = 0;
  int eof = 0;
  while (ok && (!eof || have > 0)) {
    if (!eof && have < RAW) {
      long n = SYS3(read, fd, raw + have, RAW - have);
      if (n == -EINTR) continue;
      if (n < 0) ok = 0;
      if (n <= 0) eof = 1;
      else have += (size_t)n;
    }
    size_t start = 0;
    for (;;) {
      const char *nl = memchr(raw + start, '\n', have - start);
      size_t end = nl ? (size_t)(nl - raw) + 1 : (eof ? have : 0);
      if (end <= start) break;
      if (!header) {
        header = 1;
        for (int i = 0; i < ncol; i++) ok &= (col[i] = header_index(raw + start, raw + end, names[i])) >= 0;
      } else if (ok) {
        usage_line(kind, col, ncol, raw + start, raw + end, u, page);
      }
      start = end;
    }
    if (start == 0 && have == RAW) ok = 0; /* a line longer than the buffer: no such file */
    memmove(raw, raw + start, have - start);
    have -= start;
  }
  SYS1(close, fd);
  return ok && header;
}

/* --- The copy ------------------------------------------------------------ */

static long write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    long w = SYS3(write, fd, p, n);
    if (w == -EINTR) continue;
    if (w < 0) return w;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* At most five numbers of up to 10 digits (a stat file's) for others, and
 * four CPU times of up to 20 for the ticks they had (a stat file's). */
enum { LINE_ROOM = 160 };

/* Copies the text of `src` (from its start) into `dst`, translated; `cpu`:
 * what a stat file's CPU times get added (stat_text), or NULL. */
static long copy_translated(enum view v, int src, int dst, const int64_t *cpu) {
  enum { RAW = 2048 };
  struct view_state st = {.cpu = cpu};
  char raw[RAW], out[RAW + LINE_ROOM];
  size_t have = 0, used = 0;
  int eof = 0;
  while (!eof || have > 0) {
    if (!eof && have < RAW) {
      long n = SYS3(read, src, raw + have, RAW - have);
      if (n == -EINTR) continue;
      if (n < 0) return n;
      if (n == 0) eof = 1;
      have += (size_t)n;
    }
    /* The complete lines in raw; at the end of the file, the rest. A line
     * longer than the buffer (none of these files has one) goes through as
     * it is, in pieces. A stat file is one line whose comm may hold '\n'
     * (a few hundred bytes): taken whole at its end. A children file is
     * one line of "<pid> " items: taken item by item. */
    char sep = v == VIEW_CHILDREN ? ' ' : '\n';
    size_t start = 0;
    for (;;) {
      const char *nl = v == VIEW_STAT ? NULL : memchr(raw + start, sep, have - start);
      size_t end = nl ? (size_t)(nl - raw) + 1 : 0;
      if (!nl) {
        if (start < have && (eof || (start == 0 && have == RAW))) end = have;
        else break;
      }
      if (used + (end - start) + LINE_ROOM > sizeof out) {
        long r = write_all(dst, out, used);
        if (r < 0) return r;
        used = 0;
      }
      /* A line of at most RAW bytes grows by at most LINE_ROOM. */
      used = (size_t)(translate_line(v, &st, out + used, raw + start, raw + end) - out);
      start = end;
    }
    memmove(raw, raw + start, have - start);
    have -= start;
  }
  return write_all(dst, out, used);
}

/* Puts the translated copy of the file `fd` holds in its place, the
 * file of process (and thread) `who` for /proc's. Returns 0, or -errno
 * (fd then still holds the kernel's file). Called inside an id window
 * (view_fill_named): system PIDs read, not yet translated. `name`: the
 * memfd's (write_through_name). Its own frame: the copy's buffers are not
 * under view_of_descriptor's link buffer. */
static NOINLINE long substitute(int fd, enum view v, const struct view_owner *who, const char *name) {
  long fdflags = SYS2(fcntl, fd, F_GETFD);
  long flflags = SYS2(fcntl, fd, F_GETFL);
  if (fdflags < 0) return fdflags;
  if (flflags < 0) return flflags;
  long mem = SYS2(memfd_create, name, MFD_CLOEXEC);
  if (mem < 0) return mem;
  int64_t cpu[4];
  long r = copy_translated(v, fd, (int)mem, v == VIEW_STAT && cpu_stat_offsets(who->pid, who->tid, cpu) ? cpu : NULL);
  /* Read-only, with the kernel's descriptor's status flags, at its number. */
  long ro = -1;
  if (r == 0) {
    char link[40] = "/proc/self/fd/";
    *put_decimal(link + 14, (unsigned long)mem) = '\0';
    ro = SYS3(openat, AT_FDCWD, link, O_RDONLY | O_CLOEXEC | (flflags & O_NONBLOCK));
    if (ro < 0) { /* no /proc: the memfd itself, at its start */
      r = SYS3(lseek, mem, 0, SEEK_SET);
      ro = mem;
      mem = -1;
    }
  }
  if (r == 0) r = SYS3(dup3, ro, fd, (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0);
  if (ro >= 0) SYS1(close, ro);
  if (mem >= 0) SYS1(close, mem);
  return r < 0 ? r : 0;
}

/* --- Which file an open reached ------------------------------------------ */

/* What the last name of an opened path says the file may be, before its
 * descriptor is asked: one of /proc's (stat, status, sched, children,
 * timers, locks, shm, sem, msg), one of a cgroup's lists (cgroup.procs,
 * cgroup.threads, tasks), or either (a number: /proc/<pid>/fdinfo/<n>, or
 * a descriptor reopened through /proc/self/fd/<n> or /dev/fd/<n>, an O_PATH
 * one of any of those files among them; and /dev/stdin, stdout and
 * stderr, links to /proc/self/fd/0, 1 and 2, which may hold one after a
 * dup2). */
enum name { NAME_OTHER = 0, NAME_PROC = 1, NAME_CGROUP = 2, NAME_ANY = 3 };

static int pidlist_name(const char *base) {
  return !strcmp(base, "cgroup.procs") || !strcmp(base, "cgroup.threads") || !strcmp(base, "tasks");
}

/* A few compares, for every open: the only cost an open of any other
 * name pays. */
static enum name viewed_name(const char *path) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  switch (base[0]) {
    case 's':
      if (!strcmp(base, "stat") || !strcmp(base, "status") || !strcmp(base, "sched") || !strcmp(base, "shm") ||
          !strcmp(base, "sem"))
        return NAME_PROC;
      /* /dev/stdin, stdout, stderr: links to /proc/self/fd/<0-2> */
      return !strcmp(base, "stdin") || !strcmp(base, "stdout") || !strcmp(base, "stderr") ? NAME_ANY : NAME_OTHER;
    case 'm': return !strcmp(base, "msg") ? NAME_PROC : NAME_OTHER;
    case 'l': return !strcmp(base, "locks") ? NAME_PROC : NAME_OTHER;
    case 'c':
      return !strcmp(base, "children") ? NAME_PROC : pidlist_name(base) ? NAME_CGROUP : NAME_OTHER;
    case 't': return !strcmp(base, "timers") ? NAME_PROC : pidlist_name(base) ? NAME_CGROUP : NAME_OTHER;
    default:
      if (base[0] < '0' || base[0] > '9') return NAME_OTHER;
      for (const char *d = base; *d; d++)
        if (*d < '0' || *d > '9') return NAME_OTHER;
      return NAME_ANY;
  }
}

/* A process's or thread's id [s, s + n) (no sign, no leading zero, an
 * int32): it, or 0. */
static int32_t link_id(const char *s, size_t n) {
  if (n == 0 || n > 10 || s[0] < '1' || s[0] > '9') return 0;
  int64_t v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    v = v * 10 + (s[i] - '0');
  }
  return v <= INT32_MAX ? (int32_t)v : 0;
}

struct name_span {
  const char *s;
  size_t n;
};

static int span_is(struct name_span c, const char *name) {
  return strlen(name) == c.n && !memcmp(c.s, name, c.n);
}

/* The view of the file of procfs whose link (the kernel's, with system
 * ids) is link[0, n), by its last names only, wherever that procfs is
 * mounted: ".../locks", ".../sysvipc/<shm|sem|msg>" (no other file of
 * procfs has those names: /proc/sys/kernel/sem is ".../kernel/sem"),
 * ".../<pid>[/task/<tid>]/<stat|status|sched|children|timers>" and
 * ".../<pid>[/task/<tid>]/fdinfo/<n>" (/proc/stat is ".../proc/stat": no
 * number before it); *who the ids the link names. */
static enum view view_of_proc_link(const char *link, size_t n, struct view_owner *who) {
  struct name_span c[5]; /* the last names, the last first */
  int k = 0;
  for (const char *e = link + n; k < 5;) {
    const char *s = e;
    while (s > link && s[-1] != '/') s--;
    c[k].s = s, c[k].n = (size_t)(e - s), k++;
    if (s <= link + 1) break;
    e = s - 1;
  }
  if (k < 2) return VIEW_NONE;
  if (span_is(c[0], "locks")) return VIEW_LOCKS;
  if (span_is(c[1], "sysvipc"))
    return span_is(c[0], "shm")   ? VIEW_SYSV_SHM
           : span_is(c[0], "sem") ? VIEW_SYSV_SEM
           : span_is(c[0], "msg") ? VIEW_SYSV_MSG
                                  : VIEW_NONE;
  enum view v = VIEW_NONE;
  int dir = 1; /* c[dir]: the process's or thread's id */
  if (span_is(c[1], "fdinfo")) {
    if (c[0].n == 0) return VIEW_NONE;
    for (size_t i = 0; i < c[0].n; i++)
      if (c[0].s[i] < '0' || c[0].s[i] > '9') return VIEW_NONE;
    v = VIEW_FDINFO;
    dir = 2;
  } else if (span_is(c[0], "stat")) {
    v = VIEW_STAT;
  } else if (span_is(c[0], "status")) {
    v = VIEW_STATUS;
  } else if (span_is(c[0], "sched")) {
    v = VIEW_SCHED;
  } else if (span_is(c[0], "children")) { /* only under task/<tid> */
    v = VIEW_CHILDREN;
  } else if (span_is(c[0], "timers")) {
    v = VIEW_TIMERS;
  }
  int32_t id = dir < k ? link_id(c[dir].s, c[dir].n) : 0;
  if (v == VIEW_NONE || !id) return VIEW_NONE;
  int32_t pid = dir + 2 < k && span_is(c[dir + 1], "task") ? link_id(c[dir + 2].s, c[dir + 2].n) : 0;
  who->pid = pid ? pid : id;
  who->tid = pid ? id : 0;
  return v;
}

/* Which view the open descriptor `fd` needs, by the file itself, for a
 * name (`path`) viewed_name did not rule out: its file system (statfs: procfs, or
 * a cgroup's), then its link (/proc/self/fd/<fd>: the path the kernel
 * resolved, with system ids) for /proc's files. The name it was opened by
 * cannot say, however plain it is made: a ".." after a directory whose
 * parent the name does not tell (/proc/sys/../self/stat), a symbolic link
 * to /proc or into it (/proc/self/root/proc/..., a link of the
 * application's own to /proc/self), a directory descriptor of /proc
 * opened any of those ways, a descriptor reopened through
 * /proc/self/fd/<n>: the kernel resolves them all to one file, and which
 * process's file it is (*who) is the link's to say, not the name's. A
 * cgroup's list by a name of its own: its file system is enough. What is
 * not covered is a symbolic link to one of the files themselves under
 * another name, which no name shows; and a /proc not reachable as /proc
 * (no link to read): VIEW_NONE. Its own frame: the link buffer costs the
 * stack only here, not under the copy's buffers. */
static NOINLINE enum view view_of_descriptor(int fd, const char *path, enum name name, struct view_owner *who) {
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0) return VIEW_NONE;
  enum name fs = sf.f_type == PROC_SUPER_MAGIC ? NAME_PROC
                 : sf.f_type == CGROUP2_SUPER_MAGIC || sf.f_type == CGROUP_SUPER_MAGIC ? NAME_CGROUP
                                                                                      : NAME_OTHER;
  /* A file of another file system mounted over one of /proc's (as LXCFS
   * mounts its own over /proc/meminfo & co.) is what that name reads:
   * its link says which, asked only when the name is /proc's. */
  int over_proc = fs == NAME_OTHER && (name & NAME_PROC) && !strncmp(path, "/proc/", 6);
  if (!(fs & name) && !over_proc) return VIEW_NONE;
  if (fs == NAME_CGROUP && name == NAME_CGROUP) return VIEW_PIDLIST;
  char self[32] = "/proc/self/fd/", link[PATH_MAX];
  *put_decimal(self + 14, (unsigned long)fd) = '\0';
  long n = SYS4(readlinkat, AT_FDCWD, self, link, sizeof link - 1);
  if (n <= 0 || n >= (long)sizeof link - 1) return VIEW_NONE;
  link[n] = '\0';
  if (fs == NAME_CGROUP) {
    const char *base = strrchr(link, '/');
    return pidlist_name(base ? base + 1 : link) ? VIEW_PIDLIST : VIEW_NONE;
  }
  if (over_proc && strncmp(link, "/proc/", 6)) return VIEW_NONE;
  return view_of_proc_link(link, (size_t)n, who);
}

/* The files nobody may write (no write bit: /proc/locks and sysvipc's, a
 * process's stat, status, timers and fdinfo/<n>, a thread's children):
 * root opens them read-write too (CAP_DAC_OVERRIDE), the kernel lets it
 * read and refuses its writes (EINVAL). The copy is read-only: a write
 * fails with EBADF instead. Not a cgroup's list (written to move
 * processes) nor a sched file (written to reset it): written through. */
static int read_only_file(enum view v) {
  return v != VIEW_PIDLIST && v != VIEW_SCHED;
}

/* --- Written through: a cgroup's list or a sched file read-write --------
 *
 * Root opens a cgroup's cgroup.procs, cgroup.threads or tasks read-write
 * (and anyone its own sched file): what it reads must be the view, and
 * what it writes must reach the kernel's file (a PID, translated, moves
 * that process; any write to sched resets its counters). The descriptor
 * holds the view's copy, read-only, and is marked as a cgroup list's
 * descriptors are (preload_cgroup.c): write() on it opens the kernel's
 * file again and writes there (view_write_through). Which file, the copy
 * says itself: its memfd's name, "appshot-view:<path>", the path in
 * virtual ids (a sched file's process by its virtual PID, which a restore
 * keeps), so that a dup of the descriptor, or one inherited by a fork,
 * writes through too, and nothing is kept beside it. Writes that do not
 * pass write() (stdio's, pwrite, writev; after an exec, which forgets
 * the mark) reach the read-only copy and fail (EBADF): never a virtual
 * PID given to the kernel as a system one. */
#define VIEW_NAME "appshot-view"
#define THROUGH_PREFIX VIEW_NAME ":"
enum { THROUGH_PREFIX_LEN = sizeof THROUGH_PREFIX - 1, VIEW_NAME_MAX = 250 /* memfd_create's 249, and the NUL */ };

/* The memfd's name for the view `v` of `fd` opened read-write, into
 * name[VIEW_NAME_MAX]: 0, or -errno (-ENAMETOOLONG: a path too long for a
 * memfd's name, or one that names another file from here; the kernel's
 * descriptor then stays, view_fill_named). A sched file of a process
 * outside the application keeps the plain name: read, its view; written,
 * refused. Its own frame: the link buffer costs the stack only here. */
static NOINLINE long write_through_name(int fd, enum view v, const struct view_owner *who, char name[VIEW_NAME_MAX]) {
  char *d = (char *)memcpy(name, THROUGH_PREFIX, THROUGH_PREFIX_LEN) + THROUGH_PREFIX_LEN;
  if (v == VIEW_SCHED) {
    int32_t vpid, vtid = 0;
    /* The caller's own thread, not mapped until it asks its TID, maps as
     * gettid() would map it (shown_task; r388 L2). */
    if (who->tid && !appshot_s2v(g_h, APPSHOT_PID, who->tid, &vtid) && who->tid == SYS0(gettid)) vtid = self_vtid();
    if (!appshot_s2v(g_h, APPSHOT_PID, who->pid, &vpid) || (who->tid && !vtid)) {
      strcpy(name, VIEW_NAME);
      return 0;
    }
    d = put_decimal((char *)memcpy(d, "/proc/", 6) + 6, (unsigned long)vpid);
    if (vtid) d = put_decimal((char *)memcpy(d, "/task/", 6) + 6, (unsigned long)vtid);
    strcpy(d, "/sched");
    return 0;
  }
  char self[32] = "/proc/self/fd/", link[PATH_MAX];
  *put_decimal(self + 14, (unsigned long)fd) = '\0';
  long n = SYS4(readlinkat, AT_FDCWD, self, link, sizeof link);
  if (n < 0) return n;
  if (n >= VIEW_NAME_MAX - THROUGH_PREFIX_LEN || link[0] != '/') return -ENAMETOOLONG;
  link[n] = '\0';
  /* The link's text is a name from the root of the mount it was opened
   * in: opened through a directory from before a chroot, or from another
   * mount namespace, it may name another file here (another cgroup's
   * list, which the write would move the process into: r403 L5). The
   * name must lead to the file itself (one stat, at the open), else it is
   * no name for it: as one too long. */
  struct stat named, opened;
  if (SYS4(newfstatat, AT_FDCWD, link, &named, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0 || SYS2(fstat, fd, &opened) != 0 ||
      named.st_dev != opened.st_dev || named.st_ino != opened.st_ino)
    return -ENAMETOOLONG;
  memcpy(d, link, (size_t)n + 1);
  return 0;
}

#define TMPFS_MAGIC 0x01021994

int view_write_through(int fd, const char *buf, size_t count, ssize_t *result) {
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0 || sf.f_type != TMPFS_MAGIC) return 0;
  /* The link is "/memfd:<name> (deleted)": a name longer than a memfd's
   * is no view's. */
  char self[32] = "/proc/self/fd/", link[VIEW_NAME_MAX + 32], sys[PATH_MAX];
  *put_decimal(self + 14, (unsigned long)fd) = '\0';
  static const char memfd[] = "/memfd:" THROUGH_PREFIX, deleted[] = " (deleted)";
  enum { MEMFD = sizeof memfd - 1, DELETED = sizeof deleted - 1 };
  long n = SYS4(readlinkat, AT_FDCWD, self, link, sizeof link - 1);
  if (n <= MEMFD + DELETED || n >= (long)sizeof link - 1 || memcmp(link, memfd, MEMFD) ||
      memcmp(link + n - DELETED, deleted, DELETED))
    return 0;
  link[n - DELETED] = '\0';
  /* A name we gave: an absolute path to a cgroup's list or a sched file
   * (a memfd the application named so and put at a marked number by a
   * raw dup2 is refused here, or by the checks of what opened). */
  const char *source = link + MEMFD, *base = strrchr(source, '/');
  /* Our names are plain (a link's text, or "/proc/<vpid>/sched"): one
   * with "..", "." or "//" is no name of ours (r388 L1). */
  if (source[0] != '/' || path_unplain(source) || (!pidlist_name(base + 1) && strcmp(base + 1, "sched"))) {
    *result = fail(EBADF);
    return 1;
  }
  base++;
  const char *p = proc_path(source, sys);
  if (!p) {
    *result = fail(errno);
    return 1;
  }
  /* What it is, asked before it is opened for writing (r388 L1): a
   * cgroup's list, or a sched file of /proc; then opened again for
   * writing through the descriptor looked at. */
  long t = SYS4(openat, AT_FDCWD, p, O_PATH | O_CLOEXEC | O_NOFOLLOW, 0);
  if (t < 0) {
    *result = libc_ret(t);
    return 1;
  }
  int cgroup_list = 0, sched = 0;
  if (SYS2(fstatfs, t, &sf) != 0) sf.f_type = 0;
  if (sf.f_type == CGROUP2_SUPER_MAGIC || sf.f_type == CGROUP_SUPER_MAGIC) cgroup_list = pidlist_name(base);
  else sched = sf.f_type == PROC_SUPER_MAGIC && !strcmp(base, "sched");
  long w = -EBADF;
  if (cgroup_list || sched) {
    *put_decimal(self + 14, (unsigned long)t) = '\0';
    w = SYS4(openat, AT_FDCWD, self, O_WRONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0);
  }
  SYS1(close, t);
  if (w < 0) {
    *result = libc_ret(w);
    return 1;
  }
  *result = cgroup_list ? cgroup_write_ids((int)w, buf, count) : libc_ret(SYS3(write, w, buf, count));
  SYS1(close, w);
  return 1;
}

/* The view for `fd`, opened by a name viewed_name did not rule out. One
 * window from the link's read to the copy's end: the link and the text
 * hold system ids, which a restore in between would make another's. */
static NOINLINE long view_fill_named(int fd, const char *path, enum name name, int access) {
  ID_WINDOW();
  struct view_owner who = {0, 0};
  enum view v = view_of_descriptor(fd, path, name, &who);
  if (v == VIEW_NONE) return 0;
  int through = access == O_RDWR && !read_only_file(v);
  /* A descriptor past the marks' table could never write through. A
   * sched file's writes hold no id: the kernel's descriptor stays, as
   * before views read-write (its reads untranslated; review r388 M4). A
   * cgroup list's would be virtual PIDs read as system ones: its view
   * stays, and its writes fail (EBADF). */
  if (through && v == VIEW_SCHED && !cgroup_procs_markable(fd)) return 0;
  char memfd_name[VIEW_NAME_MAX] = VIEW_NAME;
  long r = through ? write_through_name(fd, v, &who, memfd_name) : 0;
  if (r == -ENAMETOOLONG) {
    /* A path no memfd's name holds (or that names another file from
     * here: r403 L5): the kernel's descriptor stays where
     * its writes are translated (marked at its open, cgroup_procs_opened)
     * or hold no id (sched). Past the marks' table, a cgroup list's view
     * stays, read-only: its writes fail (EBADF) rather than hand the
     * kernel virtual PIDs as system ones (review r403 M1). */
    if (v == VIEW_SCHED || cgroup_procs_markable(fd)) return 0;
    through = 0;
    r = 0;
    strcpy(memfd_name, VIEW_NAME);
  }
  if (r == 0) r = substitute(fd, v, &who, memfd_name);
  if (r == 0 && through) cgroup_procs_mark(fd, 1);
  return r;
}

long view_fill(int fd, const char *path, int flags) {
  int access = flags & O_ACCMODE;
  if (fd < 0 || !g_h || !path || (access != O_RDONLY && access != O_RDWR) ||
      (flags & (O_PATH | O_DIRECTORY)))
    return 0;
  enum name name = viewed_name(path);
  if (LIKELY(name == NAME_OTHER)) return 0;
  return view_fill_named(fd, path, name, access);
}

int view_opened(int fd, const char *path, int flags) {
  long r = view_fill(fd, path, flags);
  if (r < 0) {
    cgroup_procs_forget(fd); /* marked by the open (r388 L4): the number is free again */
    SYS1(close, fd);
    return (int)fail((int)-r);
  }
  return fd;
}
