/*
 * Nodes: the objects of the bus. A node is owned by the peer that created it, for its
 * whole life, and is reached only through handles (handle.h).
 *
 * Ownership and counts: a node is referenced by every handle to it: the owner's handle
 * (the anchor, which pins it) and one handle per other peer holding it (`holders`). The
 * node is freed when the last of those handles is freed (`n_refs` reaches 0).
 * `n_holders` counts the holders; when it falls to 0 on a live node the owner gets a
 * NODE_RELEASE notification. Destruction is a state, not a free: holders keep their ids
 * (now stale) until they release them.
 */
#ifndef CB_NODE_H
#define CB_NODE_H

#include <stdbool.h>
#include <stdint.h>

#include "list.h"

struct cb_handle;
struct cb_peer;

struct cb_node {
	uint64_t serial;          /* kernel-wide, never reused: key of per-peer dedup maps */
	struct cb_handle *anchor; /* the owner's handle; NULL once the owner released it */
	struct cb_peer *owner;    /* fixed for the node's life; only valid while anchor != NULL */
	struct cb_link holders;   /* struct cb_handle.holder_link of every non-owner handle */
	uint32_t n_holders;
	uint32_t n_refs;          /* handles pointing at this node, anchor included */
	uint64_t send_mark;       /* the send (kernel->send_serial) that counted it among its
				   * attached nodes: one handle per node, however often attached */
	bool destroyed;
	bool monitor;             /* a monitor node: holders may attach as monitors (uapi.h) */
	bool kept;                /* spared by the CAPBUS_CMD_SHUTDOWN being carried out */
};

#endif
