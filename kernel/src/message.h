/*
 * Messages: a payload and fds shared by every destination of one send, reference counted
 * by the queue entries that carry it (struct cb_qentry). The kernel owns the fds in a
 * message until the last entry carrying it is written or dropped; then they are closed.
 *
 * Send transactions (cb_send) live here too: validate, charge each destination all or
 * nothing, stamp one sequence number, install handles and queue.
 */
#ifndef CB_MESSAGE_H
#define CB_MESSAGE_H

#include <stdint.h>
#include <sys/types.h>

struct cb_kernel;
struct cb_peer;
struct cb_user;

struct cb_message {
	struct cb_kernel *kernel;
	struct cb_user *holder;  /* the uid its fds are held for (quota.h), or NULL */
	uint32_t *pinned_by;     /* receiving uids its fds are pinned by (cb_fds_pin), or NULL */
	uint32_t n_pinned, pinned_capacity;
	uint32_t n_refs;
	uint32_t payload_size;
	uint32_t n_fds;
	int *fds;
	uint8_t *payload;
	/* payload bytes and fds follow in the same allocation */
};

struct cb_creds {
	uint32_t uid;
	uint32_t gid;
	uint32_t pid;
	uint64_t process_id; /* pidfs inode of the sender, or 0 */
	uint64_t peer;       /* serial of the sending peer */
};

struct cb_message *cb_message_new(const void *payload, uint32_t payload_size, const int *fds, uint32_t n_fds);
struct cb_message *cb_message_ref(struct cb_message *message);
void cb_message_unref(struct cb_message *message);

/* Handles CAPBUS_CMD_SEND. `fds` are owned by the call (closed unless queued). */
void cb_send(struct cb_peer *sender, uint64_t cookie, const void *body, size_t body_size,
	     int *fds, uint32_t n_fds, const struct cb_creds *creds);

#endif
