/*
 * appshot translation tables: the layout shared by the preload library, the
 * init process and the Node addon.
 *
 * One file in /dev/shm per application (AID). Every process of the
 * application maps it MAP_SHARED. It holds one table per resource kind; each
 * table maps a virtual id (what the application sees) to a system id (what
 * the kernel knows), one to one.
 *
 * Concurrency model
 *  - Lookups (the hot path: getppid, kill, semop...) take no lock. An entry's
 *    (virtual, system) pair lives in one 64-bit word written atomically, so a
 *    reader never sees half of one mapping and half of another.
 *  - Inserts and removals take one lock per file: a robust futex word of
 *    our own (appshot_lock; why not glibc's robust mutex: appshot_table.c,
 *    "The writer lock"). If a thread dies while holding it, the kernel
 *    marks the word FUTEX_OWNER_DIED; the next locker rebuilds the hash
 *    indexes from the entry arrays (the arrays are the truth, the indexes
 *    are derived), settles the keys a dead creator had reserved
 *    (APPSHOT_F_RESERVED) and goes on. No lock can stay held by a dead
 *    thread.
 *  - Each table has two generations of hash indexes. A rebuild (after a
 *    dead writer, or when tombstones pile up) fills the idle generation from
 *    the entry array and then publishes it by bumping `flips`. A reader
 *    that misses re-reads `flips` and walks again if a rebuild happened
 *    meanwhile (two rebuilds during one walk would clear the very index it
 *    is walking).
 *  - Writers block signals while they hold the lock, so a signal handler
 *    that forks or creates a semaphore cannot deadlock against its own
 *    thread.
 *
 * The file is: the header, then each table's entry array and indexes (at
 * the offsets the header gives), then the wait slots and the previous
 * node's PIDs (struct appshot_waits, at appshot_waits_of: after everything
 * an older build's reader looks at, so its offsets stay as they were), then
 * the PIDs restored SysV objects show (struct appshot_ipc_pids, at
 * appshot_ipc_pids_of; version 13).
 *
 * Bump APPSHOT_TABLE_VERSION whenever this layout changes: a process of an
 * older build refuses a newer file instead of misreading it.
 */
#ifndef APPSHOT_TABLE_H
#define APPSHOT_TABLE_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define APPSHOT_TABLE_MAGIC 0x5441505041ull /* "APPAT" */
#define APPSHOT_TABLE_VERSION 13u
#define APPSHOT_AID_MAX 64

/* Resource kinds. Keys are per kind because the kernel keeps one key
 * namespace per IPC kind: semaphore key 7 and segment key 7 are unrelated. */
enum appshot_kind {
  APPSHOT_PID = 0, /* processes and threads (they share the PID space) */
  APPSHOT_SEMID,   /* SysV semaphore set ids */
  APPSHOT_SHMID,   /* SysV shared memory segment ids */
  APPSHOT_MSGID,   /* SysV message queue ids */
  APPSHOT_SEMKEY,  /* IPC keys passed to semget */
  APPSHOT_SHMKEY,  /* IPC keys passed to shmget */
  APPSHOT_MSGKEY,  /* IPC keys passed to msgget */
  APPSHOT_PORT,    /* TCP ports: the one the application asks for (a
                      template's fixed port) -> the one it really has (an
                      allocated port); never allocated here */
  APPSHOT_KINDS
};

/* Capacity of each table (live entries). Powers of two. */
#define APPSHOT_PID_CAPACITY 8192u
#define APPSHOT_IPC_CAPACITY 2048u

/* Entry flags (appshot_entry.flags). */
#define APPSHOT_F_INIT 0x1u    /* PID: the application's init (virtual PID 1) */
#define APPSHOT_F_THREAD 0x2u  /* PID: a thread that is not a group leader */
#define APPSHOT_F_THREADS 0x4u /* PID: this process has thread entries */
/* Key tables: a virtual key reserved by a create in progress, its system
 * key the one being tried (IPC_PRIVATE: none yet). In the entry array, so
 * that whoever walks it (stop, rm, init's end) finds an object made under
 * it, but in no index, so that nobody translates through a key whose
 * object may not exist yet. Its creator holds the lock until it commits
 * or drops it; one a locker finds is a dead creator's, and is settled as
 * the lock is repaired (settle_reservations in appshot_table.c). */
#define APPSHOT_F_RESERVED 0x8u
/* PID: this process may be inside a Landlock domain: it restricted itself
 * (landlock_restrict_self), or descends from one that had when it was
 * made, a domain being inherited by every child and kept across exec. Set
 * by the preload library, never cleared (a domain is for life); the
 * kernel shows a domain nowhere, so the snapshot refuses such a process. */
#define APPSHOT_F_LANDLOCK 0x10u
/* PID: this process executed another program while its library's table of
 * SEM_UNDO adjustments held some, or could not know them (preload_ipc.c):
 * the kernel keeps them across exec, the new program's table starts
 * empty. Never cleared (the kernel drops them only at exit); the snapshot
 * refuses such a process (src/resources/sysv.ts, review r257). */
#define APPSHOT_F_SEM_UNDO_EXEC 0x20u

/* An unused entry's pair. Neither ids nor keys we hand out are ever -1. */
#define APPSHOT_PAIR_FREE UINT64_MAX

/* Hash index cells: 0 = never used, TOMB = was used, else slot + 1. */
#define APPSHOT_CELL_EMPTY 0u
#define APPSHOT_CELL_TOMB UINT32_MAX

struct appshot_entry {
  uint64_t stored; /* ~((uint32)virtual << 32 | (uint32)system): all zero
                      (FREE inverted) if unused; see entry_pair */
  uint32_t flags; /* APPSHOT_F_* */
  int32_t owner;  /* PID: for a thread, the system PID of its process */
};

