#include "handle.h"

#include <errno.h>
#include <stdlib.h>

#include "capbus/uapi.h"
#include "kernel.h"
#include "node.h"
#include "peer.h"
#include "queue.h"

uint64_t cb_handle_id_key(const void *handle)
{
	return ((const struct cb_handle *)handle)->id;
}

uint64_t cb_handle_node_key(const void *handle)
{
	return ((const struct cb_handle *)handle)->node->serial;
}

struct cb_handle *cb_handle_lookup(struct cb_peer *peer, uint64_t id)
{
	if (id == 0 || id == CAPBUS_HANDLE_INVALID)
		return NULL;
	return cb_map_get(&peer->handles_by_id, id);
}

int cb_handle_reserve(struct cb_peer *peer, uint32_t n)
{
	if (cb_map_reserve(&peer->handles_by_id, n) < 0 || cb_map_reserve(&peer->handles_by_node, n) < 0)
		return -ENOMEM;
	return 0;
}

/* Links a new handle into `peer` and `node`. The caller reserved map room. */
static struct cb_handle *handle_new(struct cb_peer *peer, struct cb_node *node, int anchor)
{
	struct cb_handle *handle = calloc(1, sizeof(*handle));
	if (!handle)
		return NULL;
	/* Its node's destroy notification is paid now, with the handle (user_handles bounds
	 * them): queueing it then needs no memory and counts in no one's backlog. Not for an
	 * owner: only it destroys its nodes, and what its own commands queue for it is its
	 * backlog, like their replies. */
	if (!anchor) {
		handle->destroy_note = cb_queue_note_new();
		if (!handle->destroy_note) {
			free(handle);
			return NULL;
		}
	}
	handle->id = (++peer->next_handle << CAPBUS_HANDLE_ID_SHIFT) | CAPBUS_HANDLE_FLAG_MANAGED;
	if (!anchor)
		handle->id |= CAPBUS_HANDLE_FLAG_REMOTE;
	handle->peer = peer;
	handle->node = node;
	handle->n_user = 1;
	cb_list_init(&handle->holder_link);
	cb_map_put(&peer->handles_by_id, handle);
	node->n_refs++;
	if (!anchor) {
		/* The owner finds its own handle through node->anchor: no map entry needed. */
		cb_map_put(&peer->handles_by_node, handle);
		cb_list_add_tail(&node->holders, &handle->holder_link);
		node->n_holders++;
	}
	peer->kernel->stats.handles++;
	handle->charged_to = peer->user;
	peer->user->n_handles++;
	return handle;
}

struct cb_handle *cb_node_create(struct cb_peer *peer, int *error)
{
	struct cb_kernel *kernel = peer->kernel;

	if (peer->n_owned >= kernel->limits.nodes_owned ||
	    peer->handles_by_id.count >= kernel->limits.handles_held ||
	    peer->user->n_handles >= kernel->limits.user_handles) {
		*error = EDQUOT;
		return NULL;
	}
	if (cb_handle_reserve(peer, 1) < 0) {
		*error = ENOMEM;
		return NULL;
	}
	struct cb_node *node = calloc(1, sizeof(*node));
	if (!node) {
		*error = ENOMEM;
		return NULL;
	}
	node->serial = ++kernel->next_node_serial;
	node->owner = peer;
	cb_list_init(&node->holders);
	struct cb_handle *anchor = handle_new(peer, node, 1);
	if (!anchor) {
		free(node);
		*error = ENOMEM;
		return NULL;
	}
	node->anchor = anchor;
	peer->n_owned++;
	kernel->stats.nodes++;
	return anchor;
}

int cb_handle_is_new(struct cb_peer *peer, struct cb_node *node)
{
	if (node->destroyed || (node->anchor && node->owner == peer))
		return 0;
	return cb_map_get(&peer->handles_by_node, node->serial) == NULL;
}

uint64_t cb_handle_install(struct cb_peer *peer, struct cb_node *node, struct cb_user *sender)
{
	if (node->destroyed)
		return CAPBUS_HANDLE_INVALID;
	struct cb_handle *handle = node->owner == peer ? node->anchor : cb_map_get(&peer->handles_by_node, node->serial);
	if (handle) {
		handle->n_user++;
		return handle->id;
	}
	handle = handle_new(peer, node, 0);
	if (!handle) {
		/* Out of memory after commit: the receiver cannot be told correctly, so it is
		 * disconnected (a clear, reported failure) instead of losing the handle. */
		cb_peer_doom(peer);
		return CAPBUS_HANDLE_INVALID;
	}
	/* Out of memory for the count, it is only not counted: still charged to its holder. */
	if (sender && sender != handle->charged_to && cb_handles_bring(sender, handle->charged_to->uid) == 0)
		handle->brought_by = sender;
	return handle->id;
}

