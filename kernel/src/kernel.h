/*
 * The kernel object: everything one bus owns. One thread runs cb loop (loop.c) over it;
 * other threads (the embedding process) touch it only through the public API in
 * capbus_kernel.h, which takes `lock`. The loop holds `lock` whenever it is not waiting in
 * epoll, so every operation on peers, nodes and handles is serialized: that single order
 * is the bus's global order.
 */
#ifndef CB_KERNEL_H
#define CB_KERNEL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "capbus/uapi.h"
#include "capbus_kernel.h"
#include "list.h"
#include "map.h"
#include "retry.h"

struct cb_message;
struct cb_peer;

/* Frames moved per system call: recvmmsg from one peer, sendmmsg to one peer. */
#define CB_RX_BATCH 16
#define CB_TX_BATCH 32
#define CB_CONTROL_SIZE (CMSG_SPACE(sizeof(int) * CAPBUS_FDS_MAX) + CMSG_SPACE(sizeof(struct ucred)))

union cb_control {
	struct cmsghdr align;
	char buffer[CB_CONTROL_SIZE];
};

/* Scratch space for batched IO; used by the loop thread only, never across a dispatch. */
struct cb_io {
	uint8_t *rx_buffers[CB_RX_BATCH]; /* CAPBUS_FRAME_MAX + 1 bytes each */
	struct mmsghdr rx[CB_RX_BATCH];
	struct iovec rx_iov[CB_RX_BATCH];
	union cb_control rx_control[CB_RX_BATCH];
	struct mmsghdr tx[CB_TX_BATCH];
	struct iovec tx_iov[CB_TX_BATCH][2];
	union cb_control tx_control[CB_TX_BATCH];
};

struct cb_kernel {
	pthread_mutex_t lock;
	int epoll_fd;
	int wake_fd;               /* eventfd: stop requests and new peers from other threads */
	int listen_fd;             /* daemon socket, or -1 */
	bool stopping;
	bool running;
	uint64_t seq;              /* the global order: last stamped transaction */
	uint64_t next_node_serial;
	uint64_t next_peer_serial;
	uint64_t send_serial;          /* the send being prepared: its marks on peers and users */
	struct capbus_limits limits;
	struct capbus_stats stats;
	struct cb_map peers_by_key;    /* first 8 key bytes -> peer */
	struct cb_map users;           /* uid + 1 -> struct cb_user */
	struct cb_link peers;
	struct cb_link dirty;          /* peers with frames to flush */
	struct cb_link doomed;         /* peers to disconnect at the next safe point */
	uint32_t n_monitors;           /* peers with the monitor capability */
	struct cb_io *io;
	unsigned int rx_batch;         /* frames per recvmmsg, so that their fds fit the room left */
	int spare_fd;                  /* given up to accept-and-close a newcomer at EMFILE, or -1 */
	int log_fd;                    /* capbus_kernel_set_log_fd, or -1 */
	bool listen_paused;            /* the listener is not polled until the next retry */
	bool refusing;                 /* connections are being refused (logged once per episode) */
	struct cb_retry_queue stalled; /* peers whose next frame waits for fd room (queue.h) */
	struct cb_retry_queue fd_holders; /* peers with fds written to their socket, perhaps unread */
	struct cb_link gated;          /* peers not read while their uid's backlog is full */
	struct cb_retry_queue lingering; /* disconnected peers' sockets with fds unread (linger.h) */
	int retry_ms;                  /* how long the loop waits before its next retry round */
	uint64_t now_ms;               /* the loop's clock, read at each wakeup */
	uint64_t frames_written;       /* frames written to peers: has a flush moved anything? */
};

/* Stamps the next transaction. */
static inline uint64_t cb_kernel_tick(struct cb_kernel *kernel) { return ++kernel->seq; }
/* Writes one line to the operator's log, if there is one. */
void cb_kernel_log(struct cb_kernel *kernel, const char *format, ...) __attribute__((format(printf, 2, 3)));
/* capbus_kernel_stats, for the loop thread (which holds the kernel already). */
void cb_kernel_stats(struct cb_kernel *kernel, struct capbus_stats *out);
/* Flushes dirty peers and disconnects doomed ones. */
void cb_kernel_settle(struct cb_kernel *kernel);
/* Copies an event to every monitor (monitor.c). */
void cb_monitor_observe(struct cb_kernel *kernel, uint16_t event, uint64_t seq, uint32_t uid, uint32_t pid,
			uint32_t n_destinations, uint32_t n_handles, uint32_t n_fds, const struct cb_message *message);
struct cb_node;
/* Stops every peer attached as a monitor through `node`, destroyed (monitor.c). */
void cb_monitor_revoke(struct cb_kernel *kernel, const struct cb_node *node);
/* Handles one frame read from `peer` (command.c). */
void cb_command_dispatch(struct cb_peer *peer, const uint8_t *frame, size_t size, int *fds, uint32_t n_fds,
			 const void *creds, bool fds_truncated);

#endif
