/* The file of a unix socket's bind, handled by its inode through a
 * descriptor of its directory (sockfile.c; src/resources/socketfile.ts).
 * Plain C; functions return 0 (or a count) or -errno. Each one that acts
 * on a path does it as `who` (fsident.h; NULL: the restorer itself). */
#ifndef APPSHOT_SOCKFILE_H
#define APPSHOT_SOCKFILE_H

#include <stdint.h>
#include <sys/types.h>

#include "fsident.h"

/* A file as stat(2) names it. */
struct sockfile_id {
  uint64_t ino;
  dev_t dev;
};

/* The file `sock`'s bind made (sock_diag); -ENODATA for an abstract or
 * unnamed socket. */
int sockfile_of(int sock, struct sockfile_id* id);

/* Makes room for a bind of `name` in directory `dir`: a socket file there
 * that no live socket holds (an ended process's) is removed. 1 if a live
 * socket holds it, 0 otherwise (also when something else is there, which
 * the bind then reports), or -errno. */
int sockfile_clear(const char* dir, const char* name, const struct fsident_list* who);

/* The file `id` at `name` in `dir` given owner `uid`:`gid` and `mode`, then,
 * unless `renamed` is NULL or "", linked as `renamed` there (a stale socket
 * file there removed first; -EADDRINUSE if a live one holds it; anything
 * else there: -EEXIST) and `name` removed. -ESTALE if `name` is not `id`. */
int sockfile_finish(const char* dir, const char* name, const struct sockfile_id* id, uint32_t uid,
                    uint32_t gid, uint32_t mode, const char* renamed, const struct fsident_list* who);

/* The file `id` at `from` in `dir` moved to `to` there (which must not
 * exist: -EEXIST). -ESTALE if `from` is not `id`. */
int sockfile_move(const char* dir, const char* from, const char* to, const struct sockfile_id* id, const struct fsident_list* who);

/* Removes `name` from `dir` if it is the file `id`: 1 if it did. */
int sockfile_remove(const char* dir, const char* name, const struct sockfile_id* id, const struct fsident_list* who);

#endif
