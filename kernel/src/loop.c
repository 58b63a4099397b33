/*
 * The I/O loop and the kernel's public API (capbus_kernel.h).
 *
 * One thread, one epoll set, non-blocking sockets: read frames from readable peers (at
 * most READ_BUDGET per peer per wakeup, so one busy peer cannot starve the rest), carry
 * each out, then write what queued up. A peer whose socket is full simply keeps its queue
 * in kernel memory (charged to quotas) until EPOLLOUT; the loop never waits on one peer.
 * Called through cffi, capbus_kernel_run holds no GIL: no Python runs on this thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "capbus_kernel.h"
#include "handle.h"
#include "kernel.h"
#include "linger.h"
#include "message.h"
#include "node.h"
#include "peer.h"

#define READ_BUDGET 64
#define PIDFS_MAGIC 0x50494446 /* linux/magic.h PID_FS_MAGIC; pidfs exists since Linux 6.9 */
#define EVENT_BATCH 64
#define RETRY_MS_MIN 1   /* first retry of a stalled peer or a paused listener */
#define RETRY_MS_MAX 128 /* retries back off to this while nothing moves */

static char listen_marker;

void capbus_kernel_default_limits(struct capbus_limits *limits)
{
	*limits = (struct capbus_limits){
		.peer_bytes = CAPBUS_DEFAULT_PEER_BYTES,
		.peer_messages = CAPBUS_DEFAULT_PEER_MESSAGES,
		.peer_handles = CAPBUS_DEFAULT_PEER_HANDLES,
		.peer_fds = CAPBUS_DEFAULT_PEER_FDS,
		.handles_held = CAPBUS_DEFAULT_HANDLES_HELD,
		.nodes_owned = CAPBUS_DEFAULT_NODES_OWNED,
		.user_bytes = CAPBUS_DEFAULT_USER_BYTES,
		.peers_per_user = CAPBUS_DEFAULT_PEERS_PER_USER,
		.user_handles = CAPBUS_DEFAULT_USER_HANDLES,
		.user_backlog = CAPBUS_DEFAULT_USER_BACKLOG,
		.kernel_fds = 0,
	};
}

/*
 * Splits the kernel's file descriptors (quota.h): RLIMIT_NOFILE, or limits.kernel_fds, is
 * the number the process may have open and, for a kernel not running with CAP_SYS_RESOURCE,
 * also the number its uid may have in flight in unix sockets. Of the open ones, an eighth
 * (and a few) stay for the embedding process and the kernel's own (epoll, eventfd, listener,
 * spare, pidfds, a socketpair being made), and room for the fds of one receive batch;
 * peers' sockets and queued fds get the rest. In flight, an eighth stays for the uid's
 * other processes.
 */
static void fd_budgets(struct cb_kernel *kernel)
{
	uint64_t n = kernel->limits.kernel_fds;
	if (n == 0) {
		struct rlimit limit = { 0 };
		getrlimit(RLIMIT_NOFILE, &limit);
		n = limit.rlim_cur == RLIM_INFINITY || limit.rlim_cur > (1u << 24) ? (1u << 24) : limit.rlim_cur;
	}
	uint64_t reserved = n / 8 + 16;
	uint64_t receiving = (uint64_t)CB_RX_BATCH * CAPBUS_FDS_MAX;
	if (receiving > n / 4)
		receiving = n / 4;
	kernel->rx_batch = receiving / CAPBUS_FDS_MAX ? (unsigned int)(receiving / CAPBUS_FDS_MAX) : 1;
	kernel->stats.fds_held_max = n > reserved + receiving ? n - reserved - receiving : 0;
	kernel->stats.fds_in_flight_max = n - n / 8;
}

void cb_kernel_log(struct cb_kernel *kernel, const char *format, ...)
{
	char line[512];
	va_list args;
	if (kernel->log_fd < 0)
		return;
	va_start(args, format);
	int length = vsnprintf(line, sizeof(line) - 1, format, args);
	va_end(args);
	if (length < 0)
		return;
	if ((size_t)length > sizeof(line) - 2)
		length = sizeof(line) - 2;
	line[length++] = '\n';
	if (write(kernel->log_fd, line, (size_t)length) < 0) {
		/* nowhere to say it: the statistics still count it */
	}
}

