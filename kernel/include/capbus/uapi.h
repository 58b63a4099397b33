/*
 * capbus wire format: the whole contract between the capbus kernel and its peers.
 *
 * A peer is one AF_UNIX SOCK_SEQPACKET connection to the kernel. Every datagram is one
 * frame: a struct capbus_frame header followed by a body whose layout depends on `type`.
 * All integers are little-endian, every field is naturally aligned, and every frame's
 * `size` must equal the datagram's length. File descriptors travel as SCM_RIGHTS on the
 * datagram that names them; nothing else travels out of band.
 *
 * Peers send commands (CAPBUS_CMD_*) carrying a `cookie` of their choice; the kernel
 * answers every command with exactly one CAPBUS_FRAME_REPLY carrying the same cookie, in
 * the order the commands were sent. Independently the kernel pushes CAPBUS_FRAME_MESSAGE
 * frames (data and notifications) in the global order. Replies and messages share the one
 * socket, so a reply is ordered against messages too: everything the kernel committed to
 * this peer before it processed a command is written before that command's reply.
 *
 * This header is plain C with no kernel or Python knowledge; the Python side reads its
 * constants through cffi (capbus._kernel), so the numbers below exist in one place only.
 */
#ifndef CAPBUS_UAPI_H
#define CAPBUS_UAPI_H

#include <stdint.h>

#define CAPBUS_WIRE_VERSION 2

/* Handle ids: kernel-chosen, private to one peer, never reused by that peer. */
#define CAPBUS_HANDLE_FLAG_MANAGED  (1ULL << 0) /* always set: the kernel chose this id */
#define CAPBUS_HANDLE_FLAG_REMOTE   (1ULL << 1) /* set when the node is owned by someone else */
#define CAPBUS_HANDLE_ID_SHIFT      3
#define CAPBUS_HANDLE_INVALID       (~0ULL)     /* a handle whose node was gone when it arrived */

/* Hard limits of one frame (every peer, every user). Quotas (below) come on top. */
#define CAPBUS_PAYLOAD_MAX          (128u * 1024u) /* inline payload bytes per message */
#define CAPBUS_DESTINATIONS_MAX     1024u          /* destinations of one send */
#define CAPBUS_HANDLES_MAX          256u           /* handles attached to one message */
#define CAPBUS_FDS_MAX              64u            /* fds attached to one message */
#define CAPBUS_DESTROY_MAX          1024u          /* nodes in one destroy */
#define CAPBUS_FRAME_MAX            (CAPBUS_PAYLOAD_MAX + 16u * 1024u)

/* Default quotas (see docs/wire-format.md "Quotas"); a kernel may be opened with others. */
#define CAPBUS_DEFAULT_PEER_BYTES     (8u * 1024u * 1024u) /* queued payload bytes per receiving peer */
#define CAPBUS_DEFAULT_PEER_MESSAGES  8192u                /* queued messages per receiving peer */
#define CAPBUS_DEFAULT_PEER_HANDLES   4096u                /* handles in queued messages per peer */
#define CAPBUS_DEFAULT_PEER_FDS       256u                 /* fds in queued messages per peer */
#define CAPBUS_DEFAULT_HANDLES_HELD   65536u               /* handles one peer may hold */
#define CAPBUS_DEFAULT_NODES_OWNED    65536u               /* nodes one peer may own */
#define CAPBUS_DEFAULT_USER_BYTES     (64u * 1024u * 1024u) /* queued bytes one sending user may have in the kernel */
#define CAPBUS_DEFAULT_PEERS_PER_USER 16384u               /* peers one user may have connected */
#define CAPBUS_DEFAULT_USER_HANDLES   262144u              /* handles all peers of one user may hold */
#define CAPBUS_DEFAULT_USER_BACKLOG   (16u * 1024u * 1024u) /* reply/notification bytes queued to one user's peers */

