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

#include "capbus_kernel.h"
#include "list.h"
#include "map.h"

struct cb_message;
struct cb_peer;

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
	struct capbus_limits limits;
	struct capbus_stats stats;
	struct cb_map peers_by_key;    /* first 8 key bytes -> peer */
	struct cb_map users;           /* uid + 1 -> struct cb_user */
	struct cb_link peers;
	struct cb_link dirty;          /* peers with frames to flush */
	struct cb_link doomed;         /* peers to disconnect at the next safe point */
	uint32_t n_monitors;           /* peers with the monitor capability */
	uint8_t *rx_buffer;            /* CAPBUS_FRAME_MAX + 1 bytes */
};

/* Stamps the next transaction. */
static inline uint64_t cb_kernel_tick(struct cb_kernel *kernel) { return ++kernel->seq; }
/* Flushes dirty peers and disconnects doomed ones. */
void cb_kernel_settle(struct cb_kernel *kernel);
/* Copies an event to every monitor (monitor.c). */
void cb_monitor_observe(struct cb_kernel *kernel, uint16_t event, uint64_t seq, uint32_t uid, uint32_t pid,
			uint32_t n_destinations, uint32_t n_handles, uint32_t n_fds, const struct cb_message *message);
/* Handles one frame read from `peer` (command.c). */
void cb_command_dispatch(struct cb_peer *peer, const uint8_t *frame, size_t size, int *fds, uint32_t n_fds,
			 const void *creds, bool fds_truncated);

#endif