/* One table. Its arrays follow the header in the file at the given offsets
 * (offsets, not pointers: every process maps the file at its own address). */
struct appshot_table {
  uint32_t kind;
  uint32_t capacity;     /* entries */
  uint32_t index_size;   /* cells in each hash index: 2 * capacity */
  uint32_t live;         /* entries in use (written under the lock) */
  int32_t vmin, vmax;    /* range virtual ids are allocated from */
  int32_t vnext;         /* allocation cursor: ids are not reused soon */
  uint32_t tombs;        /* tombstones in the active indexes */
  uint32_t flips;        /* rebuilds so far; readers use indexes flips & 1 */
  uint32_t slot_hint;    /* where to start looking for a free entry */
  uint64_t entries_off;  /* struct appshot_entry[capacity] */
  uint64_t vindex_off[2]; /* uint32_t[index_size], hashed by virtual id */
  uint64_t sindex_off[2]; /* uint32_t[index_size], hashed by system id */
};

/* --- The instance: per-application rewriting (templates and clones) ------
 *
 * Written by appshot before any process of the application runs (run) or
 * before the restored processes resume (restore, clone), and never while
 * they run: readers take no lock. Strings are NUL-terminated. */
#define APPSHOT_PATH_MAX 256
#define APPSHOT_REDIRS 16
/* SET ENV rules (at most 16) and the two identity variables a clone gets
 * (APPSHOT_CLONE_GENERATION, APPSHOT_INSTANCE). */
#define APPSHOT_ENVS 18
#define APPSHOT_ENV_LEN 384

enum appshot_redir_kind {
  /* REDIR PATH: `from` (and everything below it) is `to`. */
  APPSHOT_REDIR_PATH = 1,
  /* A copy-on-write rule: `from` is read where it is until the instance
   * writes; a write copies it to `to` first, and from then on `to` is what
   * the instance sees (a composite view). */
  APPSHOT_REDIR_COW = 2,
};

struct appshot_redir {
  uint32_t kind;     /* enum appshot_redir_kind */
  uint32_t from_len; /* strlen(from) */
  char from[APPSHOT_PATH_MAX]; /* absolute, no trailing '/': a file or a
                                  directory, matched on whole components */
  char to[APPSHOT_PATH_MAX];   /* absolute, evaluated for this instance */
};

/* Which of glibc's random number generators a process reseeds when it
 * finds itself in a new instance (IDENTITY RESEED|KEEP LIBC;
 * addon/preload/preload_identity.c). */
enum appshot_reseed {
  APPSHOT_RESEED_SEEDED = 0, /* the default: those the process seeded */
  APPSHOT_RESEED_ALWAYS = 1, /* also those left at their default seed */
  APPSHOT_RESEED_NEVER = 2,
};

/* What makes a clone a new instance of the application rather than a copy
 * of its template: a clone keeps its virtual PID, so the usual fork
 * detection (getpid() changed) never fires in it. */
struct appshot_identity {
  /* 128 random bits, new in every clone, kept by a restore; 0 for an
   * application `appshot run` started. A process that finds id[0] other
   * than the one its memory last saw is in a new instance. */
  uint64_t id[2];
  uint64_t generation;  /* clonings since `appshot run`: 0, then +1 each */
  uint32_t reseed_libc; /* enum appshot_reseed */
  /* Set (never cleared) by the preload library when a process seeds
   * glibc's generator: what `template create` warns about. The one field
   * written while the application runs, with a single atomic store. */
  uint32_t libc_seeded;
};

struct appshot_instance {
  /* This file's own path: what an exec passes on as APPSHOT_TABLES (a
   * restored process's memory still holds the path it started with). */
  char tables_path[APPSHOT_PATH_MAX];
  uint32_t redirs; /* entries of redir in use */
  uint32_t envs;   /* entries of env in use */
  struct appshot_redir redir[APPSHOT_REDIRS];
  /* SET ENV, evaluated: "NAME=value", forced into every exec. */
  char env[APPSHOT_ENVS][APPSHOT_ENV_LEN];
  struct appshot_identity identity;
};

/* --- What the kernel lets a program set on a socket but never shows -------
 *
 * Noted by the preload library when the program's setsockopt succeeds, and
 * read by a snapshot (src/resources/sockopts.ts): the steering program of
 * a reuseport group (SO_ATTACH_REUSEPORT_CBPF/EBPF: refused by name), an
 * IPv4 multicast interface chosen by index only (IP_MULTICAST_IF with a
 * struct ip_mreqn: carried), a UDP socket's IPV6_MTU (read back as the
 * path's MTU: carried). Keyed by the socket's inode, so that a
 * descriptor number used again, or shared, cannot mislead. Written while
 * the application runs, without the lock: a slot is claimed by a
 * compare-and-swap of its inode, its fields are stored, then `ready`. A
 * full array counts `lost`, and marks what the lost note was about in
 * `lost_seen`: its socket's inode, and for a reuseport steering program
 * its group (port and type), as a Bloom filter (two bits a key, set with
 * an atomic OR: no lock, no room to run out of). A snapshot refuses a
 * socket, or a reuseport group, the filter may hold (never one it does
 * not: it errs towards refusing). A socket closed leaves its note
 * behind: sockfs does not hand an inode number out again soon. A snapshot
 * that has seen every process, all stopped, frees the notes of sockets
 * none of them holds, and clears `lost` and the filter when no socket of
 * the application is in it (the lost notes were of sockets closed since),
 * so that a full array is not the end of noting. */
#define APPSHOT_SOCKET_NOTES 64
/* A note's level for a directory watched with dnotify (fcntl F_NOTIFY, name
 * F_NOTIFY, value its mask, ORed as the kernel ORs a watch's masks), which
 * nothing in /proc shows: `ino` is the directory's (no socket level is
 * negative), `maker` the virtual PID of the process whose F_NOTIFY made
 * it (its descriptor table owns the watch: a program it execs finds its
 * inherited watched descriptors by it, preload_pid.c). A snapshot carries
 * a DN_MULTISHOT watch of a directory held through one descriptor, and
 * refuses the rest (fdowner.ts). */
