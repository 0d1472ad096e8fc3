/* A path operation done with the filesystem identity of a process of the
 * image, not the restorer's (fsident.c; src/resources/fsident.ts).
 * Plain C; functions return 0 (or what the operation returns) or -errno. */
#ifndef APPSHOT_FSIDENT_H
#define APPSHOT_FSIDENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What the kernel consults on a path: fsuid and fsgid (owner of what is
 * made, and the DAC checks), supplementary groups, and the effective
 * capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN, ...). */
#define FSIDENT_MAX_GROUPS 65536
#define FSIDENT_MAX_IDENTITIES 64
struct fsident {
  uint32_t fsuid;
  uint32_t fsgid;
  uint32_t ngroups;
  const uint32_t* groups;
  uint64_t cap_eff;
};

/* Identities to try in order (fsident_run); NULL or none: the restorer's. */
struct fsident_list {
  const struct fsident* ids;
  uint32_t n;
};

/* Runs `op(arg)` on a thread of its own whose credentials are the first
 * identity's of `who` (NULL or empty: the restorer's own, unchanged) and, unless `dir` is NULL or "",
 * whose working directory is `dir` (entered as `who`; the process's own
 * stays where it is). The thread ends with the call: nothing else in the
 * process ever runs with those credentials, nor this thread with any
 * other. Refused (-EACCES, -EPERM), it is tried again as the next one,
 * and so on: the identities of the application's other processes, any of which
 * could have done it and handed the result over (a server's root master
 * binds, its unprivileged worker holds). Returns what `op` returned for
 * the first identity it was not refused for, or the first refusal; -EPERM
 * if credentials cannot be taken exactly. */
int fsident_run(const struct fsident_list* who, const char* dir, int (*op)(void*), void* arg);

/* fsident_run, and `*not_taken` 1 where it gave up because a thread's
 * credentials (or its working directory of its own) could not be taken
 * exactly, before `op` ran: told apart from a thread that could not be
 * made and from what `op` returned, which leave it 0. */
int fsident_run_told(const struct fsident_list* who, const char* dir, int (*op)(void*), void* arg, int* not_taken);

/* For operations run by fsident_run. open(2), or -errno, never through a
 * /proc magic link (openat2 RESOLVE_NO_MAGICLINKS: /proc/PID/fd/N, cwd,
 * root, exe...; one met is -ELOOP); in a retry as another identity than
 * the first, without following any symlink on the way
 * (RESOLVE_NO_SYMLINKS; one met is -EACCES). -ENOSYS on a kernel without
 * openat2 (before 5.6), or where a seccomp filter refuses it
 * (fsident_openat2_refused): never a plain open(2) in its place. */
int fsident_open(const char* path, int flags, unsigned mode);
/* fsident_open of `path` beneath our descriptor `dir` (AT_FDCWD: as
 * fsident_open). */
int fsident_openat(int dir, const char* path, int flags, unsigned mode);
/* 0 where openat2 works; -EPERM or -ENOSYS where it is refused whatever
 * it is asked (a seccomp filter, a kernel before 5.6): then fsident_open
 * answers -ENOSYS for every name, never a refusal. */
int fsident_openat2_refused(void);
/* The same of faccessat2 (Linux 5.8), which checks an executable. */
int fsident_faccessat2_refused(void);
/* Whether fsident_openat's -ELOOP for `path` (beneath `dir`) opened with
 * `flags` was a magic link met (1), not a loop of symlinks or a trailing
 * symlink under O_NOFOLLOW (0). Asked on the same thread, as the same
 * identity. */
int fsident_through_magic_link(int dir, const char* path, int flags);
/* 0, or -EACCES if in such a retry `path`'s directory is reached through a
 * symlink (or, `final_too`, its last component is one): for bind(2) and
 * connect(2), which take a path and not a descriptor. */
int fsident_plain_path(const char* path, int final_too);
/* Whether the operation running on this thread is such a retry. */
int fsident_strict(void);

/* The mount id of what our descriptor `fd` holds, as /proc/self/fdinfo/N
 * shows it (its `mnt_id:`, Linux 3.15; the same number statx's
 * STATX_MNT_ID gives from 5.8), in `id`: 0, or -errno (-ENODATA: no such
 * line). Read as the calling thread's identity. */
int fsident_fdinfo_mount_id(int fd, uint64_t* id);

/* Whether the calling thread's supplementary groups are `groups` (as a
 * set; the raw getgroups, this thread's own). Also peercred.c's. */
int thread_groups_are(const uint32_t* groups, uint32_t ngroups);

#ifdef __cplusplus
}
#endif

#endif
