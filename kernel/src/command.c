/*
 * Commands: parsing one frame from a peer and carrying it out. Every command gets exactly
 * one reply; every way a frame can be wrong maps to one errno (docs/wire-format.md).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "handle.h"
#include "kernel.h"
#include "message.h"
#include "node.h"
#include "peer.h"
#include "queue.h"
#include "snapshot.h"

static void close_fds(int *fds, uint32_t n_fds)
{
	for (uint32_t i = 0; i < n_fds; i++)
		close(fds[i]);
}

/* A frame that cannot be parsed: answered with cookie 0; too many and the peer is cut off. */
static void violation(struct cb_peer *peer, uint64_t cookie, uint16_t command, int error)
{
	peer->kernel->stats.violations++;
	cb_queue_reply(peer, cookie, command, error, NULL, 0);
	if (++peer->violations >= CAPBUS_VIOLATIONS_MAX) {
		peer->kernel->stats.peers_doomed++;
		cb_peer_doom(peer);
	}
}

/* Refuses a frame of a writer of uid `uid` that the connection is not charged to. */
static void refuse(struct cb_peer *peer, uint32_t uid, uint64_t cookie, uint16_t command, int error)
{
	struct cb_user *writer = cb_user_get(peer->kernel, uid);
	if (!writer) {
		/* Not charged to the maker instead: the writer cannot be told, so it is cut off. */
		cb_peer_doom(peer);
		return;
	}
	/* Its refusals count in its uid's backlog, but nothing stops reading the connections
	 * it writes to when that is full (they are gated by their own uid's): once the
	 * refusals it has queued are past user_backlog, the frame is refused without a reply,
	 * or a writer that never reads them could queue refusals on every connection it writes
	 * to. Below that it is told, even while its own peers' replies gate them. */
	if (writer->refused_bytes <= peer->kernel->limits.user_backlog)
		cb_queue_refuse(peer, writer, cookie, command, error);
	cb_user_put_if_unused(peer->kernel, writer);
}

static void cmd_node_create(struct cb_peer *peer, uint64_t cookie, size_t body_size)
{
	int error = 0;
	uint64_t id = 0;
	if (body_size != 0)
		error = EINVAL;
	else {
		struct cb_handle *anchor = cb_node_create(peer, &error);
		if (anchor)
			id = anchor->id;
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_NODE_CREATE, error, error ? NULL : &id, error ? 0 : sizeof(id));
}

static void cmd_handle_release(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	struct capbus_cmd_release cmd = { .count = 1 };
	int error = 0;
	if (body_size == sizeof(cmd.handle)) {
		memcpy(&cmd.handle, body, sizeof(cmd.handle));
	} else if (body_size == sizeof(cmd)) {
		memcpy(&cmd, body, sizeof(cmd));
		if (cmd.reserved)
			error = EINVAL;
	} else {
		error = EINVAL;
	}
	if (!error) {
		struct cb_handle *handle = cb_handle_lookup(peer, cmd.handle);
		error = handle ? -cb_handle_release_many(handle, cmd.count) : ENXIO;
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_HANDLE_RELEASE, error, NULL, 0);
}

/* The handle a command's body (one u64 id) names, or NULL with *error set (EINVAL for the
 * size, ENXIO for no such handle). */
static struct cb_handle *body_handle(struct cb_peer *peer, const uint8_t *body, size_t body_size, int *error)
{
	uint64_t id;
	if (body_size != sizeof(id)) {
		*error = EINVAL;
		return NULL;
	}
	memcpy(&id, body, sizeof(id));
	struct cb_handle *handle = cb_handle_lookup(peer, id);
	if (!handle)
		*error = ENXIO;
	return handle;
}

/* A handle to a live monitor node: the caller's proof that it is trusted to watch. NULL
 * with *error set otherwise (as MONITOR_ATTACH's errors). */
static struct cb_handle *monitor_handle(struct cb_peer *peer, const uint8_t *body, size_t body_size, int *error)
{
	struct cb_handle *handle = body_handle(peer, body, body_size, error);
	if (handle && !handle->node->monitor)
		*error = EINVAL;
	else if (handle && handle->node->destroyed)
		*error = ESTALE;
	return *error ? NULL : handle;
}

