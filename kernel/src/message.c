#include "message.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "handle.h"
#include "kernel.h"
#include "node.h"
#include "peer.h"
#include "queue.h"
#include "quota.h"

struct cb_message *cb_message_new(const void *payload, uint32_t payload_size, const int *fds, uint32_t n_fds)
{
	struct cb_message *message = malloc(sizeof(*message) + n_fds * sizeof(int) + payload_size);
	if (!message)
		return NULL;
	message->kernel = NULL;
	message->holder = NULL;
	message->pinned_by = NULL;
	message->n_pinned = message->pinned_capacity = 0;
	message->n_refs = 1;
	message->payload_size = payload_size;
	message->n_fds = n_fds;
	message->fds = (int *)(message + 1);
	message->payload = (uint8_t *)(message->fds + n_fds);
	if (n_fds)
		memcpy(message->fds, fds, n_fds * sizeof(int));
	if (payload_size)
		memcpy(message->payload, payload, payload_size);
	return message;
}

struct cb_message *cb_message_ref(struct cb_message *message)
{
	message->n_refs++;
	return message;
}

void cb_message_unref(struct cb_message *message)
{
	if (--message->n_refs > 0)
		return;
	for (uint32_t i = 0; i < message->n_fds; i++)
		close(message->fds[i]);
	if (message->holder) {
		for (uint32_t i = 0; i < message->n_pinned; i++)
			cb_fds_unpin(message->holder, message->pinned_by[i], message->n_fds);
		cb_fds_unhold(message->kernel, message->holder, message->n_fds);
		message->holder->n_charges--;
		cb_user_put_if_unused(message->kernel, message->holder);
	}
	free(message->pinned_by);
	free(message);
}

/* Pins the message's held fds by `uid`, once per receiving uid (quota.h). Returns 0 or an
 * errno. */
static int pin_fds(struct cb_message *message, uint32_t uid)
{
	if (!message->holder)
		return 0;
	for (uint32_t i = 0; i < message->n_pinned; i++)
		if (message->pinned_by[i] == uid)
			return 0;
	if (message->n_pinned == message->pinned_capacity) {
		uint32_t capacity = message->pinned_capacity ? message->pinned_capacity * 2 : 2;
		uint32_t *uids = realloc(message->pinned_by, capacity * sizeof(*uids));
		if (!uids)
			return ENOMEM;
		message->pinned_by = uids;
		message->pinned_capacity = capacity;
	}
	int r = cb_fds_pin(message->kernel, message->holder, uid, message->n_fds);
	if (r < 0)
		return -r;
	message->pinned_by[message->n_pinned++] = uid;
	return 0;
}

/* Unix sockets may not travel: a peer could send its own connection into its own queue and
 * keep itself alive forever (the reason bus1 refuses them too). */
static int check_fd(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return EBADF;
	if (S_ISSOCK(st.st_mode)) {
		int domain = 0;
		socklen_t len = sizeof(domain);
		if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain == AF_UNIX)
			return EOPNOTSUPP;
	}
	return 0;
}

/* A memfd payload must be sealed so that no one can change it under a receiver. */
#define MEMFD_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW)

static int check_memfd(int fd, uint64_t *size)
{
	struct stat st;
	int seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0)
		return EBADF; /* not a memfd (no seals to speak of) */
	if ((seals & MEMFD_SEALS) != MEMFD_SEALS)
		return ETXTBSY; /* kdbus's errno for an unsealed memfd */
	if (fstat(fd, &st) < 0)
		return EBADF;
	if ((uint64_t)st.st_size > CAPBUS_MEMFD_MAX)
		return EMSGSIZE;
	*size = (uint64_t)st.st_size;
	return 0;
}

#define SMALL_SEND 64 /* destinations handled without heap bookkeeping */

static int compare_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Is any id in the list twice? */
static int has_duplicates(const uint64_t *ids, uint32_t n)
{
	if (n < 2)
		return 0;
	if (n == 2)
		return ids[0] == ids[1];
	uint64_t *sorted = malloc(n * sizeof(*sorted));
	if (!sorted)
		return -ENOMEM;
	memcpy(sorted, ids, n * sizeof(*sorted));
	qsort(sorted, n, sizeof(*sorted), compare_u64);
	int dup = 0;
	for (uint32_t i = 1; i < n && !dup; i++)
		dup = sorted[i] == sorted[i - 1];
	free(sorted);
	return dup;
}

