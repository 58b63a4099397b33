/*
 * Queues: each peer's outbound frames, in the order the kernel committed them.
 *
 * Global order (docs/design.md 2.1, rule 8): the kernel is one thread, so every transaction
 * (a send to any number of destinations, a destroy of any number of nodes, a release) is
 * committed at one instant and stamped with the next value of a kernel-wide sequence; its
 * entries are appended to each receiver's FIFO queue before the next transaction starts.
 * Every queue is thus sorted by sequence, which gives any two receivers the same relative
 * order for messages they both get, and orders anything sent after a receive after it.
 * Replies go first: a peer waiting for the answer to a command must not have to drain a
 * flood of messages before it (replies are not messages; rule 8 orders messages and
 * notifications, and their order is untouched). A reply still follows whatever already
 * sits in the socket.
 *
 * Frames are written to the peer's non-blocking socket as soon as it takes them; what it
 * does not take stays here (charged to quotas) and the kernel never waits for a reader.
 *
 * A frame with fds is written only when they fit the in-flight fd budget (quota.h) and the
 * receiver's own bound on unread fds in its socket (CB_SOCKET_FDS_MAX). When they do not, or
 * Linux itself refuses them for now (ETOOMANYREFS, ENOBUFS), the receiver is "stalled": its
 * queue, in order, waits, and the loop retries it after a short, growing delay (loop.c).
 * Nothing accepted is failed or dropped for it, and no receiver is cut off for it. Linux
 * says nothing when a receiver reads, so fds written to a socket are counted as landed once
 * the socket is seen empty (SIOCOUTQ 0): on the receiver's next flush, or at a retry.
 */
#ifndef CB_QUEUE_H
#define CB_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "capbus/uapi.h"
#include "list.h"
#include "quota.h"

struct cb_handle;
struct cb_message;
struct cb_peer;
struct cb_user;

/* Unread fds one receiver's socket may hold: at least one message's worth. */
#define CB_SOCKET_FDS_MAX (4 * CAPBUS_FDS_MAX)

struct cb_qentry {
	struct cb_link link;
	struct cb_link ranked_link;  /* queue->ranked while queued with a priority other than 0 */
	struct cb_message *message;  /* payload and fds, or NULL */
	struct cb_user *charged_to;  /* sending user charged on the receiver, or NULL */
	uint32_t charged_for;        /* the receiving uid it was charged for (quota.h) */
	struct cb_amount charge;
	uint64_t seq;
	int passed_fd;               /* an fd to pass and then close (PEER_CREATE), or -1 */
	struct cb_user *passed_for;  /* the uid passed_fd is held for (quota.h), or NULL */
	bool is_reply;
	bool in_backlog;             /* counted in backlog_bytes */
	bool held_counted;           /* ... and in held_backlog (queue.h: cb_queue_hold) */
	bool monitor_record;         /* a MONITOR record: counted in its peer's monitor_bytes */
	bool prepaid;                /* a handle's NODE_DESTROY, paid with the handle: in no backlog */
	bool tracked;                /* a struct cb_tracking follows the header (cb_qentry_tracking) */
	bool snapshot;               /* a SNAPSHOT reply (passed_fd its memfd): counted in its
				      * peer's snapshots_queued until written */
	struct cb_handle *note_of;   /* that handle while both live: it withdraws its note when it is
				      * freed first (cb_queue_withdraw), so that a queued note never
				      * outlives what paid for it; or NULL */
	struct cb_user *backlog_of;  /* the uid whose backlog it counts in if not the peer's
				      * (cb_queue_refuse), with a reference (n_charges), or NULL */
	uint32_t header_size;
	uint64_t header[];           /* capbus_frame + body, 8-byte aligned */
};

struct cb_queue {
	struct cb_link taken;   /* held entries a RECV took: written first, before its reply */
	struct cb_link replies;
	struct cb_link entries;
	struct cb_link ranked;  /* the entries of a priority other than 0, in queue order: a
				 * receive by priority looks at these (and at the oldest of priority
				 * 0), not at the whole queue, which is mostly of priority 0 */
	size_t n_entries;
	size_t backlog_bytes;   /* memory of queued replies and notifications: what the kernel
				 * itself queues, charged to no sender (real bytes, headers and
				 * bookkeeping included); past CAPBUS_REPLY_BACKLOG_MAX the peer's
				 * commands are not read until it reads */
	size_t held_backlog;    /* the part of it in `entries` of a peer that holds them: its
				 * RECVs drain it, not its reads (cb_peer_over_backlog) */
	size_t foreign_backlog; /* the part of it charged to another uid than the peer's
				 * (backlog_of): stays there when the connection moves */
	uint64_t continued_seq; /* the seq of the last message or notification written if it
				 * said CONTINUE (the reader waits for one more of it), else 0 */
};

