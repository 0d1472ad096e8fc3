/* io_uring counters brought to a snapshot's values (resources/iouring.ts). */
#ifndef APPSHOT_IOURING_H
#define APPSHOT_IOURING_H

#ifdef __cplusplus
extern "C" {
#endif

struct iouring_advance {
  int pid, fd;                 /* the ring, at descriptor fd of process pid */
  unsigned sq_entries, cq_entries;
  unsigned long ring_bytes;    /* its SQ/CQ ring region, as mapped there */
  unsigned long sqe_bytes;     /* its SQE array */
  long array_offset;           /* of the SQ index array in the ring; -1: none */
  unsigned sqe_size;           /* 64, or 128 (IORING_SETUP_SQE128) */
  unsigned sq_head, cq_tail;   /* where the kernel's counters are to be */
  /* out */
  unsigned calls;              /* io_uring_enter calls made */
  char error[160];
};

/* Brings a new, unused ring's kernel-owned counters (SQ head, CQ tail)
 * to a->sq_head and a->cq_tail by NOPs submitted from a thread of this
 * process, through a copy of the ring's descriptor. 0, or -1 with
 * a->error set. */
int iouring_advance(struct iouring_advance* a);

/* Whether the ring at descriptor fd of process pid has an eventfd
 * registered (IORING_REGISTER_EVENTFD), which fdinfo does not show: 1 if
 * so, 0 if not, -errno if it cannot be told. Asked without changing it:
 * registering one of ours is refused (EBUSY) while one is there; taken,
 * it is unregistered at once. */
int iouring_has_eventfd(int pid, int fd);

#ifdef __cplusplus
}
#endif
#endif
