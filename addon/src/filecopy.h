#ifndef APPSHOT_FILECOPY_H
#define APPSHOT_FILECOPY_H

#ifdef __cplusplus
extern "C" {
#endif

// Copies the regular file open at `in` to `out` (empty, open for writing),
// holes left as holes: 0, or -errno with *step naming what failed.
long file_copy_data(int in, int out, const char **step);

#ifdef __cplusplus
}
#endif

#endif
