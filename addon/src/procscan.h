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
};

/* The facts of `pid`, from /proc/PID/stat and /proc/PID/status: neither
 * reads the process's memory (its mmap lock is not taken). 0, or -1 if
 * there is no such process (or it cannot be read). */
int procscan_facts(pid_t pid, struct procscan_facts *f);

/* Calls `found` with each descriptor's target (readlink of
 * /proc/PID/fd/N: the descriptor table under RCU, no file system asked,
 * unlike a stat of the file, which a hung NFS server would hold) that
 * starts with `prefix`. Descriptors of a process we may not look into are
 * not seen (EACCES). 0, or -1 if its descriptors cannot be listed. */
int procscan_targets(pid_t pid, const char *prefix,
                     void (*found)(const char *target, size_t len, void *arg),
                     void *arg);

/* The value of `name` in /proc/PID/environ into out (cap bytes, NUL
 * ended): its length, -1 if it is not there (or the environment cannot be
 * read), -2 if the value does not fit. Reading another process's
 * environment takes its mmap lock (access_remote_vm): one held by a
 * process stuck in a page fault (a hung NFS mapping) makes this wait. */
long procscan_environ_value(pid_t pid, const char *name, char *out, size_t cap);

#endif
