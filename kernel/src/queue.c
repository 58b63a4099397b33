#include "queue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "handle.h"
#include "kernel.h"
#include "message.h"
#include "node.h"
#include "peer.h"

#define NOTE_SIZE ((uint32_t)(sizeof(struct capbus_frame) + sizeof(struct capbus_message)))

void cb_queue_init(struct cb_queue *queue)
{
	cb_list_init(&queue->taken);
	cb_list_init(&queue->replies);
	cb_list_init(&queue->entries);
	cb_list_init(&queue->ranked);
	queue->n_entries = 0;
	queue->backlog_bytes = 0;
	queue->held_backlog = 0;
	queue->foreign_backlog = 0;
	queue->continued_seq = 0;
}

struct cb_qentry *cb_qentry_new(uint32_t header_size)
{
	size_t words = (header_size + 7) / 8;
	struct cb_qentry *entry = malloc(sizeof(*entry) + words * 8);
	if (!entry)
		return NULL;
	cb_list_init(&entry->link);
	cb_list_init(&entry->ranked_link);
	entry->message = NULL;
	entry->charged_to = NULL;
	entry->charged_for = 0;
	entry->charge = (struct cb_amount){ 0 };
	entry->seq = 0;
	entry->passed_fd = -1;
	entry->passed_for = NULL;
	entry->is_reply = false;
	entry->in_backlog = false;
	entry->held_counted = false;
	entry->monitor_record = false;
	entry->prepaid = false;
	entry->note_of = NULL;
	entry->backlog_of = NULL;
	entry->tracked = false;
	entry->snapshot = false;
	entry->header_size = header_size;
	return entry;
}

static size_t header_room(uint32_t header_size)
{
	return (header_size + 7) / 8 * 8;
}

struct cb_tracking *cb_qentry_tracking(struct cb_qentry *entry)
{
	return (struct cb_tracking *)((uint8_t *)entry->header + header_room(entry->header_size));
}

struct cb_qentry *cb_qentry_new_tracked(uint32_t header_size, struct cb_peer *sender, uint64_t cookie)
{
	struct cb_qentry *entry = cb_qentry_new((uint32_t)(header_room(header_size) + sizeof(struct cb_tracking)));
	if (!entry)
		return NULL;
	entry->header_size = header_size;
	entry->tracked = true;
	struct cb_tracking *tracking = cb_qentry_tracking(entry);
	tracking->sender = sender;
	tracking->cookie = cookie;
	cb_list_add_tail(&sender->tracked, &tracking->link);
	return entry;
}

void cb_qentry_free(struct cb_qentry *entry)
{
	if (cb_link_linked(&entry->ranked_link))
		cb_list_del(&entry->ranked_link);
	if (entry->tracked && cb_qentry_tracking(entry)->sender)
		cb_list_del(&cb_qentry_tracking(entry)->link);
	if (entry->message)
		cb_message_unref(entry->message);
	if (entry->passed_fd >= 0)
		close(entry->passed_fd);
	free(entry);
}

/* Counts a queued message or notification's backlog as held (the peer holds them). */
static void hold_count(struct cb_peer *peer, struct cb_qentry *entry)
{
	if (!peer->hold || !entry->in_backlog || entry->held_counted || entry->backlog_of)
		return;
	size_t cost = cb_qentry_cost(entry);
	entry->held_counted = true;
	peer->queue.held_backlog += cost;
	peer->user->held_backlog += cost;
}

static void hold_uncount(struct cb_peer *peer, struct cb_qentry *entry)
{
	if (!entry->held_counted)
		return;
	size_t cost = cb_qentry_cost(entry);
	entry->held_counted = false;
	peer->queue.held_backlog -= cost;
	peer->user->held_backlog -= cost;
}

void cb_queue_hold(struct cb_peer *peer, bool hold)
{
	for (struct cb_link *link = peer->queue.entries.next; link != &peer->queue.entries; link = link->next) {
		struct cb_qentry *entry = cb_container_of(link, struct cb_qentry, link);
		if (hold)
			hold_count(peer, entry);
		else
			hold_uncount(peer, entry);
	}
}

