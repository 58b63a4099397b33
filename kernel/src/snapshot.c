/*
 * Snapshots (CAPBUS_CMD_SNAPSHOT, uapi.h): the whole object model, written to a sealed memfd
 * for `capbus status` and `capbus graph`. The loop thread writes it while it holds the
 * kernel, so a snapshot is one instant of the global order: no handle is seen twice or
 * missed because it moved during the walk, and `seq` says which instant.
 *
 * Cost: linear in peers, nodes, handles and uids, paid by the kernel thread while everyone
 * waits. Only a peer holding a monitor node's handle may ask (command.c), at most once per
 * loop wakeup (a pipeline of them is refused EBUSY past the first: the others waiting to
 * be read wait for one walk, not for dozens), and what a uid's snapshots take until they
 * are read (their memfds) is bounded by its user_backlog, past one snapshot (EDQUOT): an
 * asker that does not read pins no more than a peer that does not read its replies.
 *
 * A memfd rather than a reply body: a kernel's snapshot outgrows any frame (32 bytes a
 * handle), and a sealed memfd is read by mmap with no copy through the socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "handle.h"
#include "kernel.h"
#include "node.h"
#include "peer.h"
#include "snapshot.h"

/* Nodes are listed once each, with whichever handle stands for them: the owner's, or once
 * the owner let go of a destroyed node, the first holder's. */
static bool lists_node(const struct cb_handle *handle)
{
	const struct cb_node *node = handle->node;
	if (node->anchor)
		return node->anchor == handle;
	return node->holders.next == &handle->holder_link;
}

static void count(struct cb_kernel *kernel, struct capbus_snapshot *head)
{
	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next) {
		struct cb_peer *peer = cb_container_of(link, struct cb_peer, kernel_link);
		const struct cb_map *map = &peer->handles_by_id;
		head->n_peers++;
		head->n_handles += (uint32_t)map->count;
		for (size_t i = 0; i < map->capacity; i++)
			if (map->slots[i] && lists_node(map->slots[i]))
				head->n_nodes++;
	}
	head->n_users = (uint32_t)kernel->users.count;
}

static void fill_header(struct cb_kernel *kernel, const struct cb_peer *asker, struct capbus_snapshot *head)
{
	struct capbus_stats stats;
	const struct capbus_limits *limits = &kernel->limits;
	cb_kernel_stats(kernel, &stats);
	head->magic = CAPBUS_SNAPSHOT_MAGIC;
	head->version = CAPBUS_SNAPSHOT_VERSION;
	head->peer_size = sizeof(struct capbus_snapshot_peer);
	head->node_size = sizeof(struct capbus_snapshot_node);
	head->handle_size = sizeof(struct capbus_snapshot_handle);
	head->user_size = sizeof(struct capbus_snapshot_user);
	head->you = asker->serial;
	head->seq = stats.seq;
	head->messages_sent = stats.messages_sent;
	head->messages_written = stats.messages_written;
	head->violations = stats.violations;
	head->peers_doomed = stats.peers_doomed;
	head->memory_bytes = stats.memory_bytes;
	head->fds_held = stats.fds_held;
	head->fds_held_max = stats.fds_held_max;
	head->fds_in_flight = stats.fds_in_flight;
	head->fds_in_flight_max = stats.fds_in_flight_max;
	head->connections_refused = stats.connections_refused;
	head->peer_bytes = limits->peer_bytes;
	head->peer_messages = limits->peer_messages;
	head->peer_handles = limits->peer_handles;
	head->peer_fds = limits->peer_fds;
	head->handles_held = limits->handles_held;
	head->nodes_owned = limits->nodes_owned;
	head->user_bytes = limits->user_bytes;
	head->peers_per_user = limits->peers_per_user;
	head->user_handles = limits->user_handles;
	head->user_backlog = limits->user_backlog;
}

static uint32_t peer_flags(const struct cb_peer *peer)
{
	return (peer->hold ? CAPBUS_SNAPSHOT_PEER_HOLD : 0) |
	       (peer->want_metadata ? CAPBUS_SNAPSHOT_PEER_WANT_METADATA : 0) |
	       (peer->monitor ? CAPBUS_SNAPSHOT_PEER_MONITOR : 0) | (peer->gated ? CAPBUS_SNAPSHOT_PEER_GATED : 0) |
	       (peer->stalled ? CAPBUS_SNAPSHOT_PEER_STALLED : 0) |
	       (peer->read_closed ? CAPBUS_SNAPSHOT_PEER_HALF_CLOSED : 0) |
	       (peer->recv_waiting ? CAPBUS_SNAPSHOT_PEER_RECV_WAITING : 0);
}