#define APPSHOT_NOTE_DNOTIFY (-1)
/* A note's level for a POSIX message queue registered for notification
 * with SIGEV_SIGNAL (mq_notify), whose sigev_value the queue's text
 * ("QSIZE NOTIFY SIGNO NOTIFY_PID") does not show. At most one a queue
 * (the kernel allows one registration a queue). Its fields:
 *   ino    the queue's inode (of the mqueue file system; no socket level
 *          is negative, so a socket of the same number is never taken
 *          for it)
 *   name   bits 0-31 of sigev_value (sival_int, or sival_ptr's low half)
 *   value  bits 32-63 of sigev_value
 *   port   sigev_signo
 *   maker  the virtual PID of the process that registered (the kernel's
 *          registration is that process's: only its own mq_notify(NULL)
 *          ends it, and a snapshot matches it with the queue's NOTIFY_PID)
 *   type   0
 * Noted by the preload library's mq_notify (preload_ipc.c) once the call
 * succeeded; dropped by mq_notify(NULL) or a registration of another kind.
 * A snapshot carries a SIGEV_SIGNAL registration the queue's text shows
 * only with the note of its inode whose signal is the one shown, and
 * refuses it otherwise (src/resources/mqueue.ts). */
#define APPSHOT_NOTE_MQ_NOTIFY (-2)
#define APPSHOT_LOST_SEEN_BITS 65536

struct appshot_socket_note {
  uint64_t ino;   /* the socket's inode; 0 = free */
  int32_t level;  /* setsockopt's level and name */
  int32_t name;
  int32_t value;  /* IP_MULTICAST_IF: the interface index; IPV6_MTU: it */
  int32_t maker;  /* APPSHOT_NOTE_DNOTIFY: the watcher's virtual PID; else 0 */
  uint16_t port;  /* the socket's own port when noted (0: unbound) */
  uint8_t type;   /* SOCK_STREAM 1, SOCK_DGRAM 2 */
  uint8_t ready;  /* 1 once the fields above are stored */
};

struct appshot_socket_notes {
  uint32_t lost; /* notes that found no free slot */
  uint32_t pad;
  struct appshot_socket_note note[APPSHOT_SOCKET_NOTES];
  uint64_t lost_seen[APPSHOT_LOST_SEEN_BITS / 64];
};

/* The keyed create in progress (appshot_reserve_key_locked): at most one,
 * as its creator holds the lock from its reservation to its commit or
 * drop. Who makes it and since when: the witness a settling locker checks
 * an object found under the reserved system key against, to adopt only an
 * object that creator made, never one it met there (settle_reservations in
 * appshot_table.c). */
struct appshot_creating {
  uint32_t kind;  /* the key table of the reservation */
  uint32_t slot;  /* its entry */
  int32_t pid;    /* the creator's system PID: a segment's shm_cpid */
  uint32_t euid;  /* its effective uid as it aimed: an object's cuid */
  int64_t aimed;  /* appshot_ipc_clock() as it aimed at the system key it
                     tries: the object it makes there has no earlier ctime */
};

struct appshot_header {
  uint64_t magic;
  uint32_t version;
  uint32_t size;          /* bytes of the whole file */
  char aid[APPSHOT_AID_MAX + 1];
  uint8_t pad[7];
  uint64_t key_salt;      /* makes this AID's system IPC keys its own */
  int32_t init_pid;       /* system PID of the application's init */
  uint32_t repairs;       /* times a dead writer's lock was recovered */
  /* The writer lock: a robust futex word (appshot_lock), and nothing else
   * of it in the file. 0 free; else the holder's system TID
   * (FUTEX_TID_MASK), with FUTEX_WAITERS while a locker sleeps on it, or
   * FUTEX_OWNER_DIED (no TID) once the kernel saw its holder die. */
  uint32_t lock;
  /* SysV semaphore SETVAL, SETALL and IPC_RMID made through the library
   * (each zeroes processes' SEM_UNDO adjustments): preload_ipc.c. Where
   * the lock's padding was (zero in a file made before). */
  uint32_t sem_generation;
  struct appshot_table tables[APPSHOT_KINDS];
  struct appshot_instance instance;
  struct appshot_socket_notes sockets;
  struct appshot_creating creating; /* written under the lock */
};

/* --- Wait calls across a restore -----------------------------------------
 *
 * A wait call for any child (wait4(-1), waitid(P_ALL)...) returns a system
 * PID, which the preload library then translates. A snapshot may freeze the
 * thread in between; restored, the thread would translate the old node's
 * system PID through the new node's tables (a wrong virtual PID, or a new
 * one, and the reaped child's entry never goes). A counter of restores,
 * read before the call, cannot tell that case from the common one, a
 * thread blocked in the call: the restore rewinds the call and it runs
 * again here, returning a system PID of this node. Only what the kernel
 * wrote tells them apart, so the call writes into the tables file:
 *
 *  - the thread claims a slot and marks `out` (its first 8 bytes all ones:
 *    no rusage or siginfo the kernel writes starts so), then passes `out`
 *    to the kernel as the call's rusage (wait4) or siginfo (waitid), which
 *    the kernel writes when it reports a child;
 *  - a snapshot carries the claimed slots (Image.waits); the restore writes
 *    them into the new file with `out` marked again, what the kernel wrote
 *    on the node before in `carried`, and the previous node's PIDs in
 *    `prior`;
 *  - after the call: `out` written, the call ran on this node; still marked
 *    with `carried` written, it ran on the node before the last restore, and
 *    its system PID is translated through `prior` instead of the tables.
 *
 * A slot is written only by its holder (and by a restore, while every
 * process is stopped); one whose holder is gone from the PID table (killed
 * in its call) is taken over. `prior` is written only by a restore, and
 * emptied entry by entry by the threads that use it. A call answered two
 * restores back, still untranslated, cannot be helped (`prior` is of the
 * last node only): it is translated as before. */
