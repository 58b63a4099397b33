#include "peer.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "handle.h"
#include "kernel.h"
#include "linger.h"
#include "node.h"

static uint64_t key_hash(const uint8_t key[16])
{
	uint64_t word;
	memcpy(&word, key, sizeof(word));
	return word ? word : 1; /* 0 is the map's empty marker */
}

uint64_t cb_peer_map_key(const void *peer)
{
	return key_hash(((const struct cb_peer *)peer)->key);
}

struct cb_peer *cb_peer_by_key(struct cb_kernel *kernel, const uint8_t key[16])
{
	struct cb_peer *peer = cb_map_get(&kernel->peers_by_key, key_hash(key));
	if (!peer || memcmp(peer->key, key, sizeof(peer->key)) != 0 || peer->fd < 0)
		return NULL;
	return peer;
}

struct cb_peer *cb_peer_new(struct cb_kernel *kernel, int fd, uint32_t uid, uint32_t gid, uint32_t pid, int *error)
{
	struct cb_peer *peer = NULL;
	struct cb_user *user = cb_user_get(kernel, uid);
	bool held = false;
	int one = 1;

	if (!user) {
		*error = ENOMEM;
		goto fail;
	}
	/* Its socket is one of the kernel's fds: a uid gets its fair share of them (quota.h). */
	if (user->n_peers >= kernel->limits.peers_per_user || cb_fds_hold(kernel, user, 1) < 0) {
		*error = EDQUOT;
		goto fail;
	}
	held = true;
	/* SO_PASSCRED: every frame then carries its sender's credentials at send time. */
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0) {
		*error = errno;
		goto fail;
	}
	peer = calloc(1, sizeof(*peer));
	if (!peer) {
		*error = ENOMEM;
		goto fail;
	}
	peer->kernel = kernel;
	peer->fd = fd;
	peer->serial = ++kernel->next_peer_serial;
	peer->uid = uid;
	peer->gid = gid;
	peer->pid = pid;
	peer->user = user;
	cb_map_init(&peer->handles_by_id, cb_handle_id_key);
	cb_map_init(&peer->handles_by_node, cb_handle_node_key);
	cb_queue_init(&peer->queue);
	cb_quota_init(&peer->quota);
	cb_list_init(&peer->dirty_link);
	cb_list_init(&peer->tracked);
	cb_list_init(&peer->doomed_link);
	cb_retry_item_init(&peer->stalled_retry);
	cb_retry_item_init(&peer->holder_retry);
	cb_list_init(&peer->gated_link);
	do {
		if (getrandom(peer->key, sizeof(peer->key), 0) != sizeof(peer->key)) {
			*error = errno ? errno : EIO;
			goto fail;
		}
	} while (cb_map_get(&kernel->peers_by_key, key_hash(peer->key)));
	if (cb_map_put(&kernel->peers_by_key, peer) < 0) {
		*error = ENOMEM;
		goto fail;
	}
	struct epoll_event event = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = peer };
	if (epoll_ctl(kernel->epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0) {
		*error = errno;
		cb_map_remove(&kernel->peers_by_key, key_hash(peer->key));
		goto fail;
	}
	peer->epoll_events = EPOLLIN | EPOLLRDHUP;
	cb_peer_update_events(peer); /* a newcomer of a uid past its backlog waits too */
	user->n_peers++;
	cb_list_add_tail(&kernel->peers, &peer->kernel_link);
	kernel->stats.peers++;
	return peer;

fail:
	free(peer);
	if (held)
		cb_fds_unhold(kernel, user, 1);
	if (user)
		cb_user_put_if_unused(kernel, user);
	close(fd);
	return NULL;
}