/* Takes the entry out of the backlog it counts in, if any. */
static void leave_backlog(struct cb_peer *peer, struct cb_qentry *entry)
{
	hold_uncount(peer, entry);
	if (!entry->in_backlog)
		return;
	size_t cost = cb_qentry_cost(entry);
	struct cb_user *user = entry->backlog_of ? entry->backlog_of : peer->user;
	entry->in_backlog = false;
	peer->queue.backlog_bytes -= cost;
	user->backlog_bytes -= cost;
	if (entry->backlog_of) {
		peer->queue.foreign_backlog -= cost;
		user->refused_bytes -= cost;
		entry->backlog_of = NULL;
		user->n_charges--;
		cb_user_put_if_unused(peer->kernel, user);
	}
}

static void entry_release(struct cb_peer *peer, struct cb_qentry *entry)
{
	if (entry->monitor_record)
		peer->monitor_bytes -= cb_qentry_cost(entry);
	if (entry->note_of)
		entry->note_of->destroy_note = NULL; /* written or dropped: its handle has none now */
	if (entry->charged_to)
		cb_quota_uncharge(peer->kernel, &peer->quota, entry->charged_to, entry->charged_for, &entry->charge);
	if (entry->passed_for) {
		cb_fds_unhold(peer->kernel, entry->passed_for, 1);
		entry->passed_for->n_charges--;
		cb_user_put_if_unused(peer->kernel, entry->passed_for);
	}
	cb_qentry_free(entry);
}

size_t cb_qentry_cost(const struct cb_qentry *entry)
{
	return sizeof(*entry) + header_room(entry->header_size) + (entry->tracked ? sizeof(struct cb_tracking) : 0) + 16;
}

static uint32_t entry_fds(const struct cb_qentry *entry)
{
	if (entry->message)
		return entry->message->n_fds;
	return entry->passed_fd >= 0;
}

void cb_queue_reclaim_fds(struct cb_peer *peer)
{
	int unread = 0;
	if (peer->fds_in_socket == 0 || peer->fd < 0)
		return;
	/* SIOCOUTQ on a unix socket: what this end wrote that the other end has not read. */
	if (ioctl(peer->fd, SIOCOUTQ, &unread) < 0 || unread != 0)
		return;
	cb_fds_land(peer->kernel, peer->user, peer->fds_in_socket);
	peer->fds_in_socket = 0;
	cb_retry_cancel(&peer->kernel->fd_holders, &peer->holder_retry);
	if (peer->snapshots_queued == 0) { /* every snapshot it asked for is read */
		peer->user->snapshot_bytes -= peer->snapshot_bytes;
		peer->snapshot_bytes = 0;
	}
}

/* May `n` more fds go into the peer's socket now? */
static bool fds_fit(struct cb_peer *peer, uint32_t pending, uint32_t n)
{
	if (peer->fds_in_socket + pending + n > CB_SOCKET_FDS_MAX)
		return false;
	return cb_fds_may_fly(peer->kernel, peer->user, pending + n);
}

static struct capbus_message *message_header(struct cb_qentry *entry)
{
	return (struct capbus_message *)((uint8_t *)entry->header + sizeof(struct capbus_frame));
}

