/*
 * Quotas: what one sending user may have queued on one receiving peer, and in the whole
 * kernel.
 *
 * Every queued message is charged, until it is written to its receiver's socket, to the
 * pair (receiving peer, sending uid): one message, its payload bytes, its attached handles
 * and fds. A charge must pass two checks or the send fails for that destination with
 * EDQUOT and has no effect:
 *
 *  - fair share on the receiving peer (bus1's rule): for every resource, with `limit` the
 *    peer's limit, `used` what all users have queued there and `share` what this user has,
 *    the charge `c` must leave `limit - used - c >= share + c`. One user can so take at most
 *    half of what others leave free: a flood from one uid (or one stuck pair of peers of
 *    the same uid) stops at half the peer's limit and a second uid can still get through;
 *  - the sending user's kernel-wide total of queued bytes (`user_bytes`), which bounds the
 *    kernel memory one uid can pin by flooding many receivers.
 *
 * The socket buffer below the kernel adds at most one socket's worth (~200 KiB) per peer.
 */
#ifndef CB_QUOTA_H
#define CB_QUOTA_H

#include <stdint.h>
#include <stddef.h>

struct cb_kernel;

struct cb_user {
	uint32_t uid;
	uint32_t n_peers;        /* connected peers created by this uid */
	uint32_t n_charges;      /* queued entries charged to this uid; with n_peers, its references */
	uint64_t queued_bytes;   /* payload bytes this uid has queued anywhere in the kernel */
};

/* An amount of the four queued resources. */
struct cb_amount {
	uint64_t bytes;
	uint32_t messages;
	uint32_t handles;
	uint32_t fds;
};

struct cb_share {
	uint32_t uid;
	struct cb_amount amount;
};

/* The receiving side of one peer: what is queued on it, in total and per sending uid. */
struct cb_quota {
	struct cb_amount used;
	struct cb_share *shares; /* one per sending uid with something queued (usually 1-2) */
	uint32_t n_shares;
	uint32_t capacity;
};

struct cb_user *cb_user_get(struct cb_kernel *kernel, uint32_t uid); /* NULL on ENOMEM */
uint64_t cb_user_map_key(const void *user); /* key of kernel->users */
void cb_user_put_if_unused(struct cb_kernel *kernel, struct cb_user *user);

void cb_quota_init(struct cb_quota *quota);
void cb_quota_free(struct cb_quota *quota);
/* Charges `amount` from `sender` on `quota`: 0, -EDQUOT or -ENOMEM; no effect on failure. */
int cb_quota_charge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		    const struct cb_amount *amount);
void cb_quota_uncharge(struct cb_kernel *kernel, struct cb_quota *quota, struct cb_user *sender,
		       const struct cb_amount *amount);

#endif