int cb_peer_charge_to(struct cb_peer *peer, uint32_t uid, uint32_t gid, uint32_t pid)
{
	struct cb_kernel *kernel = peer->kernel;
	const struct capbus_limits *limits = &kernel->limits;
	struct cb_user *from = peer->user;
	struct cb_user *to = cb_user_get(kernel, uid);
	/* Refusals charged to their writers stay theirs (cb_queue_refuse). */
	uint64_t backlog = peer->queue.backlog_bytes - peer->queue.foreign_backlog;
	if (!to)
		return -ENOMEM;
	if (to != from) {
		if (to->n_peers >= limits->peers_per_user ||
		    (backlog && to->backlog_bytes + backlog > limits->user_backlog / 2) ||
		    cb_fds_move(kernel, from, to, 1, peer->fds_in_socket) < 0) {
			cb_user_put_if_unused(kernel, to);
			return -EDQUOT;
		}
		from->n_peers--;
		to->n_peers++;
		from->backlog_bytes -= backlog;
		to->backlog_bytes += backlog;
		from->held_backlog -= peer->queue.held_backlog;
		to->held_backlog += peer->queue.held_backlog;
		from->snapshot_bytes -= peer->snapshot_bytes;
		to->snapshot_bytes += peer->snapshot_bytes;
		peer->user = to;
	}
	peer->uid = uid;
	peer->gid = gid;
	peer->pid = pid;
	cb_user_put_if_unused(kernel, from);
	cb_peer_update_events(peer);
	return 0;
}

void cb_peer_dirty(struct cb_peer *peer)
{
	if (!cb_link_linked(&peer->dirty_link))
		cb_list_add_tail(&peer->kernel->dirty, &peer->dirty_link);
}

void cb_peer_doom(struct cb_peer *peer)
{
	if (peer->doomed)
		return;
	peer->doomed = true;
	cb_list_add_tail(&peer->kernel->doomed, &peer->doomed_link);
	cb_peer_update_events(peer);
}

/* A holding peer's held notifications are drained by its RECVs, not by its reads: they do
 * not stop its commands being read (it could never RECV again), but past the same bounds
 * they stop all its commands but those that drain (cb_peer_draining_only). */
bool cb_peer_over_backlog(const struct cb_peer *peer)
{
	return peer->queue.backlog_bytes - peer->queue.held_backlog > CAPBUS_REPLY_BACKLOG_MAX ||
	       peer->user->backlog_bytes - peer->user->held_backlog > peer->kernel->limits.user_backlog;
}

bool cb_peer_draining_only(const struct cb_peer *peer)
{
	return peer->queue.held_backlog > CAPBUS_REPLY_BACKLOG_MAX ||
	       peer->user->held_backlog > peer->kernel->limits.user_backlog;
}

void cb_peer_update_events(struct cb_peer *peer)
{
	uint32_t events = 0;
	if (peer->fd < 0)
		return;
	/* Gated by its uid's backlog, which other peers' reading lowers: nothing on this peer
	 * would wake it, so the loop's retry timer looks at it again (loop.c). */
	bool gated = peer->user->backlog_bytes - peer->user->held_backlog > peer->kernel->limits.user_backlog;
	if (gated != peer->gated) {
		peer->gated = gated;
		if (gated) {
			cb_list_add_tail(&peer->kernel->gated, &peer->gated_link);
			peer->kernel->stats.peers_gated++;
		} else {
			cb_list_del(&peer->gated_link);
			peer->kernel->stats.peers_gated--;
		}
	}
	if (!peer->doomed && !peer->read_closed && !cb_peer_over_backlog(peer))
		events |= EPOLLIN | EPOLLRDHUP;
	/* A stalled peer is writable but must not be written: the loop's retry brings it back. */
	struct cb_queue *queue = &peer->queue;
	bool to_write = !cb_list_empty(&queue->taken) || !cb_list_empty(&queue->replies) ||
			(!peer->hold && !cb_list_empty(&queue->entries)); /* (held ones wait for RECVs) */
	if (!peer->stalled && to_write)
		events |= EPOLLOUT;
	if (events == peer->epoll_events)
		return;
	struct epoll_event event = { .events = events, .data.ptr = peer };
	if (epoll_ctl(peer->kernel->epoll_fd, EPOLL_CTL_MOD, peer->fd, &event) == 0)
		peer->epoll_events = events;
}