/* Queues a reply that passes `fd` (held for `user`: cb_fds_hold'ed by the caller), which
 * then closes it once written. false on ENOMEM, with nothing queued and `fd` still the
 * caller's. */
static bool reply_with_fd(struct cb_peer *peer, uint64_t cookie, uint16_t command, int fd, struct cb_user *user)
{
	uint32_t size = sizeof(struct capbus_frame) + sizeof(struct capbus_reply);
	struct cb_qentry *entry = cb_qentry_new(size);
	if (!entry)
		return false;
	struct capbus_frame *frame = (struct capbus_frame *)entry->header;
	*frame = (struct capbus_frame){ .size = size, .type = CAPBUS_FRAME_REPLY, .cookie = cookie };
	*(struct capbus_reply *)(frame + 1) = (struct capbus_reply){ .command = command };
	entry->is_reply = true;
	entry->passed_fd = fd;
	entry->passed_for = user;
	entry->snapshot = command == CAPBUS_CMD_SNAPSHOT;
	user->n_charges++;
	cb_queue_push(peer, entry);
	return true;
}

static void cmd_handle_query(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	struct capbus_reply_handle reply = { 0 };
	int error = 0;
	struct cb_handle *handle = body_handle(peer, body, body_size, &error);
	if (handle) {
		reply.n_user = handle->n_user;
		if (handle->node->anchor == handle) {
			reply.flags |= CAPBUS_HANDLE_STATE_OWNER;
			reply.n_holders = handle->node->n_holders;
		}
		if (handle->node->destroyed)
			reply.flags |= CAPBUS_HANDLE_STATE_DESTROYED;
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_HANDLE_QUERY, error, error ? NULL : &reply, error ? 0 : sizeof(reply));
}

static int compare_ptr(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t) * (void *const *)a, y = (uintptr_t) * (void *const *)b;
	return x < y ? -1 : x > y;
}

static void cmd_nodes_destroy(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	const struct capbus_cmd_destroy *cmd = (const void *)body;
	struct cb_handle **anchors = NULL;
	int error = 0;

	if (body_size < sizeof(*cmd) || cmd->n_nodes > CAPBUS_DESTROY_MAX ||
	    (cmd->flags & ~(uint32_t)CAPBUS_DESTROY_FLAG_RELEASE) ||
	    body_size != sizeof(*cmd) + 8ull * cmd->n_nodes) {
		error = EINVAL;
		goto out;
	}
	anchors = malloc((cmd->n_nodes + 1) * sizeof(*anchors));
	if (!anchors) {
		error = ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i < cmd->n_nodes; i++) {
		uint64_t id;
		memcpy(&id, body + sizeof(*cmd) + 8 * i, sizeof(id));
		struct cb_handle *handle = cb_handle_lookup(peer, id);
		if (!handle) {
			error = ENXIO;
			goto out;
		}
		if (handle->node->anchor != handle) {
			error = EREMOTE;
			goto out;
		}
		if (handle->node->destroyed) {
			error = ESTALE;
			goto out;
		}
		anchors[i] = handle;
	}
	if (cmd->n_nodes > 1) {
		struct cb_handle **sorted = malloc(cmd->n_nodes * sizeof(*sorted));
		if (!sorted) {
			error = ENOMEM;
			goto out;
		}
		memcpy(sorted, anchors, cmd->n_nodes * sizeof(*sorted));
		qsort(sorted, cmd->n_nodes, sizeof(*sorted), compare_ptr);
		for (uint32_t i = 1; i < cmd->n_nodes && !error; i++)
			if (sorted[i] == sorted[i - 1])
				error = ENOTUNIQ;
		free(sorted);
		if (error)
			goto out;
	}
	cb_nodes_destroy(anchors, cmd->n_nodes, cmd->flags & CAPBUS_DESTROY_FLAG_RELEASE);
out:
	free(anchors);
	cb_queue_reply(peer, cookie, CAPBUS_CMD_NODES_DESTROY, error, NULL, 0);
}