#define APPSHOT_WAIT_SLOTS 128u
#define APPSHOT_WAIT_OUT 144u /* sizeof(struct rusage); siginfo_t is 128 */

struct appshot_wait_slot {
  int32_t holder;  /* virtual TID of the thread in the call; 0: free */
  uint32_t moved;  /* restores since `carried` was written (restore) */
  uint8_t out[APPSHOT_WAIT_OUT] __attribute__((aligned(8)));
  uint8_t carried[APPSHOT_WAIT_OUT] __attribute__((aligned(8)));
};

struct appshot_waits {
  struct appshot_wait_slot slot[APPSHOT_WAIT_SLOTS];
  uint32_t prior_count; /* pairs of prior in use */
  uint32_t pad;
  /* The previous node's processes: (uint32)virtual << 32 | (uint32)system,
   * as in appshot_entry; FREE once used for a reaped child. Not the live
   * tables: those system PIDs may name other processes here. */
  uint64_t prior[APPSHOT_PID_CAPACITY];
};

/* Where a finished wait call's answer was written (appshot_wait_origin). */
enum appshot_wait_origin {
  APPSHOT_WAIT_HERE = 0,   /* on this node (or nowhere: no child reported) */
  APPSHOT_WAIT_BEFORE = 1, /* on the node before the last restore */
  APPSHOT_WAIT_LOST = 2,   /* two or more restores ago: `prior` is not its */
};

struct appshot_waits *appshot_waits_of(const struct appshot_header *h);
/* Claims a slot for a wait call of thread `holder` (its virtual TID) and
 * marks it; returns the slot, or -1 when all are taken (the call then goes
 * without, as before). With `reclaim` (the caller knows it has no other
 * wait call in progress), a slot the holder itself still holds is taken
 * again: one left by a siglongjmp out of an earlier call. Lock-free and
 * async-signal-safe. */
int appshot_wait_begin(struct appshot_header *h, int32_t holder, int reclaim);
/* The slot's area for the kernel to write (rusage or siginfo). */
void *appshot_wait_out(struct appshot_header *h, int slot);
/* Where the call's answer was written, and *answer: that area (out, or
 * carried from the node before). */
enum appshot_wait_origin appshot_wait_origin(struct appshot_header *h,
                                             int slot, const void **answer);
/* Gives the slot back if `holder` (the caller's virtual TID) holds it;
 * returns 1 if it did. */
int appshot_wait_end(struct appshot_header *h, int slot, int32_t holder);
/* Whether `holder` holds the slot (not so in a process forked by a signal
 * handler that ran during its parent's call). */
int appshot_wait_held(const struct appshot_header *h, int slot,
                      int32_t holder);
/* Whether the slot is held (*holder: by whom) by a call the kernel has
 * answered here and that has not ended: its thread has a child's system
 * PID still to translate, and that child's entry must stay (init's sweep
 * leaves dead processes' entries alone meanwhile). */
int appshot_wait_answered(const struct appshot_header *h, uint32_t slot,
                          int32_t *holder);
/* The virtual PID the previous node's system PID `sid` had; 1 if found. */
int appshot_prior_s2v(const struct appshot_header *h, int32_t sid,
                      int32_t *vid);
/* Drops the pair (vid, sid) from `prior` (its child was reaped: nothing
 * may be told it again). Only that pair: a caller restored between its
 * look-up and this call holds a pair of an older node, which must not
 * drop another process's. */
void appshot_prior_forget(struct appshot_header *h, int32_t vid, int32_t sid);
/* For a restore, before any restored process runs: a slot as a snapshot
 * read it (`out` and `carried`: APPSHOT_WAIT_OUT bytes each), written so
 * that its holder can tell where its call ran (see above). Returns 0, or -1
 * with EINVAL (a slot or holder out of range). */
int appshot_wait_carry(struct appshot_header *h, uint32_t slot,
                       int32_t holder, uint32_t moved, const void *out,
                       const void *carried);
/* Appends (vid, sid) to `prior`; -1 with ENOSPC when it is full. */
int appshot_prior_add(struct appshot_header *h, int32_t vid, int32_t sid);

/* --- The PIDs a restored SysV object shows --------------------------------
 *
 * shm_cpid/shm_lpid, msg_lspid/msg_lrpid and each semaphore's sempid are
 * set by the kernel to whoever made the object or last used it. A restore
 * makes the objects itself (and attaches segments, gives back SEM_UNDO
 * adjustments), so the kernel names the restorer (or nobody, 0) where the
 * image recorded a process of the application. The restore leaves each
 * such field naming a process that is not the application's (the
 * restorer, or 0: src/resources/sysv.ts settleSysvPids) and writes here
 * "while the kernel shows system PID `shown` in this field, the
 * application sees `vpid`". The first use by a process of the application
 * sets the field to that process, which the usual translation names: the
 * entry stops applying by itself. Written by a restore, before any
 * restored process runs; afterwards only an entry's kind changes, to
 * APPSHOT_IPC_PID_FORGOTTEN, when its object goes or a new object gets
 * its system id (appshot_ipc_pids_forget: the library's IPC_RMID and
 * gets, init's sweep). Read without the lock (preload_ipc.c, and a
 * snapshot: the application may overwrite it, so every reader bounds
 * `count` and checks what it finds). */
#define APPSHOT_IPC_PID_SLOTS 4096u
/* appshot_ipc_pid.field: which PID of the object. A semaphore's is its
 * number in the set. */
