/*
 * exec and posix_spawn: the new program must stay in the application.
 *
 * An application that builds its own environment (execle, a daemon that
 * clears it, a shell's `env -i`) would otherwise drop LD_PRELOAD or the
 * APPSHOT_* variables, and its next program would see real ids: an escape
 * from the application. So each exec gets our variables: LD_PRELOAD,
 * APPSHOT_TABLES and APPSHOT_AID as they were when this process started,
 * and APPSHOT_TABLES_FD, the number of our descriptor of the table file as
 * it is now (preload_fd.c).
 */
#include "preload.h"

#include <alloca.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

extern char **environ;

static char g_lib[PATH_MAX];             /* this library's path */
static char g_env_ld[PATH_MAX * 2 + 12]; /* "LD_PRELOAD=..." */
static char g_env_tables[PATH_MAX + 16]; /* "APPSHOT_TABLES=..." */
static char g_env_aid[APPSHOT_AID_MAX + 16];

#define ENV_STACK_MAX (256 * 1024) /* beyond: mmap, not the stack */

static int copy_str(char *dst, size_t cap, const char *a, const char *b,
                    const char *c) {
  size_t la = strlen(a), lb = strlen(b), lc = c ? strlen(c) : 0;
  if (la + lb + lc + 1 > cap) return 0;
  memcpy(dst, a, la);
  memcpy(dst + la, b, lb);
  if (c) memcpy(dst + la + lb, c, lc);
  dst[la + lb + lc] = '\0';
  return 1;
}

/* Called by init (before the tables are mapped, so that exec works the same
 * even if mapping fails: then nothing is added). */
void exec_capture_env(void) {
  Dl_info info;
  if (!dladdr((void *)&exec_capture_env, &info) || !info.dli_fname ||
      !copy_str(g_lib, sizeof g_lib, info.dli_fname, "", NULL))
    g_lib[0] = '\0';
  const char *tables = getenv("APPSHOT_TABLES"), *aid = getenv("APPSHOT_AID");
  const char *ld = getenv("LD_PRELOAD");
  if (!tables || !aid || !g_lib[0] ||
      !copy_str(g_env_tables, sizeof g_env_tables, "APPSHOT_TABLES=", tables,
                NULL) ||
      !copy_str(g_env_aid, sizeof g_env_aid, "APPSHOT_AID=", aid, NULL))
    goto off;
  if (ld && strstr(ld, g_lib)) {
    if (!copy_str(g_env_ld, sizeof g_env_ld, "LD_PRELOAD=", ld, NULL)) goto off;
  } else if (!copy_str(g_env_ld, sizeof g_env_ld, "LD_PRELOAD=", g_lib, NULL)) {
    goto off;
  }
  return;
off:
  g_env_tables[0] = '\0';
}