void capbus_kernel_set_log_fd(struct cb_kernel *kernel, int fd)
{
	pthread_mutex_lock(&kernel->lock);
	kernel->log_fd = fd;
	pthread_mutex_unlock(&kernel->lock);
}

int capbus_kernel_new(const struct capbus_limits *limits, struct cb_kernel **out)
{
	struct cb_kernel *kernel = calloc(1, sizeof(*kernel));
	if (!kernel)
		return -ENOMEM;
	if (limits)
		kernel->limits = *limits;
	else
		capbus_kernel_default_limits(&kernel->limits);
	pthread_mutex_init(&kernel->lock, NULL);
	kernel->listen_fd = -1;
	kernel->wake_fd = -1;
	kernel->log_fd = -1;
	kernel->retry_ms = RETRY_MS_MIN;
	cb_retry_queue_init(&kernel->stalled);
	cb_retry_queue_init(&kernel->fd_holders);
	cb_list_init(&kernel->gated);
	cb_retry_queue_init(&kernel->lingering);
	fd_budgets(kernel);
	/* Kept to be given up at EMFILE, to accept a newcomer and close it at once (so that a
	 * full fd table never leaves the listener readable for ever: the loop would spin). */
	kernel->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	cb_map_init(&kernel->peers_by_key, cb_peer_map_key);
	cb_map_init(&kernel->users, cb_user_map_key);
	cb_list_init(&kernel->peers);
	cb_list_init(&kernel->dirty);
	cb_list_init(&kernel->doomed);
	kernel->io = calloc(1, sizeof(*kernel->io));
	for (int i = 0; kernel->io && i < CB_RX_BATCH; i++) {
		/* Untouched pages cost nothing: a small frame commits one page of its buffer. */
		kernel->io->rx_buffers[i] = malloc(CAPBUS_FRAME_MAX + 1);
		if (!kernel->io->rx_buffers[i]) {
			capbus_kernel_free(kernel);
			return -ENOMEM;
		}
	}
	kernel->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	kernel->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	struct epoll_event event = { .events = EPOLLIN, .data.ptr = NULL };
	if (!kernel->io || kernel->epoll_fd < 0 || kernel->wake_fd < 0 ||
	    epoll_ctl(kernel->epoll_fd, EPOLL_CTL_ADD, kernel->wake_fd, &event) < 0) {
		int error = errno ? -errno : -ENOMEM;
		capbus_kernel_free(kernel);
		return error;
	}
	*out = kernel;
	return 0;
}

struct bind_request {
	int fd;
	mode_t mode;
	const struct sockaddr_un *address;
	int result;
};

/* Binds on a thread of its own with a file-system context of its own (CLONE_FS), so that
 * the umask that gives the socket exactly `mode` is not the embedding process's: changing
 * the process umask would race with its other threads creating files. */
static void *bind_with_mode(void *arg)
{
	struct bind_request *request = arg;
	if (unshare(CLONE_FS) < 0) {
		request->result = -errno;
		return NULL;
	}
	umask(~request->mode & 0777);
	if (bind(request->fd, (const struct sockaddr *)request->address, sizeof(*request->address)) < 0)
		request->result = -errno;
	return NULL;
}

int capbus_bind_unix(int fd, const char *path, unsigned int mode)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(address.sun_path))
		return -ENAMETOOLONG;
	if (mode & ~0777u)
		return -EINVAL;
	strcpy(address.sun_path, path);
	/* The socket's file mode is the access control, as /dev/bus1's is. Linux creates the
	 * socket file with the socket inode's mode (0777) less the umask, so the file has exactly
	 * `mode` from the instant it exists. Never chmod by path after bind: in a directory
	 * another user can write, the path may by then name their symlink, and a root daemon
	 * would chmod its target. */
	struct bind_request request = { .fd = fd, .mode = (mode_t)mode, .address = &address };
	pthread_t thread;
	int r = pthread_create(&thread, NULL, bind_with_mode, &request);
	if (r != 0)
		return -r;
	pthread_join(thread, NULL);
	return request.result;
}