static void close_fds(int *fds, uint32_t n_fds)
{
	for (uint32_t i = 0; i < n_fds; i++)
		close(fds[i]);
}

/* The new handles the send being prepared will install in `user`'s peers, so far. */
static uint32_t *send_handles(struct cb_kernel *kernel, struct cb_user *user)
{
	if (user->send_mark != kernel->send_serial) {
		user->send_mark = kernel->send_serial;
		user->send_handles = 0;
	}
	return &user->send_handles;
}

/* Checks one destination and reserves everything its delivery needs. Returns 0 or an errno;
 * on success *entry is a queue entry charged to the receiver. */
static int prepare(struct cb_peer *sender, struct cb_user *user, struct cb_message *message, uint64_t id,
		   struct cb_node **distinct, uint32_t n_distinct, const struct cb_amount *amount,
		   const uint64_t *tracked_cookie, struct cb_qentry **entry)
{
	struct cb_kernel *kernel = sender->kernel;
	struct cb_handle *handle = cb_handle_lookup(sender, id);
	if (!handle)
		return ENXIO;
	struct cb_node *node = handle->node;
	if (node->destroyed || !node->anchor)
		return EHOSTUNREACH;
	struct cb_peer *receiver = node->owner;
	if (receiver->fd < 0 || receiver->doomed)
		return EHOSTUNREACH;

	/* Installs happen at commit, for all destinations at once: what the destinations before
	 * this one will install counts too. The handles it brings count in the fair share of
	 * the uid the sending peer is charged to (the uid of its own handles, an adopted peer's
	 * included), quota.h. A second destination on the same receiver installs
	 * nothing the first did not, and a node attached twice installs one handle (a peer
	 * holds one handle per node): `distinct` are the attached nodes, each once. */
	uint32_t new_handles = 0;
	if (receiver->send_mark != kernel->send_serial)
		for (uint32_t i = 0; i < n_distinct; i++)
			new_handles += cb_handle_is_new(receiver, distinct[i]);
	uint32_t *pending = send_handles(kernel, receiver->user);
	if (receiver->handles_by_id.count + new_handles > kernel->limits.handles_held ||
	    receiver->user->n_handles + *pending + new_handles > kernel->limits.user_handles ||
	    !cb_handles_may_bring(kernel, sender->user, receiver->user, *pending, new_handles))
		return EDQUOT;
	if (cb_handle_reserve(receiver, new_handles) < 0)
		return ENOMEM;

	uint32_t header_size = sizeof(struct capbus_frame) + sizeof(struct capbus_message) + amount->handles * 8;
	*entry = tracked_cookie ? cb_qentry_new_tracked(header_size, sender, *tracked_cookie) : cb_qentry_new(header_size);
	if (!*entry)
		return ENOMEM;
	struct cb_amount charge = *amount;
	charge.overhead = (uint32_t)cb_qentry_cost(*entry);
	int r = cb_quota_charge(kernel, &receiver->quota, user, receiver->uid, &charge);
	if (r < 0) {
		cb_qentry_free(*entry);
		*entry = NULL;
		return -r;
	}
	/* Pinned until the message goes (its fds are held until its last entry is written). */
	int error = pin_fds(message, receiver->uid);
	if (error) {
		cb_quota_uncharge(kernel, &receiver->quota, user, receiver->uid, &charge);
		cb_qentry_free(*entry);
		*entry = NULL;
		return error;
	}
	(*entry)->charged_to = user;
	(*entry)->charged_for = receiver->uid;
	(*entry)->charge = charge;
	*pending += new_handles;
	receiver->send_mark = kernel->send_serial;
	return 0;
}