static void cmd_handle_transfer(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	const struct capbus_cmd_transfer *cmd = (const void *)body;
	uint64_t id = 0;
	int error = 0;

	if (body_size != sizeof(*cmd)) {
		error = EINVAL;
		goto out;
	}
	struct cb_handle *handle = cb_handle_lookup(peer, cmd->handle);
	struct cb_peer *target = cb_peer_by_key(peer->kernel, cmd->peer_key);
	if (!handle) {
		error = ENXIO;
	} else if (!target) {
		error = ESRCH;
	} else if (handle->node->destroyed) {
		error = EHOSTUNREACH;
	} else if (cb_handle_is_new(target, handle->node) &&
		   (target->handles_by_id.count >= peer->kernel->limits.handles_held ||
		    target->user->n_handles >= peer->kernel->limits.user_handles ||
		    !cb_handles_may_bring(peer->kernel, peer->user, target->user, 0, 1))) {
		/* The target may be a connection this uid made and handed to a process of
		 * another uid (charged to it now): what a transfer makes that uid hold is
		 * brought by this one, in its fair share, as for a message (quota.h). */
		error = EDQUOT;
	} else if (cb_handle_reserve(target, 1) < 0) {
		error = ENOMEM;
	} else {
		id = cb_handle_install(target, handle->node, peer->user);
	}
out:
	cb_queue_reply(peer, cookie, CAPBUS_CMD_HANDLE_TRANSFER, error, error ? NULL : &id, error ? 0 : sizeof(id));
}

static void cmd_peer_set_flags(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	uint64_t flags;
	int error = 0;
	if (body_size != sizeof(flags)) {
		error = EINVAL;
	} else {
		memcpy(&flags, body, sizeof(flags));
		if (flags & ~(uint64_t)(CAPBUS_PEER_FLAG_WANT_METADATA | CAPBUS_PEER_FLAG_HOLD))
			error = EINVAL;
	}
	if (!error) {
		peer->want_metadata = flags & CAPBUS_PEER_FLAG_WANT_METADATA;
		bool hold = flags & CAPBUS_PEER_FLAG_HOLD;
		if (hold != peer->hold) {
			if (!hold)
				cb_queue_hold(peer, false);
			peer->hold = hold;
			if (hold)
				cb_queue_hold(peer, true);
		}
		if (!hold) {
			if (peer->recv_waiting) {
				peer->recv_waiting = false;
				cb_queue_reply(peer, peer->recv_cookie, CAPBUS_CMD_RECV, ECANCELED, NULL, 0);
			}
			cb_peer_dirty(peer); /* what was held goes now, in order */
		}
		cb_peer_update_events(peer);
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_SET_FLAGS, error, NULL, 0);
}

/* Trusted to make monitor nodes: root, the kernel process's own uid, or granted by the
 * embedder. */
static bool monitor_trusted(const struct cb_peer *peer)
{
	return peer->uid == 0 || peer->uid == (uint32_t)geteuid() || peer->monitor_trusted;
}

static void cmd_monitor_create(struct cb_peer *peer, uint64_t cookie, size_t body_size)
{
	int error = 0;
	uint64_t id = 0;
	if (body_size != 0) {
		error = EINVAL;
	} else if (!monitor_trusted(peer)) {
		error = EPERM;
	} else {
		struct cb_handle *anchor = cb_node_create(peer, &error);
		if (anchor) {
			anchor->node->monitor = true;
			id = anchor->id;
		}
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_MONITOR_CREATE, error, error ? NULL : &id, error ? 0 : sizeof(id));
}

static void cmd_monitor_attach(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	int error = 0;
	struct cb_handle *handle = monitor_handle(peer, body, body_size, &error);
	if (handle && peer->monitor)
		error = EALREADY;
	if (handle && !error) {
		peer->monitor = true;
		peer->monitor_via = handle->node->serial;
		peer->kernel->n_monitors++;
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_MONITOR_ATTACH, error, NULL, 0);
}

