/* Probes of the kernel features appshot uses, for `appshot check`: each
 * tries the real call on a throwaway object of this process's own (or of a
 * forked child that exits at once) and reports whether the kernel let it. */
#ifndef APPSHOT_PROBE_H
#define APPSHOT_PROBE_H

#ifdef __cplusplus
extern "C" {
#endif

/* 0 if the feature named `name` works here, else the errno the kernel
 * answered (ENOSYS: not in this kernel); -1 for a name it does not know. */
int probe_feature(const char* name);

#ifdef __cplusplus
}
#endif
#endif