static int starts(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Our two identity variables as they stand now. A restored process's
 * memory holds the ones it started with, while the application may have
 * come back under another AID with another table file: the table's
 * instance section names the file and its header the AID. Before the
 * instance has a path (tables of an older appshot), the strings of init. */
struct app_ids {
  const char *tables; /* the value of APPSHOT_TABLES */
  const char *aid;    /* the value of APPSHOT_AID */
  size_t tables_len, aid_len;
};

static void app_ids(struct app_ids *ids) {
  const struct appshot_header *h = g_h;
  if (h && h->instance.tables_path[0]) {
    ids->tables = h->instance.tables_path;
    ids->tables_len = strnlen(ids->tables, APPSHOT_PATH_MAX - 1);
    ids->aid = h->aid;
    ids->aid_len = strnlen(h->aid, APPSHOT_AID_MAX);
  } else {
    ids->tables = g_env_tables + 15;
    ids->tables_len = strlen(ids->tables);
    ids->aid = g_env_aid + 12;
    ids->aid_len = strlen(ids->aid);
  }
}

/* Whether `e` is "<prefix><value>" exactly (value not NUL-terminated). */
static int is_var(const char *e, const char *prefix, size_t pl,
                  const char *value, size_t vl) {
  return strncmp(e, prefix, pl) == 0 && strncmp(e + pl, value, vl) == 0 &&
         e[pl + vl] == '\0';
}

/* Whether a forced "NAME=value" names a variable the dynamic loader or a
 * shell runs code from (src/template/rules.ts runsCode, which refuses them
 * in rules and images; this is the same list, for an instance written by
 * an older appshot): every LD_ variable, GCONV_PATH, BASH_ENV, ENV,
 * SHELLOPTS, BASHOPTS, PROMPT_COMMAND and bash's exported functions. */
static int env_runs_code(const char *e) {
  return starts(e, "LD_") || starts(e, "GCONV_PATH=") ||
         starts(e, "BASH_ENV=") || starts(e, "ENV=") ||
         starts(e, "SHELLOPTS=") || starts(e, "BASHOPTS=") ||
         starts(e, "PROMPT_COMMAND=") || starts(e, "BASH_FUNC_");
}

/* SET ENV entry i of the instance, if it is a well-formed "NAME=value"
 * that is not one of ours (those the application cannot override) nor one
 * that runs code; sets *name_len to the length of "NAME=". */
static const char *instance_env(const struct appshot_instance *in, uint32_t i,
                                size_t *name_len) {
  const char *e = in->env[i];
  size_t len = strnlen(e, APPSHOT_ENV_LEN);
  const char *eq = memchr(e, '=', len);
  if (len == APPSHOT_ENV_LEN || !eq || eq == e || env_runs_code(e) ||
      starts(e, "APPSHOT_TABLES=") || starts(e, "APPSHOT_TABLES_FD=") ||
      starts(e, "APPSHOT_AID="))
    return NULL;
  *name_len = (size_t)(eq - e) + 1;
  return e;
}

static uint32_t instance_envs(void) {
  const struct appshot_header *h = g_h;
  if (!h) return 0;
  uint32_t n = h->instance.envs;
  return n < APPSHOT_ENVS ? n : APPSHOT_ENVS;
}

/* Whether the instance forces a value for envp entry e's variable. */
static int forced(const char *e, uint32_t envs) {
  for (uint32_t i = 0; i < envs; i++) {
    size_t nl;
    const char *f = instance_env(&g_h->instance, i, &nl);
    if (f && strncmp(e, f, nl) == 0) return 1;
  }
  return 0;
}

#define TABLES_VAR "APPSHOT_TABLES="
#define AID_VAR "APPSHOT_AID="
#define FD_VAR "APPSHOT_TABLES_FD="
#define FD_VAR_MAX (18 + 11) /* with the digits of an int and the NUL */

/* "APPSHOT_TABLES_FD=<our descriptor>" in buf, or "" without one. */
static size_t fd_var(char buf[FD_VAR_MAX]) {
  int fd = __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED);
  if (fd < 0) {
    buf[0] = '\0';
    return 0;
  }
  memcpy(buf, FD_VAR, 18);
  char *end = put_decimal(buf + 18, (unsigned long)fd);
  *end = '\0';
  return (size_t)(end - buf);
}

/* Bytes app_env_build needs for envp, or 0 when envp keeps us in already
 * and the instance forces no variable. */
static size_t app_env_size(char *const *envp) {
  if (!g_h || !g_env_tables[0]) return 0;
  struct app_ids ids;
  app_ids(&ids);
  uint32_t envs = instance_envs();
  char fd_now[FD_VAR_MAX];
  size_t fd_len = fd_var(fd_now);
  size_t n = 0;
  int tables = 0, aid = 0, fd = 0, fd_stale = 0;
  const char *ld = NULL;
  for (; envp && envp[n]; n++) {
    if (is_var(envp[n], TABLES_VAR, 15, ids.tables, ids.tables_len)) tables = 1;
    else if (is_var(envp[n], AID_VAR, 12, ids.aid, ids.aid_len)) aid = 1;
    else if (fd_len && strcmp(envp[n], fd_now) == 0) fd = 1;
    else if (starts(envp[n], FD_VAR)) fd_stale = 1;
    else if (!ld && starts(envp[n], "LD_PRELOAD=")) ld = envp[n];
  }
  if (tables && aid && (fd || !fd_len) && !fd_stale && ld &&
      strstr(ld, g_lib) && !envs)
    return 0;
  /* The pointers, then the strings: our three variables and a merged
   * "LD_PRELOAD=ours theirs" (the forced variables are pointed at where
   * they are, in the table file, which outlives the exec). */
  return (n + 5 + envs) * sizeof(char *) + (15 + ids.tables_len + 1) +
         (12 + ids.aid_len + 1) + FD_VAR_MAX + sizeof g_env_ld +
         (ld ? strlen(ld) : 0) + 1;
}

