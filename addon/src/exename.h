/* A deleted executable's copy made at the name it had, then removed from
 * it (exename.c; src/resources/deleted.ts madeAtItsName). Plain C;
 * functions return a descriptor, 0 or 1, or -errno. Each is done as `who`
 * (fsident.h; NULL: the restorer itself). */
#ifndef APPSHOT_EXENAME_H
#define APPSHOT_EXENAME_H

#include "fsident.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A new file `name` in directory `dir` (O_EXCL, never through a symlink
 * at the name), removed from it at once if it is still that file there:
 * our read-write descriptor of it, which has no name left (removed from
 * the name by another meanwhile is as good). -EEXIST: a file is at the
 * name (nothing made); -ESTALE: ours was moved elsewhere in the directory
 * as it was made (left where it was moved); -EMLINK: it was given another
 * name as it was made (removed from ours, the other kept); any other
 * -errno: its directory could not be opened, the file made, or, once
 * made, looked at or removed from the name. `*left_at_name` (if not
 * NULL) is set to 1 when our empty file may still be at the name (its
 * removal refused, or the name could not be looked at: it is not
 * retried), else to 0: what the caller's journal keeps (review r425 G1,
 * G3). `aside`: `name` is a random one beside the program's, made for a
 * copy that is only to have no name (no test point is reached). */
int exename_make_unlinked(const char* dir, const char* name, const struct fsident_list* who, int aside, int* left_at_name);

/* What exename_make_unlinked of a killed restore may have left at `name`
 * in `dir` removed: only a regular file, empty, mode 0600, with no other
 * name, owned by the identity it is removed as. 1 if it was removed. */
int exename_clear(const char* dir, const char* name, const struct fsident_list* who);

#ifdef __cplusplus
}
#endif

#endif