struct cb_seed *cb_seed_new(struct cb_kernel *kernel, struct cb_user *user, uint32_t n_handles,
			    uint32_t payload_size, int *error)
{
	uint64_t size = sizeof(struct cb_seed) + 8ull * n_handles + payload_size;
	uint64_t cost = size + 16; /* and the allocator's own */
	if (user->queued_bytes + cost > kernel->limits.user_bytes) {
		*error = EDQUOT;
		return NULL;
	}
	struct cb_seed *seed = malloc(size);
	if (!seed) {
		*error = ENOMEM;
		return NULL;
	}
	seed->n_handles = n_handles;
	seed->payload_size = payload_size;
	seed->handles = (uint64_t *)(seed + 1);
	seed->payload = (uint8_t *)(seed->handles + n_handles);
	seed->charged_to = user;
	seed->cost = cost;
	user->queued_bytes += cost;
	user->n_charges++;
	kernel->stats.seed_bytes += cost;
	return seed;
}

void cb_seed_discard(struct cb_kernel *kernel, struct cb_seed *seed)
{
	struct cb_user *user = seed->charged_to;
	user->queued_bytes -= seed->cost;
	kernel->stats.seed_bytes -= seed->cost;
	free(seed);
	user->n_charges--;
	cb_user_put_if_unused(kernel, user);
}

void cb_seed_free(struct cb_peer *peer, struct cb_seed *seed)
{
	if (!seed)
		return;
	for (uint32_t i = 0; i < seed->n_handles; i++) {
		struct cb_handle *handle = cb_handle_lookup(peer, seed->handles[i]);
		if (handle)
			cb_handle_release(handle);
	}
	cb_seed_discard(peer->kernel, seed);
}

/* Collects the handles of a map, so that they can be released while the map changes. */
static struct cb_handle **collect_handles(struct cb_peer *peer, size_t *n)
{
	struct cb_map *map = &peer->handles_by_id;
	struct cb_handle **handles = malloc((map->count + 1) * sizeof(*handles));
	*n = 0;
	if (!handles)
		return NULL;
	for (size_t i = 0; i < map->capacity; i++)
		if (map->slots[i])
			handles[(*n)++] = map->slots[i];
	return handles;
}

/* Destroys the live nodes among `handles` (all of one peer) in one transaction. false on
 * ENOMEM, with nothing done. */
static bool destroy_live(struct cb_handle **handles, size_t n)
{
	size_t n_live = 0;
	struct cb_handle **live = malloc((n + 1) * sizeof(*live));
	if (!live)
		return false;
	for (size_t i = 0; i < n; i++)
		if (handles[i]->node->anchor == handles[i] && !handles[i]->node->destroyed && !handles[i]->node->kept)
			live[n_live++] = handles[i];
	cb_nodes_destroy(live, (uint32_t)n_live, 0);
	free(live);
	return true;
}

/* A peer that shut down goes: the holders of its nodes (destroyed with DRAINING) are told
 * again, without it, that nothing more will come from them. */
static void tell_holders_gone(struct cb_peer *peer, struct cb_handle **handles, size_t n)
{
	uint64_t seq = 0;
	for (size_t i = 0; i < n; i++) {
		struct cb_node *node = handles[i]->node;
		if (node->anchor != handles[i] || !node->destroyed || !node->n_holders)
			continue;
		if (seq == 0)
			seq = cb_kernel_tick(peer->kernel);
		struct cb_link *link;
		for (link = node->holders.next; link != &node->holders; link = link->next) {
			struct cb_handle *holder = cb_container_of(link, struct cb_handle, holder_link);
			/* In no backlog, as the first note (prepaid): the going of a uid's peer must
			 * not fill the backlog of the uids holding its nodes. Bounded by their handles. */
			struct cb_qentry *note = cb_queue_note_new();
			if (!note) {
				cb_peer_doom(holder->peer); /* (as any notification it cannot be told) */
				continue;
			}
			cb_queue_notify_prepaid(holder->peer, note, CAPBUS_MSG_NODE_DESTROY, 0, holder->id, seq);
		}
	}
}

