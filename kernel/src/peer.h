/*
 * Peers: one connection to the kernel each. A peer owns nodes, holds handles, has one
 * outbound queue and one receiving quota. It has no address: nothing in the wire format
 * names a peer, except the secret key a connection can read about itself (used to prove
 * that one process holds two peers, for CAPBUS_CMD_HANDLE_TRANSFER).
 *
 * Lifetime: created by the kernel when a connection appears (adopted socketpair end,
 * accepted connection, or CAPBUS_CMD_PEER_CREATE), freed by cb_peer_disconnect when the
 * connection ends (EOF, error, CAPBUS_CMD_DISCONNECT, a hostile peer, or kernel stop).
 * Disconnecting destroys its live nodes in one transaction, releases its handles and drops
 * its queue; what it sent before stays queued at the receivers.
 */
#ifndef CB_PEER_H
#define CB_PEER_H

#include <stdbool.h>
#include <stdint.h>

#include "list.h"
#include "map.h"
#include "queue.h"
#include "quota.h"
#include "retry.h"

struct cb_kernel;
struct cb_handle;

struct cb_seed {
	uint32_t n_handles;
	uint32_t payload_size;
	struct cb_user *charged_to; /* its heap counts in this uid's queued bytes (user_bytes) */
	uint64_t cost;
	uint64_t *handles; /* ids in this peer, each holding one user reference */
	uint8_t *payload;
};

struct cb_peer {
	struct cb_kernel *kernel;
	int fd;
	uint64_t serial;
	uint8_t key[16];
	uint32_t uid, gid, pid;     /* whom this peer belongs to: who connected, or who wrote the
				     * PEER_CREATE (its credentials); then whoever writes to it */
	uint32_t sender_pid;        /* the last pid that wrote to this peer's socket ... */
	uint64_t sender_process_id; /* ... and its pidfs identity (loop.c, process_identity) */
	struct cb_user *user;       /* charged for the connection: its socket (a held fd), its place
				     * in peers_per_user, its backlog, its fds in flight, the handles
				     * it gets from now on; moves with `uid` to whoever writes to it
				     * (cb_peer_charge_to) */
	uint64_t next_handle;       /* id counter, never decreases */
	struct cb_map handles_by_id;
	struct cb_map handles_by_node;
	uint32_t n_owned;           /* live nodes owned */
	struct cb_queue queue;
	struct cb_quota quota;
	struct cb_seed *seed;
	uint32_t violations;
	uint32_t epoll_events;      /* what the kernel currently polls this peer's fd for */
	bool want_metadata;         /* CAPBUS_PEER_FLAG_WANT_METADATA */
	bool hold;                  /* CAPBUS_PEER_FLAG_HOLD: messages written as RECV takes them */
	bool recv_waiting;          /* a RECV waits for a message (hold only): ... */
	bool recv_by_priority;      /* ... its CAPBUS_RECV_FLAG_PRIORITY, */
	int32_t recv_priority;      /* ... its least priority, */
	uint64_t recv_cookie;       /* ... and its cookie */
	bool charged_as_adopted;    /* the embedder chose whom to charge (capbus_kernel_adopt with
				     * a uid): not moved to whoever writes (cb_peer_charge_to) */
	bool monitor;               /* receives copies of all traffic (monitor.c) */
	uint64_t monitor_via;       /* the serial of the monitor node it attached through (its
				     * destruction stops it), or 0 (granted by the embedder) */
	bool monitor_trusted;       /* the embedder granted it the monitor: may make monitor nodes */
	uint64_t monitor_dropped;   /* monitor records lost to a full queue */
	size_t monitor_bytes;       /* heap its queued monitor records take (CB_MONITOR_BYTES_MAX) */
	uint64_t sent_messages;     /* sends it committed (a multicast counts once) ... */
	uint64_t sent_bytes;        /* ... their payload bytes (a memfd's size) */
	uint64_t received_messages; /* data messages written to it ... */
	uint64_t received_bytes;    /* ... their payload bytes */
	struct cb_link tracked;     /* its tracked messages still queued (struct cb_tracking.link) */
	uint64_t snapshot_bytes;    /* its snapshots (CAPBUS_CMD_SNAPSHOT) queued or unread in its
				     * socket: counted in its uid's snapshot_bytes until seen read */
	uint32_t snapshots_queued;  /* of them, those not written to its socket yet */
	uint64_t snapshot_wakeup;   /* the loop wakeup it last asked for one in (+1; 0: never) */
	bool closing;               /* CAPBUS_CMD_SHUTDOWN: its nodes are destroyed (but those it
				     * kept); it may make no more */
	bool draining;              /* its SHUTDOWN's destroy is being carried out: holders' notes
				     * say DRAINING */
	bool doomed;                /* disconnect at the next safe point */
	bool read_closed;           /* it shut down its writing side: it still reads (half-close) */
	bool stalled;               /* its next frame waits for fd room (in kernel->stalled) */
	bool gated;                 /* not read because its uid's backlog is full (kernel->gated) */
	uint32_t fds_in_socket;     /* fds written to its socket since it was last seen empty */
	uint64_t send_mark;         /* the send (kernel->send_serial) that last prepared a
				     * destination here: its new handles are counted already */
	struct cb_link kernel_link; /* kernel->peers */
	struct cb_link dirty_link;  /* kernel->dirty while frames wait to be flushed */
	struct cb_link doomed_link; /* kernel->doomed */
	struct cb_retry_item stalled_retry; /* kernel->stalled while stalled (out while it is retried) */
	struct cb_retry_item holder_retry;  /* in kernel->fd_holders while fds_in_socket > 0 */
	struct cb_link gated_link;  /* kernel->gated */
};