int capbus_kernel_listen(struct cb_kernel *kernel, const char *path, unsigned int mode)
{
	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		return -ENAMETOOLONG;
	if (mode & ~0777u)
		return -EINVAL;
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	int r = capbus_bind_unix(fd, path, mode);
	if (r == 0 && listen(fd, SOMAXCONN) < 0)
		r = -errno;
	if (r < 0) {
		close(fd);
		return r;
	}
	pthread_mutex_lock(&kernel->lock);
	struct epoll_event event = { .events = EPOLLIN, .data.ptr = &listen_marker };
	if (kernel->listen_fd >= 0 || epoll_ctl(kernel->epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0) {
		r = kernel->listen_fd >= 0 ? -EBUSY : -errno;
		close(fd);
	} else {
		kernel->listen_fd = fd;
	}
	pthread_mutex_unlock(&kernel->lock);
	return r;
}

static int read_creds(int fd, uint32_t *uid, uint32_t *gid, uint32_t *pid)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return -errno;
	*uid = cred.uid;
	*gid = cred.gid;
	*pid = (uint32_t)cred.pid;
	return 0;
}

int capbus_kernel_adopt(struct cb_kernel *kernel, int fd, int64_t uid, int64_t gid, int64_t pid)
{
	uint32_t peer_uid = (uint32_t)uid, peer_gid = (uint32_t)gid, peer_pid = (uint32_t)pid;
	int type = 0, error = 0;
	socklen_t len = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET) {
		close(fd);
		return -EPROTOTYPE;
	}
	if (uid < 0 || gid < 0 || pid < 0) {
		int r = read_creds(fd, &peer_uid, &peer_gid, &peer_pid);
		if (r < 0) {
			close(fd);
			return r;
		}
	}
	pthread_mutex_lock(&kernel->lock);
	struct cb_peer *peer = cb_peer_new(kernel, fd, peer_uid, peer_gid, peer_pid, &error);
	if (peer && uid >= 0)
		peer->charged_as_adopted = true; /* the embedder said whom to charge */
	pthread_mutex_unlock(&kernel->lock);
	return peer ? 0 : -error;
}

int capbus_kernel_grant_monitor(struct cb_kernel *kernel, const uint8_t *peer_key)
{
	int r = 0;
	pthread_mutex_lock(&kernel->lock);
	struct cb_peer *peer = cb_peer_by_key(kernel, peer_key);
	if (!peer)
		r = -ESRCH;
	else {
		peer->monitor_trusted = true;
		peer->monitor_via = 0; /* the embedder's grant: no node's destruction revokes it */
		if (!peer->monitor) {
			peer->monitor = true;
			kernel->n_monitors++;
		}
	}
	pthread_mutex_unlock(&kernel->lock);
	return r;
}

void capbus_kernel_stats(struct cb_kernel *kernel, struct capbus_stats *out)
{
	pthread_mutex_lock(&kernel->lock);
	cb_kernel_stats(kernel, out);
	pthread_mutex_unlock(&kernel->lock);
}

void cb_kernel_stats(struct cb_kernel *kernel, struct capbus_stats *out)
{
	*out = kernel->stats;
	out->seq = kernel->seq;
	uint64_t memory = kernel->stats.peers * sizeof(struct cb_peer) +
			  kernel->stats.nodes * sizeof(struct cb_node) +
			  kernel->stats.handles * sizeof(struct cb_handle) +
			  (kernel->stats.handles - kernel->stats.nodes) * cb_queue_note_cost() +
			  kernel->stats.queued_bytes;
	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next) {
		struct cb_peer *peer = cb_container_of(link, struct cb_peer, kernel_link);
		memory += cb_map_bytes(&peer->handles_by_id) + cb_map_bytes(&peer->handles_by_node);
		memory += peer->queue.n_entries * sizeof(struct cb_qentry) + peer->queue.backlog_bytes +
			  peer->monitor_bytes;
	}
	memory += cb_map_bytes(&kernel->peers_by_key) + cb_map_bytes(&kernel->users);
	memory += kernel->stats.sockets_lingering * sizeof(struct cb_linger) + kernel->stats.seed_bytes;
	out->memory_bytes = memory;
}

/* After a flush: whether the peer's next frame waits for fd room, and whether the flush
 * wrote anything. A stalled peer is retried on its own timer (retry.h), which starts over
 * when it moves and slows down while it does not. */