static void cmd_snapshot(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	struct cb_kernel *kernel = peer->kernel;
	struct cb_user *user = peer->user;
	int error = 0;
	if (!monitor_handle(peer, body, body_size, &error)) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SNAPSHOT, error, NULL, 0);
		return;
	}
	/* One walk of the whole kernel per peer per wakeup: the rest of a pipeline is refused,
	 * so that the peers after it wait for one walk, not for a turn's worth (snapshot.c). */
	if (peer->snapshot_wakeup == kernel->stats.wakeups + 1) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SNAPSHOT, EBUSY, NULL, 0);
		return;
	}
	/* What its uid's unread snapshots take is bounded by user_backlog (past one): those
	 * this peer has read (its socket is empty now) no longer count. */
	cb_queue_reclaim_fds(peer);
	uint64_t taken = user->snapshot_bytes;
	size_t room = taken == 0 ? SIZE_MAX
		      : taken < kernel->limits.user_backlog ? (size_t)(kernel->limits.user_backlog - taken)
							    : 0;
	/* The memfd is one more fd the kernel holds until it is written. */
	if (room == 0 || cb_fds_hold(kernel, user, 1) < 0) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SNAPSHOT, EDQUOT, NULL, 0);
		return;
	}
	peer->snapshot_wakeup = kernel->stats.wakeups + 1;
	size_t size = 0;
	int fd = cb_snapshot_write(kernel, peer, room, &size, &error);
	if (fd < 0 || !reply_with_fd(peer, cookie, CAPBUS_CMD_SNAPSHOT, fd, user)) {
		if (fd >= 0)
			close(fd);
		cb_fds_unhold(kernel, user, 1);
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SNAPSHOT, fd < 0 ? error : ENOMEM, NULL, 0);
		return;
	}
	peer->snapshot_bytes += size;
	peer->snapshots_queued++;
	user->snapshot_bytes += size;
}

/* The nodes a SHUTDOWN keeps (u64 ids of live nodes the peer owns), marked kept; or 0 with
 * *error set and none marked. */
static uint32_t mark_kept(struct cb_peer *peer, const uint8_t *body, size_t body_size, int *error)
{
	uint32_t n = (uint32_t)(body_size / 8);
	if (body_size % 8 || n > CAPBUS_HANDLES_MAX) {
		*error = EINVAL;
		return 0;
	}
	for (uint32_t i = 0; i < n && !*error; i++) {
		uint64_t id;
		memcpy(&id, body + 8ull * i, sizeof(id));
		struct cb_handle *handle = cb_handle_lookup(peer, id);
		if (!handle)
			*error = ENXIO;
		else if (handle->node->anchor != handle)
			*error = EREMOTE;
		else if (handle->node->destroyed)
			*error = ESTALE;
		else
			handle->node->kept = true;
	}
	for (uint32_t i = 0; *error && i < n; i++) { /* (undone: an id after them was refused) */
		uint64_t id;
		memcpy(&id, body + 8ull * i, sizeof(id));
		struct cb_handle *handle = cb_handle_lookup(peer, id);
		if (handle)
			handle->node->kept = false;
	}
	return *error ? 0 : n;
}

static void unmark_kept(struct cb_peer *peer, const uint8_t *body, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		uint64_t id;
		memcpy(&id, body + 8ull * i, sizeof(id));
		cb_handle_lookup(peer, id)->node->kept = false;
	}
}

static void cmd_shutdown(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	int error = 0;
	struct cb_qentry *drained = NULL;
	uint32_t n_kept = 0;
	if (peer->closing)
		error = EALREADY;
	else
		n_kept = mark_kept(peer, body, body_size, &error);
	if (!error && !(drained = cb_queue_note_new()))
		error = ENOMEM;
	if (!error) {
		peer->closing = peer->draining = true; /* (first: its holders' notes say DRAINING) */
		if (cb_peer_destroy_nodes(peer) < 0) {
			peer->closing = false;
			error = ENOMEM;
		}
		peer->draining = false;
	}
	unmark_kept(peer, body, error ? 0 : n_kept);
	if (error) {
		if (drained)
			cb_qentry_free(drained);
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SHUTDOWN, error, NULL, 0);
		return;
	}
	/* No node of its own is left but those it kept, and it may make none: nothing can be
	 * queued for it from here on but to those, so DRAINED, queued now, comes after the last
	 * message it will get on any other. */
	cb_queue_notify_prepaid(peer, drained, CAPBUS_MSG_DRAINED, 0, CAPBUS_HANDLE_INVALID,
				cb_kernel_tick(peer->kernel));
	cb_queue_reply(peer, cookie, CAPBUS_CMD_SHUTDOWN, 0, NULL, 0);
}