static void handle_free(struct cb_handle *handle)
{
	struct cb_peer *peer = handle->peer;
	struct cb_node *node = handle->node;
	struct cb_kernel *kernel = peer->kernel;

	cb_map_remove(&peer->handles_by_id, handle->id);
	if (node->anchor == handle) {
		node->anchor = NULL;
	} else {
		cb_map_remove(&peer->handles_by_node, node->serial);
		cb_list_del(&handle->holder_link);
		if (--node->n_holders == 0 && !node->destroyed && node->anchor)
			cb_queue_notify(node->owner, CAPBUS_MSG_NODE_RELEASE, 0, node->anchor->id, cb_kernel_tick(kernel));
	}
	struct cb_user *charged = handle->charged_to;
	kernel->stats.handles--;
	charged->n_handles--;
	if (handle->brought_by)
		cb_handles_unbring(kernel, handle->brought_by, charged->uid);
	if (handle->destroy_note && handle->destroy_note->prepaid)
		cb_queue_withdraw(peer, handle->destroy_note); /* queued, not written yet */
	else if (handle->destroy_note)
		cb_qentry_free(handle->destroy_note);
	free(handle);
	if (--node->n_refs == 0) {
		kernel->stats.nodes--;
		free(node);
	}
	cb_user_put_if_unused(kernel, charged); /* its peer may have moved to another uid since */
}

int cb_handle_release(struct cb_handle *handle)
{
	if (handle == handle->node->anchor && handle->n_user == 1 && !handle->node->destroyed)
		return -EBUSY;
	if (--handle->n_user == 0)
		handle_free(handle);
	return 0;
}

int cb_handle_release_many(struct cb_handle *handle, uint32_t count)
{
	if (count == 0 || count > handle->n_user)
		return -EINVAL;
	if (handle == handle->node->anchor && count == handle->n_user && !handle->node->destroyed)
		return -EBUSY;
	handle->n_user -= count - 1;
	return cb_handle_release(handle);
}

void cb_handle_release_all(struct cb_handle *handle)
{
	handle->n_user = 0;
	handle_free(handle);
}

/* A node is destroyed once: each holder's note is queued at most once. */
static void notify_destroyed(struct cb_handle *holder, uint16_t flags, uint64_t seq)
{
	struct cb_qentry *note = holder->destroy_note;
	note->note_of = holder; /* cleared, with holder->destroy_note, once it is written or dropped */
	cb_queue_notify_prepaid(holder->peer, note, CAPBUS_MSG_NODE_DESTROY, flags, holder->id, seq);
}

void cb_nodes_destroy(struct cb_handle **anchors, uint32_t n, int release)
{
	if (n == 0)
		return;
	struct cb_kernel *kernel = anchors[0]->peer->kernel;
	uint64_t seq = cb_kernel_tick(kernel);
	/* A peer's shutdown: its holders know that what they queued before will still be read. */
	uint16_t flags = anchors[0]->peer->draining ? CAPBUS_MSG_FLAG_DRAINING : 0;

	for (uint32_t i = 0; i < n; i++) {
		struct cb_node *node = anchors[i]->node;
		node->destroyed = true;
		node->owner->n_owned--;
		if (!node->owner->draining) /* (a SHUTDOWN's owner asked for it: no note per node) */
			cb_queue_notify(node->owner, CAPBUS_MSG_NODE_DESTROY, flags, anchors[i]->id, seq);
		struct cb_link *link;
		for (link = node->holders.next; link != &node->holders; link = link->next)
			notify_destroyed(cb_container_of(link, struct cb_handle, holder_link), flags, seq);
		if (node->monitor)
			cb_monitor_revoke(kernel, node); /* its owner revokes what it handed out */
	}
	cb_monitor_observe(kernel, CAPBUS_MSG_NODE_DESTROY, seq, anchors[0]->peer->uid, anchors[0]->peer->pid,
			   n, 0, 0, NULL);
	if (release)
		for (uint32_t i = 0; i < n; i++)
			cb_handle_release(anchors[i]);
}