/* A peer that has more than this many reply bytes unread is not read from until it reads. */
#define CAPBUS_REPLY_BACKLOG_MAX     (1024u * 1024u)
/* Protocol violations (frames that cannot even be parsed) tolerated before disconnecting. */
#define CAPBUS_VIOLATIONS_MAX        16u

enum capbus_frame_type {
	/* peer -> kernel */
	CAPBUS_CMD_NODE_CREATE      = 0x01, /* body: none                     reply: u64 id */
	CAPBUS_CMD_HANDLE_RELEASE   = 0x02, /* body: u64 id, or capbus_cmd_release  reply: none */
	CAPBUS_CMD_NODES_DESTROY    = 0x03, /* body: capbus_cmd_destroy       reply: none */
	CAPBUS_CMD_HANDLE_TRANSFER  = 0x04, /* body: capbus_cmd_transfer      reply: u64 id in the destination peer */
	CAPBUS_CMD_SEND             = 0x05, /* body: capbus_cmd_send          reply: capbus_reply_send */
	CAPBUS_CMD_PEER_QUERY       = 0x06, /* body: none                     reply: capbus_reply_query */
	CAPBUS_CMD_PEER_CREATE      = 0x07, /* body: capbus_cmd_peer_create   reply: none, the new peer's socket as SCM_RIGHTS */
	CAPBUS_CMD_SEED_TAKE        = 0x08, /* body: none                     reply: capbus_message (kind DATA) or ENOENT */
	CAPBUS_CMD_SEED_SET         = 0x09, /* body: capbus_cmd_peer_create   reply: none */
	CAPBUS_CMD_DISCONNECT       = 0x0a, /* body: none                     reply: none, then the kernel hangs up */
	CAPBUS_CMD_HANDLE_QUERY     = 0x0c, /* body: u64 id                   reply: capbus_reply_handle */
	CAPBUS_CMD_PEER_SET_FLAGS   = 0x0d, /* body: u64 CAPBUS_PEER_FLAG_*   reply: none */
	CAPBUS_CMD_RECV             = 0x0e, /* body: capbus_cmd_recv          reply: none, after the message it takes */
	CAPBUS_CMD_MONITOR_CREATE   = 0x0f, /* body: none                     reply: u64 id of a new monitor node */
	CAPBUS_CMD_MONITOR_ATTACH   = 0x10, /* body: u64 id of a handle to a monitor node  reply: none */
	CAPBUS_CMD_SNAPSHOT         = 0x11, /* body: u64 id of a handle to a monitor node  reply: none, a
					     * sealed memfd holding a capbus_snapshot as SCM_RIGHTS */
	CAPBUS_CMD_SHUTDOWN         = 0x12, /* body: u64 ids of nodes to keep, or none  reply: none (graceful disconnect, below) */

	/* kernel -> peer */
	CAPBUS_FRAME_REPLY          = 0x80, /* body: capbus_reply, then the command's reply body */
	CAPBUS_FRAME_MESSAGE        = 0x81, /* body: capbus_message */
};

/* Every frame starts with this. */
struct capbus_frame {
	uint32_t size;   /* bytes of the whole frame, header included */
	uint16_t type;   /* enum capbus_frame_type */
	uint16_t flags;  /* per type; unknown bits are rejected */
	uint64_t cookie; /* commands: chosen by the peer, echoed in the reply; messages: 0 */
};

/* Kernel -> peer: the answer to one command. `error` is 0 or a positive errno. Errors the
 * kernel could not attribute to a command (an unparseable frame) carry cookie 0. */
struct capbus_reply {
	int32_t error;
	uint32_t command; /* the command's type, or 0 when it could not be parsed */
};

/* Drops `count` references at once (a peer that received a handle many times). All or
 * nothing: more than the peer holds is EINVAL, the owner's pin of a live node EBUSY. */
struct capbus_cmd_release {
	uint64_t handle;
	uint32_t count;
	uint32_t reserved;      /* must be 0 */
};