/* The environment to exec with: envp minus our variables (and a LD_PRELOAD
 * that lacks us) and minus the variables the instance forces, plus ours and
 * those. A LD_PRELOAD of the application's own is kept, after our library. */
static char *const *app_env_build(char *const *envp, void *mem, size_t need) {
  if (!mem) return envp; /* no memory: the best we can do */
  struct app_ids ids;
  app_ids(&ids);
  uint32_t envs = instance_envs();
  size_t count = 0;
  while (envp && envp[count]) count++;
  char **out = mem;
  char *str = (char *)mem + (count + 5 + envs) * sizeof(char *);
  char *end = (char *)mem + need;
  char *tables_var = str;
  memcpy(str, TABLES_VAR, 15);
  memcpy(str + 15, ids.tables, ids.tables_len);
  str[15 + ids.tables_len] = '\0';
  str += 15 + ids.tables_len + 1;
  char *aid_var = str;
  memcpy(str, AID_VAR, 12);
  memcpy(str + 12, ids.aid, ids.aid_len);
  str[12 + ids.aid_len] = '\0';
  str += 12 + ids.aid_len + 1;
  char *fd_var_str = str;
  str += fd_var(fd_var_str) + 1;
  size_t n = 0;
  const char *ld = g_env_ld;
  int seen_ld = 0; /* a second LD_PRELOAD is dead weight: getenv sees one */
  for (size_t i = 0; i < count; i++) {
    const char *e = envp[i];
    if (starts(e, TABLES_VAR) || starts(e, AID_VAR) || starts(e, FD_VAR))
      continue;
    if (starts(e, "LD_PRELOAD=")) {
      if (seen_ld++) continue;
      if (strstr(e, g_lib)) ld = e;
      else if (e[11]) {
        copy_str(str, (size_t)(end - str), g_env_ld, " ", e + 11);
        ld = str;
      }
      continue;
    }
    if (envs && forced(e, envs)) continue;
    out[n++] = (char *)e;
  }
  out[n++] = (char *)ld;
  out[n++] = tables_var;
  out[n++] = aid_var;
  if (fd_var_str[0]) out[n++] = fd_var_str;
  for (uint32_t i = 0; i < envs; i++) {
    size_t nl;
    const char *f = instance_env(&g_h->instance, i, &nl);
    if (f) out[n++] = (char *)f;
  }
  out[n] = NULL;
  return out;
}