static void set_stalled(struct cb_peer *peer, bool stalled, bool moved)
{
	struct cb_kernel *kernel = peer->kernel;
	struct cb_retry_item *item = &peer->stalled_retry;
	if (!stalled) {
		if (peer->stalled) {
			peer->stalled = false;
			cb_retry_cancel(&kernel->stalled, item);
			kernel->stats.peers_stalled--;
		}
		return;
	}
	if (!peer->stalled) {
		peer->stalled = true;
		kernel->stats.peers_stalled++;
		cb_retry_schedule(&kernel->stalled, item, kernel->now_ms, 0);
	} else if (moved) {
		cb_retry_schedule(&kernel->stalled, item, kernel->now_ms, 0);
	} else if (!cb_retry_queued(item)) {
		cb_retry_back_off(&kernel->stalled, item, kernel->now_ms); /* its retry found no room */
	} /* else flushed for another reason (a new frame): its next retry stays as it was */
}

/* Retries due per round and queue: the rest wait for the next round, at once. */
#define RETRY_BATCH 256

/* The retries that are due: sockets with fds perhaps read by now (landed once empty), of
 * peers and lingering after them, and stalled peers, each on its own timer (retry.h). */
static void retry_due(struct cb_kernel *kernel)
{
	struct cb_retry_item *item;
	for (int n = 0; n < RETRY_BATCH && (item = cb_retry_take_due(&kernel->fd_holders, kernel->now_ms)); n++) {
		struct cb_peer *peer = cb_container_of(item, struct cb_peer, holder_retry);
		cb_queue_reclaim_fds(peer);
		if (peer->fds_in_socket)
			cb_retry_back_off(&kernel->fd_holders, item, kernel->now_ms);
	}
	cb_linger_retry_due(kernel, RETRY_BATCH);
	for (int n = 0; n < RETRY_BATCH && (item = cb_retry_take_due(&kernel->stalled, kernel->now_ms)); n++)
		cb_peer_dirty(cb_container_of(item, struct cb_peer, stalled_retry));
	cb_kernel_settle(kernel);
}

/* Re-arms gated peers. */
static void retry_others(struct cb_kernel *kernel)
{
	struct cb_link *link, *next;
	for (link = kernel->gated.next; link != &kernel->gated; link = next) {
		next = link->next; /* re-arming may ungate it */
		cb_peer_update_events(cb_container_of(link, struct cb_peer, gated_link));
	}
}

void cb_kernel_settle(struct cb_kernel *kernel)
{
	while (!cb_list_empty(&kernel->dirty) || !cb_list_empty(&kernel->doomed)) {
		while (!cb_list_empty(&kernel->dirty)) {
			struct cb_peer *peer = cb_list_first(&kernel->dirty, struct cb_peer, dirty_link);
			cb_list_del(&peer->dirty_link);
			uint64_t written = kernel->frames_written;
			int r = cb_queue_flush(peer);
			if (r < 0)
				cb_peer_doom(peer);
			else
				set_stalled(peer, r == CB_FLUSH_STALLED, kernel->frames_written != written);
			cb_peer_update_events(peer);
		}
		if (!cb_list_empty(&kernel->doomed)) {
			struct cb_peer *peer = cb_list_first(&kernel->doomed, struct cb_peer, doomed_link);
			cb_peer_disconnect(peer);
		}
	}
}

/*
 * The sender's process identity: the inode of a pidfd for it, which pidfs makes unique for
 * the boot. Looked up once per (peer, pid) change, not per frame. The pid comes from
 * SCM_CREDENTIALS, checked by Linux at send time; the lookup follows within microseconds,
 * and a pid number cannot be reused before pid_max more processes were created.
 */
static uint64_t process_identity(struct cb_peer *peer, uint32_t pid)
{
	if (pid == 0)
		return 0;
	if (pid == peer->sender_pid)
		return peer->sender_process_id;
	uint64_t identity = 0;
	int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
	if (pidfd >= 0) {
		struct stat st;
		struct statfs fs;
		if (fstatfs(pidfd, &fs) == 0 && fs.f_type == PIDFS_MAGIC && fstat(pidfd, &st) == 0)
			identity = st.st_ino;
		close(pidfd);
	}
	peer->sender_pid = pid;
	peer->sender_process_id = identity;
	return identity;
}

