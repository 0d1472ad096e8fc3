// The front door's forwarding path (issue 15): bytes shuttled between an
// accepted client socket and an instance's socket by one thread with
// epoll, so that Node's event loop is not woken per chunk. Node keeps the
// decisions (which instance, when); this side reports what happened.
#ifndef APPSHOT_FORWARD_H
#define APPSHOT_FORWARD_H
#include <stddef.h>
#include <stdint.h>

enum fwd_kind {
  // The instance accepted: bytes flow; Node may close its own descriptor
  // of the client socket (this side holds a duplicate).
  FWD_CONNECTED = 1,
  // The instance refused: nothing was read from or written to the client,
  // whose socket is still Node's to hold or forward again.
  FWD_REFUSED = 2,
  // Both directions ended (or one failed): both sockets released here.
  FWD_CLOSED = 3,
  // Accepted by the thread on a listener and sent at once to the port of
  // Node's grant (fwd_route): connected, the client's bytes on their way.
  FWD_FORWARDED = 4,
  // Accepted by the thread, not forwarded (no grant): fd is Node's now.
  FWD_ACCEPTED = 5,
  // The process of a listener's granted instance ended (pid, port): the
  // grant is revoked; until Node grants again every connection is handed
  // over (FWD_ACCEPTED).
  FWD_DIED = 6,
};

struct fwd_event {
  uint32_t id;
  int kind;
  int err;              // errno of a refusal or of the failure that closed
  uint64_t to_instance; // bytes client -> instance
  uint64_t to_client;   // bytes instance -> client
  uint64_t at_ns;       // CLOCK_MONOTONIC (process.hrtime's clock)
  // FWD_FORWARDED and FWD_ACCEPTED:
  uint32_t lid;         // the listener (fwd_listen)
  int fd;               // FWD_ACCEPTED: the client's socket, Node's to close
  uint32_t peer_ip;     // the client, host order
  uint16_t peer_port;
  uint16_t port;        // FWD_FORWARDED: where it went; FWD_DIED: the grant's
  int32_t pid;          // FWD_DIED: the process that ended
};

// Called on the forwarding thread once per epoll wake-up with what
// happened in it (n >= 1); the events are only valid during the call.
typedef void (*fwd_report_fn)(void *ctx, const struct fwd_event *events, int n);

struct fwd_loop;

// Starts the thread. NULL and *err set on failure.
struct fwd_loop *fwd_loop_start(fwd_report_fn report, void *ctx, int *err);

// Forwards client_fd (not taken: it is duplicated) to 127.0.0.1:port. The
// connect is non-blocking and started here. 1: it is done already (no
// FWD_CONNECTED event follows, and the client's pending bytes were sent);
// 0: its outcome comes as an event; either way the close comes as one with
// this id. -errno: nothing was started (refused on the spot, or no
// descriptors); the client's socket is untouched.
int fwd_connect(struct fwd_loop *loop, int client_fd, uint16_t port, uint32_t id);

// The thread accepts on a duplicate of listen_fd from now on (the caller
// stops accepting on its own): each connection is forwarded at once while
// a grant lasts, else handed over (FWD_ACCEPTED). Listeners of one group
// (a service) share a bound: once the connections handed over and not yet
// let go of (fwd_unhold) number max_held, none of them accepts until one
// is; the kernel's listen backlog holds the rest. The last max_held given
// for a group counts. 0 or -errno.
int fwd_listen(struct fwd_loop *loop, int listen_fd, uint32_t lid, uint32_t group, uint32_t max_held);

// Node has let go of n connections handed over on the listener (their
// descriptors closed, or forwarded and closed).
void fwd_unhold(struct fwd_loop *loop, uint32_t lid, uint32_t n);

// Node's grant for a listener: up to `capacity` connections open at once
// to 127.0.0.1:port (0: none, hand every connection over). `seen` is how
// many FWD_FORWARDED of this listener Node has handled; those not yet
// handled count against the capacity. Returns their number (so 0 means
// Node's picture is complete), or -ENOENT. pid (> 0): the instance's
// process; the thread watches it (pidfd) and revokes the grant the
// moment it ends (FWD_DIED), and grants nothing for a process already
// ended.
int64_t fwd_route(struct fwd_loop *loop, uint32_t lid, uint16_t port, uint32_t capacity, uint32_t seen, int32_t pid);

// Stops accepting on the listener (its descriptor closed).
void fwd_unlisten(struct fwd_loop *loop, uint32_t lid);

// The connections still open (not yet closed by the thread) that are
// named in ids (fwd_connect's, or the thread's FWD_FORWARDED) or were
// forwarded under a grant of a listener in lids, whether or not their
// FWD_FORWARDED has reached Node yet: how many. With shut, each is ended
// too (once): both its sockets are shut down, which the thread sees as
// both ends closing and reports as usual (FWD_CLOSED; FWD_REFUSED if it
// was still connecting). For a serve that stops: a client that neither
// sends nor closes, or an instance that never answers, would hold it for
// ever. Sorts ids and lids in place.
int fwd_shut(struct fwd_loop *loop, uint32_t *ids, size_t nids, uint32_t *lids, size_t nlids, int shut);

// Ends the thread and releases every connection's descriptors (without
// reports).
void fwd_loop_stop(struct fwd_loop *loop);

#endif