struct capbus_cmd_destroy {
	uint32_t n_nodes;
	uint32_t flags;   /* CAPBUS_DESTROY_FLAG_* */
	/* uint64_t nodes[n_nodes]; */
};
#define CAPBUS_DESTROY_FLAG_RELEASE 0x1 /* also drop the owner's pinned reference */

struct capbus_cmd_transfer {
	uint64_t handle;        /* the handle to give, in the sender's ids */
	uint8_t peer_key[16];   /* the receiving peer's key (CAPBUS_CMD_PEER_QUERY) */
};

struct capbus_cmd_send {
	uint32_t n_destinations;
	uint32_t n_handles;
	uint32_t n_fds;        /* must equal the number of SCM_RIGHTS fds on this datagram */
	uint32_t payload_size;
	int32_t priority;      /* higher is more urgent; see docs/peer-api.md "Priority" */
	uint32_t flags;        /* CAPBUS_SEND_FLAG_* */
	/* uint64_t destinations[n_destinations]; */
	/* uint64_t handles[n_handles]; */
	/* uint8_t payload[payload_size]; */
};

/* The payload is the first attached fd: a memfd sealed against writing, shrinking and
 * growing (so every receiver can map it and trust it not to change); payload_size is 0.
 * Large payloads travel this way without being copied through the kernel. */
#define CAPBUS_SEND_FLAG_MEMFD  0x1
/* One-way: no reply when every destination got the message. A send that fails anywhere
 * (or is refused as a whole) is answered as usual, and the reply then also lists the
 * destination ids after the errors, since the sender keeps no record of one-way sends. */
#define CAPBUS_SEND_FLAG_QUIET  0x2
/* Tracked: if a destination's receiver disconnects before this message is written to it, the
 * sender gets a CAPBUS_MSG_UNDELIVERED notice naming the destination (its own handle id) and
 * this send's cookie (struct capbus_undelivered). Without it, such a message is dropped with
 * the receiver as ever; the sender learns of the disconnect from NODE_DESTROY only. */
#define CAPBUS_SEND_FLAG_TRACK  0x4
#define CAPBUS_MEMFD_MAX        (1ull << 30) /* bytes of one memfd payload */

/* Per-destination results of a send: all-or-nothing for each destination. */
struct capbus_reply_send {
	uint32_t n_destinations;
	uint32_t n_delivered;
	/* int32_t errors[n_destinations]; 0 = queued for delivery; padded to 8 bytes */
	/* with CAPBUS_SEND_FLAG_QUIET: uint64_t destinations[n_destinations]; */
};

struct capbus_reply_query {
	uint8_t peer_key[16];      /* proves possession of this connection; used by HANDLE_TRANSFER */
	uint32_t uid;              /* who the kernel charges this peer's receiving side to */
	uint32_t gid;
	uint32_t pid;
	uint32_t wire_version;
	uint32_t payload_max;
	uint32_t handles_max;
	uint32_t fds_max;
	uint32_t destinations_max;
};

/* Data messages to this peer carry the sender's credentials (uid, gid, pid, process_id,
 * peer); without it they carry ~0, ~0, 0, 0, 0. Sender metadata is the receiver's to ask for. */
#define CAPBUS_PEER_FLAG_WANT_METADATA 0x1
/* Messages and notifications to this peer stay queued in the kernel (charged as ever) and
 * are written one at a time, as CAPBUS_CMD_RECV takes them: the kernel chooses which (by
 * priority, kdbus's KDBUS_RECV_USE_PRIORITY). Cleared, what is held is written in order. */
#define CAPBUS_PEER_FLAG_HOLD          0x2

/* CAPBUS_CMD_RECV, on a peer that holds its messages: writes the oldest queued message or
 * notification (the global order), or with CAPBUS_RECV_FLAG_PRIORITY the most urgent one
 * whose priority is at least `priority` (ties: the oldest; notifications count as 0), and
 * then the reply. With none queued, the reply waits until one comes; a new RECV replaces a
 * waiting one (answered ECANCELED), as does clearing the HOLD flag. A message taken alone
 * never says CONTINUE. EINVAL on a peer that does not hold. */