int cb_peer_destroy_nodes(struct cb_peer *peer)
{
	size_t n = 0;
	struct cb_handle **handles = collect_handles(peer, &n);
	bool done = handles && destroy_live(handles, n);
	free(handles);
	return done ? 0 : -ENOMEM;
}

void cb_peer_disconnect(struct cb_peer *peer)
{
	struct cb_kernel *kernel = peer->kernel;
	size_t n = 0;

	if (peer->fd < 0)
		return;
	epoll_ctl(kernel->epoll_fd, EPOLL_CTL_DEL, peer->fd, NULL);
	cb_queue_reclaim_fds(peer);
	/* Fds still unread in its socket stay in flight until they are read (linger.h). */
	cb_retry_cancel(&kernel->fd_holders, &peer->holder_retry);
	cb_linger_close(kernel, peer->fd, peer->user, peer->fds_in_socket);
	peer->fds_in_socket = 0;
	peer->fd = -1; /* from here nothing is queued to this peer */
	cb_queue_untrack(peer);
	cb_map_remove(&kernel->peers_by_key, key_hash(peer->key));
	cb_list_del(&peer->dirty_link);
	cb_list_del(&peer->doomed_link);
	cb_retry_cancel(&kernel->stalled, &peer->stalled_retry);
	cb_list_del(&peer->gated_link);
	if (peer->gated)
		kernel->stats.peers_gated--;
	if (peer->stalled) {
		peer->stalled = false;
		kernel->stats.peers_stalled--;
	}
	if (peer->read_closed)
		kernel->stats.peers_half_closed--;
	cb_queue_drop(peer);
	peer->user->snapshot_bytes -= peer->snapshot_bytes; /* (its unread socket goes with it) */
	peer->snapshot_bytes = 0;
	cb_seed_free(peer, peer->seed);
	peer->seed = NULL;
	if (peer->monitor) {
		peer->monitor = false;
		kernel->n_monitors--;
	}

	struct cb_handle **handles = collect_handles(peer, &n);
	if (handles) {
		/* Every live node goes in one transaction, as one destroy command would (one at a
		 * time if there is no memory for that). */
		if (peer->closing)
			tell_holders_gone(peer, handles, n);
		bool destroyed = destroy_live(handles, n);
		for (size_t i = 0; i < n; i++)
			if (!destroyed && handles[i]->node->anchor == handles[i] && !handles[i]->node->destroyed)
				cb_nodes_destroy(&handles[i], 1, 0);
		for (size_t i = 0; i < n; i++)
			cb_handle_release_all(handles[i]);
		free(handles);
	} else {
		/* Out of memory for the list: release one at a time (slower, same result). */
		while (peer->handles_by_id.count) {
			struct cb_map *map = &peer->handles_by_id;
			for (size_t i = 0; i < map->capacity; i++) {
				struct cb_handle *handle = map->slots[i];
				if (!handle)
					continue;
				if (handle->node->anchor == handle && !handle->node->destroyed)
					cb_nodes_destroy(&handle, 1, 0);
				cb_handle_release_all(handle);
				break;
			}
		}
	}
	cb_map_free(&peer->handles_by_id);
	cb_map_free(&peer->handles_by_node);
	cb_quota_free(&peer->quota);
	cb_list_del(&peer->kernel_link);
	peer->user->n_peers--;
	cb_user_put_if_unused(kernel, peer->user);
	kernel->stats.peers--;
	free(peer);
}
