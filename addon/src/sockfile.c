/* The file of a unix socket's bind, handled by what it is, not by its name
 * (src/resources/socketfile.ts). Every step goes through a descriptor of
 * the file's directory and checks the inode it acts on against the one
 * the kernel says the socket's bind made (sock_diag's UNIX_DIAG_VFS): the
 * directories on the way are not ours, and a path looked up twice may name
 * two files (a directory swapped for a symlink in between). And every step
 * is done as the application's process (fsident.c): whatever the
 * directories hold, it can reach nothing that process could not. */
#define _GNU_SOURCE
#include "sockfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <unistd.h>

#include "sockdiag.h"

/* A unix socket's sk_state, as sock_diag gives it (the TCP numbers). */
#define TCP_LISTEN_STATE 10
#define TCP_CLOSE_STATE 7
/* statfs(2)'s f_type of an overlay (linux/magic.h). */
#define OVERLAYFS_MAGIC 0x794c7630UL

int sockfile_of(int sock, struct sockfile_id* id) {
  struct stat st;
  if (fstat(sock, &st) != 0) return -errno;
  sockdiag_unix u;
  int rc = sockdiag_unix_one((uint32_t)st.st_ino, &u);
  if (rc) return rc;
  if (!u.vfs_ino) return -ENODATA; /* no file: abstract or unnamed */
  id->ino = u.vfs_ino;
  id->dev = (dev_t)u.vfs_dev;
  return 0;
}

/* Whether `st`, an entry of open directory `d`, is the file (`ino`, `dev`)
 * sock_diag names. On an overlay whose layers are on other file systems
 * (without xino), stat gives a non-directory the device of its layer and
 * sock_diag the overlay's own, which the overlay's directories show (the
 * inode number is the same): then the file is told by its inode and its
 * directory's device (review28 R4). */
static int is_file(int d, const struct stat* st, uint64_t ino, dev_t dev) {
  /* sock_diag's inode number is 32 bits wide. */
  if ((uint32_t)st->st_ino != (uint32_t)ino) return 0;
  if (st->st_dev == dev) return 1;
  struct statfs fs;
  struct stat ds;
  return fstatfs(d, &fs) == 0 && (unsigned long)fs.f_type == OVERLAYFS_MAGIC && fstat(d, &ds) == 0 && ds.st_dev == dev;
}

static int same(int d, const struct stat* st, const struct sockfile_id* id) {
  return S_ISSOCK(st->st_mode) && is_file(d, st, id->ino, id->dev);
}

/* Whether two stats of entries of one directory are one file: by the whole
 * 64-bit inode number and the device, both known here (sock_diag's 32 bits
 * are for what it alone names: a file whose inode differs above them is
 * another one). */
static int same_stat(const struct stat* a, const struct stat* b) {
  return S_ISSOCK(a->st_mode) && a->st_ino == b->st_ino && a->st_dev == b->st_dev;
}

/* Whether a live socket holds the file (st_ino, st_dev): one of the unix
 * sockets of this network namespace was bound there and still answers to
 * it (a listener, a datagram socket) or keeps it (a stream socket bound,
 * neither listening nor connected). Not a connection: an accepted one
 * shows its listener's file (held by the keeper after the listener ended,
 * as PostgreSQL's are across a snapshot), and nothing connects to a
 * connected stream socket's. 1, 0 or -errno. */
static int held(int d, const struct stat* st) {
  sockdiag_unix* all = NULL;
  long n = sockdiag_unix_all(&all);
  if (n < 0) return (int)n;
  int found = 0;
  for (long i = 0; i < n && !found; i++)
    found = all[i].vfs_ino && is_file(d, st, all[i].vfs_ino, (dev_t)all[i].vfs_dev) &&
            (all[i].type == SOCK_DGRAM || all[i].state == TCP_LISTEN_STATE || (!all[i].peer && all[i].state == TCP_CLOSE_STATE));
  free(all);
  return found;
}

static int open_dir(const char* dir) {
  return fsident_open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
}

/* Whether something answers a connection to `name` in open directory `d`
 * (through the directory's /proc/self/fd link: any length of path): a
 * listener (accepted, or its backlog full) or a datagram socket (a stream
 * socket's connect says EPROTOTYPE). What sock_diag cannot see: a socket
 * of another network namespace bound to a file here (a container's, a
 * program started under `ip netns exec`). */
static int answers(int d, const char* name) {
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (snprintf(a.sun_path, sizeof a.sun_path, "/proc/self/fd/%d/%s", d, name) >= (int)sizeof a.sun_path) return 0;
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (probe < 0) return 0;
  int rc = connect(probe, (struct sockaddr*)&a, sizeof a);
  int live = rc == 0 || errno == EPROTOTYPE || errno == EAGAIN || errno == EINPROGRESS;
  close(probe);
  return live;
}

