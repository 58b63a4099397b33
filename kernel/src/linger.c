#include "linger.h"

#include <stdbool.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "kernel.h"
#include "quota.h"

/* Has everything written to this socket been read, or thrown away by the other end? */
static bool drained(int fd)
{
	int unread = 0;
	/* SIOCOUTQ on a unix socket: what this end wrote that the other end has not read. An
	 * error means there is nothing left to wait for. */
	return ioctl(fd, SIOCOUTQ, &unread) < 0 || unread == 0;
}

static void release(struct cb_kernel *kernel, int fd, struct cb_user *user, uint32_t n_fds)
{
	close(fd);
	cb_fds_land(kernel, user, n_fds);
	cb_fds_unhold(kernel, user, 1);
}

void cb_linger_close(struct cb_kernel *kernel, int fd, struct cb_user *user, uint32_t n_fds)
{
	struct cb_linger *linger = NULL;
	if (n_fds && !drained(fd))
		linger = malloc(sizeof(*linger));
	if (!linger) {
		/* Drained; or out of memory, where the old way (forget them) is all that is left. */
		release(kernel, fd, user, n_fds);
		return;
	}
	shutdown(fd, SHUT_RDWR);
	*linger = (struct cb_linger){ .fd = fd, .user = user, .n_fds = n_fds };
	user->n_charges++;
	cb_list_add_tail(&kernel->lingering, &linger->link);
	kernel->stats.sockets_lingering++;
}

static void linger_free(struct cb_kernel *kernel, struct cb_linger *linger)
{
	struct cb_user *user = linger->user;
	cb_list_del(&linger->link);
	kernel->stats.sockets_lingering--;
	release(kernel, linger->fd, user, linger->n_fds);
	free(linger);
	user->n_charges--;
	cb_user_put_if_unused(kernel, user);
}

void cb_linger_reap(struct cb_kernel *kernel)
{
	struct cb_link *link, *next;
	for (link = kernel->lingering.next; link != &kernel->lingering; link = next) {
		next = link->next;
		struct cb_linger *linger = cb_container_of(link, struct cb_linger, link);
		if (drained(linger->fd))
			linger_free(kernel, linger);
	}
}

void cb_linger_free_all(struct cb_kernel *kernel)
{
	while (!cb_list_empty(&kernel->lingering))
		linger_free(kernel, cb_list_first(&kernel->lingering, struct cb_linger, link));
}