void cb_queue_push(struct cb_peer *peer, struct cb_qentry *entry)
{
	if (peer->fd < 0) {
		/* The receiver is going away: nothing can be delivered to it any more. */
		entry_release(peer, entry);
		return;
	}
	if (!entry->is_reply && entry->seq != 0) {
		struct cb_qentry *tail = cb_list_last(&peer->queue.entries, struct cb_qentry, link);
		if (tail && !tail->is_reply && tail->seq == entry->seq)
			message_header(tail)->flags |= CAPBUS_MSG_FLAG_CONTINUE;
	}
	if (entry->is_reply) {
		cb_list_add_tail(&peer->queue.replies, &entry->link);
	} else {
		cb_list_add_tail(&peer->queue.entries, &entry->link);
		peer->queue.n_entries++;
		if (message_header(entry)->priority != 0)
			cb_list_add_tail(&peer->queue.ranked, &entry->ranked_link);
	}
	/* What no sender was charged for is charged to the receiver's backlog, in real bytes. */
	if (!entry->charged_to && !entry->message && !entry->prepaid) {
		size_t cost = cb_qentry_cost(entry);
		entry->in_backlog = true;
		peer->queue.backlog_bytes += cost;
		if (entry->backlog_of) {
			entry->backlog_of->n_charges++;
			entry->backlog_of->refused_bytes += cost;
			peer->queue.foreign_backlog += cost;
		}
		(entry->backlog_of ? entry->backlog_of : peer->user)->backlog_bytes += cost;
		if (!entry->is_reply)
			hold_count(peer, entry);
	}
	if (!entry->is_reply && peer->recv_waiting)
		cb_queue_answer_recv(peer);
	cb_peer_dirty(peer);
}

/* The next entries to write, at most `max`: what RECVs took, replies, then (unless the peer
 * holds its messages) the messages and notifications in order. */
static int collect(struct cb_queue *queue, struct cb_qentry **out, int max, bool hold)
{
	int n = 0;
	struct cb_link *lists[] = { &queue->taken, &queue->replies, &queue->entries };
	size_t n_lists = hold ? 2 : 3;
	for (size_t l = 0; l < n_lists && n < max; l++)
		for (struct cb_link *link = lists[l]->next; link != lists[l] && n < max; link = link->next)
			out[n++] = cb_container_of(link, struct cb_qentry, link);
	return n;
}

static void prepare(struct cb_qentry *entry, struct msghdr *msg, struct iovec *iov, union cb_control *control)
{
	const int *fds = NULL;
	uint32_t n_fds = 0;

	iov[0] = (struct iovec){ entry->header, entry->header_size };
	*msg = (struct msghdr){ .msg_iov = iov, .msg_iovlen = 1 };
	if (entry->message && entry->message->payload_size) {
		iov[1] = (struct iovec){ entry->message->payload, entry->message->payload_size };
		msg->msg_iovlen = 2;
	}
	if (entry->message && entry->message->n_fds) {
		fds = entry->message->fds;
		n_fds = entry->message->n_fds;
	} else if (entry->passed_fd >= 0) {
		fds = &entry->passed_fd;
		n_fds = 1;
	}
	if (n_fds) {
		msg->msg_control = control->buffer;
		msg->msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
		struct cmsghdr *cmsg = CMSG_FIRSTHDR(msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
		memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * n_fds);
	}
}