/* A tracked message's sender (CAPBUS_SEND_FLAG_TRACK), told if the message is dropped
 * undelivered. Kept after the header of tracked entries only: other entries pay nothing. */
struct cb_tracking {
	struct cb_link link;    /* in sender->tracked while sender is set */
	struct cb_peer *sender; /* NULL once that sender is gone (cb_queue_untrack) */
	uint64_t cookie;        /* the cookie of the send */
};

void cb_queue_init(struct cb_queue *queue);
/* Allocates an entry with `header_size` bytes of header. */
struct cb_qentry *cb_qentry_new(uint32_t header_size);
/* ... and room for a struct cb_tracking after it, linked to `sender`'s tracked list. */
struct cb_qentry *cb_qentry_new_tracked(uint32_t header_size, struct cb_peer *sender, uint64_t cookie);
struct cb_tracking *cb_qentry_tracking(struct cb_qentry *entry);
void cb_qentry_free(struct cb_qentry *entry);
/* The heap an entry takes: the entry, its header words, and the allocator's own. */
size_t cb_qentry_cost(const struct cb_qentry *entry);
void cb_queue_push(struct cb_peer *peer, struct cb_qentry *entry);
/* cb_queue_flush's result when the next frame waits for fd room. */
#define CB_FLUSH_STALLED 1
/* Writes what the socket takes: 0 (all, or the socket is full), CB_FLUSH_STALLED, or
 * -errno if the peer's socket is broken (the peer is gone). */
int cb_queue_flush(struct cb_peer *peer);
/* Counts the fds in the peer's socket as landed if it is empty. */
void cb_queue_reclaim_fds(struct cb_peer *peer);
/* Drops everything queued (disconnect), returning charges and closing fds. Each tracked
 * message not written yet becomes a CAPBUS_MSG_UNDELIVERED notice to its sender (one
 * transaction for all of them); a sender that cannot be told for want of memory is
 * disconnected, as for any notification. */
void cb_queue_drop(struct cb_peer *peer);
/* The messages `sender` tracks (still queued at their receivers) forget it: it is going. */
void cb_queue_untrack(struct cb_peer *sender);

/* Queues a notification of `kind` about the receiver's id `destination`. */
int cb_queue_notify(struct cb_peer *peer, uint16_t kind, uint16_t flags, uint64_t destination, uint64_t seq);
/* A notification allocated ahead, with the handle it is about (bus1's prepaid NODE_DESTROY):
 * NULL on ENOMEM. Freed with cb_qentry_free unless queued by cb_queue_notify_prepaid. */
struct cb_qentry *cb_queue_note_new(void);
/* The heap one such notification takes (kernel memory statistics). */
size_t cb_queue_note_cost(void);
/* Queues `note` (cb_queue_note_new, now the queue's) as a notification like
 * cb_queue_notify's, which needs no memory and counts in no backlog: its handle paid for it
 * (user_handles), so a uid that destroys nodes others hold cannot fill their backlog. */
void cb_queue_notify_prepaid(struct cb_peer *peer, struct cb_qentry *note, uint16_t kind, uint16_t flags,
			     uint64_t destination, uint64_t seq);
/* Takes a queued prepaid note (note_of) out of the queue and frees it: its handle is being
 * freed before the note was written, and a holder that releases its handle before reading
 * its NODE_DESTROY never sees it (bus1). Otherwise a holder could release handles as fast as
 * their notes are queued and pile up notes paid for by nothing. Kept (its handle let go)
 * only when it is the frame a CONTINUE already written promised: one per peer at most. */
void cb_queue_withdraw(struct cb_peer *peer, struct cb_qentry *note);
/* On a peer that holds its messages (CAPBUS_PEER_FLAG_HOLD): takes the message a RECV asks
 * for (the oldest, or by_priority the most urgent at least min_priority) to be written next;
 * false if none is queued. */
bool cb_queue_take(struct cb_peer *peer, bool by_priority, int32_t min_priority);
/* Counts (hold) or stops counting the backlog of queued entries as held: when the peer
 * starts or stops holding its messages. */
void cb_queue_hold(struct cb_peer *peer, bool hold);
/* Answers a waiting RECV if a message it takes has come (called as entries are queued). */
void cb_queue_answer_recv(struct cb_peer *peer);
/* Queues the reply to a command. */
void cb_queue_reply(struct cb_peer *peer, uint64_t cookie, uint16_t command, int error,
		    const void *body, uint32_t body_size);
/* Queues the refusal of a frame that `writer`, not the uid the connection is charged to,
 * wrote (a move that does not fit it, cb_peer_charge_to): the reply counts in the writer's
 * backlog, so that a writer that never reads its refusals gates only itself (and once its
 * queued refusals, refused_bytes, are past user_backlog, the caller queues none, command.c). */
void cb_queue_refuse(struct cb_peer *peer, struct cb_user *writer, uint64_t cookie, uint16_t command, int error);

#endif
