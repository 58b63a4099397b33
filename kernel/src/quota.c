#include "quota.h"

#include <errno.h>
#include <stdlib.h>

#include "kernel.h"

uint64_t cb_user_map_key(const void *user)
{
	return (uint64_t)((const struct cb_user *)user)->uid + 1;
}

struct cb_user *cb_user_get(struct cb_kernel *kernel, uint32_t uid)
{
	struct cb_user *user = cb_map_get(&kernel->users, (uint64_t)uid + 1);
	if (user)
		return user;
	user = calloc(1, sizeof(*user));
	if (!user)
		return NULL;
	user->uid = uid;
	if (cb_map_put(&kernel->users, user) < 0) {
		free(user);
		return NULL;
	}
	return user;
}

void cb_user_free(struct cb_user *user)
{
	cb_quota_free(&user->receivers);
	free(user);
}

void cb_user_put_if_unused(struct cb_kernel *kernel, struct cb_user *user)
{
	if (user->n_peers == 0 && user->n_charges == 0 && user->n_handles == 0 && user->n_brought == 0) {
		cb_map_remove(&kernel->users, (uint64_t)user->uid + 1);
		cb_user_free(user);
	}
}

void cb_quota_init(struct cb_quota *quota)
{
	*quota = (struct cb_quota){ 0 };
}

void cb_quota_free(struct cb_quota *quota)
{
	free(quota->shares);
	cb_quota_init(quota);
}

static struct cb_share *find_share(struct cb_quota *quota, uint32_t uid)
{
	for (uint32_t i = 0; i < quota->n_shares; i++)
		if (quota->shares[i].uid == uid)
			return &quota->shares[i];
	return NULL;
}

/* The share of `uid`, made empty if it has none yet; NULL on ENOMEM. */
static struct cb_share *get_share(struct cb_quota *quota, uint32_t uid)
{
	struct cb_share *share = find_share(quota, uid);
	if (share)
		return share;
	if (quota->n_shares == quota->capacity) {
		uint32_t capacity = quota->capacity ? quota->capacity * 2 : 2;
		struct cb_share *shares = realloc(quota->shares, capacity * sizeof(*shares));
		if (!shares)
			return NULL;
		quota->shares = shares;
		quota->capacity = capacity;
	}
	share = &quota->shares[quota->n_shares++];
	*share = (struct cb_share){ .uid = uid };
	return share;
}

/* Keeps the array short: most peers hear from one or two users at a time. */
static void drop_share_if_empty(struct cb_quota *quota, struct cb_share *share)
{
	const struct cb_amount *a = &share->amount;
	if (a->bytes == 0 && a->messages == 0 && a->handles == 0 && a->fds == 0)
		*share = quota->shares[--quota->n_shares];
}

static struct cb_amount zero;

/* bus1's fair share: after the charge, this user holds at most what stays free. */
static bool fits(uint64_t limit, uint64_t used, uint64_t share, uint64_t charge)
{
	if (charge == 0)
		return true;
	if (used + charge > limit)
		return false;
	return limit - used - charge >= share + charge;
}

int cb_fds_hold(struct cb_kernel *kernel, struct cb_user *user, uint32_t n)
{
	struct capbus_stats *stats = &kernel->stats;
	if (!fits(stats->fds_held_max, stats->fds_held, user->fds_held, n))
		return -EDQUOT;
	user->fds_held += n;
	stats->fds_held += n;
	return 0;
}

void cb_fds_unhold(struct cb_kernel *kernel, struct cb_user *user, uint32_t n)
{
	user->fds_held -= n;
	kernel->stats.fds_held -= n;
}

/* The most fds `user` may hold: its fair share of what the other uids leave. */
static uint64_t fds_held_ceiling(const struct cb_kernel *kernel, const struct cb_user *user)
{
	const struct capbus_stats *stats = &kernel->stats;
	uint64_t others = stats->fds_held - user->fds_held;
	return others < stats->fds_held_max ? (stats->fds_held_max - others) / 2 : 0;
}

int cb_fds_pin(struct cb_kernel *kernel, struct cb_user *sender, uint32_t receiver_uid, uint32_t n)
{
	if (receiver_uid == sender->uid)
		return 0; /* its own peers that do not read only spend its own budget */
	struct cb_share *pair = find_share(&sender->receivers, receiver_uid);
	uint64_t pinned = pair ? pair->amount.fds : 0;
	/* The message's own fds are in fds_held already: the check is as of before it. */
	if (!fits(fds_held_ceiling(kernel, sender), sender->fds_held - n, pinned, n))
		return -EDQUOT;
	pair = get_share(&sender->receivers, receiver_uid);
	if (!pair)
		return -ENOMEM;
	pair->amount.fds += n;
	return 0;
}

void cb_fds_unpin(struct cb_user *sender, uint32_t receiver_uid, uint32_t n)
{
	if (receiver_uid == sender->uid)
		return;
	struct cb_share *pair = find_share(&sender->receivers, receiver_uid);
	if (!pair)
		return; /* cannot happen: every unpin follows its pin */
	pair->amount.fds -= n;
	drop_share_if_empty(&sender->receivers, pair);
}

int cb_fds_move(struct cb_kernel *kernel, struct cb_user *from, struct cb_user *to, uint32_t held,
		uint32_t in_flight)
{
	struct capbus_stats *stats = &kernel->stats;
	/* As new charges to `to`: as of before they were counted at all. */
	if (!fits(stats->fds_held_max, stats->fds_held - held, to->fds_held, held) ||
	    !fits(stats->fds_in_flight_max, stats->fds_in_flight - in_flight, to->fds_in_flight, in_flight))
		return -EDQUOT;
	from->fds_held -= held;
	to->fds_held += held;
	from->fds_in_flight -= in_flight;
	to->fds_in_flight += in_flight;
	return 0;
}