static void cmd_recv(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	struct capbus_cmd_recv cmd;
	if (body_size != sizeof(cmd) || !peer->hold) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_RECV, EINVAL, NULL, 0);
		return;
	}
	memcpy(&cmd, body, sizeof(cmd));
	if (cmd.flags & ~(uint32_t)CAPBUS_RECV_FLAG_PRIORITY) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_RECV, EINVAL, NULL, 0);
		return;
	}
	if (peer->recv_waiting) { /* replaced: its asker gave up on it (a cancelled receive) */
		peer->recv_waiting = false;
		cb_queue_reply(peer, peer->recv_cookie, CAPBUS_CMD_RECV, ECANCELED, NULL, 0);
	}
	bool by_priority = cmd.flags & CAPBUS_RECV_FLAG_PRIORITY;
	if (cb_queue_take(peer, by_priority, cmd.priority)) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_RECV, 0, NULL, 0);
		return;
	}
	peer->recv_waiting = true;
	peer->recv_by_priority = by_priority;
	peer->recv_priority = cmd.priority;
	peer->recv_cookie = cookie;
}

static void cmd_peer_query(struct cb_peer *peer, uint64_t cookie, size_t body_size)
{
	struct capbus_reply_query reply = {
		.uid = peer->uid,
		.gid = peer->gid,
		.pid = peer->pid,
		.wire_version = CAPBUS_WIRE_VERSION,
		.payload_max = CAPBUS_PAYLOAD_MAX,
		.handles_max = CAPBUS_HANDLES_MAX,
		.fds_max = CAPBUS_FDS_MAX,
		.destinations_max = CAPBUS_DESTINATIONS_MAX,
	};
	if (body_size != 0) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_QUERY, EINVAL, NULL, 0);
		return;
	}
	memcpy(reply.peer_key, peer->key, sizeof(reply.peer_key));
	cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_QUERY, 0, &reply, sizeof(reply));
}

/* Builds a seed for `target` out of `source`'s handles. Returns 0 or an errno. */
static int seed_build(struct cb_peer *source, struct cb_peer *target, const uint8_t *body, size_t body_size,
		      struct cb_seed **out)
{
	const struct capbus_cmd_peer_create *cmd = (const void *)body;
	struct cb_node *nodes[CAPBUS_HANDLES_MAX];

	if (body_size < sizeof(*cmd) || cmd->n_handles > CAPBUS_HANDLES_MAX || cmd->payload_size > CAPBUS_PAYLOAD_MAX ||
	    body_size != sizeof(*cmd) + 8ull * cmd->n_handles + cmd->payload_size)
		return EINVAL;
	for (uint32_t i = 0; i < cmd->n_handles; i++) {
		uint64_t id;
		memcpy(&id, body + sizeof(*cmd) + 8 * i, sizeof(id));
		struct cb_handle *handle = cb_handle_lookup(source, id);
		if (!handle)
			return ENXIO;
		if (handle->node->destroyed)
			return EHOSTUNREACH;
		nodes[i] = handle->node;
	}
	if (target->handles_by_id.count + cmd->n_handles > source->kernel->limits.handles_held ||
	    target->user->n_handles + cmd->n_handles > source->kernel->limits.user_handles)
		return EDQUOT;
	int error = 0;
	struct cb_seed *seed = cb_seed_new(source->kernel, target->user, cmd->n_handles, cmd->payload_size, &error);
	if (!seed)
		return error;
	if (cb_handle_reserve(target, cmd->n_handles) < 0) {
		cb_seed_discard(source->kernel, seed);
		return ENOMEM;
	}
	memcpy(seed->payload, body + sizeof(*cmd) + 8ull * cmd->n_handles, cmd->payload_size);
	for (uint32_t i = 0; i < cmd->n_handles; i++)
		seed->handles[i] = cb_handle_install(target, nodes[i], NULL);
	*out = seed;
	return 0;
}