int cb_queue_flush(struct cb_peer *peer)
{
	struct cb_kernel *kernel = peer->kernel;
	struct cb_queue *queue = &peer->queue;
	struct cb_io *io = kernel->io;
	struct cb_qentry *batch[CB_TX_BATCH];

	cb_queue_reclaim_fds(peer);
	for (;;) {
		int n = collect(queue, batch, CB_TX_BATCH, peer->hold);
		bool stalled = false;
		uint32_t pending = 0;
		for (int i = 0; i < n; i++) {
			uint32_t fds = entry_fds(batch[i]);
			if (fds && !fds_fit(peer, pending, fds)) {
				n = i; /* this one and everything behind it wait, in order */
				stalled = true;
				break;
			}
			pending += fds;
		}
		if (n == 0 && stalled)
			kernel->stats.delivery_retries++;
		if (n == 0)
			return stalled ? CB_FLUSH_STALLED : 0;
		for (int i = 0; i < n; i++)
			prepare(batch[i], &io->tx[i].msg_hdr, io->tx_iov[i], &io->tx_control[i]);
		int sent = sendmmsg(peer->fd, io->tx, (unsigned int)n, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
				return -errno; /* the receiver is gone */
			/* ETOOMANYREFS (the kernel's uid has too many fds in flight, perhaps through
			 * other processes of that uid), ENOBUFS, ENOMEM: not the receiver's doing, and
			 * not for ever. Retry later; never fail what was accepted. */
			kernel->stats.delivery_retries++;
			return CB_FLUSH_STALLED;
		}
		for (int i = 0; i < sent; i++) {
			struct cb_qentry *entry = batch[i];
			uint32_t fds = entry_fds(entry);
			if (fds) {
				if (peer->fds_in_socket == 0)
					cb_retry_schedule(&kernel->fd_holders, &peer->holder_retry, kernel->now_ms, 0);
				peer->fds_in_socket += fds;
				cb_fds_fly(kernel, peer->user, fds);
			}
			cb_list_del(&entry->link);
			kernel->frames_written++;
			if (entry->snapshot)
				peer->snapshots_queued--;
			leave_backlog(peer, entry);
			if (!entry->is_reply) {
				bool continues = message_header(entry)->flags & CAPBUS_MSG_FLAG_CONTINUE;
				queue->continued_seq = continues ? entry->seq : 0;
				queue->n_entries--;
				if (entry->message) {
					kernel->stats.messages_written++;
					peer->received_messages++;
					peer->received_bytes += message_header(entry)->payload_size;
				}
			}
			entry_release(peer, entry);
		}
		if (sent < n)
			return 0; /* the socket is full; EPOLLOUT brings us back */
		if (stalled) {
			kernel->stats.delivery_retries++;
			return CB_FLUSH_STALLED;
		}
	}
}

void cb_queue_untrack(struct cb_peer *sender)
{
	while (!cb_list_empty(&sender->tracked)) {
		struct cb_tracking *tracking = cb_list_first(&sender->tracked, struct cb_tracking, link);
		cb_list_del(&tracking->link);
		tracking->sender = NULL;
	}
}

#define UNDELIVERED_SIZE ((uint32_t)(NOTE_SIZE + sizeof(struct capbus_undelivered)))

/* Tells the sender of `entry`, a tracked message about to be dropped with its receiver
 * `peer` (whose handles are still there), that it was not delivered. */
static void tell_undelivered(struct cb_peer *peer, struct cb_qentry *entry, uint64_t *seq)
{
	struct cb_peer *sender = cb_qentry_tracking(entry)->sender;
	if (!sender || sender->fd < 0)
		return;
	struct cb_qentry *note = cb_qentry_new(UNDELIVERED_SIZE);
	if (!note) {
		cb_peer_doom(sender); /* as any notification: a peer that cannot be told goes */
		return;
	}
	uint64_t destination = CAPBUS_HANDLE_INVALID;
	struct cb_handle *anchor = cb_handle_lookup(peer, message_header(entry)->destination);
	if (anchor) {
		struct cb_handle *held = cb_map_get(&sender->handles_by_node, anchor->node->serial);
		if (held)
			destination = held->id;
	}
	if (*seq == 0)
		*seq = cb_kernel_tick(peer->kernel); /* one transaction: every notice of this drop */
	struct capbus_frame *frame = (struct capbus_frame *)note->header;
	*frame = (struct capbus_frame){ .size = UNDELIVERED_SIZE, .type = CAPBUS_FRAME_MESSAGE };
	*message_header(note) = (struct capbus_message){
		.kind = CAPBUS_MSG_UNDELIVERED,
		.destination = destination,
		.seq = *seq,
		.uid = UINT32_MAX,
		.gid = UINT32_MAX,
		.payload_size = sizeof(struct capbus_undelivered),
	};
	struct capbus_undelivered what = { .cookie = cb_qentry_tracking(entry)->cookie, .seq = entry->seq };
	memcpy(message_header(note) + 1, &what, sizeof(what));
	note->seq = *seq;
	/* It takes over its message's charge (on the sender's user_bytes, as a message to its
	 * own peer), not its backlog: a receiver choosing to go must not gate the sender's uid.
	 * Only past that (its own queue full) is it counted in its backlog, as notes are. */
	struct cb_amount amount = {
		.bytes = sizeof(what), .messages = 1, .overhead = (uint32_t)cb_qentry_cost(note),
	};
	if (cb_quota_charge(peer->kernel, &sender->quota, sender->user, sender->uid, &amount) == 0) {
		note->charged_to = sender->user;
		note->charged_for = sender->uid;
		note->charge = amount;
	}
	cb_queue_push(sender, note);
}

