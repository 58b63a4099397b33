#include "linger.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "capbus/uapi.h"
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

/* Throws away what the peer wrote that the kernel never read (it was cut off, or went),
 * closing the fds on it: one of them may be the peer's own end, which would otherwise keep
 * itself open from this socket's queue, and this socket lingering on it, for ever. */
static void discard_unread(int fd)
{
	union {
		struct cmsghdr align;
		char buffer[CMSG_SPACE(sizeof(int) * CAPBUS_FDS_MAX)];
	} control;
	char byte;
	for (int frames = 0; frames < 4096; frames++) {
		struct iovec iov = { &byte, 1 };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer,
				      .msg_controllen = sizeof(control.buffer) };
		ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n <= 0)
			return;
		for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
			if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
				continue;
			size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t i = 0; i < count; i++) {
				int received;
				memcpy(&received, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
				close(received);
			}
		}
	}
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
	if (n_fds)
		discard_unread(fd);
	if (n_fds && !drained(fd))
		linger = malloc(sizeof(*linger));
	if (!linger) {
		/* Drained; or out of memory, where the old way (forget them) is all that is left. */
		release(kernel, fd, user, n_fds);
		return;
	}
	shutdown(fd, SHUT_RDWR);
	*linger = (struct cb_linger){ .fd = fd, .user = user, .n_fds = n_fds };
	cb_retry_item_init(&linger->retry);
	user->n_charges++;
	cb_retry_schedule(&kernel->lingering, &linger->retry, kernel->now_ms, 0);
	kernel->stats.sockets_lingering++;
}

static void linger_free(struct cb_kernel *kernel, struct cb_linger *linger)
{
	struct cb_user *user = linger->user;
	cb_retry_cancel(&kernel->lingering, &linger->retry);
	kernel->stats.sockets_lingering--;
	release(kernel, linger->fd, user, linger->n_fds);
	free(linger);
	user->n_charges--;
	cb_user_put_if_unused(kernel, user);
}

void cb_linger_retry_due(struct cb_kernel *kernel, unsigned int batch)
{
	struct cb_retry_item *item;
	for (unsigned int n = 0; n < batch && (item = cb_retry_take_due(&kernel->lingering, kernel->now_ms)); n++) {
		struct cb_linger *linger = cb_container_of(item, struct cb_linger, retry);
		discard_unread(linger->fd); /* (what it wrote after it was cut off) */
		if (drained(linger->fd))
			linger_free(kernel, linger);
		else
			cb_retry_back_off(&kernel->lingering, item, kernel->now_ms);
	}
}

void cb_linger_free_all(struct cb_kernel *kernel)
{
	for (unsigned int i = 0; i < CB_RETRY_LEVELS; i++)
		while (!cb_list_empty(&kernel->lingering.levels[i]))
			linger_free(kernel, cb_list_first(&kernel->lingering.levels[i], struct cb_linger, retry.link));
}