struct capbus_cmd_recv {
	int32_t priority;
	uint32_t flags;         /* CAPBUS_RECV_FLAG_* */
};
#define CAPBUS_RECV_FLAG_PRIORITY 0x1

/* Monitoring is a capability (kdbus's monitor, on bus1's model): a monitor node, made with
 * CAPBUS_CMD_MONITOR_CREATE only by a peer the kernel trusts for it (of uid 0, or of the
 * kernel process's own uid; or one its embedder granted the monitor), is a node like any
 * other: its owner passes handles to it to whom it wants. CAPBUS_CMD_MONITOR_ATTACH with a
 * handle to a live monitor node makes the calling peer receive CAPBUS_MSG_MONITOR records
 * of all traffic; destroying the node stops every peer attached through it (revocation).
 * Errors: EPERM (MONITOR_CREATE, untrusted), ENXIO (no such handle), EINVAL (not a monitor
 * node, size), ESTALE (destroyed), EALREADY (this peer monitors already). */

/* CAPBUS_CMD_SNAPSHOT: the whole object model at one instant of the global order (`seq`),
 * for `capbus status` and `capbus graph`. It takes the monitor's trust: the caller names a
 * handle it holds to a live monitor node (its owner's own handle counts). The reply carries
 * a sealed memfd: a struct capbus_snapshot, then n_peers records of peer_size bytes, n_nodes
 * of node_size, n_handles of handle_size and n_users of user_size. The sizes let a reader
 * skip fields a later kernel appends to a record. Peers are named by their serial (the
 * `peer` of a message's metadata), nodes by a kernel-wide serial, handles by the id their
 * holder knows them by. Errors as MONITOR_ATTACH's, and EDQUOT when the uid may hold no more
 * fds. */
#define CAPBUS_SNAPSHOT_MAGIC   0x4e534243u /* "CBSN" */
#define CAPBUS_SNAPSHOT_VERSION 1u

struct capbus_snapshot {
	uint32_t magic;
	uint32_t version;
	uint32_t peer_size, node_size, handle_size, user_size;
	uint32_t n_peers, n_nodes, n_handles, n_users;
	uint64_t you;               /* the serial of the peer that asked */
	uint64_t seq;               /* transactions committed so far */
	uint64_t messages_sent;     /* data messages queued for delivery (per destination) */
	uint64_t messages_written;  /* data messages written to their receivers */
	uint64_t violations;        /* frames rejected as malformed */
	uint64_t peers_doomed;      /* peers disconnected for misbehaving */
	uint64_t memory_bytes;      /* kernel heap in use */
	uint64_t fds_held, fds_held_max;
	uint64_t fds_in_flight, fds_in_flight_max;
	uint64_t connections_refused;
	/* The limits (capbus_kernel.h's struct capbus_limits), so that use reads against them. */
	uint64_t peer_bytes, peer_messages, peer_handles, peer_fds;
	uint64_t handles_held, nodes_owned;
	uint64_t user_bytes, peers_per_user, user_handles, user_backlog;
};

