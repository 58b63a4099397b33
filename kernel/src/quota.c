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

void cb_user_put_if_unused(struct cb_kernel *kernel, struct cb_user *user)
{
	if (user->n_peers == 0 && user->n_charges == 0) {
		cb_map_remove(&kernel->users, (uint64_t)user->uid + 1);
		free(user);
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

int cb_quota_charge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		    const struct cb_amount *amount)
{
	const struct capbus_limits *limits = &kernel->limits;
	struct cb_share *share = find_share(quota, sender->uid);
	struct cb_amount mine = share ? share->amount : (struct cb_amount){ 0 };

	if (!fits(limits->peer_bytes, quota->used.bytes, mine.bytes, amount->bytes) ||
	    !fits(limits->peer_messages, quota->used.messages, mine.messages, amount->messages) ||
	    !fits(limits->peer_handles, quota->used.handles, mine.handles, amount->handles) ||
	    !fits(limits->peer_fds, quota->used.fds, mine.fds, amount->fds))
		return -EDQUOT;
	if (sender->queued_bytes + amount->bytes + amount->overhead > limits->user_bytes)
		return -EDQUOT;

	if (!share) {
		if (quota->n_shares == quota->capacity) {
			uint32_t capacity = quota->capacity ? quota->capacity * 2 : 2;
			struct cb_share *shares = realloc(quota->shares, capacity * sizeof(*shares));
			if (!shares)
				return -ENOMEM;
			quota->shares = shares;
			quota->capacity = capacity;
		}
		share = &quota->shares[quota->n_shares++];
		*share = (struct cb_share){ .uid = sender->uid };
	}
	share->amount.bytes += amount->bytes;
	share->amount.messages += amount->messages;
	share->amount.handles += amount->handles;
	share->amount.fds += amount->fds;
	quota->used.bytes += amount->bytes;
	quota->used.messages += amount->messages;
	quota->used.handles += amount->handles;
	quota->used.fds += amount->fds;
	sender->queued_bytes += amount->bytes + amount->overhead;
	sender->n_charges++;
	kernel->stats.queued_messages += amount->messages;
	kernel->stats.queued_bytes += amount->bytes;
	kernel->stats.queued_fds += amount->fds;
	return 0;
}

void cb_quota_uncharge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		       const struct cb_amount *amount)
{
	struct cb_share *share = find_share(quota, sender->uid);
	if (!share)
		return; /* cannot happen: every uncharge follows its charge */
	share->amount.bytes -= amount->bytes;
	share->amount.messages -= amount->messages;
	share->amount.handles -= amount->handles;
	share->amount.fds -= amount->fds;
	quota->used.bytes -= amount->bytes;
	quota->used.messages -= amount->messages;
	quota->used.handles -= amount->handles;
	quota->used.fds -= amount->fds;
	sender->queued_bytes -= amount->bytes + amount->overhead;
	sender->n_charges--;
	kernel->stats.queued_messages -= amount->messages;
	kernel->stats.queued_bytes -= amount->bytes;
	kernel->stats.queued_fds -= amount->fds;
	if (share->amount.messages == 0) {
		/* Keep the array short: most peers hear from one or two users at a time. */
		*share = quota->shares[--quota->n_shares];
	}
	cb_user_put_if_unused(kernel, sender);
}