#define APPSHOT_IPC_SHM_CPID 0
#define APPSHOT_IPC_SHM_LPID 1
#define APPSHOT_IPC_MSG_LSPID 0
#define APPSHOT_IPC_MSG_LRPID 1

struct appshot_ipc_pid {
  int32_t sid;    /* the object's system id */
  uint16_t kind;  /* APPSHOT_SEMID, APPSHOT_SHMID or APPSHOT_MSGID */
  uint16_t field; /* APPSHOT_IPC_*, or the semaphore's number */
  int32_t shown;  /* the system PID the kernel shows (0: nobody) */
  int32_t vpid;   /* the virtual PID the image recorded */
};

struct appshot_ipc_pids {
  uint32_t count; /* entries of pid in use, from the first */
  uint32_t pad;
  struct appshot_ipc_pid pid[APPSHOT_IPC_PID_SLOTS];
};

struct appshot_ipc_pids *appshot_ipc_pids_of(const struct appshot_header *h);
/* Where struct appshot_ipc_pids starts in the file. */
uint64_t appshot_ipc_pids_offset(void);
/* The virtual PID recorded for field `field` of object `sid` of `kind`
 * while the kernel shows `shown` there: 1 and *vpid, or 0 if none is.
 * Lock-free and async-signal-safe. */
int appshot_ipc_pid_recorded(const struct appshot_header *h, enum appshot_kind kind,
                             int32_t sid, uint32_t field, int32_t shown,
                             int32_t *vpid);
/* appshot_ipc_pid.kind of an entry forgotten: it matches no object
 * (APPSHOT_PID is never an entry's kind). */
#define APPSHOT_IPC_PID_FORGOTTEN APPSHOT_PID
/* Forgets every entry of object `sid` of `kind`: it is gone (its IPC_RMID
 * succeeded, init found it gone) or a new object was just made under that
 * system id. An entry outliving its object would apply to the next object
 * the kernel gives the same id: one whose field shows what the entry's
 * `shown` says (0, nobody, as any fresh object's does) would name the old
 * object's recorded process. Lock-free and async-signal-safe: each entry's
 * kind is cleared by one atomic store. */
void appshot_ipc_pids_forget(struct appshot_header *h, enum appshot_kind kind, int32_t sid);

/* Notes (level, name) of socket `ino` with `value`, replacing its note of
 * the same option. Lock-free and async-signal-safe. */
void appshot_note_socket(struct appshot_header *h, uint64_t ino, int32_t level,
                         int32_t name, int32_t value, uint16_t port,
                         uint8_t type);
/* Notes a dnotify watch of directory `ino` with `mask`, made by the
 * process of virtual PID `maker` (APPSHOT_NOTE_DNOTIFY), replacing its
 * note. Lock-free and async-signal-safe. */
void appshot_note_dnotify(struct appshot_header *h, uint64_t ino, int32_t mask,
                          int32_t maker);
/* Notes the SIGEV_SIGNAL registration of message queue `ino` with signal
 * `signo` and `value` (APPSHOT_NOTE_MQ_NOTIFY), replacing any note of that
 * queue. Lock-free and async-signal-safe. */
void appshot_note_mq_notify(struct appshot_header *h, uint64_t ino,
                            int32_t signo, uint64_t value, int32_t owner);
/* Drops the note of message queue `ino`'s registration: only if process
 * `owner` (virtual PID) made it, or whoever did with `owner` 0. */
void appshot_unnote_mq_notify(struct appshot_header *h, uint64_t ino, int32_t owner);
/* The note of message queue `ino`'s registration: 1 with its signal,
 * value and owner (`owner` may be NULL), or 0 if there is none. */
int appshot_mq_notify_noted(const struct appshot_header *h, uint64_t ino,
                            int32_t *signo, uint64_t *value, int32_t *owner);
/* Drops the notes of (level, name) of socket `ino`, and with `port` set,
 * of every socket of `type` noted on that port (a reuseport group's
 * program goes for the whole group). */
void appshot_unnote_socket(struct appshot_header *h, uint64_t ino,
                           int32_t level, int32_t name, uint16_t port,
                           uint8_t type);

/* Drops every note of socket `ino` (closed: a snapshot saw no process of
 * the application hold it). */
void appshot_forget_socket(struct appshot_header *h, uint64_t ino);

/* Whether a lost note may have been about socket `ino` (port 0), or about
 * the reuseport group of `type` on `port` (ino 0), in a copy of
 * `lost_seen` as bytes, each word little-endian (appshot_lost_copy). */
int appshot_lost_maybe(const uint8_t *lost_seen, uint64_t ino,
                       uint16_t port, uint8_t type);
/* Copies `lost_seen` into `out` (APPSHOT_LOST_SEEN_BITS / 8 bytes). */
void appshot_lost_copy(const struct appshot_header *h, uint8_t *out);
/* Forgets every lost note: none of them was of a socket still open. */
void appshot_forget_lost(struct appshot_header *h);

/* A system call straight to the kernel, whatever the process's libc
 * wraps: the kernel's result, -errno on failure. Inside the preload
 * library kill(), semget(), pread() and syscall() are its own wrappers,
 * which take virtual ids and keys; and no libc call here may be a
 * cancellation point. Inline: the preload library's hot paths (the id
 * calls) make it in place. Async-signal-safe, needs no symbol resolved.
 * x86-64 only. */
static inline long appshot_raw_syscall(long nr, long a, long b, long c, long d, long e, long f) {
#if defined(__x86_64__)
  register long r10 __asm__("r10") = d;
  register long r8 __asm__("r8") = e;
  register long r9 __asm__("r9") = f;
  long ret;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                   : "rcx", "r11", "memory");
  return ret;
#else
#error "appshot_raw_syscall: only x86-64 is supported"
#endif
}

/* --- Creating and mapping ----------------------------------------------- */

