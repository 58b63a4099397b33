/*
 * Quotas: what one sending user may have queued on one receiving peer, and in the whole
 * kernel.
 *
 * Every queued message is charged, until it is written to its receiver's socket, to the
 * pair (receiving peer, sending uid): one message, its payload bytes, its attached handles
 * and fds. A charge must pass two checks or the send fails for that destination with
 * EDQUOT and has no effect:
 *
 *  - fair share on the receiving peer (bus1's rule): for every resource, with `limit` the
 *    peer's limit, `used` what all users have queued there and `share` what this user has,
 *    the charge `c` must leave `limit - used - c >= share + c`. One user can so take at most
 *    half of what others leave free: a flood from one uid (or one stuck pair of peers of
 *    the same uid) stops at half the peer's limit and a second uid can still get through;
 *  - the sending user's kernel-wide total of queued bytes (`user_bytes`), which bounds the
 *    kernel memory one uid can pin by flooding many receivers. It counts each queued
 *    entry's real size (the entry and its header, `overhead`) besides the payload: an empty
 *    message is not free (~170 bytes of heap each).
 *
 * The sender's kernel-wide budgets are shared between receiving uids by the same rule (bus1
 * charges what is queued to the receiving side; here a receiving uid may pin at most half of
 * what its sender has left): receivers that never read, however many peers their uid has,
 * cannot take all of a sender's user_bytes, nor all of its held fds.
 *
 * Receiving uids' user_handles are shared fairly between sending uids the other way round:
 * the new handles a message installs in its receivers are held by the receiving uid, but
 * while they are held they count as their sender's doing too ("brought"), and a sending uid
 * may make a receiving uid hold at most half of what that uid has left free (the same rule).
 * So another uid's messages to peers that do not read (or do not release) cannot use up a
 * uid's user_handles: it can still create nodes and receive handles from others.
 *
 * The socket buffer below the kernel adds at most one socket's worth (~200 KiB) per peer.
 *
 * File descriptors are a resource of the kernel process, not of one receiver: Linux bounds
 * the fds a process has open (RLIMIT_NOFILE, EMFILE) and the fds its user has in flight in
 * unix sockets, written but not yet received (the same limit, ETOOMANYREFS). So besides the
 * per-receiver `fds` above, two kernel-wide budgets, each shared between uids by the same
 * fair-share rule (one uid gets at most half of what the others leave free):
 *
 *  - held: fds open in the kernel for peers (each peer's socket, charged to the uid that
 *    made the peer; each queued message's fds, once however many receivers it has, charged
 *    to the sender's uid). A send whose fds do not fit is refused with EDQUOT before it is
 *    accepted; a peer that does not fit is not created (EDQUOT) or not accepted;
 *  - in flight: fds written to a receiver's socket and perhaps not read yet, charged to the
 *    receiver's uid (its peers are the ones not reading). A message whose fds do not fit
 *    waits in its queue and is retried (queue.h): never failed, never a cause to cut anyone
 *    off. A receiver's in-flight count is known to have landed once its socket is empty.
 */
#ifndef CB_QUOTA_H
#define CB_QUOTA_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

struct cb_kernel;

/* An amount of the four queued resources. */
struct cb_amount {
	uint64_t bytes;
	uint32_t messages;
	uint32_t handles;
	uint32_t fds;
	uint32_t overhead; /* the queue entry's own heap (cb_qentry_cost): charged to the
			    * sender's kernel-wide bytes with the payload, so that messages
			    * with little or no payload still cost their real size */
};

struct cb_share {
	uint32_t uid;
	struct cb_amount amount;
};

/* The receiving side of one peer: what is queued on it, in total and per sending uid. */
struct cb_quota {
	struct cb_amount used;
	struct cb_share *shares; /* one per sending uid with something queued (usually 1-2) */
	uint32_t n_shares;
	uint32_t capacity;
};