static void fill_peer(const struct cb_peer *peer, struct capbus_snapshot_peer *out)
{
	*out = (struct capbus_snapshot_peer){
		.serial = peer->serial,
		.uid = peer->uid,
		.gid = peer->gid,
		.pid = peer->pid,
		.flags = peer_flags(peer),
		.nodes = peer->n_owned,
		.handles = (uint32_t)peer->handles_by_id.count,
		.queued = (uint32_t)peer->queue.n_entries,
		.queued_messages = peer->quota.used.messages,
		.queued_bytes = peer->quota.used.bytes,
		.queued_handles = peer->quota.used.handles,
		.queued_fds = peer->quota.used.fds,
		.backlog_bytes = peer->queue.backlog_bytes,
		.sent_messages = peer->sent_messages,
		.sent_bytes = peer->sent_bytes,
		.received_messages = peer->received_messages,
		.received_bytes = peer->received_bytes,
		.charged_uid = peer->user ? peer->user->uid : peer->uid,
	};
}

static void fill_node(const struct cb_node *node, struct capbus_snapshot_node *out)
{
	*out = (struct capbus_snapshot_node){
		.serial = node->serial,
		.owner = node->anchor ? node->owner->serial : 0,
		.flags = (node->destroyed ? CAPBUS_SNAPSHOT_NODE_DESTROYED : 0) |
			 (node->monitor ? CAPBUS_SNAPSHOT_NODE_MONITOR : 0),
		.holders = node->n_holders,
	};
}

static void fill_user(const struct cb_user *user, struct capbus_snapshot_user *out)
{
	*out = (struct capbus_snapshot_user){
		.uid = user->uid,
		.peers = user->n_peers,
		.queued_bytes = user->queued_bytes,
		.backlog_bytes = user->backlog_bytes,
		.handles = user->n_handles,
		.fds_held = user->fds_held,
		.fds_in_flight = user->fds_in_flight,
	};
}

static void fill(struct cb_kernel *kernel, const struct capbus_snapshot *head, uint8_t *base)
{
	struct capbus_snapshot_peer *peers = (struct capbus_snapshot_peer *)(base + sizeof(*head));
	struct capbus_snapshot_node *nodes = (struct capbus_snapshot_node *)(peers + head->n_peers);
	struct capbus_snapshot_handle *handles = (struct capbus_snapshot_handle *)(nodes + head->n_nodes);
	struct capbus_snapshot_user *users = (struct capbus_snapshot_user *)(handles + head->n_handles);
	memcpy(base, head, sizeof(*head));

	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next) {
		struct cb_peer *peer = cb_container_of(link, struct cb_peer, kernel_link);
		const struct cb_map *map = &peer->handles_by_id;
		fill_peer(peer, peers++);
		for (size_t i = 0; i < map->capacity; i++) {
			const struct cb_handle *handle = map->slots[i];
			if (!handle)
				continue;
			if (lists_node(handle))
				fill_node(handle->node, nodes++);
			*handles++ = (struct capbus_snapshot_handle){
				.peer = peer->serial,
				.node = handle->node->serial,
				.id = handle->id,
				.references = handle->n_user,
				.flags = handle->node->anchor == handle ? CAPBUS_SNAPSHOT_HANDLE_OWNER : 0,
			};
		}
	}
	const struct cb_map *map = &kernel->users;
	for (size_t i = 0; i < map->capacity; i++)
		if (map->slots[i])
			fill_user(map->slots[i], users++);
}

int cb_snapshot_write(struct cb_kernel *kernel, const struct cb_peer *asker, size_t max_size, size_t *written,
		      int *error)
{
	struct capbus_snapshot head = { 0 };
	count(kernel, &head);
	fill_header(kernel, asker, &head);
	size_t size = sizeof(head) + head.n_peers * sizeof(struct capbus_snapshot_peer) +
		      head.n_nodes * sizeof(struct capbus_snapshot_node) +
		      head.n_handles * sizeof(struct capbus_snapshot_handle) +
		      head.n_users * sizeof(struct capbus_snapshot_user);
	if (size > max_size) {
		*error = EDQUOT;
		return -1;
	}
	*written = size;

	int fd = memfd_create("capbus-snapshot", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0) {
		*error = errno;
		return -1;
	}
	void *base = MAP_FAILED;
	if (ftruncate(fd, (off_t)size) < 0)
		goto fail;
	base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		goto fail;
	fill(kernel, &head, base);
	munmap(base, size);
	/* Sealed, so that the reader may map it and trust what it reads not to change. */
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)
		goto fail;
	return fd;
fail:
	*error = errno;
	close(fd);
	return -1;
}