void cb_queue_drop(struct cb_peer *peer)
{
	struct cb_queue *queue = &peer->queue;
	struct cb_link *lists[] = { &queue->taken, &queue->replies, &queue->entries };
	uint64_t seq = 0;
	for (size_t i = 0; i < 3; i++) {
		while (!cb_list_empty(lists[i])) {
			struct cb_qentry *entry = cb_list_first(lists[i], struct cb_qentry, link);
			cb_list_del(&entry->link);
			leave_backlog(peer, entry);
			if (entry->tracked && entry->message)
				tell_undelivered(peer, entry, &seq);
			entry_release(peer, entry);
		}
	}
	queue->n_entries = 0;
}

struct cb_qentry *cb_queue_note_new(void)
{
	return cb_qentry_new(NOTE_SIZE);
}

size_t cb_queue_note_cost(void)
{
	return sizeof(struct cb_qentry) + (NOTE_SIZE + 7) / 8 * 8 + 16;
}

static void notify(struct cb_peer *peer, struct cb_qentry *entry, uint16_t kind, uint16_t flags, uint64_t destination,
		   uint64_t seq)
{
	struct capbus_frame *frame = (struct capbus_frame *)entry->header;
	*frame = (struct capbus_frame){ .size = NOTE_SIZE, .type = CAPBUS_FRAME_MESSAGE };
	*message_header(entry) = (struct capbus_message){
		.kind = kind,
		.flags = flags,
		.destination = destination,
		.seq = seq,
		.uid = UINT32_MAX,
		.gid = UINT32_MAX,
	};
	entry->seq = seq;
	cb_queue_push(peer, entry);
}

int cb_queue_notify(struct cb_peer *peer, uint16_t kind, uint16_t flags, uint64_t destination, uint64_t seq)
{
	if (peer->fd < 0)
		return 0;
	struct cb_qentry *entry = cb_queue_note_new();
	if (!entry) {
		/* A notification must not vanish: a peer that cannot be told is disconnected. */
		cb_peer_doom(peer);
		return -ENOMEM;
	}
	notify(peer, entry, kind, flags, destination, seq);
	return 0;
}

void cb_queue_notify_prepaid(struct cb_peer *peer, struct cb_qentry *note, uint16_t kind, uint16_t flags,
			     uint64_t destination, uint64_t seq)
{
	note->prepaid = true;
	notify(peer, note, kind, flags, destination, seq); /* freed there if the peer is going away */
}

void cb_queue_withdraw(struct cb_peer *peer, struct cb_qentry *note)
{
	struct cb_queue *queue = &peer->queue;
	note->note_of = NULL;
	/* The last note of its transaction: the one before it must not announce it any more. */
	if (!(message_header(note)->flags & CAPBUS_MSG_FLAG_CONTINUE)) {
		if (note->link.prev == &queue->entries || note->link.prev == &queue->taken) {
			if (queue->continued_seq == note->seq)
				return; /* announced by a frame already written: delivered, stale */
		} else {
			struct cb_qentry *prev = cb_container_of(note->link.prev, struct cb_qentry, link);
			if (prev->seq == note->seq)
				message_header(prev)->flags &= (uint16_t)~CAPBUS_MSG_FLAG_CONTINUE;
		}
	}
	cb_list_del(&note->link);
	queue->n_entries--;
	entry_release(peer, note);
}

/* The oldest queued entry of priority 0 (most often the first), or NULL. */
static struct cb_qentry *oldest_plain(struct cb_queue *queue)
{
	for (struct cb_link *link = queue->entries.next; link != &queue->entries; link = link->next) {
		struct cb_qentry *entry = cb_container_of(link, struct cb_qentry, link);
		if (message_header(entry)->priority == 0)
			return entry;
	}
	return NULL;
}