/* Collects a received frame's fds and credentials. */
static void parse_control(struct cb_peer *peer, struct msghdr *msg, int *fds, uint32_t *n_fds,
			  struct cb_creds *creds)
{
	*n_fds = 0;
	*creds = (struct cb_creds){ peer->uid, peer->gid, peer->pid, 0, peer->serial };
	for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(msg); cmsg; cmsg = CMSG_NXTHDR(msg, cmsg)) {
		if (cmsg->cmsg_level != SOL_SOCKET)
			continue;
		if (cmsg->cmsg_type == SCM_RIGHTS) {
			size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t i = 0; i < count; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
				if (*n_fds < CAPBUS_FDS_MAX)
					fds[(*n_fds)++] = fd;
				else
					close(fd);
			}
		} else if (cmsg->cmsg_type == SCM_CREDENTIALS) {
			struct ucred cred;
			memcpy(&cred, CMSG_DATA(cmsg), sizeof(cred));
			/* pid 0: written before SO_PASSCRED was set on our end (a frame sent right
			 * after connect, before the kernel accepted), and Linux reports no one (the
			 * overflow uid, 65534). The connection's own credentials stand for it. */
			if (cred.pid != 0)
				*creds = (struct cb_creds){ cred.uid, cred.gid, (uint32_t)cred.pid, 0, peer->serial };
		}
	}
	creds->process_id = process_identity(peer, creds->pid);
}

static void close_unread_fds(struct cb_peer *peer, struct mmsghdr *msgs, int from, int to)
{
	int fds[CAPBUS_FDS_MAX];
	uint32_t n_fds;
	struct cb_creds creds;
	for (int i = from; i < to; i++) {
		parse_control(peer, &msgs[i].msg_hdr, fds, &n_fds, &creds);
		for (uint32_t j = 0; j < n_fds; j++)
			close(fds[j]);
	}
}

static void read_peer(struct cb_peer *peer, uint32_t events)
{
	struct cb_io *io = peer->kernel->io;

	/* A peer that hung up is read to the end at once: everything it sent before it went
	 * away is carried out (no budget, no reply backlog: it reads nothing any more). */
	bool hangup = (events & (EPOLLHUP | EPOLLRDHUP)) != 0;
	/* Gone for good, rather than only done writing (shutdown(SHUT_WR), a half-close). */
	bool closed = (events & EPOLLHUP) != 0;

	for (int budget = 0; (hangup || budget < READ_BUDGET) && !peer->doomed;) {
		if (!hangup && cb_peer_over_backlog(peer)) {
			/* It, or its uid, does not read its replies: stop reading its commands. Its
			 * uid may have crossed the bound through its other peers, since this one was
			 * armed: disarm it here (and gate it), or level-triggered epoll reports it
			 * again at once and the loop spins. */
			cb_peer_update_events(peer);
			break;
		}
		for (int i = 0; i < CB_RX_BATCH; i++) {
			io->rx_iov[i] = (struct iovec){ io->rx_buffers[i], CAPBUS_FRAME_MAX + 1 };
			io->rx[i].msg_hdr = (struct msghdr){
				.msg_iov = &io->rx_iov[i],
				.msg_iovlen = 1,
				.msg_control = io->rx_control[i].buffer,
				.msg_controllen = sizeof(io->rx_control[i].buffer),
			};
		}
		/* Near the reply backlog bound, one frame at a time, so that it is not overshot by
		 * a batch's worth of replies. */
		unsigned int batch = peer->kernel->rx_batch;
		if (!hangup && peer->queue.backlog_bytes - peer->queue.held_backlog + CB_RX_BATCH * 4096u >
				       CAPBUS_REPLY_BACKLOG_MAX)
			batch = 1;
		int n = recvmmsg(peer->fd, io->rx, batch, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, NULL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECONNRESET) {
				/* A peer that closed with our replies unread: Linux reports that once,
				 * ahead of the frames it wrote before closing. Those still count. */
				hangup = closed = true;
				continue;
			}
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				cb_peer_doom(peer);
			return;
		}
		for (int i = 0; i < n; i++) {
			struct msghdr *msg = &io->rx[i].msg_hdr;
			size_t length = io->rx[i].msg_len;
			int fds[CAPBUS_FDS_MAX];
			uint32_t n_fds;
			struct cb_creds creds;

			if (peer->doomed) {
				close_unread_fds(peer, io->rx, i, n);
				return;
			}
			parse_control(peer, msg, fds, &n_fds, &creds);
			if (length == 0 && n_fds == 0 && hangup) {
				/* End of file (an empty datagram cannot be told apart; a live peer
				 * that sends one is answered as malformed below). */
				close_unread_fds(peer, io->rx, i + 1, n);
				if (closed) {
					cb_peer_doom(peer);
				} else {
					/* A half-close: it sends no more, but still reads what is queued
					 * for it and what comes, until it closes (EPOLLHUP). */
					peer->read_closed = true;
					peer->kernel->stats.peers_half_closed++;
					cb_peer_update_events(peer);
				}
				return;
			}
			size_t size = (msg->msg_flags & MSG_TRUNC) ? CAPBUS_FRAME_MAX + 1 : length;
			cb_command_dispatch(peer, io->rx_buffers[i], size, fds, n_fds, &creds,
					    (msg->msg_flags & MSG_CTRUNC) != 0);
		}
		budget += n;
		if ((unsigned int)n < batch && !hangup)
			return; /* drained */
		if (n == 0)
			return;
	}
}