/* Takes ownership of `fd` (closed on failure). Returns the peer or NULL with *error set. */
struct cb_peer *cb_peer_new(struct cb_kernel *kernel, int fd, uint32_t uid, uint32_t gid, uint32_t pid, int *error);
void cb_peer_disconnect(struct cb_peer *peer);
/* Destroys every live node `peer` owns but those marked kept, in one transaction
 * (CAPBUS_CMD_SHUTDOWN): 0, or -ENOMEM with nothing done. */
int cb_peer_destroy_nodes(struct cb_peer *peer);
/* Marks the peer to be disconnected once the current command is done. */
void cb_peer_doom(struct cb_peer *peer);
/* Charges the connection, from now on, to the uid that writes to it (cb_command_dispatch):
 * its own cost (its socket, its place among that uid's peers, its backlog, the fds in flight
 * in its socket) moves to that uid, checked as new charges to it would be: peers_per_user,
 * the fair shares of held fds and of fds in flight, and the backlog (what moves may bring the
 * uid to at most half of user_backlog, so that moved connections never gate its own peers).
 * The handles the peer holds stay charged to the uid they were made for (handle.h), and
 * those it gets from now on are the new uid's. A connection handed to a
 * process of another uid is that uid's to spend, not its maker's. Returns 0, or -EDQUOT or
 * -ENOMEM with no effect (it stays charged to the previous uid). */
int cb_peer_charge_to(struct cb_peer *peer, uint32_t uid, uint32_t gid, uint32_t pid);
/* Marks that `peer` has frames to flush. */
void cb_peer_dirty(struct cb_peer *peer);
/* Is what the kernel queued for it, or for its uid, past the backlog bound (queue.h)? */
bool cb_peer_over_backlog(const struct cb_peer *peer);
/* Its (or its uid's) held notifications are past the backlog bounds: of its commands only
 * those that drain them are carried out (RECV, PEER_SET_FLAGS, PEER_QUERY, DISCONNECT). */
bool cb_peer_draining_only(const struct cb_peer *peer);
/* Re-arms epoll for what the peer currently needs. */
void cb_peer_update_events(struct cb_peer *peer);
struct cb_peer *cb_peer_by_key(struct cb_kernel *kernel, const uint8_t key[16]);
uint64_t cb_peer_map_key(const void *peer); /* key of kernel->peers_by_key */
/* A seed of `n_handles` handles and `payload_size` bytes for a peer of `user`: charged to
 * its user_bytes like queued messages (quota.h), since the kernel keeps it until it is
 * taken. NULL with *error EDQUOT or ENOMEM. */
struct cb_seed *cb_seed_new(struct cb_kernel *kernel, struct cb_user *user, uint32_t n_handles,
			    uint32_t payload_size, int *error);
/* Frees a seed whose handle references went to its peer (taken), or were released. */
void cb_seed_discard(struct cb_kernel *kernel, struct cb_seed *seed);
/* Releases a seed's handle references and frees it. */
void cb_seed_free(struct cb_peer *peer, struct cb_seed *seed);

#endif