static void cmd_peer_create(struct cb_peer *peer, const struct cb_creds *creds, uint64_t cookie, const uint8_t *body,
			    size_t body_size)
{
	struct cb_kernel *kernel = peer->kernel;
	int pair[2];
	int error = 0;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_CREATE, errno, NULL, 0);
		return;
	}
	/* The new peer belongs to the user of the process that wrote this command (its
	 * credentials), not to the one that made the connection it came on: a connection handed
	 * to a child of another uid must not let that child spend its parent's uid. */
	struct cb_peer *child = cb_peer_new(kernel, pair[0], creds->uid, creds->gid, creds->pid, &error);
	if (!child) {
		close(pair[1]);
		cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_CREATE, error, NULL, 0);
		return;
	}
	struct cb_user *user = child->user;
	error = seed_build(peer, child, body, body_size, &child->seed);
	/* The creator's end is one more fd the kernel holds until it is written. */
	if (!error && cb_fds_hold(kernel, user, 1) < 0)
		error = EDQUOT;
	if (error) {
		cb_peer_disconnect(child);
		close(pair[1]);
		cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_CREATE, error, NULL, 0);
		return;
	}
	if (!reply_with_fd(peer, cookie, CAPBUS_CMD_PEER_CREATE, pair[1], user)) {
		cb_fds_unhold(kernel, user, 1);
		cb_peer_disconnect(child);
		close(pair[1]);
		cb_queue_reply(peer, cookie, CAPBUS_CMD_PEER_CREATE, ENOMEM, NULL, 0);
	}
}

static void cmd_seed_set(struct cb_peer *peer, uint64_t cookie, const uint8_t *body, size_t body_size)
{
	struct cb_seed *seed = NULL;
	int error = seed_build(peer, peer, body, body_size, &seed);
	if (!error) {
		cb_seed_free(peer, peer->seed);
		peer->seed = seed;
	}
	cb_queue_reply(peer, cookie, CAPBUS_CMD_SEED_SET, error, NULL, 0);
}

static void cmd_seed_take(struct cb_peer *peer, uint64_t cookie, size_t body_size)
{
	struct cb_seed *seed = peer->seed;
	if (body_size != 0 || !seed) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SEED_TAKE, body_size ? EINVAL : ENOENT, NULL, 0);
		return;
	}
	size_t size = sizeof(struct capbus_message) + 8ull * seed->n_handles + seed->payload_size;
	struct capbus_message *message = malloc(size);
	if (!message) {
		cb_queue_reply(peer, cookie, CAPBUS_CMD_SEED_TAKE, ENOMEM, NULL, 0);
		return;
	}
	*message = (struct capbus_message){
		.kind = CAPBUS_MSG_DATA,
		.destination = CAPBUS_HANDLE_INVALID,
		.uid = peer->uid,
		.gid = peer->gid,
		.pid = peer->pid,
		.n_handles = seed->n_handles,
		.payload_size = seed->payload_size,
	};
	memcpy(message + 1, seed->handles, 8ull * seed->n_handles);
	memcpy((uint8_t *)(message + 1) + 8ull * seed->n_handles, seed->payload, seed->payload_size);
	/* The seed's references pass to the peer that takes it. */
	cb_seed_discard(peer->kernel, seed);
	peer->seed = NULL;
	cb_queue_reply(peer, cookie, CAPBUS_CMD_SEED_TAKE, 0, message, (uint32_t)size);
	free(message);
}