static void refusing(struct cb_kernel *kernel, const char *why, uint32_t uid)
{
	kernel->stats.connections_refused++;
	if (kernel->refusing)
		return; /* said once per episode */
	kernel->refusing = true;
	cb_kernel_log(kernel, "capbus kernel: refusing new connections (uid %u): %s", uid, why);
}

static void pause_listener(struct cb_kernel *kernel, bool paused)
{
	struct epoll_event event = { .events = paused ? 0 : EPOLLIN, .data.ptr = &listen_marker };
	if (kernel->listen_paused != paused &&
	    epoll_ctl(kernel->epoll_fd, EPOLL_CTL_MOD, kernel->listen_fd, &event) == 0)
		kernel->listen_paused = paused;
}

/* Out of fds (EMFILE, ENFILE): a newcomer waiting in the backlog keeps the listener readable,
 * so leaving it there would make the loop spin. Accept it with the spare fd and close it at
 * once (it sees its connection end); without a spare, stop polling the listener until the
 * retry timer. Returns whether to go on accepting. */
static bool refuse_at_fd_limit(struct cb_kernel *kernel, int error)
{
	refusing(kernel, error == EMFILE ? "the kernel process is out of file descriptors (EMFILE)"
					 : "the system is out of file descriptors (ENFILE)", UINT32_MAX);
	if (kernel->spare_fd >= 0) {
		close(kernel->spare_fd);
		int fd = accept4(kernel->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0)
			close(fd);
		kernel->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (kernel->spare_fd >= 0)
			return fd >= 0; /* no one else waiting: done until the listener wakes us */
	}
	pause_listener(kernel, true);
	return false;
}

static void accept_peers(struct cb_kernel *kernel)
{
	while (!kernel->listen_paused) {
		int fd = accept4(kernel->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if ((errno == EMFILE || errno == ENFILE) && refuse_at_fd_limit(kernel, errno))
				continue;
			return;
		}
		uint32_t uid = 0, gid = 0, pid = 0;
		int error;
		if (read_creds(fd, &uid, &gid, &pid) < 0) {
			close(fd);
			continue;
		}
		if (!cb_peer_new(kernel, fd, uid, gid, pid, &error)) {
			refusing(kernel, error == EDQUOT ? "its share of peers or of the kernel's fds is used up (EDQUOT)"
							 : strerror(error), uid);
		} else if (kernel->refusing) {
			kernel->refusing = false;
			cb_kernel_log(kernel, "capbus kernel: accepting new connections again");
		}
	}
}