/* Creates the table file at path (O_EXCL) and maps it. Returns NULL and sets
 * errno on failure; nothing is left behind then. */
struct appshot_header *appshot_table_create(const char *path, const char *aid,
                                            uint64_t key_salt);
/* Maps an existing table file. Returns NULL and sets errno (EPROTO for a
 * file of another layout). */
struct appshot_header *appshot_table_open(const char *path);
/* The same for a descriptor of the file, which stays open (the preload
 * library keeps one across exec and changes of user: see preload_fd.c). */
struct appshot_header *appshot_table_map_fd(int fd);
/* The lowest number for the descriptor of the table file that each process
 * of an application keeps open across exec (named by APPSHOT_TABLES_FD):
 * high, out of the way of programs that expect the lowest free numbers or
 * dup2 onto small ones (shells use up to 9, then 10 and up), yet below the
 * usual soft limit of 1024, and within a lower one (a quarter of it is left
 * above). */
int appshot_tables_fd_base(void);
/* The size of every table file, and of every mapping of one. */
uint64_t appshot_table_bytes(void);
void appshot_table_close(struct appshot_header *h);

/* --- Lookups: lock-free, async-signal-safe ------------------------------ */

/* Returns 1 and sets *out when found, 0 when the table holds no such id. */
int appshot_v2s(const struct appshot_header *h, enum appshot_kind kind,
                int32_t vid, int32_t *out);
int appshot_s2v(const struct appshot_header *h, enum appshot_kind kind,
                int32_t sid, int32_t *out);
/* The flags of the entry of system id `sid`: 1 and *flags, or 0 when the
 * table holds no such id. */
int appshot_s2flags(const struct appshot_header *h, enum appshot_kind kind,
                    int32_t sid, uint32_t *flags);
/* Reads entry `slot` of a table; returns 0 when the slot is free. */
int appshot_entry_at(const struct appshot_header *h, enum appshot_kind kind,
                     uint32_t slot, int32_t *vid, int32_t *sid,
                     uint32_t *flags, int32_t *owner);
/* The number of entries of `kind`'s table, from the layout: what a reader
 * outside the application walks to, never the file's own `capacity`
 * field, which the application can overwrite. */
uint32_t appshot_capacity(enum appshot_kind kind);
/* Where `kind`'s struct appshot_entry[capacity] starts in the file. */
uint64_t appshot_entries_offset(enum appshot_kind kind);
/* A lock-free walk of every entry of `kind` that stops once it has found
 * as many as the table holds, rather than at the capacity: read through a
 * shared mapping, each page of a tmpfs hole touched is allocated and
 * faulted in, and init's sweep, every 2 s, made a table file of a few live
 * entries take ~280 KiB of memory instead of ~40. It stops there only if,
 * when it gets there, no writer holds the lock (a writer inside its
 * change, or one stopped or dead there, may have stored an entry before
 * counting it), the count is the same (less what the walker removed
 * itself) and no entry was added since (slot_hint unchanged: an insert
 * moves it before it stores its entry); otherwise it walks on to the
 * capacity. It can still miss an entry that was there throughout when
 * inserts wrap slot_hint all the way round during one walk (a walker
 * preempted that long): fit for init's sweep, whose next round finds what
 * this one missed, not for a reader that must see every entry (the
 * engine's readTables finds the used slots with pread of the file, which
 * reads holes as zeros without allocating them).
 *
 *   struct appshot_scan sc;
 *   appshot_scan_begin(h, kind, &sc);
 *   for (uint32_t s = 0; s < capacity && !appshot_scan_over(h, kind, &sc); s++)
 *     if (appshot_entry_at(h, kind, s, ...)) appshot_scan_found(&sc);
 */
struct appshot_scan {
  uint32_t left; /* entries still to find; UINT32_MAX: read to the capacity */
  uint32_t live; /* the count the stop is checked against */
  uint32_t hint; /* slot_hint at the start */
};
void appshot_scan_begin(const struct appshot_header *h, enum appshot_kind kind,
                        struct appshot_scan *sc);
int appshot_scan_over(const struct appshot_header *h, enum appshot_kind kind,
                      struct appshot_scan *sc);
static inline void appshot_scan_found(struct appshot_scan *sc) {
  if (sc->left != UINT32_MAX && sc->left) sc->left--;
}
/* The reader removed an entry it found: the count goes down by it. */
static inline void appshot_scan_removed(struct appshot_scan *sc) {
  if (sc->live) sc->live--;
}

/* --- Writes: take the lock ---------------------------------------------- */

/* Maps sid to a newly allocated virtual id, or returns the one it already
 * has. An existing PID entry whose APPSHOT_F_THREAD bit differs from
 * `flags` is stale (a thread's TID now names a process, or the reverse) and
 * is replaced. Returns the virtual id, or -1 with errno (ENOSPC when the
 * table is full). */
int32_t appshot_map_system(struct appshot_header *h, enum appshot_kind kind,
                           int32_t sid, uint32_t flags, int32_t owner);
/* Binds a given virtual id to a given system id (restore, init, keys).
 * Fails with EEXIST when either id is mapped already. */
int appshot_bind(struct appshot_header *h, enum appshot_kind kind,
                 int32_t vid, int32_t sid, uint32_t flags, int32_t owner);
/* Removes the mapping of a system id; returns 1 if there was one. For a
 * PID that has thread entries, the threads' entries go too. */
int appshot_unmap_system(struct appshot_header *h, enum appshot_kind kind,
                         int32_t sid);
/* A process was reaped: drops its PID entry, unless the PID lives on as
 * the id of a process group that still has members (its leader exited
 * first, as a pipeline's often does): kill(-pgid), setpgid and tcsetpgrp
 * must still reach that group by its virtual id, and the kernel does not
 * hand the number out again meanwhile. Returns 1 if the entry went. */