/* clear, in an open directory. */
static int clear_at(int d, const char* name) {
  struct stat st;
  if (fstatat(d, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return errno == ENOENT ? 0 : -errno;
  if (!S_ISSOCK(st.st_mode)) return 0; /* not ours to remove: the bind says the name is taken */
  int h = held(d, &st);
  if (!h) h = answers(d, name);
  if (h) return h < 0 ? h : 1;
  if (unlinkat(d, name, 0) != 0 && errno != ENOENT) return -errno;
  return 0;
}

struct clear_call {
  const char* dir;
  const char* name;
};

static int clear_op(void* arg) {
  struct clear_call* c = arg;
  int d = open_dir(c->dir);
  if (d < 0) return d == -ENOENT ? 0 : d;
  int rc = clear_at(d, c->name);
  close(d);
  return rc;
}

int sockfile_clear(const char* dir, const char* name, const struct fsident_list* who) {
  struct clear_call c = {dir, name};
  return fsident_run(who, NULL, clear_op, &c);
}

struct finish_call {
  const char* dir;
  const char* name;
  const struct sockfile_id* id;
  uint32_t uid, gid, mode;
  const char* renamed;
};

static int finish_op(void* arg) {
  const struct finish_call* c = arg;
  const char *dir = c->dir, *name = c->name, *renamed = c->renamed;
  const struct sockfile_id* id = c->id;
  uint32_t uid = c->uid, gid = c->gid, mode = c->mode;
  int d = open_dir(dir);
  if (d < 0) return d;
  int f = openat(d, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  int rc = 0;
  struct stat st;
  if (f < 0) rc = -errno;
  else if (fstat(f, &st) != 0) rc = -errno;
  else if (!same(d, &st, id)) rc = -ESTALE; /* not the file the bind made */
  /* The owner first: a chown drops set-id bits, which the mode then sets. */
  if (!rc && (st.st_uid != uid || st.st_gid != gid) && fchownat(f, "", uid, gid, AT_EMPTY_PATH) != 0) rc = -errno;
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", f);
  /* chmod through the descriptor's magic link: that very inode. */
  if (!rc && (st.st_mode & 07777) != mode && chmod(self, mode) != 0) rc = -errno;
  if (!rc && renamed && *renamed) {
    int c = clear_at(d, renamed);
    if (c > 0) rc = -EADDRINUSE;
    else if (c < 0) rc = c;
    /* Linked by the descriptor (never replacing anything), then the bound
     * name removed if it is still that file. */
    else if (linkat(AT_FDCWD, self, d, renamed, AT_SYMLINK_FOLLOW) != 0) rc = -errno;
    else {
      struct stat now;
      if (fstatat(d, name, &now, AT_SYMLINK_NOFOLLOW) == 0 && same_stat(&now, &st)) unlinkat(d, name, 0);
    }
  }
  if (f >= 0) close(f);
  close(d);
  return rc;
}

int sockfile_finish(const char* dir, const char* name, const struct sockfile_id* id, uint32_t uid,
                    uint32_t gid, uint32_t mode, const char* renamed, const struct fsident_list* who) {
  struct finish_call c = {dir, name, id, uid, gid, mode, renamed};
  return fsident_run(who, NULL, finish_op, &c);
}

struct move_call {
  const char* dir;
  const char* from;
  const char* to;
  const struct sockfile_id* id;
};

static int move_op(void* arg) {
  const struct move_call* c = arg;
  int d = open_dir(c->dir);
  if (d < 0) return d;
  int f = openat(d, c->from, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  int rc = 0;
  struct stat st;
  if (f < 0) rc = -errno;
  else if (fstat(f, &st) != 0) rc = -errno;
  else if (!same(d, &st, c->id)) rc = -ESTALE;
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", f);
  /* Linked by the descriptor (never replacing anything), then `from`
   * removed if it is still that file. */
  if (!rc && linkat(AT_FDCWD, self, d, c->to, AT_SYMLINK_FOLLOW) != 0) rc = -errno;
  if (!rc) {
    struct stat now;
    if (fstatat(d, c->from, &now, AT_SYMLINK_NOFOLLOW) == 0 && same_stat(&now, &st)) unlinkat(d, c->from, 0);
  }
  if (f >= 0) close(f);
  close(d);
  return rc;
}

int sockfile_move(const char* dir, const char* from, const char* to, const struct sockfile_id* id, const struct fsident_list* who) {
  struct move_call c = {dir, from, to, id};
  return fsident_run(who, NULL, move_op, &c);
}

struct remove_call {
  const char* dir;
  const char* name;
  const struct sockfile_id* id;
};

static int remove_op(void* arg) {
  const struct remove_call* c = arg;
  int d = open_dir(c->dir);
  if (d < 0) return d == -ENOENT ? 0 : d;
  struct stat st;
  int rc = 0;
  if (fstatat(d, c->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && same(d, &st, c->id)) rc = unlinkat(d, c->name, 0) == 0 ? 1 : -errno;
  close(d);
  return rc;
}

int sockfile_remove(const char* dir, const char* name, const struct sockfile_id* id, const struct fsident_list* who) {
  struct remove_call c = {dir, name, id};
  return fsident_run(who, NULL, remove_op, &c);
}