static uint64_t now_ms(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

/* A retry round for what has no timer of its own: gated peers, a paused listener. The delay doubles while a round moves nothing, so that a stall that lasts costs
 * little. */
static void retry(struct cb_kernel *kernel)
{
	uint64_t written = kernel->stats.messages_written;
	uint64_t gated = kernel->stats.peers_gated;
	if (kernel->listen_paused)
		pause_listener(kernel, false);
	retry_others(kernel);
	cb_kernel_settle(kernel);
	bool moved = kernel->stats.messages_written != written || kernel->stats.peers_gated < gated;
	if (moved)
		kernel->retry_ms = RETRY_MS_MIN;
	else if (kernel->retry_ms < RETRY_MS_MAX)
		kernel->retry_ms *= 2;
}

int capbus_kernel_run(struct cb_kernel *kernel)
{
	struct epoll_event events[EVENT_BATCH];
	uint64_t retry_at = 0;

	pthread_mutex_lock(&kernel->lock);
	if (kernel->running) {
		pthread_mutex_unlock(&kernel->lock);
		return -EBUSY;
	}
	kernel->running = true;
	while (!kernel->stopping) {
		/* Stalled peers and a paused listener are retried on a timer, never polled: they
		 * would be ready (writable, readable) all the time and the loop would spin. */
		bool waiting = !cb_list_empty(&kernel->gated) || kernel->listen_paused;
		uint64_t now = now_ms(), due = UINT64_MAX;
		if (waiting) {
			if (retry_at == 0)
				retry_at = now + (uint64_t)kernel->retry_ms;
			due = retry_at;
		} else {
			retry_at = 0;
		}
		uint64_t stalled_due = cb_retry_next_due(&kernel->stalled);
		uint64_t holders_due = cb_retry_next_due(&kernel->fd_holders);
		uint64_t lingering_due = cb_retry_next_due(&kernel->lingering);
		if (stalled_due < due)
			due = stalled_due;
		if (holders_due < due)
			due = holders_due;
		if (lingering_due < due)
			due = lingering_due;
		int timeout = due == UINT64_MAX ? -1 : due > now ? (int)(due - now) : 0;
		pthread_mutex_unlock(&kernel->lock);
		int n = epoll_wait(kernel->epoll_fd, events, EVENT_BATCH, timeout);
		pthread_mutex_lock(&kernel->lock);
		kernel->now_ms = now_ms();
		kernel->stats.wakeups++;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (int i = 0; i < n; i++) {
			void *ptr = events[i].data.ptr;
			if (ptr == NULL) {
				uint64_t value;
				if (read(kernel->wake_fd, &value, sizeof(value)) < 0) {
					/* nothing to do: the counter was already drained */
				}
			} else if (ptr == &listen_marker) {
				accept_peers(kernel);
			} else {
				struct cb_peer *peer = ptr;
				if (peer->fd < 0 || peer->doomed)
					continue;
				if (events[i].events & EPOLLOUT)
					cb_peer_dirty(peer);
				if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP | EPOLLERR))
					read_peer(peer, events[i].events);
			}
		}
		cb_kernel_settle(kernel);
		/* Due even while other peers keep the loop busy. Only after the batch: a retry
		 * may disconnect (free) a peer whose event is in it. */
		if (waiting && kernel->now_ms >= retry_at) {
			retry_at = 0;
			retry(kernel);
		}
		retry_due(kernel);
	}
	kernel->running = false;
	pthread_mutex_unlock(&kernel->lock);
	return 0;
}

void capbus_kernel_stop(struct cb_kernel *kernel)
{
	uint64_t one = 1;
	pthread_mutex_lock(&kernel->lock);
	kernel->stopping = true;
	pthread_mutex_unlock(&kernel->lock);
	if (write(kernel->wake_fd, &one, sizeof(one)) < 0) {
		/* the eventfd is only full if a wakeup is already pending */
	}
}

void capbus_kernel_free(struct cb_kernel *kernel)
{
	if (!kernel)
		return;
	pthread_mutex_lock(&kernel->lock);
	while (!cb_list_empty(&kernel->peers)) {
		struct cb_peer *peer = cb_list_first(&kernel->peers, struct cb_peer, kernel_link);
		cb_peer_disconnect(peer);
		/* Notifications to peers still connected are dropped with them below. */
	}
	cb_linger_free_all(kernel);
	pthread_mutex_unlock(&kernel->lock);
	if (kernel->listen_fd >= 0)
		close(kernel->listen_fd);
	if (kernel->wake_fd >= 0)
		close(kernel->wake_fd);
	if (kernel->spare_fd >= 0)
		close(kernel->spare_fd);
	if (kernel->epoll_fd >= 0)
		close(kernel->epoll_fd);
	for (size_t i = 0; i < kernel->users.capacity; i++)
		if (kernel->users.slots[i])
			cb_user_free(kernel->users.slots[i]);
	cb_map_free(&kernel->users);
	cb_map_free(&kernel->peers_by_key);
	pthread_mutex_destroy(&kernel->lock);
	if (kernel->io)
		for (int i = 0; i < CB_RX_BATCH; i++)
			free(kernel->io->rx_buffers[i]);
	free(kernel->io);
	free(kernel);
}
