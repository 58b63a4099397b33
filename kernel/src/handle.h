/*
 * Handles: one peer's reference to a node.
 *
 * A peer holds at most one handle per node (per-peer deduplication through the peer's
 * `handles_by_node` map), so receiving a node it already holds yields the same id and adds
 * one user reference (`n_user`). Ids are chosen by the kernel from a per-peer counter, never
 * reused: (counter << 3) | MANAGED | REMOTE-if-not-owner. A handle is freed when its user
 * references reach 0; the owner's handle (the anchor) keeps one pinned reference that can
 * be dropped only after the node is destroyed (EBUSY before).
 *
 * Handles attached to a message are installed in each receiver when the send commits, so
 * a committed message's handles are always counted: no in-flight state to track, and the
 * receiver's later disconnect releases them like any other.
 */
#ifndef CB_HANDLE_H
#define CB_HANDLE_H

#include <stdint.h>

#include "list.h"

struct cb_node;
struct cb_peer;
struct cb_qentry;

struct cb_handle {
	uint64_t id;
	struct cb_peer *peer;
	struct cb_node *node;
	struct cb_link holder_link; /* in node->holders unless this is the anchor */
	uint32_t n_user;
	struct cb_user *charged_to; /* counts it in its n_handles (user_handles): the uid its peer
				     * was charged to when it was made, wherever that connection
				     * moves later (cb_peer_charge_to); a reference to that uid */
	struct cb_qentry *destroy_note; /* a holder's NODE_DESTROY notification, allocated with
					 * it and queued when its node is destroyed (bus1's
					 * prepaid notification); withdrawn with it if still
					 * queued (cb_queue_withdraw); NULL once written, and for
					 * the anchor */
	struct cb_user *brought_by; /* the other uid whose message made it, in whose fair share
				     * of charged_to's user_handles it counts while it lives
				     * (quota.h); a reference to that uid; or NULL */
};

/* Keys of the two per-peer maps (map.h). */
uint64_t cb_handle_id_key(const void *handle);
uint64_t cb_handle_node_key(const void *handle);
struct cb_handle *cb_handle_lookup(struct cb_peer *peer, uint64_t id);
/* Creates a node owned by `peer`; returns its anchor handle or NULL (errno-style *error:
 * EDQUOT, ENOMEM). */
struct cb_handle *cb_node_create(struct cb_peer *peer, int *error);
/* Makes room so that `n` installs into `peer` cannot fail. 0 or -ENOMEM. */
int cb_handle_reserve(struct cb_peer *peer, uint32_t n);
/* Gives `peer` one more user reference to `node` and returns the id (CAPBUS_HANDLE_INVALID
 * for a destroyed node). Cannot fail once room was reserved. A new handle is counted as
 * brought by `sender` (the uid the peer that sends the message installing it, or transfers
 * it, is charged to; or NULL), if that is another uid than the one it is charged to. */
uint64_t cb_handle_install(struct cb_peer *peer, struct cb_node *node, struct cb_user *sender);
/* Would installing `node` into `peer` need a new handle? */
int cb_handle_is_new(struct cb_peer *peer, struct cb_node *node);
/* Drops one user reference: 0, or -EBUSY for the pinned reference of a live node. */
int cb_handle_release(struct cb_handle *handle);
/* Drops `count` user references, all or nothing: 0, -EINVAL (more than held) or -EBUSY. */
int cb_handle_release_many(struct cb_handle *handle, uint32_t count);
/* Drops every reference `peer` holds (disconnect). */
void cb_handle_release_all(struct cb_handle *handle);
/* Destroys the nodes (anchors owned by one peer, all live, distinct) as one transaction. */
void cb_nodes_destroy(struct cb_handle **anchors, uint32_t n, int release);

#endif
