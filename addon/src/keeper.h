/* The TCP connection keeper's two ends on appshot's side (keeper.c). */
#ifndef APPSHOT_KEEPER_H
#define APPSHOT_KEEPER_H

#include <stddef.h>

/* Starts appshot-keeper (`binary`) holding `fds` (the descriptors stay
 * ours too: the caller closes them), listening at `path` for the restore
 * of image `image_id`, for at most `hold_seconds`. 0, or -errno with
 * `*step` naming what failed. */
int keeper_start(const char *binary, const char *path, const char *image_id, long hold_seconds, const int *fds, size_t nfds,
                 const char **step);

/* Asks the keeper at `path` for the connections of image `image_id`.
 * Returns the number of descriptors stored in `*fds` (malloc'd, the
 * caller frees it), with `*control` the connection to tell the keeper
 * keeper_done() on; 0 if the keeper dropped them (another image) or
 * there is no keeper at `path` (`*none` set then); -errno on failure. */
long keeper_take(const char *path, const char *image_id, int wait_ms, int **fds, int *control, int *none, const char **step);

/* The restore that took them committed: the keeper lets its copies go.
 * Closes `control`. */
int keeper_done(int control);

#endif