struct capbus_snapshot_peer {
	uint64_t serial;
	uint32_t uid, gid, pid;     /* whom it belongs to (its connection's credentials) */
	uint32_t flags;             /* CAPBUS_SNAPSHOT_PEER_* */
	uint32_t nodes;             /* live nodes it owns */
	uint32_t handles;           /* handles it holds (its own nodes' included) */
	uint32_t queued;            /* messages and notifications queued for it, not yet written */
	uint32_t queued_messages;   /* of them, messages charged to senders: the quota in use ... */
	uint64_t queued_bytes;      /* ... their payload bytes, */
	uint32_t queued_handles;    /* ... handles */
	uint32_t queued_fds;        /* ... and fds */
	uint64_t backlog_bytes;     /* replies and notifications queued for it (no sender's) */
	uint64_t sent_messages;     /* sends it committed (a multicast counts once) ... */
	uint64_t sent_bytes;        /* ... and their payload bytes */
	uint64_t received_messages; /* data messages written to it ... */
	uint64_t received_bytes;    /* ... and their payload bytes */
	uint32_t charged_uid;       /* the uid its connection is charged to now */
	uint32_t reserved;
};
#define CAPBUS_SNAPSHOT_PEER_HOLD          0x01 /* holds its messages (CAPBUS_PEER_FLAG_HOLD) */
#define CAPBUS_SNAPSHOT_PEER_WANT_METADATA 0x02
#define CAPBUS_SNAPSHOT_PEER_MONITOR       0x04 /* attached as a monitor */
#define CAPBUS_SNAPSHOT_PEER_GATED         0x08 /* not read: its uid's backlog is full */
#define CAPBUS_SNAPSHOT_PEER_STALLED       0x10 /* its next message waits for fd room */
#define CAPBUS_SNAPSHOT_PEER_HALF_CLOSED   0x20 /* stopped writing, still reads */
#define CAPBUS_SNAPSHOT_PEER_RECV_WAITING  0x40 /* a RECV waits for a message */

struct capbus_snapshot_node {
	uint64_t serial;
	uint64_t owner;             /* its owner's serial; 0 once the owner let it go */
	uint32_t flags;             /* CAPBUS_SNAPSHOT_NODE_* */
	uint32_t holders;           /* peers other than the owner holding a handle to it */
};
#define CAPBUS_SNAPSHOT_NODE_DESTROYED 0x1
#define CAPBUS_SNAPSHOT_NODE_MONITOR   0x2

struct capbus_snapshot_handle {
	uint64_t peer;              /* the holder's serial */
	uint64_t node;              /* the node's serial */
	uint64_t id;                /* the holder's id for it */
	uint32_t references;        /* user references the holder has on it */
	uint32_t flags;             /* CAPBUS_SNAPSHOT_HANDLE_* */
};
#define CAPBUS_SNAPSHOT_HANDLE_OWNER 0x1 /* the owner's own handle (the anchor) */

struct capbus_snapshot_user {
	uint32_t uid;
	uint32_t peers;             /* connections charged to it (peers_per_user) */
	uint64_t queued_bytes;      /* what it has queued anywhere (user_bytes) */
	uint64_t backlog_bytes;     /* replies and notifications queued to its peers (user_backlog) */
	uint32_t handles;           /* handles its peers hold (user_handles) */
	uint32_t fds_held;          /* kernel fds charged to it */
	uint32_t fds_in_flight;     /* fds in its peers' sockets, perhaps unread */
	uint32_t reserved;
};

struct capbus_reply_handle {
	uint32_t n_user;        /* references this peer holds on the handle */
	uint32_t flags;         /* CAPBUS_HANDLE_STATE_* */
	uint32_t n_holders;     /* the owner's handle: how many other peers hold one; else 0 */
	uint32_t reserved;
};
#define CAPBUS_HANDLE_STATE_OWNER     0x1
#define CAPBUS_HANDLE_STATE_DESTROYED 0x2

/* CAPBUS_CMD_PEER_CREATE and CAPBUS_CMD_SEED_SET: a seed message of payload and handles. */
struct capbus_cmd_peer_create {
	uint32_t n_handles;
	uint32_t payload_size;
	/* uint64_t handles[n_handles]; */
	/* uint8_t payload[payload_size]; */
};

enum capbus_message_kind {
	CAPBUS_MSG_DATA          = 1, /* a send */
	CAPBUS_MSG_NODE_DESTROY  = 2, /* the node behind `destination` was destroyed */
	CAPBUS_MSG_NODE_RELEASE  = 3, /* the last handle of another peer to our node is gone */
	CAPBUS_MSG_MONITOR       = 4, /* a copy of some traffic, for a monitor */
	CAPBUS_MSG_DRAINED       = 5, /* after CAPBUS_CMD_SHUTDOWN: every message queued for this peer
				       * came before this; none comes after (notifications may) */
	CAPBUS_MSG_UNDELIVERED   = 6, /* a tracked message (CAPBUS_SEND_FLAG_TRACK) was dropped: its
				       * receiver disconnected before it was written; `destination`
				       * is our handle to its node (~0 if released), the payload a
				       * struct capbus_undelivered */
};

