/*
 * A file's data copied as a sparse copy: only the ranges the source has
 * data in are written, and its size set at the end, so a copy takes no
 * more room than the file does. appshot copies a clone's private files
 * (template.ts, clone.ts: copies.ts) as root, for every clone: a file of
 * 10 TB with nothing in it, which the application or the writer of a
 * template may have made, written out in full would fill the disk,
 * beyond any quota of the application's user. The data ranges are found
 * with SEEK_DATA/SEEK_HOLE; a file system without them (EINVAL) is
 * copied whole, as one range. A file without holes (as many blocks as
 * its size) is allocated whole first, preallocated ranges included.
 */
#define _GNU_SOURCE
#include "filecopy.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

static long fail(const char **step, const char *what) {
  *step = what;
  return -errno;
}

/* [from, to) of `in` copied to the same offsets of `out`: copy_file_range
 * where the kernel can (it may clone or share blocks), else read and
 * write. Stops early, without error, at the source's end (a file that
 * shrank meanwhile). */
static long copy_range(int in, int out, off_t from, off_t to, const char **step) {
  int plain = 0;
  char buf[64 * 1024];
  while (from < to) {
    size_t want = (size_t)(to - from);
    if (!plain) {
      off64_t src = from, dst = from;
      ssize_t n = copy_file_range(in, &src, out, &dst, want, 0);
      if (n > 0) {
        from += n;
        continue;
      }
      if (n == 0) return 0;
      if (errno == EINTR) continue;
      // Across file systems on older kernels, or a file system without
      // it: the bytes go through here.
      if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) return fail(step, "copying a file's data");
      plain = 1;
    }
    if (want > sizeof buf) want = sizeof buf;
    ssize_t got = pread(in, buf, want, from);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return fail(step, "reading a file to copy");
    if (got == 0) return 0;
    for (ssize_t done = 0; done < got;) {
      ssize_t put = pwrite(out, buf + done, (size_t)(got - done), from + done);
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) return fail(step, "writing a file's copy");
      done += put;
    }
    from += got;
  }
  return 0;
}

long file_copy_data(int in, int out, const char **step) {
  struct stat st;
  if (fstat(in, &st)) return fail(step, "reading a file's size to copy it");
  // A file whose blocks cover its size has them all (written out, or
  // preallocated with fallocate: SEEK_DATA takes an unwritten extent for a
  // hole): its copy gets them too, as a database that preallocated its
  // file counts on the room being there. Only a file with fewer blocks
  // than its size has holes to keep.
  if (st.st_size > 0 && (unsigned long long)st.st_blocks * 512 >= (unsigned long long)st.st_size &&
      fallocate(out, 0, 0, st.st_size) && errno != EOPNOTSUPP)
    return fail(step, "allocating a file's copy");
  off_t pos = 0;
  while (pos < st.st_size) {
    off_t data = lseek(in, pos, SEEK_DATA);
    off_t hole;
    if (data < 0 && errno == ENXIO) break;  // only a hole is left
    if (data < 0 && errno == EINVAL) {
      data = pos;
      hole = st.st_size;
    } else if (data < 0) {
      return fail(step, "finding a file's data to copy");
    } else {
      hole = lseek(in, data, SEEK_HOLE);
      if (hole < 0) return fail(step, "finding a file's holes to copy it");
    }
    if (hole > st.st_size) hole = st.st_size;
    long rc = copy_range(in, out, data, hole, step);
    if (rc) return rc;
    pos = hole;
  }
  // The size, with any hole at the end.
  if (ftruncate(out, st.st_size)) return fail(step, "setting a file copy's size");
  return 0;
}
