/*
 * Lingering sockets: the kernel's end of a disconnected peer's socket, kept while fds it
 * wrote there may still be unread.
 *
 * Closing the kernel's end does not free what the other end has not read: those frames stay
 * in its receive queue, readable, and Linux keeps their fds in flight, charged to the
 * kernel's uid (RLIMIT_NOFILE, ETOOMANYREFS), for as long as that process keeps its end
 * open. So a peer disconnected with fds in its socket (fds_in_socket > 0) is not closed:
 * its end is shut down (the other end sees the hang-up at once and can still read what is
 * there), taken out of epoll, and kept, with its fds still counted in flight and the socket
 * still counted as a held fd, both charged to the peer's uid as before (quota.h). It waits
 * on a retry queue of its own (kernel->lingering, retry.h): looked at on its own timer, 1 ms
 * doubling to 128 ms while its fds stay unread, at most a batch per round, and closed once
 * SIOCOUTQ says the other end read everything or closed. What the peer wrote that the kernel
 * never read is thrown away, and the fds on it closed, when it starts to linger and at each
 * look: one may be the peer's own end, which would otherwise be held by this very socket's
 * queue, and never close. So sockets an attacker never reads
 * cost one look each per 128 ms, not a walk over all of them at every retry round.
 */
#ifndef CB_LINGER_H
#define CB_LINGER_H

#include <stdint.h>

#include "retry.h"

struct cb_kernel;
struct cb_user;

struct cb_linger {
	struct cb_retry_item retry; /* in kernel->lingering while it lingers */
	int fd;
	struct cb_user *user;  /* charged: one held fd, n_fds in flight, one n_charges reference */
	uint32_t n_fds;
};

/* Ends a peer's socket `fd`, into which `n_fds` fds were written since it was last seen
 * empty, all charged to `user`: closes it and returns the charges if they have landed, else
 * keeps it lingering with them. Takes ownership of `fd`. */
void cb_linger_close(struct cb_kernel *kernel, int fd, struct cb_user *user, uint32_t n_fds);
/* Looks at (at most `batch` of) the lingering sockets that are due: closes those whose fds
 * have landed, and backs the others off (retry.h). */
void cb_linger_retry_due(struct cb_kernel *kernel, unsigned int batch);
/* Closes every lingering socket (the kernel stops). */
void cb_linger_free_all(struct cb_kernel *kernel);

#endif