/* CAPBUS_CMD_SHUTDOWN, a graceful disconnect (kdbus's "disconnect only when empty", without
 * polling): in one transaction the kernel destroys every live node the peer owns (holders
 * are told, in order, with DRAINING; the peer itself is sent no note per node: it asked);
 * from then on nothing can be queued for those nodes; then it queues a CAPBUS_MSG_DRAINED
 * notification behind everything already queued. The peer reads (or RECVs) up to it, so
 * nothing accepted for it is lost, and then disconnects. It may still send meanwhile
 * (answers to what it reads), and make nodes (an object its answer returns): what comes to
 * those is its own affair, as for kept nodes. A second SHUTDOWN is EALREADY.
 *
 * The body may name nodes the peer owns to keep (u64 ids, at most CAPBUS_HANDLES_MAX): they
 * live on until it disconnects (then destroyed as usual, not DRAINING), so that answers to
 * the calls it made itself still reach it; DRAINED then says that nothing more comes to any
 * other node. Errors: ENXIO (no such handle), EREMOTE (not its own node), ESTALE
 * (destroyed), EINVAL (size), nothing done. */

struct capbus_undelivered {
	uint64_t cookie;        /* the cookie of the send */
	uint64_t seq;           /* the message's place in the global order */
};

#define CAPBUS_MSG_FLAG_CONTINUE  0x1 /* the next message belongs to the same transaction */
#define CAPBUS_MSG_FLAG_MEMFD     0x2 /* the payload (payload_size bytes) is the first fd, a sealed memfd */
/* On NODE_DESTROY: the owner shut down (CAPBUS_CMD_SHUTDOWN): what was queued for the node
 * before this will still be read, and may be answered. When that owner disconnects, its
 * holders get a second NODE_DESTROY, without this flag: nothing more will come from it. */
#define CAPBUS_MSG_FLAG_DRAINING  0x4

struct capbus_message {
	uint16_t kind;          /* enum capbus_message_kind */
	uint16_t flags;         /* CAPBUS_MSG_FLAG_* */
	int32_t priority;
	uint64_t destination;   /* the receiver's own id of the node or handle concerned */
	uint64_t seq;           /* position in the global order (transactions share one) */
	uint32_t uid;           /* sender's credentials at send time (DATA to a peer that asked
				 * with CAPBUS_PEER_FLAG_WANT_METADATA; else ~0, ~0, 0, 0) */
	uint32_t gid;
	uint32_t pid;           /* in the kernel's pid namespace; 0 when unknown */
	uint32_t n_handles;
	uint32_t n_fds;         /* fds on this datagram, as SCM_RIGHTS */
	uint32_t payload_size;
	uint64_t process_id;    /* the sending process's pidfs inode: unique for the boot, never
				 * reused (0 when unknown). A receiver checks a pidfd it opened for
				 * `pid` against it to know it has the very process that sent. */
	uint64_t peer;          /* the sending peer's serial: unique for the kernel's life, the
				 * same for every process writing on that connection (forked
				 * children); 0 when not asked for */
	/* uint64_t handles[n_handles];  ids in the receiver, CAPBUS_HANDLE_INVALID if gone */
	/* uint8_t payload[payload_size]; */
};

/* CAPBUS_MSG_MONITOR payload: this record, then the copied payload. */
struct capbus_monitor_record {
	uint16_t event;         /* enum capbus_message_kind of what was observed */
	uint16_t n_destinations;
	uint32_t payload_size;  /* of the observed message (the copy may be cut short) */
	uint64_t seq;
	uint32_t uid;
	uint32_t pid;
	uint32_t n_handles;
	uint32_t n_fds;
	uint64_t dropped;       /* monitor records lost to this monitor's quota so far */
};

#endif /* CAPBUS_UAPI_H */