void cb_command_dispatch(struct cb_peer *peer, const uint8_t *data, size_t size, int *fds, uint32_t n_fds,
			 const void *creds_ptr, bool fds_truncated)
{
	const struct capbus_frame *frame = (const void *)data;
	const struct cb_creds *creds = creds_ptr;

	if (size < sizeof(*frame)) {
		close_fds(fds, n_fds);
		violation(peer, 0, 0, EBADMSG);
		return;
	}
	if (size > CAPBUS_FRAME_MAX) {
		close_fds(fds, n_fds);
		violation(peer, frame->cookie, frame->type, EMSGSIZE);
		return;
	}
	if (frame->size != size) {
		close_fds(fds, n_fds);
		violation(peer, frame->cookie, frame->type, EBADMSG);
		return;
	}
	if (fds_truncated) {
		/* Linux cuts the fds short either at our buffer (CAPBUS_FDS_MAX: the sender's doing)
		 * or where the kernel process had no fd left for one (not the sender's doing). */
		close_fds(fds, n_fds);
		cb_queue_reply(peer, frame->cookie, frame->type, n_fds < CAPBUS_FDS_MAX ? EMFILE : EMSGSIZE, NULL, 0);
		return;
	}
	if (n_fds && frame->type != CAPBUS_CMD_SEND) {
		close_fds(fds, n_fds);
		cb_queue_reply(peer, frame->cookie, frame->type, EINVAL, NULL, 0);
		return;
	}
	if (frame->flags != 0) {
		close_fds(fds, n_fds);
		cb_queue_reply(peer, frame->cookie, frame->type, EINVAL, NULL, 0);
		return;
	}
	const uint8_t *body = data + sizeof(*frame);
	size_t body_size = size - sizeof(*frame);
	/* What this connection costs is the writer's to pay (a connection made by one uid and
	 * handed to a process of another). */
	if (creds->uid != peer->uid && !peer->charged_as_adopted) {
		int r = cb_peer_charge_to(peer, creds->uid, creds->gid, creds->pid);
		if (r < 0) {
			/* It does not fit that uid: the frame is refused, the connection stays
			 * charged as it was, and the refusal is the writer's to read: charged to
			 * the maker's backlog, a writer that never reads them could gate the
			 * maker's uid. */
			close_fds(fds, n_fds);
			refuse(peer, creds->uid, frame->cookie, frame->type, -r);
			return;
		}
	}
	if (cb_peer_draining_only(peer) && frame->type != CAPBUS_CMD_RECV && frame->type != CAPBUS_CMD_PEER_SET_FLAGS &&
	    frame->type != CAPBUS_CMD_PEER_QUERY && frame->type != CAPBUS_CMD_DISCONNECT) {
		/* It holds more notifications than it may: it takes them first (RECV) */
		close_fds(fds, n_fds);
		cb_queue_reply(peer, frame->cookie, frame->type, EDQUOT, NULL, 0);
		return;
	}
	switch (frame->type) {
	case CAPBUS_CMD_NODE_CREATE:
		cmd_node_create(peer, frame->cookie, body_size);
		break;
	case CAPBUS_CMD_HANDLE_RELEASE:
		cmd_handle_release(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_NODES_DESTROY:
		cmd_nodes_destroy(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_HANDLE_TRANSFER:
		cmd_handle_transfer(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_SEND:
		cb_send(peer, frame->cookie, body, body_size, fds, n_fds, creds);
		break;
	case CAPBUS_CMD_PEER_QUERY:
		cmd_peer_query(peer, frame->cookie, body_size);
		break;
	case CAPBUS_CMD_PEER_CREATE:
		cmd_peer_create(peer, creds, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_SEED_SET:
		cmd_seed_set(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_SEED_TAKE:
		cmd_seed_take(peer, frame->cookie, body_size);
		break;
	case CAPBUS_CMD_HANDLE_QUERY:
		cmd_handle_query(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_PEER_SET_FLAGS:
		cmd_peer_set_flags(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_RECV:
		cmd_recv(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_MONITOR_CREATE:
		cmd_monitor_create(peer, frame->cookie, body_size);
		break;
	case CAPBUS_CMD_MONITOR_ATTACH:
		cmd_monitor_attach(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_SNAPSHOT:
		cmd_snapshot(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_SHUTDOWN:
		cmd_shutdown(peer, frame->cookie, body, body_size);
		break;
	case CAPBUS_CMD_DISCONNECT:
		cb_queue_reply(peer, frame->cookie, CAPBUS_CMD_DISCONNECT, body_size ? EINVAL : 0, NULL, 0);
		if (!body_size)
			cb_peer_doom(peer);
		break;
	default:
		cb_queue_reply(peer, frame->cookie, frame->type, ENOTTY, NULL, 0);
		break;
	}
}
