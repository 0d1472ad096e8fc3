/*
 * An io_uring's kernel-owned counters brought to a snapshot's values
 * (resources/iouring.ts). The kernel starts a new ring's SQ head and CQ
 * tail at 0 and moves them only as it consumes SQEs and posts CQEs, so
 * the restored ring is made to consume and post as many: NOPs, first
 * ones that post a CQE (which move both counters; their CQEs consumed at
 * once by moving the CQ head), then ones with IOSQE_CQE_SKIP_SUCCESS
 * (which move the SQ head alone).
 *
 * Every SQE slot holds the same NOP and the index array (if the ring has
 * one) maps each slot to itself, so a batch is one store of the SQ tail
 * and one io_uring_enter, of as many NOPs as the ring takes at once.
 *
 * The calls are made here, not injected into the restored process (one
 * ptrace stop each): the ring's descriptor is copied into this process
 * (pidfd_getfd) and mapped here, and the NOPs are submitted from a
 * thread made for it. A task that submits to a ring gets io_uring state
 * of its own that lives until it exits: a thread that exits after the
 * last batch leaves none in appshot's process (whose tracer thread may
 * live long, in the engine). The ring is made by the restored process
 * (its memory and limits are charged to it); a ring only its maker may
 * submit to (IORING_SETUP_SINGLE_ISSUER) is never made (resources/iouring.ts).
 */
#define _GNU_SOURCE
#include "iouring.h"

#include <errno.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

/* struct io_rings' layout (io_uring/io_uring.h), which io_uring_setup's
 * sq_off/cq_off have reported unchanged since Linux 5.1: the restore
 * checks the offsets it is given against them. */
#define SQ_HEAD 0
#define SQ_TAIL 4
#define CQ_HEAD 8
#define CQ_TAIL 12

static unsigned* at(unsigned char* ring, unsigned off) { return (unsigned*)(ring + off); }