struct cb_user {
	uint32_t uid;
	uint32_t n_peers;        /* connected peers charged to this uid (made by it, or moved to it) */
	uint32_t n_charges;      /* queued entries charged to this uid; with n_peers and
				  * n_handles, its references */
	uint64_t queued_bytes;   /* bytes this uid has queued anywhere in the kernel: payload and
				  * each queue entry's overhead (bounded by user_bytes) */
	uint32_t fds_held;       /* kernel fds charged to this uid: its peers' sockets, its queued fds */
	uint32_t fds_in_flight;  /* fds in the sockets of this uid's peers, perhaps unread */
	uint32_t n_brought;      /* handles its messages brought to peers of other uids, still
				  * held (cb_handles_bring): references too */
	uint32_t n_handles;      /* handles made for its peers (nodes they own included), held
				  * wherever their connections moved since (handle.h, charged_to) */
	uint64_t backlog_bytes;  /* replies and notifications queued to its peers (queue.h) */
	uint64_t held_backlog;   /* the part of it held by peers that hold their messages
				  * (CAPBUS_PEER_FLAG_HOLD): waiting for their RECVs, not their reads */
	uint64_t snapshot_bytes; /* snapshots its peers asked for, not yet seen read: the memfds
				  * the kernel made for them (bounded by user_backlog, snapshot.c) */
	uint64_t refused_bytes;  /* the part of it that is refusals of its writes queued on
				  * connections charged to other uids (cb_queue_refuse): past
				  * user_backlog, its writes there are refused without a reply */
	uint64_t send_mark;      /* the send (kernel->send_serial) send_handles counts for */
	uint32_t send_handles;   /* new handles that send's destinations prepared so far will
				  * install in its peers: one multicast is checked as a whole */
	struct cb_quota receivers; /* what its queued messages pin, per receiving uid (below):
				    * bytes (payload and overhead), entries, fds of messages */
};

struct cb_user *cb_user_get(struct cb_kernel *kernel, uint32_t uid); /* NULL on ENOMEM */
uint64_t cb_user_map_key(const void *user); /* key of kernel->users */
void cb_user_put_if_unused(struct cb_kernel *kernel, struct cb_user *user);
void cb_user_free(struct cb_user *user); /* what cb_user_put_if_unused does, unconditionally */

void cb_quota_init(struct cb_quota *quota);
void cb_quota_free(struct cb_quota *quota);
/* Charges `amount` from `sender` on `quota`, a peer of `receiver_uid`: 0, -EDQUOT or
 * -ENOMEM; no effect on failure. */
int cb_quota_charge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		    uint32_t receiver_uid, const struct cb_amount *amount);
void cb_quota_uncharge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		       uint32_t receiver_uid, const struct cb_amount *amount);

/* The kernel-wide fd budgets (see above). Charges to `user` must be undone before its
 * peers and charges are gone (cb_user_put_if_unused). */
int cb_fds_hold(struct cb_kernel *kernel, struct cb_user *user, uint32_t n); /* 0 or -EDQUOT */
void cb_fds_unhold(struct cb_kernel *kernel, struct cb_user *user, uint32_t n);
/* Moves `held` held fds and `in_flight` fds in flight from `from` to `to` (a connection that
 * changes hands, cb_peer_charge_to) if they fit `to`'s fair shares as new charges would:
 * 0 or -EDQUOT (no effect). The kernel's totals stay as they were. */
int cb_fds_move(struct cb_kernel *kernel, struct cb_user *from, struct cb_user *to, uint32_t held,
		uint32_t in_flight);
bool cb_fds_may_fly(struct cb_kernel *kernel, struct cb_user *user, uint32_t n);
void cb_fds_fly(struct cb_kernel *kernel, struct cb_user *user, uint32_t n);
void cb_fds_land(struct cb_kernel *kernel, struct cb_user *user, uint32_t n);
/* A message's `n` held fds, pinned by receivers of `receiver_uid` (once per message and
 * receiving uid): a receiving uid may pin at most half of what its sender may still hold.
 * 0, -EDQUOT or -ENOMEM; no effect on failure. */
int cb_fds_pin(struct cb_kernel *kernel, struct cb_user *sender, uint32_t receiver_uid, uint32_t n);
void cb_fds_unpin(struct cb_user *sender, uint32_t receiver_uid, uint32_t n);
/* May a message (or a HANDLE_TRANSFER) of `sender` bring `n` new handles to a peer of
 * `receiver`, when the same send brings `pending` more to other peers of it? Its own peers
 * spend only its user_handles. */
bool cb_handles_may_bring(struct cb_kernel *kernel, struct cb_user *sender, struct cb_user *receiver,
			  uint32_t pending, uint32_t n);
/* Counts one handle a message of `sender` brought to a peer of `receiver_uid` (charged to
 * it), until it is freed (cb_handles_unbring): 0 or -ENOMEM (then it is not counted). */
int cb_handles_bring(struct cb_user *sender, uint32_t receiver_uid);
void cb_handles_unbring(struct cb_kernel *kernel, struct cb_user *sender, uint32_t receiver_uid);

#endif