int appshot_forget_process(struct appshot_header *h, int32_t sid);
/* The same, only if `sid` is still mapped to `vid`: a caller that looked
 * the pair up, was snapshotted and restored before it got here, holds a
 * system PID of the old node, which here may name a live process. */
int appshot_forget_pair(struct appshot_header *h, int32_t vid, int32_t sid);
/* Removes the mapping (vid, sid) if it is still that; 1 if it went. */
int appshot_unmap_pair(struct appshot_header *h, enum appshot_kind kind,
                       int32_t vid, int32_t sid);
/* Sets flag bits on the entry of a system id. */
void appshot_set_flags(struct appshot_header *h, enum appshot_kind kind,
                       int32_t sid, uint32_t flags);

/* What a hold of the lock keeps to give back at its end: the caller's
 * signal mask, and the calling thread's robust-list pending entry as it
 * was (appshot_table.c, "The writer lock"). On the holder's stack, never
 * in the file. */
struct appshot_held {
  sigset_t mask;
  void *robust_head;  /* the thread's struct robust_list_head; NULL: none */
  void *pending_was;  /* its list_op_pending before the lock */
};

/* The lock, for callers that must make a check-then-create atomic (semget
 * of a key the application has not used yet). Signals stay blocked from
 * lock to unlock; `held` receives what the unlock gives back. The _locked
 * variants of the writers are for use between these two calls. A lock
 * whose last holder died is repaired before this returns. Returns 0, or -1
 * with errno (EDEADLK: the word names the caller's own thread; ETIMEDOUT)
 * and nothing held. The calling thread must make no call of glibc's
 * robust mutexes while it holds it (see appshot_table.c). */
int appshot_lock(struct appshot_header *h, struct appshot_held *held);
/* How long appshot_lock (and every writer that takes the lock) waits before
 * giving up with ETIMEDOUT, in ms; 0, the default, waits as long as the
 * holder lives (one gone without the kernel's mark is found within about
 * a second: appshot_table.c, the lock's comment). The
 * preload library keeps the default: the lock is its own application's, and
 * its holder (a thread of that application) lets go within microseconds.
 * The engine, the CLI and appshot-init set a limit: the file is the
 * application's to write, and a lock word it wrote itself (a thread id that
 * never lets go) must not hang them, least of all in a snapshot's frozen
 * window. A holder stopped by a snapshot is let run on until it lets go
 * (src/ptrace/freezer.ts), so an honest application never meets the limit. */
void appshot_set_lock_patience(unsigned ms);
/* With `on`, a hold of the lock (appshot_lock, appshot_repair_if_dead)
 * leaves SIGBUS and SIGSEGV unblocked: for a process that reads the file
 * under a fault guard (the addon: addon/src/tablesguard.h). A fault the
 * kernel raises while its signal is blocked ends the process whatever its
 * handler, and the application may shrink its file under the holder at
 * any moment. Off by default: the preload library and init keep every
 * signal out of the lock. */
void appshot_set_lock_spares_faults(int on);
void appshot_unlock(struct appshot_header *h, const struct appshot_held *held);
/* For a reader that must see every object the application has, a
 * snapshot's: if the last holder of the lock died holding it, the repair
 * its next locker would make (indexes rebuilt, a dead creator's
 * reservation settled: its object adopted if it made one) is made now,
 * and the lock let go. Tries the lock without waiting: the application
 * is stopped, and a stopped thread that holds it would never let go.
 * A word that names a thread which no longer exists (kill(TID, 0) says
 * ESRCH) is a dead holder's, marked by the kernel or not.
 * Returns 1 if it repaired, 0 if the lock was free (nothing to repair),
 * or -1 with errno EBUSY (a holder, or a word that names a live thread). */
int appshot_repair_if_dead(struct appshot_header *h);
int appshot_bind_locked(struct appshot_header *h, enum appshot_kind kind,
                        int32_t vid, int32_t sid, uint32_t flags, int32_t owner);
int32_t appshot_map_system_locked(struct appshot_header *h,
                                  enum appshot_kind kind, int32_t sid,
                                  uint32_t flags, int32_t owner);
/* appshot_unmap_system, the lock held: a key bound ahead of the object it
 * was for, taken back when the object could not be made under it. */
int appshot_unmap_system_locked(struct appshot_header *h, enum appshot_kind kind,
                                int32_t sid);

/* A keyed create (semget... with IPC_CREAT of a key the application has
 * not bound, or whose object is gone), all under one hold of the lock, so that a racer of the same
 * key waits for it and then finds the key bound:
 *   appshot_reserve_key_locked      the virtual key in the entry array,
 *                                   APPSHOT_F_RESERVED, in no index;
 *   appshot_aim_reservation_locked  before each attempt, the system key
 *                                   about to be made (an object under it
 *                                   found later is this create's);
 *   the object made, its id mapped, then
 *   appshot_commit_key_locked       the key bound: indexed, flag cleared;
 *   or appshot_drop_reservation_locked if nothing was made.
 * Whatever instant the creator dies at, the key is reserved (settled by
 * the next locker: the object adopted, or the reservation dropped) or
 * bound: never an object of its making that no entry names. Reserve and
 * aim note the creator and the time in the header (struct
 * appshot_creating): an object under the aimed key is adopted only if the
 * kernel's record of it shows that creator made it there after it aimed;
 * another's (met as EEXIST, or made there between the aim and the get) is
 * left alone and the reservation dropped. Reserve returns 0 with the
 * entry's slot, or -1 with ENOSPC; commit returns -1 with EEXIST if either
 * key is bound already (only a file written from outside has that). */
int appshot_reserve_key_locked(struct appshot_header *h, enum appshot_kind kind,
                               int32_t vkey, uint32_t *slot);
void appshot_aim_reservation_locked(struct appshot_header *h, enum appshot_kind kind,
                                    uint32_t slot, int32_t skey);