bool cb_queue_take(struct cb_peer *peer, bool by_priority, int32_t min_priority)
{
	struct cb_queue *queue = &peer->queue;
	struct cb_qentry *best = cb_list_first(&queue->entries, struct cb_qentry, link);
	/* A frame already written said CONTINUE: the rest of its transaction comes next, as it
	 * promised, whatever the priority asked for. */
	bool continues = best && queue->continued_seq && best->seq == queue->continued_seq;
	if (by_priority && !continues) {
		best = NULL;
		for (struct cb_link *link = queue->ranked.next; link != &queue->ranked; link = link->next) {
			struct cb_qentry *entry = cb_container_of(link, struct cb_qentry, ranked_link);
			int32_t priority = message_header(entry)->priority;
			if (priority >= min_priority && (!best || priority > message_header(best)->priority))
				best = entry;
		}
		if (min_priority <= 0 && (!best || message_header(best)->priority < 0)) {
			struct cb_qentry *plain = oldest_plain(queue); /* 0 beats any negative one */
			if (plain)
				best = plain;
		}
	}
	if (!best)
		return false;
	if (cb_link_linked(&best->ranked_link))
		cb_list_del(&best->ranked_link);
	hold_uncount(peer, best); /* to be written now: its backlog is the reads' again */
	/* Taken alone: a frame after it of the same transaction is not promised any more. */
	struct capbus_message *header = message_header(best);
	if (header->flags & CAPBUS_MSG_FLAG_CONTINUE) {
		header->flags &= (uint16_t)~CAPBUS_MSG_FLAG_CONTINUE;
	} else if (best->link.prev != &queue->entries) {
		struct cb_qentry *prev = cb_container_of(best->link.prev, struct cb_qentry, link);
		if (prev->seq == best->seq)
			message_header(prev)->flags &= (uint16_t)~CAPBUS_MSG_FLAG_CONTINUE;
	}
	cb_list_del(&best->link);
	cb_list_add_tail(&queue->taken, &best->link);
	cb_peer_dirty(peer);
	return true;
}

void cb_queue_answer_recv(struct cb_peer *peer)
{
	if (!peer->recv_waiting || !cb_queue_take(peer, peer->recv_by_priority, peer->recv_priority))
		return;
	peer->recv_waiting = false;
	cb_queue_reply(peer, peer->recv_cookie, CAPBUS_CMD_RECV, 0, NULL, 0);
}

static void queue_reply(struct cb_peer *peer, struct cb_user *backlog_of, uint64_t cookie, uint16_t command,
			int error, const void *body, uint32_t body_size)
{
	uint32_t size = sizeof(struct capbus_frame) + sizeof(struct capbus_reply) + body_size;
	struct cb_qentry *entry = cb_qentry_new(size);
	if (!entry) {
		cb_peer_doom(peer);
		return;
	}
	struct capbus_frame *frame = (struct capbus_frame *)entry->header;
	*frame = (struct capbus_frame){ .size = size, .type = CAPBUS_FRAME_REPLY, .cookie = cookie };
	struct capbus_reply *reply = (struct capbus_reply *)(frame + 1);
	*reply = (struct capbus_reply){ .error = error, .command = command };
	if (body_size)
		memcpy(reply + 1, body, body_size);
	entry->is_reply = true;
	entry->backlog_of = backlog_of == peer->user ? NULL : backlog_of;
	cb_queue_push(peer, entry);
}

void cb_queue_reply(struct cb_peer *peer, uint64_t cookie, uint16_t command, int error, const void *body,
		    uint32_t body_size)
{
	queue_reply(peer, NULL, cookie, command, error, body, body_size);
}

void cb_queue_refuse(struct cb_peer *peer, struct cb_user *writer, uint64_t cookie, uint16_t command, int error)
{
	queue_reply(peer, writer, cookie, command, error, NULL, 0);
}
