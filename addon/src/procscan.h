/* What the registry asks of a process that may be one of an application's
 * once the application's supervisor is gone (src/registry.ts
 * TablesNamers): who it is, and whether it holds or names a table file.
 * Each answer comes from /proc and takes none of the process's memory
 * locks, but environ_value, which the caller asks last, and only of
 * processes whose identity makes their environment worth believing. */
#ifndef APPSHOT_PROCSCAN_H
#define APPSHOT_PROCSCAN_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct procscan_facts {
  uint64_t start;  /* clock ticks since boot (stat field 22) */
  uint32_t uid[4]; /* real, effective, saved, filesystem (status "Uid:") */
  int kthread;     /* a kernel thread: no descriptors, no environment */
  char state;      /* stat field 3: 'Z' for a leader that exited */
  long threads;    /* stat field 20 */
};

/* The facts of `pid`, from /proc/PID/stat and /proc/PID/status: neither
 * reads the process's memory (its mmap lock is not taken). 0, or -errno:
 * -ENOENT or -ESRCH if there is no such process. */
int procscan_facts(pid_t pid, struct procscan_facts *f);

/* A file a descriptor holds, as procscan_targets saw it: its device
 * and inode number (statx of the file pinned). `tied`: whether fdinfo's
 * inode tied the descriptor's flags to this file (Linux 5.14 on); where
 * it did not, a dup2 swap between the looks could have shown one file's
 * identity with another's flags (review r452 F2). */
struct procscan_file {
  uint32_t dev_major, dev_minor;
  uint64_t ino;
  int tied;
};

/* Calls `found` with each descriptor's target (readlink of
 * /proc/PID/fd/N: the descriptor table under RCU, no file system asked)
 * that starts with `prefix`, and the file it is (pinned_file in
 * procscan.c: the text alone does not say which file it is). Only
 * descriptors opened O_RDWR (not O_PATH) are reported.
 * `f`: the process's facts (a leader that exited is looked at through a
 * live thread). Descriptors of a process we may not look into are not
 * seen (EACCES), unless procscan_refusal_is_absence says otherwise.
 * 0; -ESRCH if the process is gone; or -errno if its descriptors cannot
 * be read. */
int procscan_targets(pid_t pid, const struct procscan_facts *f, const char *prefix,
                     void (*found)(const char *target, size_t len, const struct procscan_file *file, void *arg),
                     void *arg);

/* The file at `path` (its last component not followed), as
 * procscan_targets reports a descriptor's (`tied` 1). 0, or -errno. */
int procscan_file_identity(const char *path, struct procscan_file *file);

/* 1 if EACCES on a process's /proc entries means "not ours to look into"
 * (not looked at); 0 for a caller with CAP_SYS_PTRACE, for whom it is a
 * security module's refusal that fails the look. */
int procscan_refusal_is_absence(void);

/* The value of `name` in /proc/PID/environ into out (cap bytes, NUL
 * ended): its length, -1 if it is not there (or the environment cannot be
 * read), -2 if the value does not fit. Reading another process's
 * environment takes its mmap lock (access_remote_vm): one held by a
 * process stuck in a page fault (a hung NFS mapping) makes this wait. */
long procscan_environ_value(pid_t pid, const char *name, char *out, size_t cap);

#endif