static void* advance(void* arg) {
  struct iouring_advance* a = arg;
  int pidfd = -1, fd = -1;
  unsigned char* ring = MAP_FAILED;
  unsigned char* sqes = MAP_FAILED;
  pidfd = (int)syscall(SYS_pidfd_open, a->pid, 0);
  if (pidfd < 0) {
    snprintf(a->error, sizeof a->error, "pidfd_open(%d): %s", a->pid, strerror(errno));
    goto out;
  }
  fd = (int)syscall(SYS_pidfd_getfd, pidfd, a->fd, 0);
  if (fd < 0) {
    snprintf(a->error, sizeof a->error, "taking its descriptor (pidfd_getfd): %s", strerror(errno));
    goto out;
  }
  /* What the NOPs write must lie in what is mapped: the index array and
   * every SQE slot (the caller gives the ring's whole sizes). */
  if (a->ring_bytes < 64 || (unsigned long)a->sq_entries * a->sqe_size > a->sqe_bytes ||
      (a->array_offset >= 0 && ((unsigned long)a->array_offset < 64 || (unsigned long)a->array_offset + 4UL * a->sq_entries > a->ring_bytes))) {
    snprintf(a->error, sizeof a->error, "a ring of %lu and %lu bytes cannot hold %u entries with their index array at %ld", a->ring_bytes, a->sqe_bytes, a->sq_entries, a->array_offset);
    goto out;
  }
  ring = mmap(NULL, a->ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, IORING_OFF_SQ_RING);
  sqes = mmap(NULL, a->sqe_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, IORING_OFF_SQES);
  if (ring == MAP_FAILED || sqes == MAP_FAILED) {
    snprintf(a->error, sizeof a->error, "mapping it here: %s", strerror(errno));
    goto out;
  }
  if (__atomic_load_n(at(ring, SQ_HEAD), __ATOMIC_ACQUIRE) || __atomic_load_n(at(ring, CQ_TAIL), __ATOMIC_ACQUIRE)) {
    snprintf(a->error, sizeof a->error, "it is not new (SQ head %u, CQ tail %u)", *at(ring, SQ_HEAD), *at(ring, CQ_TAIL));
    goto out;
  }
  if (a->array_offset >= 0)
    for (unsigned i = 0; i < a->sq_entries; i++) at(ring, (unsigned)a->array_offset)[i] = i;
  for (int phase = 0; phase < 2; phase++) {
    /* Phase 0: NOPs that post a CQE, up to the CQ tail; phase 1: NOPs
     * that post none, up to the SQ head. */
    unsigned long todo = phase == 0 ? a->cq_tail : (unsigned long)(a->sq_head - a->cq_tail);
    unsigned per = a->sq_entries;
    if (phase == 0 && a->cq_entries < per) per = a->cq_entries;
    for (unsigned i = 0; i < a->sq_entries; i++) {
      struct io_uring_sqe* s = (struct io_uring_sqe*)(sqes + (unsigned long)i * a->sqe_size);
      memset(s, 0, a->sqe_size);
      s->opcode = IORING_OP_NOP;
      s->fd = -1;
      s->flags = phase ? IOSQE_CQE_SKIP_SUCCESS : 0;
    }
    while (todo) {
      unsigned n = todo < per ? (unsigned)todo : per;
      unsigned tail = *at(ring, SQ_TAIL) + n;
      __atomic_store_n(at(ring, SQ_TAIL), tail, __ATOMIC_RELEASE);
      long got = syscall(SYS_io_uring_enter, fd, n, 0, 0, NULL, 0);
      a->calls++;
      if (got != (long)n) {
        snprintf(a->error, sizeof a->error, "io_uring_enter of %u NOPs gave %ld (%s) at SQ head %u", n, got, got < 0 ? strerror(errno) : "short", *at(ring, SQ_HEAD));
        goto out;
      }
      if (phase == 0) __atomic_store_n(at(ring, CQ_HEAD), __atomic_load_n(at(ring, CQ_TAIL), __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
      todo -= n;
    }
  }
  if (*at(ring, SQ_HEAD) != a->sq_head || *at(ring, CQ_TAIL) != a->cq_tail)
    snprintf(a->error, sizeof a->error, "its SQ head is %u and CQ tail %u, not %u and %u", *at(ring, SQ_HEAD), *at(ring, CQ_TAIL), a->sq_head, a->cq_tail);
  /* The NOPs out of the slots: the snapshot's contents are written over
   * them next, but a failure must not leave them to be submitted. */
  memset(sqes, 0, a->sqe_bytes);
out:
  if (ring != MAP_FAILED) munmap(ring, a->ring_bytes);
  if (sqes != MAP_FAILED) munmap(sqes, a->sqe_bytes);
  if (fd >= 0) close(fd);
  if (pidfd >= 0) close(pidfd);
  return NULL;
}

int iouring_advance(struct iouring_advance* a) {
  a->error[0] = 0;
  a->calls = 0;
  if (a->sq_head - a->cq_tail > a->sq_head) {
    snprintf(a->error, sizeof a->error, "a CQ tail %u past the SQ head %u", a->cq_tail, a->sq_head);
    return -1;
  }
  pthread_t t;
  int rc = pthread_create(&t, NULL, advance, a);
  if (rc) {
    snprintf(a->error, sizeof a->error, "pthread_create: %s", strerror(rc));
    return -1;
  }
  pthread_join(t, NULL);
  return a->error[0] ? -1 : 0;
}

int iouring_has_eventfd(int pid, int fd) {
  int rc, pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) return -errno;
  int ring = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
  rc = -errno;
  close(pidfd);
  if (ring < 0) return rc;
  int probe = eventfd(0, EFD_CLOEXEC);
  if (probe < 0) {
    rc = -errno;
    close(ring);
    return rc;
  }
  if (syscall(SYS_io_uring_register, ring, IORING_REGISTER_EVENTFD, &probe, 1) == 0) {
    /* None was there: ours out again, the ring as it was. */
    rc = syscall(SYS_io_uring_register, ring, IORING_UNREGISTER_EVENTFD, NULL, 0) == 0 ? 0 : -errno;
  } else {
    rc = errno == EBUSY ? 1 : -errno;
  }
  close(probe);
  close(ring);
  return rc;
}