bool cb_fds_may_fly(struct cb_kernel *kernel, struct cb_user *user, uint32_t n)
{
	struct capbus_stats *stats = &kernel->stats;
	return fits(stats->fds_in_flight_max, stats->fds_in_flight, user->fds_in_flight, n);
}

void cb_fds_fly(struct cb_kernel *kernel, struct cb_user *user, uint32_t n)
{
	user->fds_in_flight += n;
	kernel->stats.fds_in_flight += n;
}

void cb_fds_land(struct cb_kernel *kernel, struct cb_user *user, uint32_t n)
{
	user->fds_in_flight -= n;
	kernel->stats.fds_in_flight -= n;
}

bool cb_handles_may_bring(struct cb_kernel *kernel, struct cb_user *sender, struct cb_user *receiver,
			  uint32_t pending, uint32_t n)
{
	if (receiver == sender)
		return true;
	const struct cb_share *pair = find_share(&sender->receivers, receiver->uid);
	uint64_t brought = (pair ? pair->amount.handles : 0) + (uint64_t)pending;
	return fits(kernel->limits.user_handles, (uint64_t)receiver->n_handles + pending, brought, n);
}

int cb_handles_bring(struct cb_user *sender, uint32_t receiver_uid)
{
	struct cb_share *pair = get_share(&sender->receivers, receiver_uid);
	if (!pair)
		return -ENOMEM;
	pair->amount.handles++;
	sender->n_brought++;
	return 0;
}

void cb_handles_unbring(struct cb_kernel *kernel, struct cb_user *sender, uint32_t receiver_uid)
{
	struct cb_share *pair = find_share(&sender->receivers, receiver_uid);
	if (pair) { /* always: every unbring follows its bring */
		pair->amount.handles--;
		drop_share_if_empty(&sender->receivers, pair);
	}
	sender->n_brought--;
	cb_user_put_if_unused(kernel, sender);
}

int cb_quota_charge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		    uint32_t receiver_uid, const struct cb_amount *amount)
{
	const struct capbus_limits *limits = &kernel->limits;
	struct cb_share *share = find_share(quota, sender->uid);
	struct cb_share *pair = find_share(&sender->receivers, receiver_uid);
	const struct cb_amount *mine = share ? &share->amount : &zero;
	uint64_t bytes = amount->bytes + amount->overhead;

	if (!fits(limits->peer_bytes, quota->used.bytes, mine->bytes, amount->bytes) ||
	    !fits(limits->peer_messages, quota->used.messages, mine->messages, amount->messages) ||
	    !fits(limits->peer_handles, quota->used.handles, mine->handles, amount->handles) ||
	    !fits(limits->peer_fds, quota->used.fds, mine->fds, amount->fds))
		return -EDQUOT;
	/* The sender's kernel-wide bytes, shared fairly between receiving uids too: receivers
	 * of another uid that never read can pin at most half of what their sender has left
	 * (its own peers spend only its own budget: bounded by user_bytes alone). */
	if (receiver_uid == sender->uid ? sender->queued_bytes + bytes > limits->user_bytes
					: !fits(limits->user_bytes, sender->queued_bytes, pair ? pair->amount.bytes : 0, bytes))
		return -EDQUOT;

	pair = get_share(&sender->receivers, receiver_uid);
	if (!pair)
		return -ENOMEM;
	share = get_share(quota, sender->uid);
	if (!share) {
		drop_share_if_empty(&sender->receivers, pair);
		return -ENOMEM;
	}
	pair->amount.bytes += bytes;
	pair->amount.messages += amount->messages;
	share->amount.bytes += amount->bytes;
	share->amount.messages += amount->messages;
	share->amount.handles += amount->handles;
	share->amount.fds += amount->fds;
	quota->used.bytes += amount->bytes;
	quota->used.messages += amount->messages;
	quota->used.handles += amount->handles;
	quota->used.fds += amount->fds;
	sender->queued_bytes += bytes;
	sender->n_charges++;
	kernel->stats.queued_messages += amount->messages;
	kernel->stats.queued_bytes += amount->bytes;
	kernel->stats.queued_fds += amount->fds;
	return 0;
}

void cb_quota_uncharge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		       uint32_t receiver_uid, const struct cb_amount *amount)
{
	struct cb_share *share = find_share(quota, sender->uid);
	struct cb_share *pair = find_share(&sender->receivers, receiver_uid);
	if (!share || !pair)
		return; /* cannot happen: every uncharge follows its charge */
	uint64_t bytes = amount->bytes + amount->overhead;
	pair->amount.bytes -= bytes;
	pair->amount.messages -= amount->messages;
	drop_share_if_empty(&sender->receivers, pair);
	share->amount.bytes -= amount->bytes;
	share->amount.messages -= amount->messages;
	share->amount.handles -= amount->handles;
	share->amount.fds -= amount->fds;
	quota->used.bytes -= amount->bytes;
	quota->used.messages -= amount->messages;
	quota->used.handles -= amount->handles;
	quota->used.fds -= amount->fds;
	sender->queued_bytes -= bytes;
	sender->n_charges--;
	kernel->stats.queued_messages -= amount->messages;
	kernel->stats.queued_bytes -= amount->bytes;
	kernel->stats.queued_fds -= amount->fds;
	drop_share_if_empty(quota, share);
	cb_user_put_if_unused(kernel, sender);
}
