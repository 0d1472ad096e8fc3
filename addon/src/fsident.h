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
struct fsident {
  uint32_t fsuid;
  uint32_t fsgid;
  uint32_t ngroups;
  const uint32_t* groups;
  uint64_t cap_eff;
};

/* Runs `op(arg)` on a thread of its own whose credentials are `who`'s
 * (NULL: the restorer's own, unchanged) and, unless `dir` is NULL or "",
 * whose working directory is `dir` (entered as `who`; the process's own
 * stays where it is). The thread ends with the call: nothing else in the
 * process ever runs with those credentials, nor this thread with any
 * other. -EPERM if the credentials cannot be taken exactly; otherwise
 * what `op` returns. */
int fsident_run(const struct fsident* who, const char* dir, int (*op)(void*), void* arg);

#ifdef __cplusplus
}
#endif

#endif