void cb_send(struct cb_peer *sender, uint64_t cookie, const void *body, size_t body_size, int *fds,
	     uint32_t n_fds, const struct cb_creds *creds)
{
	struct cb_kernel *kernel = sender->kernel;
	const struct capbus_cmd_send *cmd = body;
	struct cb_node *attached[CAPBUS_HANDLES_MAX];
	struct cb_node *distinct[CAPBUS_HANDLES_MAX]; /* the attached nodes, each once */
	uint32_t n_distinct = 0;
	int error = 0;

	if (body_size < sizeof(*cmd)) {
		error = EINVAL;
		goto fail;
	}
	if ((cmd->flags & ~(uint32_t)(CAPBUS_SEND_FLAG_MEMFD | CAPBUS_SEND_FLAG_QUIET | CAPBUS_SEND_FLAG_TRACK)) || cmd->n_destinations == 0 ||
	    cmd->n_destinations > CAPBUS_DESTINATIONS_MAX) {
		error = EINVAL;
		goto fail;
	}
	bool memfd = cmd->flags & CAPBUS_SEND_FLAG_MEMFD;
	if (memfd && (cmd->payload_size != 0 || cmd->n_fds == 0)) {
		error = EINVAL;
		goto fail;
	}
	if (cmd->n_handles > CAPBUS_HANDLES_MAX || cmd->n_fds > CAPBUS_FDS_MAX || cmd->payload_size > CAPBUS_PAYLOAD_MAX) {
		error = EMSGSIZE;
		goto fail;
	}
	if (sizeof(*cmd) + 8ull * cmd->n_destinations + 8ull * cmd->n_handles + cmd->payload_size != body_size ||
	    cmd->n_fds != n_fds) {
		error = EINVAL;
		goto fail;
	}
	const uint64_t *destinations = (const uint64_t *)(cmd + 1);
	const uint64_t *handle_ids = destinations + cmd->n_destinations;
	const uint8_t *payload = (const uint8_t *)(handle_ids + cmd->n_handles);

	for (uint32_t i = 0; i < n_fds && !error; i++)
		error = check_fd(fds[i]);
	uint64_t memfd_size = 0;
	if (!error && memfd)
		error = check_memfd(fds[0], &memfd_size);
	if (error)
		goto fail;
	for (uint32_t i = 0; i < cmd->n_handles; i++) {
		struct cb_handle *handle = cb_handle_lookup(sender, handle_ids[i]);
		if (!handle) {
			error = ENXIO;
			goto fail;
		}
		attached[i] = handle->node;
	}
	int dup = has_duplicates(destinations, cmd->n_destinations);
	if (dup) {
		error = dup < 0 ? ENOMEM : ENOTUNIQ;
		goto fail;
	}

	struct cb_user *user = cb_user_get(kernel, creds->uid);
	if (user && n_fds && cb_fds_hold(kernel, user, n_fds) < 0) {
		/* Refused now, while nothing is accepted, never failed at delivery (quota.h). */
		cb_user_put_if_unused(kernel, user);
		error = EDQUOT;
		goto fail;
	}
	struct cb_message *message = user ? cb_message_new(payload, cmd->payload_size, fds, n_fds) : NULL;
	if (message && n_fds) {
		message->kernel = kernel;
		message->holder = user;
		user->n_charges++;
	} else if (user && n_fds) {
		cb_fds_unhold(kernel, user, n_fds);
	}
	uint32_t n = cmd->n_destinations;
	bool quiet = cmd->flags & CAPBUS_SEND_FLAG_QUIET;
	size_t errors_size = (n * sizeof(int32_t) + 7) & ~(size_t)7;
	size_t reply_size = sizeof(struct capbus_reply_send) + errors_size + (quiet ? 8ull * n : 0);
	/* Most sends have few destinations: keep their bookkeeping off the heap. */
	uint64_t reply_words[(sizeof(struct capbus_reply_send) + SMALL_SEND * (sizeof(int32_t) + 8)) / 8 + 1] = { 0 };
	struct cb_qentry *small_entries[SMALL_SEND] = { 0 };
	bool small = n <= SMALL_SEND;
	uint8_t *reply = small ? (uint8_t *)reply_words : calloc(1, reply_size);
	struct cb_qentry **entries = small ? small_entries : calloc(n, sizeof(*entries));
	if (!message || !reply || !entries) {
		if (message) {
			if (message->holder) {
				cb_fds_unhold(kernel, user, message->n_fds);
				user->n_charges--;
				message->holder = NULL;
			}
			message->n_fds = 0; /* the fds are still ours, closed below */
			cb_message_unref(message);
		}
		if (!small) {
			free(reply);
			free(entries);
		}
		if (user)
			cb_user_put_if_unused(kernel, user);
		error = ENOMEM;
		goto fail;
	}
	/* From here the message owns the fds. */
	struct capbus_reply_send *result = (struct capbus_reply_send *)reply;
	int32_t *errors = (int32_t *)(result + 1);
	struct cb_amount amount = {
		.bytes = cmd->payload_size, .messages = 1, .handles = cmd->n_handles, .fds = n_fds,
	};

	result->n_destinations = n;
	kernel->send_serial++;
	for (uint32_t i = 0; i < cmd->n_handles; i++) {
		if (attached[i]->send_mark != kernel->send_serial) {
			attached[i]->send_mark = kernel->send_serial;
			distinct[n_distinct++] = attached[i];
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		errors[i] = prepare(sender, user, message, destinations[i], distinct, n_distinct, &amount,
				    cmd->flags & CAPBUS_SEND_FLAG_TRACK ? &cookie : NULL, &entries[i]);
		if (!errors[i])
			result->n_delivered++;
	}

	if (result->n_delivered) {
		/* Commit: one sequence number for every destination, nothing can fail now. */
		uint64_t seq = cb_kernel_tick(kernel);
		for (uint32_t i = 0; i < n; i++) {
			struct cb_qentry *entry = entries[i];
			if (!entry)
				continue;
			struct cb_handle *destination = cb_handle_lookup(sender, destinations[i]);
			struct cb_peer *receiver = destination->node->owner;
			struct capbus_frame *frame = (struct capbus_frame *)entry->header;
			struct capbus_message *header = (struct capbus_message *)(frame + 1);
			uint64_t *ids = (uint64_t *)(header + 1);

			for (uint32_t j = 0; j < cmd->n_handles; j++)
				ids[j] = cb_handle_install(receiver, attached[j], sender->user);
			*frame = (struct capbus_frame){
				.size = entry->header_size + cmd->payload_size,
				.type = CAPBUS_FRAME_MESSAGE,
			};
			*header = (struct capbus_message){
				.kind = CAPBUS_MSG_DATA,
				.flags = memfd ? CAPBUS_MSG_FLAG_MEMFD : 0,
				.priority = cmd->priority,
				.destination = destination->node->anchor->id,
				.seq = seq,
				.uid = receiver->want_metadata ? creds->uid : UINT32_MAX,
				.gid = receiver->want_metadata ? creds->gid : UINT32_MAX,
				.pid = receiver->want_metadata ? creds->pid : 0,
				.process_id = receiver->want_metadata ? creds->process_id : 0,
				.peer = receiver->want_metadata ? creds->peer : 0,
				.n_handles = cmd->n_handles,
				.n_fds = n_fds,
				.payload_size = memfd ? (uint32_t)memfd_size : cmd->payload_size,
			};
			entry->seq = seq;
			entry->message = cb_message_ref(message);
			cb_queue_push(receiver, entry);
		}
		kernel->stats.messages_sent += result->n_delivered;
		sender->sent_messages++;
		sender->sent_bytes += memfd ? memfd_size : cmd->payload_size;
		cb_monitor_observe(kernel, CAPBUS_MSG_DATA, seq, creds->uid, creds->pid, result->n_delivered,
				   cmd->n_handles, n_fds, message);
	}
	/* The message may hold the last charge on `user` (a sending uid with no peer of its own:
	 * credentials are the writer's): keep it until both are let go. */
	user->n_charges++;
	cb_message_unref(message);
	user->n_charges--;
	cb_user_put_if_unused(kernel, user);
	if (!quiet || result->n_delivered < n) {
		if (quiet)
			memcpy(reply + sizeof(*result) + errors_size, destinations, 8ull * n);
		cb_queue_reply(sender, cookie, CAPBUS_CMD_SEND, 0, reply, (uint32_t)reply_size);
	}
	if (!small) {
		free(reply);
		free(entries);
	}
	return;

fail:
	close_fds(fds, n_fds);
	cb_queue_reply(sender, cookie, CAPBUS_CMD_SEND, error, NULL, 0);
}
