/*
 * The kernel's public C API, for the process that embeds it (through cffi as
 * capbus._kernel) or runs it as a daemon. Peers never use this: they speak uapi.h over
 * their socket. Every function here is thread-safe; capbus_kernel_run blocks its thread.
 * Errors are negative errno values.
 */
#ifndef CAPBUS_KERNEL_H
#define CAPBUS_KERNEL_H

#include <stdint.h>

struct cb_kernel;

struct capbus_limits {
	uint64_t peer_bytes;      /* queued payload bytes per receiving peer */
	uint64_t peer_messages;   /* queued messages per receiving peer */
	uint64_t peer_handles;    /* handles in queued messages per receiving peer */
	uint64_t peer_fds;        /* fds in queued messages per receiving peer */
	uint64_t handles_held;    /* handles one peer may hold */
	uint64_t nodes_owned;     /* nodes one peer may own */
	uint64_t user_bytes;      /* queued bytes per sending uid, kernel-wide: payload and each
				   * queued entry's own size */
	uint64_t peers_per_user;  /* connected peers per uid */
	uint64_t user_handles;    /* handles (owners' included, so nodes too) held by one uid's peers */
	uint64_t user_backlog;    /* bytes of replies and notifications queued to one uid's peers */
	uint64_t kernel_fds;      /* file descriptors the kernel may use in all; 0: its RLIMIT_NOFILE
				   * at capbus_kernel_new (docs/wire-format.md "File descriptors") */
};

struct capbus_stats {
	uint64_t peers;
	uint64_t nodes;
	uint64_t handles;
	uint64_t queued_messages;
	uint64_t queued_bytes;
	uint64_t queued_fds;
	uint64_t seq;             /* transactions committed so far */
	uint64_t messages_sent;   /* data messages queued for delivery (per destination) */
	uint64_t messages_written;/* data messages written to their receiver's socket */
	uint64_t violations;      /* frames rejected as malformed */
	uint64_t peers_doomed;    /* peers disconnected for misbehaving */
	uint64_t memory_bytes;    /* kernel heap in use by peers, nodes, handles and queues */
	uint64_t fds_held;        /* fds the kernel holds for peers: their sockets, queued fds */
	uint64_t fds_held_max;    /* the budget for fds_held */
	uint64_t fds_in_flight;   /* fds written to receivers' sockets and perhaps not read yet */
	uint64_t fds_in_flight_max; /* the budget for fds_in_flight */
	uint64_t peers_stalled;   /* peers whose next message waits for fd room */
	uint64_t delivery_retries;/* writes put off for fd room (none is ever failed for it) */
	uint64_t connections_refused; /* connections closed at once: no fd or quota for a peer */
	uint64_t peers_gated;     /* peers not read because their uid's backlog is full */
	uint64_t peers_half_closed; /* peers that shut down their writing side and still read */
	uint64_t wakeups;         /* times the loop woke up: an idle kernel's stays still */
	uint64_t sockets_lingering; /* disconnected peers' sockets kept until the fds in them are read */
	uint64_t seed_bytes;      /* heap of seeds not yet taken (charged to user_bytes) */
};

void capbus_kernel_default_limits(struct capbus_limits *limits);
int capbus_kernel_new(const struct capbus_limits *limits, struct cb_kernel **out);
/* Listens on a unix socket path with the given file mode (the access control). */
int capbus_kernel_listen(struct cb_kernel *kernel, const char *path, unsigned int mode);
/* Binds unix socket `fd` to `path`, the file made with exactly `mode` from the start (the
 * process's umask is not touched). 0 or -errno. */
int capbus_bind_unix(int fd, const char *path, unsigned int mode);
/* Makes a peer of one end of a SOCK_SEQPACKET socketpair; takes ownership of `fd`.
 * `uid`, `gid`, `pid` say whom to charge, for the peer's life; pass -1 to read them with
 * SO_PEERCRED, and then the peer is charged to whichever uid writes to it (a connection
 * handed to a process of another uid is charged to that uid from its first frame). */
int capbus_kernel_adopt(struct cb_kernel *kernel, int fd, int64_t uid, int64_t gid, int64_t pid);
/* Gives a peer (by the key it read with CAPBUS_CMD_PEER_QUERY) the monitor capability. */
int capbus_kernel_grant_monitor(struct cb_kernel *kernel, const uint8_t *peer_key);
/* Where the kernel writes a line when something needs its operator's attention (a
 * connection refused for lack of fds, ...); -1 (the default) for nowhere. Not owned. */
void capbus_kernel_set_log_fd(struct cb_kernel *kernel, int fd);
/* Runs the loop until capbus_kernel_stop. */
int capbus_kernel_run(struct cb_kernel *kernel);
void capbus_kernel_stop(struct cb_kernel *kernel);
void capbus_kernel_stats(struct cb_kernel *kernel, struct capbus_stats *out);
/* Disconnects every peer and frees everything. The loop must not be running. */
void capbus_kernel_free(struct cb_kernel *kernel);

#endif