static void *app_env_mmap(size_t need) {
  long p = appshot_raw_syscall(SYS_mmap, 0, (long)need, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p < 0 && p > -4096 ? NULL : (void *)p;
}

/* Declares `var`: envp fixed up, on the caller's stack (alloca must live in
 * the frame that execs). */
#define APP_ENV(var, envp)                                                  \
  size_t var##_need = app_env_size(envp);                                       \
  char *const *var = (envp);                                                \
  if (var##_need)                                                           \
  var = app_env_build((envp),                                                   \
                  var##_need <= ENV_STACK_MAX ? alloca(var##_need)          \
                                              : app_env_mmap(var##_need),       \
                  var##_need)

API int execve(const char *path, char *const argv[], char *const envp[]) {
  ensure_init();
  tables_fd_keep_across_exec();
  sem_undo_before_exec();
  APP_ENV(env, envp);
  struct dnotify_exec closing;
  dnotify_exec_closing(&closing);
  int r = REAL(execve)(path, argv, env);
  if (UNLIKELY(closing.n)) dnotify_exec_failed(&closing);
  return r;
}

API int execvpe(const char *file, char *const argv[], char *const envp[]) {
  ensure_init();
  tables_fd_keep_across_exec();
  sem_undo_before_exec();
  APP_ENV(env, envp);
  struct dnotify_exec closing;
  dnotify_exec_closing(&closing);
  int r = REAL(execvpe)(file, argv, env);
  if (UNLIKELY(closing.n)) dnotify_exec_failed(&closing);
  return r;
}

API int fexecve(int fd, char *const argv[], char *const envp[]) {
  ensure_init();
  tables_fd_keep_across_exec();
  sem_undo_before_exec();
  APP_ENV(env, envp);
  struct dnotify_exec closing;
  dnotify_exec_closing(&closing);
  int r = REAL(fexecve)(fd, argv, env);
  if (UNLIKELY(closing.n)) dnotify_exec_failed(&closing);
  return r;
}

API int execv(const char *path, char *const argv[]) {
  return execve(path, argv, environ);
}

API int execvp(const char *file, char *const argv[]) {
  return execvpe(file, argv, environ);
}

/* execl and co.: the variadic list as an argv on the stack. */
#define ARGV_MAX (128 * 1024)
#define COLLECT_ARGV(argv, arg0, envp_out)                         \
  size_t argc_ = 1;                                                \
  va_list ap;                                                      \
  va_start(ap, arg0);                                              \
  while (va_arg(ap, const char *)) argc_++;                        \
  va_end(ap);                                                      \
  if (argc_ >= ARGV_MAX) {                                         \
    errno = E2BIG;                                                 \
    return -1;                                                     \
  }                                                                \
  char **argv = alloca((argc_ + 1) * sizeof(char *));              \
  argv[0] = (char *)arg0;                                          \
  va_start(ap, arg0);                                              \
  for (size_t i_ = 1; i_ <= argc_; i_++)                           \
    argv[i_] = va_arg(ap, char *);                                 \
  envp_out;                                                        \
  va_end(ap)

API int execl(const char *path, const char *arg0, ...) {
  COLLECT_ARGV(argv, arg0, (void)0);
  return execve(path, argv, environ);
}

API int execlp(const char *file, const char *arg0, ...) {
  COLLECT_ARGV(argv, arg0, (void)0);
  return execvpe(file, argv, environ);
}

API int execle(const char *path, const char *arg0, ...) {
  char *const *envp;
  COLLECT_ARGV(argv, arg0, envp = va_arg(ap, char *const *));
  return execve(path, argv, envp);
}

/* --- posix_spawn ----------------------------------------------------------
 *
 * The parent maps the child, and the new program maps itself at start: the
 * two may come in either order, and the table lands them on one entry, as
 * with fork (see preload_pid.c).
 *
 * The process group of POSIX_SPAWN_SETPGROUP: glibc 2.36 makes the child
 * with clone3(CLONE_VM|CLONE_VFORK), and the child calls glibc's internal
 * __setpgid(0, attr's group), a bare system call that never reaches our
 * setpgid. The attribute holds the group as the application gave it (a
 * virtual PID: posix_spawnattr_getpgroup hands it back as it was set), and
 * the spawn translates it, in the parent, into a copy of the attribute it
 * hands glibc: at the moment of use, so that an attribute set before a
 * snapshot names the group's new system PID after a restore. No other
 * attribute (flags, signal masks, scheduling parameters and policy) and no
 * file action (descriptors, paths, a directory, a terminal's descriptor)
 * carries a process id. */

static char *const empty_env[] = {NULL};

static int spawned(int rc, pid_t spid, pid_t *pid) {
  if (rc == 0 && g_h) {
    int32_t v = appshot_map_system(g_h, APPSHOT_PID, spid, 0, 0);
    if (v >= 0) landlock_note_child(spid);
    spid = v >= 0 ? v : spid;
  }
  if (rc == 0 && pid) *pid = spid;
  return rc;
}

/* `attr` as the spawn hands it to glibc, in `copy`: its process group
 * made the system's, and the child's signal mask `mask` (the caller's)
 * unless the attribute sets one. 0, or EPERM for a group the application
 * does not hold (what the child's setpgid would say of a group that does
 * not exist). Inside the caller's translation window. *masked: whether
 * the copy gives the child its mask, so that the caller may block every
 * signal across the spawn (an attribute whose flags glibc's setter
 * refuses, set by hand: not). */
static int spawn_attr(const posix_spawnattr_t *attr, posix_spawnattr_t *copy,
                      const posix_spawnattr_t **use, const sigset_t *mask, int *masked) {
  *use = attr;
  *masked = 0;
  if (!g_h) return 0;
  short flags = 0;
  if (attr) {
    memcpy(copy, attr, sizeof *copy);
    posix_spawnattr_getflags(copy, &flags);
  } else {
    posix_spawnattr_init(copy); /* glibc's fills the struct, allocates nothing */
  }
  pid_t vgroup, sgroup;
  if ((flags & POSIX_SPAWN_SETPGROUP) && posix_spawnattr_getpgroup(copy, &vgroup) == 0 && vgroup > 0) {
    if (!v2s_pid(vgroup, &sgroup)) return EPERM;
    posix_spawnattr_setpgroup(copy, sgroup);
  }
  if (flags & POSIX_SPAWN_SETSIGMASK) {
    *masked = 1;
  } else if (posix_spawnattr_setflags(copy, (short)(flags | POSIX_SPAWN_SETSIGMASK)) == 0) {
    posix_spawnattr_setsigmask(copy, mask);
    *masked = 1;
  }
  *use = copy;
  return 0;
}

typedef int spawn_fn(pid_t *restrict, const char *restrict,
                     const posix_spawn_file_actions_t *,
                     const posix_spawnattr_t *restrict, char *const[restrict],
                     char *const[restrict]);

/* posix_spawn or posix_spawnp through glibc's `real` (either version). */
static int spawn_through(spawn_fn *real, pid_t *restrict pid,
                         const char *restrict path,
                         const posix_spawn_file_actions_t *fa,
                         const posix_spawnattr_t *restrict attr,
                         char *const argv[restrict], char *const envp[restrict]) {
  ensure_init();
  if (!real) return ENOSYS;
  ID_WINDOW(); /* the group's system PID, then the child's, until mapped */
  /* Every signal blocked from before the child exists until it is mapped,
   * as fork blocks them (L10): glibc lets the caller's mask back in as its
   * posix_spawn returns, and a SIGCHLD handler that reaped the child there
   * (it may have exec'd and exited already) took the entry the child had
   * mapped itself with, and the table forgot it; the child was then
   * mapped anew, dead, under another virtual PID, which the spawn gave
   * and whose entry stayed. The child gets the caller's mask from the
   * attribute instead of the blocked one it is spawned under. */
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);
  posix_spawnattr_t attr_copy;
  const posix_spawnattr_t *use;
  int masked;
  int e = spawn_attr(attr, &attr_copy, &use, &saved, &masked);
  /* Unmasked at once where the child would get the blocked mask. */
  if (e || !masked) pthread_sigmask(SIG_SETMASK, &saved, NULL);
  if (e) return e;
  if (g_h) self_vpid(); /* mapped before the child looks for us */
  tables_fd_keep_across_exec();
  pid_t spid = 0;
  APP_ENV(env, envp ? envp : empty_env);
  int rc = real(&spid, path, fa, use, argv, env);
  test_pause("spawn-returned");
  rc = spawned(rc, spid, pid);
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  return rc;
}

API SYMVER("posix_spawn@@GLIBC_2.15")
int appshot_current_posix_spawn(pid_t *restrict pid, const char *restrict path,
                                const posix_spawn_file_actions_t *fa,
                                const posix_spawnattr_t *restrict attr,
                                char *const argv[restrict], char *const envp[restrict]) {
  ensure_init();
  return spawn_through(REAL(posix_spawn), pid, path, fa, attr, argv, envp);
}

API SYMVER("posix_spawnp@@GLIBC_2.15")
int appshot_current_posix_spawnp(pid_t *restrict pid, const char *restrict file,
                                 const posix_spawn_file_actions_t *fa,
                                 const posix_spawnattr_t *restrict attr,
                                 char *const argv[restrict], char *const envp[restrict]) {
  ensure_init();
  return spawn_through(REAL(posix_spawnp), pid, file, fa, attr, argv, envp);
}

/* posix_spawn@GLIBC_2.2.5 and posix_spawnp@GLIBC_2.2.5, before 2.15: a
 * program the kernel cannot execute (ENOEXEC) is run by /bin/sh instead.
 * glibc's functions of that version do that (the current ones fail), so
 * those are what these go through. */
COMPAT_VERSION("posix_spawn@GLIBC_2.2.5")
int appshot_compat_posix_spawn_2_2_5(pid_t *restrict pid, const char *restrict path,
                                     const posix_spawn_file_actions_t *fa,
                                     const posix_spawnattr_t *restrict attr,
                                     char *const argv[restrict], char *const envp[restrict]) {
  ensure_init();
  return spawn_through((spawn_fn *)real_fn[R_posix_spawn_2_2_5], pid, path, fa, attr, argv, envp);
}

COMPAT_VERSION("posix_spawnp@GLIBC_2.2.5")
int appshot_compat_posix_spawnp_2_2_5(pid_t *restrict pid, const char *restrict file,
                                      const posix_spawn_file_actions_t *fa,
                                      const posix_spawnattr_t *restrict attr,
                                      char *const argv[restrict], char *const envp[restrict]) {
  ensure_init();
  return spawn_through((spawn_fn *)real_fn[R_posix_spawnp_2_2_5], pid, file, fa, attr, argv, envp);
}