int appshot_commit_key_locked(struct appshot_header *h, enum appshot_kind kind,
                              uint32_t slot);
void appshot_drop_reservation_locked(struct appshot_header *h, enum appshot_kind kind,
                                     uint32_t slot);

/* A system IPC key for this AID's virtual key, try number `attempt`.
 * Never IPC_PRIVATE and never -1. */
int32_t appshot_system_key(const struct appshot_header *h, int32_t vkey,
                           uint32_t attempt);

const char *appshot_kind_name(enum appshot_kind kind);

/* --- Privileged readers: the tables are untrusted input -----------------
 *
 * Every process of an application holds a read-write descriptor of its
 * table file, including processes that dropped to another uid, so anything
 * that uid runs (ptrace, pidfd_getfd) may rewrite the tables. Whoever acts
 * with more privilege on the ids found there (init, the CLI as root) acts
 * only on what the kernel confirms is the application's. Not for the
 * preload library. */

/* 1 if `pid` is a process of the application whose init is `init_pid` (0:
 * unknown or gone) and whose table file is `tables_path` (the
 * registration's own path, the only one looked up): a descendant of init
 * (init is a child subreaper, so daemons stay below it), or a process that
 * holds a descriptor of the table file opened read-write, the file told
 * by its device and inode, pinned while its flags are read (before Linux
 * 5.14, whose fdinfo ties the flags to no file, only for a process whose
 * uids are all the owner's), not by the text its link reads (every process of
 * the application does, across exec and changes of user; a process
 * outside it can come by one only from one of them, so it is one of
 * theirs, or of their uid), or a process all of whose uids are the table
 * file owner's and whose environment names these tables in APPSHOT_TABLES
 * (`appshot exec` and its children, whose parent is the CLI). Never PID 1
 * or below, never init itself. Reads /proc only, with no allocation
 * (getdents, not opendir); async-signal-safe. */
int appshot_pid_belongs(pid_t pid, pid_t init_pid, const char *tables_path);
/* Sends `sig` to `pid` only if it belongs (see above), through a pidfd
 * opened before the check, so a PID reused meanwhile is not signalled.
 * Returns 0, or -1 with errno (EPERM when it does not belong). */
int appshot_signal_member(pid_t pid, int sig, pid_t init_pid,
                          const char *tables_path);
/* The same two with the table file's identity and owner taken from
 * `tables_fd`, a descriptor of it the caller holds (init's), not from
 * whatever is at `tables_path` now: a file unlinked under a live init and
 * made again by another user would make that user's processes count by
 * their environment, and the application's own, which hold the old file,
 * not (review r452 F5). `tables_path` is still what an environment must
 * name. -1: by the path, as above. */
int appshot_pid_belongs_fd(pid_t pid, pid_t init_pid, const char *tables_path, int tables_fd);
int appshot_signal_member_fd(pid_t pid, int sig, pid_t init_pid, const char *tables_path, int tables_fd);
/* Now, in seconds since the epoch, on the clock the kernel stamps a SysV
 * object's ctime with (the time of its last tick, CLOCK_REALTIME_COARSE):
 * `created` below must be read from it, never from CLOCK_REALTIME, which
 * runs ahead of it by up to a tick, and by tens of milliseconds on a loaded
 * machine. An object made a moment after a second began on CLOCK_REALTIME
 * may carry the second before: compared with the precise time of its
 * application's registration, it would never be the application's, and
 * nobody would ever remove it. */
int64_t appshot_ipc_clock(void);
/* 1 if the SysV object `sid` (APPSHOT_SEMID, _SHMID or _MSGID) may be
 * removed as the application's (see the rule in appshot_table.c). `salt`
 * (the file's key_salt) and `created` (when the file was made, in seconds
 * since the epoch on appshot_ipc_clock) are trusted copies: the registry's
 * (app.json), or what the file said before any process of the application
 * ran; `h` is read for its key tables and its keyed create in progress
 * (struct appshot_creating, which can only narrow what a reservation
 * proves) only. */
int appshot_ipc_owned(const struct appshot_header *h, enum appshot_kind kind,
                      int32_t sid, uint64_t salt, int64_t created,
                      pid_t init_pid, const char *tables_path);
/* IPC_RMID on `sid` if appshot_ipc_owned; returns 1 if it was removed.
 * `kind` may also be a key table's (APPSHOT_SEMKEY, _SHMKEY, _MSGKEY), `sid`
 * then a system key: the object made under that key, found by it, under
 * the same rule. A keyed object's key is bound before the object is made
 * (the restore's CreateBound), or reserved (the preload library's create:
 * appshot_reserve_key_locked), so an object whose maker was killed before
 * its id was bound is found this way; callers walk the id tables, then the
 * key tables, reserved entries included. */
int appshot_ipc_remove_owned(const struct appshot_header *h,
                             enum appshot_kind kind, int32_t sid,
                             uint64_t salt, int64_t created, pid_t init_pid,
                             const char *tables_path);
/* A process, told apart from a later one given its PID by its start time
 * (/proc/PID/stat). */
struct appshot_process_id {
  pid_t pid; /* 0: none */
  uint64_t start;
};
/* Fills `id` for process `pid` as it is now: 0, or -1 (no such process,
 * or PID 1 or below; `id` then names none). */
int appshot_process_id_of(pid_t pid, struct appshot_process_id *id);
/* appshot_ipc_remove_owned, asked by an init: `starter` is the process
 * that started it (read as it started), whose private segments stay the
 * application's after it died (see the rule in appshot_table.c). */
int appshot_ipc_remove_owned_started(const struct appshot_header *h,
                                     enum appshot_kind kind, int32_t sid,
                                     uint64_t salt, int64_t created,
                                     pid_t init_pid, const char *tables_path,
                                     const struct appshot_process_id *starter);

#ifdef __cplusplus
}
#endif

#endif
