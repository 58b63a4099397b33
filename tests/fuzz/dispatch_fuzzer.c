/*
 * libFuzzer harness over the command dispatcher (cb_command_dispatch, kernel/src/command.c).
 *
 * Each input runs on a fresh kernel, so that a crash reproduces from its input alone. The
 * kernel's loop is not run: the harness plays it, handing frames to the dispatcher exactly as
 * read_peer (loop.c) does (an exactly sized, malloc-aligned buffer; the fds a recvmsg would
 * have installed; the sender's credentials; MSG_CTRUNC) and calling cb_kernel_settle, which
 * writes what was queued to real socketpairs. The peers' ends are read back and every frame
 * the kernel wrote is checked against docs/wire-format.md. At the end every peer hangs up and
 * the kernel's counters must be back at zero and no fd may be left open.
 *
 * Input: byte 0 chooses the limits (bit 0 set: tiny quotas, so that EDQUOT paths are reached
 * by short inputs). Then records, each
 *
 *     u8 op       bits 0-2 the peer (slot, modulo the live slots), bits 3-5 the action
 *     u8 flags    FLAG_*
 *     u8 fdspec   bits 0-2 the kind of fd (FD_*), bits 3-7 how many (COUNT_*)
 *     u16 length  little-endian, then `length` bytes: the datagram
 *
 * tests/fuzz/corpus.py writes seed inputs in this encoding for every command.
 *
 * Built two ways: with clang -fsanitize=fuzzer (tests/fuzz/libfuzzer.py), and with any C
 * compiler and -DCB_FUZZ_STANDALONE, which adds a main() that replays input files (the test
 * suite does that with gcc, so the harness keeps building where clang is missing).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "capbus/uapi.h"
#include "capbus_kernel.h"
#include "kernel.h"
#include "linger.h"
#include "message.h"
#include "peer.h"

#define SLOTS_MAX 8
#define INITIAL_SLOTS 3

enum action {
	ACT_DISPATCH_A, ACT_DISPATCH_B, ACT_DISPATCH_C, /* three codes: random bytes mostly dispatch */
	ACT_DISPATCH_KEY, /* dispatch, with the key of slot (fdspec & 7) at byte 24 (HANDLE_TRANSFER) */
	ACT_DRAIN,        /* the peer reads everything waiting in its socket */
	ACT_HANGUP,       /* the peer exits: its end closes and the loop would see EOF */
	ACT_CLOSE,        /* its end closes but the kernel finds out only when it next writes */
	ACT_MONITOR,      /* the kernel's owner grants the peer the monitor capability */
};

#define FLAG_RAW_SIZE  0x01 /* keep the size field as given (else the harness makes it true) */
#define FLAG_FOREIGN   0x02 /* credentials of another process (a socket passed on, or root) */
#define FLAG_CTRUNC    0x04 /* the fds were cut short (MSG_CTRUNC) */
#define FLAG_OVERSIZED 0x08 /* the datagram was longer than CAPBUS_FRAME_MAX (MSG_TRUNC) */
#define FLAG_NO_SETTLE 0x10 /* more frames before the loop settles, as in one epoll batch */

enum fd_kind {
	FD_PIPE,          /* an ordinary fd */
	FD_MEMFD_SEALED,  /* a valid memfd payload */
	FD_MEMFD_LOOSE,   /* unsealed, or sealed against writes and shrinking only */
	FD_MEMFD_HUGE,    /* sealed, sparse, larger than CAPBUS_MEMFD_MAX */
	FD_UNIX_SOCKET,   /* refused by the kernel (a peer could send itself its own connection) */
	FD_OWN_CONNECTION,
	FD_EVENTFD,
	FD_MIXED,         /* the i-th fd of kind i % FD_MIXED */
};

#define COUNT_FDS_MAX 30   /* exactly CAPBUS_FDS_MAX */
#define COUNT_TOO_MANY 31  /* more than the loop's buffer holds: it gets FDS_MAX, and MSG_CTRUNC */

struct slot {
	int fd;                /* the peer's end of its connection, or -1 once closed */
	uint8_t key[16];       /* the kernel's peer (cb_peer_by_key finds it while it lives) */
	uint32_t uid, gid, pid;
	/* Replies still due, in order: cookie and command of each dispatched frame. */
	struct expected { uint64_t cookie; uint32_t command; bool may_be_silent; } *due;
	size_t n_due, due_cap, due_head;
	/* RECVs not answered yet: a RECV's reply may come after later commands' (it waits
	 * for a message, or a newer RECV replaces it: ECANCELED then). */
	uint64_t *recvs;
	size_t n_recvs, recvs_cap;
	uint64_t next_cookie;  /* each command's cookie, unique (as a real peer's): which reply
				* answers which command is then never ambiguous */
	/* Peers it created whose sockets are still to arrive in its PEER_CREATE replies. */
	struct child { uint8_t key[16]; } *children;
	size_t n_children, children_cap, children_head;
};

static struct cb_kernel *kernel;
static struct slot slots[SLOTS_MAX];
static size_t n_slots;
static uint8_t *rx_buffer;

#ifdef CB_FUZZ_STANDALONE
/* Which (command, errno) pairs the replayed inputs reached: the test suite checks that the
 * seed corpus reaches every command's success path. */
static uint32_t reached[256][160];
#endif

#define fail(...)                                                                                  \
	do {                                                                                       \
		fprintf(stderr, "dispatch_fuzzer: " __VA_ARGS__);                                  \
		fputc('\n', stderr);                                                               \
		abort();                                                                           \
	} while (0)

static void *grow(void *array, size_t *cap, size_t need, size_t item)
{
	if (need <= *cap)
		return array;
	size_t cap2 = *cap ? *cap * 2 : 16;
	while (cap2 < need)
		cap2 *= 2;
	void *bigger = realloc(array, cap2 * item);
	if (!bigger)
		fail("out of memory");
	*cap = cap2;
	return bigger;
}

static struct cb_peer *slot_peer(const struct slot *slot)
{
	return cb_peer_by_key(kernel, slot->key);
}

static int count_open_fds(void)
{
	int n = 0;
	DIR *dir = opendir("/proc/self/fd");
	if (!dir)
		fail("cannot list /proc/self/fd: %s", strerror(errno));
	for (struct dirent *entry; (entry = readdir(dir));)
		n += entry->d_name[0] != '.';
	closedir(dir);
	return n - 1; /* the directory's own fd */
}

static int add_slot(int fd, const uint8_t key[16], uint32_t uid, uint32_t gid, uint32_t pid)
{
	if (n_slots == SLOTS_MAX)
		return -1;
	struct slot *slot = &slots[n_slots++];
	memset(slot, 0, sizeof(*slot));
	slot->fd = fd;
	memcpy(slot->key, key, sizeof(slot->key));
	slot->uid = uid;
	slot->gid = gid;
	slot->pid = pid;
	return 0;
}

static void adopt(uint32_t uid)
{
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) < 0)
		fail("socketpair: %s", strerror(errno));
	int r = capbus_kernel_adopt(kernel, pair[0], uid, uid, 1000 + (int64_t)n_slots);
	if (r < 0)
		fail("adopt: %s", strerror(-r));
	/* A new peer goes to the tail of kernel->peers: that is how its key is found. */
	struct cb_peer *peer = cb_list_last(&kernel->peers, struct cb_peer, kernel_link);
	add_slot(pair[1], peer->key, uid, uid, 1000 + (uint32_t)n_slots);
}

/* ---- fds to attach ------------------------------------------------------------------- */

static int memfd(size_t size, unsigned int seals)
{
	int fd = memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -1;
	static const char content[] = "memfd payload from dispatch_fuzzer";
	if (size <= sizeof(content)) {
		if (write(fd, content, size) != (ssize_t)size) {
			close(fd);
			return -1;
		}
	} else if (ftruncate(fd, (off_t)size) < 0) { /* sparse: costs no memory */
		close(fd);
		return -1;
	}
	if (seals && fcntl(fd, F_ADD_SEALS, seals) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

#define ALL_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW)

static int make_fd(enum fd_kind kind, uint32_t index, const struct slot *sender)
{
	int pair[2], fd = -1;
	switch (kind) {
	case FD_PIPE:
		if (pipe2(pair, O_CLOEXEC) < 0)
			return -1;
		close(pair[1]);
		return pair[0];
	case FD_MEMFD_SEALED:
		return memfd(index % 3 == 2 ? 0 : 16 + index, ALL_SEALS);
	case FD_MEMFD_LOOSE:
		return memfd(8, index % 2 ? F_SEAL_WRITE | F_SEAL_SHRINK : 0);
	case FD_MEMFD_HUGE:
		return memfd(CAPBUS_MEMFD_MAX + 1, ALL_SEALS);
	case FD_UNIX_SOCKET:
		if (socketpair(AF_UNIX, (index % 2 ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0, pair) < 0)
			return -1;
		close(pair[1]);
		return pair[0];
	case FD_OWN_CONNECTION:
		if (sender->fd >= 0)
			fd = fcntl(sender->fd, F_DUPFD_CLOEXEC, 0);
		return fd >= 0 ? fd : make_fd(FD_PIPE, index, sender);
	case FD_EVENTFD:
		return eventfd(0, EFD_CLOEXEC);
	case FD_MIXED:
		return make_fd((enum fd_kind)(index % FD_MIXED), index / FD_MIXED, sender);
	}
	return -1;
}

/* ---- reading what the kernel wrote ----------------------------------------------------- */

static void expect_reply(struct slot *slot, uint64_t cookie, uint32_t command, bool may_be_silent)
{
	if (command == CAPBUS_CMD_RECV) {
		slot->recvs = grow(slot->recvs, &slot->recvs_cap, slot->n_recvs + 1, sizeof(*slot->recvs));
		slot->recvs[slot->n_recvs++] = cookie;
		return;
	}
	slot->due = grow(slot->due, &slot->due_cap, slot->n_due + 1, sizeof(*slot->due));
	slot->due[slot->n_due++] = (struct expected){ cookie, command, may_be_silent };
}

/* Checks one frame the kernel wrote to `slot` against the wire contract. */
/* A snapshot's memfd: sealed, and exactly as long as its header says. */
static void check_snapshot(int fd)
{
	struct capbus_snapshot head;
	struct stat st;
	int seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0 || !(seals & F_SEAL_WRITE) || !(seals & F_SEAL_SHRINK) || !(seals & F_SEAL_SEAL))
		fail("a snapshot memfd not sealed (%#x)", seals);
	if (fstat(fd, &st) < 0 || pread(fd, &head, sizeof(head), 0) != (ssize_t)sizeof(head))
		fail("a snapshot shorter than its header");
	uint64_t size = sizeof(head) + (uint64_t)head.n_peers * head.peer_size + (uint64_t)head.n_nodes * head.node_size +
			(uint64_t)head.n_handles * head.handle_size + (uint64_t)head.n_users * head.user_size;
	if (head.magic != CAPBUS_SNAPSHOT_MAGIC || head.version != CAPBUS_SNAPSHOT_VERSION ||
	    (uint64_t)st.st_size != size || head.n_peers == 0 || head.n_users == 0)
		fail("a snapshot of %lld bytes whose header says %llu", (long long)st.st_size, (unsigned long long)size);
}

static void check_frame(struct slot *slot, const uint8_t *data, size_t length, int *fds, size_t n_fds)
{
	struct capbus_frame frame;
	if (length < sizeof(frame))
		fail("the kernel wrote a %zu-byte frame", length);
	memcpy(&frame, data, sizeof(frame));
	if (frame.size != length || frame.flags != 0)
		fail("frame size %u (datagram %zu), flags %#x", frame.size, length, frame.flags);
	if (frame.type == CAPBUS_FRAME_REPLY) {
		struct capbus_reply reply;
		if (length < sizeof(frame) + sizeof(reply))
			fail("short reply");
		memcpy(&reply, data + sizeof(frame), sizeof(reply));
		if (reply.error < 0 || (reply.error && length != sizeof(frame) + sizeof(reply)))
			fail("reply error %d with a %zu-byte frame", reply.error, length);
		bool passes_peer = reply.command == CAPBUS_CMD_PEER_CREATE && reply.error == 0;
		bool passes_snapshot = reply.command == CAPBUS_CMD_SNAPSHOT && reply.error == 0;
		if (n_fds != (passes_peer || passes_snapshot ? 1u : 0u))
			fail("reply to command %#x (error %d) carried %zu fds", reply.command, reply.error, n_fds);
		if (passes_snapshot)
			check_snapshot(fds[0]);
		if (reply.command == CAPBUS_CMD_RECV) {
			for (size_t i = 0; i < slot->n_recvs; i++) {
				if (slot->recvs[i] == frame.cookie) {
					slot->recvs[i] = slot->recvs[--slot->n_recvs];
					goto matched;
				}
			}
			fail("a RECV reply (cookie %llu) to no RECV", (unsigned long long)frame.cookie);
		}
		/* Exactly one reply per command, in order; only a fully delivered QUIET send has none. */
		while (slot->due_head < slot->n_due) {
			struct expected *due = &slot->due[slot->due_head++];
			if (due->cookie == frame.cookie && due->command == reply.command)
				goto matched;
			if (!due->may_be_silent)
				fail("reply (cookie %llu, command %#x) where (cookie %llu, command %#x) was due",
				     (unsigned long long)frame.cookie, reply.command,
				     (unsigned long long)due->cookie, due->command);
		}
		fail("reply (cookie %llu, command %#x) to no command", (unsigned long long)frame.cookie,
		     reply.command);
matched:
#ifdef CB_FUZZ_STANDALONE
		reached[reply.command & 0xff][reply.error < 160 ? reply.error : 159]++;
#endif
		if (passes_peer) {
			if (slot->children_head == slot->n_children)
				fail("a PEER_CREATE reply with no new peer behind it");
			struct child *child = &slot->children[slot->children_head++];
			if (add_slot(fds[0], child->key, slot->uid, slot->gid, slot->pid) == 0)
				fds[0] = -1; /* kept: the new peer's connection */
		}
	} else if (frame.type == CAPBUS_FRAME_MESSAGE) {
		struct capbus_message message;
		if (length < sizeof(frame) + sizeof(message))
			fail("short message");
		memcpy(&message, data + sizeof(frame), sizeof(message));
		bool memfd_payload = message.flags & CAPBUS_MSG_FLAG_MEMFD;
		uint64_t expected = sizeof(frame) + sizeof(message) + 8ull * message.n_handles +
				    (memfd_payload ? 0 : message.payload_size);
		if (expected != length || message.n_fds != n_fds || (memfd_payload && !n_fds))
			fail("message kind %u: %zu bytes and %zu fds, its header says %llu and %u", message.kind,
			     length, n_fds, (unsigned long long)expected, message.n_fds);
		if (message.kind < CAPBUS_MSG_DATA || message.kind > CAPBUS_MSG_UNDELIVERED)
			fail("message of kind %u", message.kind);
		if (message.flags & ~(uint16_t)(CAPBUS_MSG_FLAG_CONTINUE | CAPBUS_MSG_FLAG_MEMFD | CAPBUS_MSG_FLAG_DRAINING))
			fail("message flags %#x", message.flags);
		if (message.flags & CAPBUS_MSG_FLAG_DRAINING && message.kind != CAPBUS_MSG_NODE_DESTROY)
			fail("DRAINING on a message of kind %u", message.kind);
		if (message.kind == CAPBUS_MSG_UNDELIVERED && message.payload_size != sizeof(struct capbus_undelivered))
			fail("an UNDELIVERED notice of %u bytes", message.payload_size);
		if (message.kind == CAPBUS_MSG_DRAINED && (message.payload_size || message.n_handles))
			fail("a DRAINED mark with a payload");
	} else {
		fail("frame type %#x", frame.type);
	}
}

static void drain(struct slot *slot)
{
	union cb_control control;
	while (slot->fd >= 0) {
		struct iovec iov = { rx_buffer, CAPBUS_FRAME_MAX + 1 };
		struct msghdr msg = {
			.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control),
		};
		ssize_t n = recvmsg(slot->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n < 0 && errno == ECONNRESET)
			continue; /* the kernel closed with our writes unread: its frames still follow */
		if (n < 0)
			fail("recvmsg: %s", strerror(errno));
		int fds[CAPBUS_FDS_MAX];
		size_t n_fds = 0;
		for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
			if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
				continue;
			size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			if (n_fds + count > CAPBUS_FDS_MAX)
				fail("more than CAPBUS_FDS_MAX fds on one frame");
			memcpy(fds + n_fds, CMSG_DATA(cmsg), count * sizeof(int));
			n_fds += count;
		}
		if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
			fail("the kernel wrote a frame larger than the wire format allows");
		if (n == 0 && n_fds == 0)
			return; /* EOF: the kernel disconnected this peer */
		check_frame(slot, rx_buffer, (size_t)n, fds, n_fds);
		for (size_t i = 0; i < n_fds; i++)
			if (fds[i] >= 0)
				close(fds[i]);
	}
}

/* ---- one record ------------------------------------------------------------------------ */

static uint32_t fd_count(uint8_t fdspec)
{
	uint32_t code = fdspec >> 3;
	if (code == COUNT_FDS_MAX)
		return CAPBUS_FDS_MAX;
	if (code == COUNT_TOO_MANY)
		return CAPBUS_FDS_MAX + 1;
	return code;
}

static void dispatch(struct slot *slot, uint8_t op_action, uint8_t flags, uint8_t fdspec, const uint8_t *bytes,
		     size_t length)
{
	struct cb_peer *peer = slot_peer(slot);
	int fds[CAPBUS_FDS_MAX];
	uint32_t n_fds = 0;
	bool truncated = (flags & FLAG_CTRUNC) != 0;

	if (!peer || peer->doomed)
		return; /* the loop reads no more from a peer it is disconnecting */

	if (op_action != ACT_DISPATCH_KEY) {
		uint32_t wanted = fd_count(fdspec);
		if (wanted > CAPBUS_FDS_MAX) {
			wanted = CAPBUS_FDS_MAX; /* what fits the loop's control buffer; Linux drops the rest */
			truncated = true;
		}
		for (; n_fds < wanted; n_fds++) {
			int fd = make_fd((enum fd_kind)(fdspec & 7), n_fds, slot);
			if (fd < 0)
				break; /* out of fds: attach fewer, as a peer would have to */
			fds[n_fds] = fd;
		}
	}

	/* The loop hands over FRAME_MAX + 1 bytes of a datagram longer than its buffer. */
	size_t size = flags & FLAG_OVERSIZED ? CAPBUS_FRAME_MAX + 1 : length;
	uint8_t *data = malloc(size ? size : 1);
	if (!data)
		fail("out of memory");
	memcpy(data, bytes, length < size ? length : size);
	if (size > length)
		memset(data + length, 0, size - length);
	struct capbus_frame header = { 0 };
	if (size >= sizeof(header)) {
		if (!(flags & FLAG_RAW_SIZE) && !(flags & FLAG_OVERSIZED)) {
			uint32_t true_size = (uint32_t)size;
			memcpy(data, &true_size, sizeof(true_size));
		}
		if (op_action == ACT_DISPATCH_KEY && size >= 40)
			memcpy(data + 24, slots[(fdspec & 7) % n_slots].key, 16);
		uint64_t cookie = ++slot->next_cookie;
		memcpy(data + offsetof(struct capbus_frame, cookie), &cookie, sizeof(cookie));
		memcpy(&header, data, sizeof(header));
	}

	/* The reply that must come back: the header's cookie and type, or zeros when there is no
	 * header. A QUIET send that reaches every destination has none. */
	uint32_t send_flags = 0;
	if (size >= sizeof(header) + sizeof(struct capbus_cmd_send))
		memcpy(&send_flags, data + sizeof(header) + offsetof(struct capbus_cmd_send, flags),
		       sizeof(send_flags));
	bool quiet = header.type == CAPBUS_CMD_SEND && (send_flags & CAPBUS_SEND_FLAG_QUIET);
	expect_reply(slot, header.cookie, header.type, quiet);

	struct cb_creds creds = { slot->uid, slot->gid, slot->pid, 0 };
	if (flags & FLAG_FOREIGN)
		creds = (struct cb_creds){ 4242, 4242, 4242, 4242 };
	uint64_t peers_before = kernel->stats.peers;
	cb_command_dispatch(peer, data, size, fds, n_fds, &creds, truncated);
	free(data);

	/* PEER_CREATE made a peer (at the tail of kernel->peers): its socket arrives with the
	 * reply, which tells the harness which slot it becomes. */
	if (kernel->stats.peers > peers_before) {
		struct cb_peer *child = cb_list_last(&kernel->peers, struct cb_peer, kernel_link);
		slot->children = grow(slot->children, &slot->children_cap, slot->n_children + 1,
				      sizeof(*slot->children));
		memcpy(slot->children[slot->n_children++].key, child->key, 16);
	}
}

static void run_record(uint8_t op, uint8_t flags, uint8_t fdspec, const uint8_t *bytes, size_t length)
{
	struct slot *slot = &slots[(op & 7) % n_slots];
	uint8_t action = (op >> 3) & 7;
	struct cb_peer *peer;

	switch (action) {
	case ACT_DRAIN:
		drain(slot);
		return;
	case ACT_HANGUP:
	case ACT_CLOSE:
		if (slot->fd < 0)
			return;
		close(slot->fd);
		slot->fd = -1;
		/* What the loop does on EOF: the peer is disconnected once settled. */
		if (action == ACT_HANGUP && (peer = slot_peer(slot)))
			cb_peer_doom(peer);
		break;
	case ACT_MONITOR:
		capbus_kernel_grant_monitor(kernel, slot->key);
		break;
	default:
		dispatch(slot, action, flags, fdspec, bytes, length);
		break;
	}
	if (!(flags & FLAG_NO_SETTLE))
		cb_kernel_settle(kernel);
}

/* ---- one input ------------------------------------------------------------------------- */

static void set_up(uint8_t profile)
{
	struct capbus_limits limits;
	capbus_kernel_default_limits(&limits);
	if (profile & 1) {
		limits.peer_bytes = 4096;
		limits.peer_messages = 8;
		limits.peer_handles = 16;
		limits.peer_fds = 8;
		limits.handles_held = 24;
		limits.nodes_owned = 12;
		limits.user_bytes = 8192;
		limits.peers_per_user = 6;
	}
	int r = capbus_kernel_new(&limits, &kernel);
	if (r < 0)
		fail("capbus_kernel_new: %s", strerror(-r));
	n_slots = 0;
	/* Two peers of one user and one of another: quotas are per receiving peer and sending uid.
	 * And one of the kernel process's own uid: trusted to make monitor nodes. */
	adopt(1000);
	adopt(1000);
	adopt(1001);
	adopt((uint32_t)geteuid());
}

static void tear_down(int fds_before)
{
	for (size_t i = 0; i < n_slots; i++)
		drain(&slots[i]);
	for (size_t i = 0; i < n_slots; i++) {
		if (slots[i].fd >= 0)
			close(slots[i].fd);
		free(slots[i].due);
		free(slots[i].recvs);
		free(slots[i].children);
	}
	/* Everyone hangs up: EOF dooms each peer, the loop settles. */
	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next)
		cb_peer_doom(cb_container_of(link, struct cb_peer, kernel_link));
	cb_kernel_settle(kernel);
	/* Sockets of peers disconnected earlier with fds unread linger until their other end is
	 * gone (linger.h); the loop's retries close them once due, as here with every delay
	 * past (each is looked at once: those still unread would back off). */
	kernel->now_ms += 1u << CB_RETRY_LEVELS;
	cb_linger_retry_due(kernel, kernel->stats.sockets_lingering);

	struct capbus_stats stats;
	capbus_kernel_stats(kernel, &stats);
	if (stats.peers || stats.nodes || stats.handles || stats.queued_messages || stats.queued_bytes ||
	    stats.queued_fds || stats.fds_held || stats.fds_in_flight || stats.peers_stalled ||
	    stats.peers_gated || stats.peers_half_closed)
		fail("left over after every peer disconnected: peers %llu nodes %llu handles %llu "
		     "queued messages %llu bytes %llu fds %llu; fds held %llu in flight %llu; "
		     "stalled %llu gated %llu half-closed %llu",
		     (unsigned long long)stats.peers, (unsigned long long)stats.nodes,
		     (unsigned long long)stats.handles, (unsigned long long)stats.queued_messages,
		     (unsigned long long)stats.queued_bytes, (unsigned long long)stats.queued_fds,
		     (unsigned long long)stats.fds_held, (unsigned long long)stats.fds_in_flight,
		     (unsigned long long)stats.peers_stalled, (unsigned long long)stats.peers_gated,
		     (unsigned long long)stats.peers_half_closed);
	capbus_kernel_free(kernel);
	kernel = NULL;
	int fds_after = count_open_fds();
	if (fds_after != fds_before)
		fail("%d fds open before this input, %d after: the kernel leaked some", fds_before, fds_after);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	/* Fds pile up in queues up to the quotas; the harness should hit those, not EMFILE. */
	struct rlimit limit;
	if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
		limit.rlim_cur = limit.rlim_max;
		setrlimit(RLIMIT_NOFILE, &limit);
	}
	rx_buffer = malloc(CAPBUS_FRAME_MAX + 1);
	if (!rx_buffer)
		fail("out of memory");
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	int fds_before = count_open_fds();
	set_up(data[0]);
	size_t at = 1;
	while (at + 5 <= size) {
		uint8_t op = data[at], flags = data[at + 1], fdspec = data[at + 2];
		size_t length = (size_t)data[at + 3] | (size_t)data[at + 4] << 8;
		at += 5;
		if (length > size - at)
			length = size - at;
		run_record(op, flags, fdspec, data + at, length);
		at += length;
	}
	tear_down(fds_before);
	return 0;
}

#ifdef CB_FUZZ_STANDALONE
/* Replays input files; with -v, prints which (command, errno) replies they reached. */
int main(int argc, char **argv)
{
	bool verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
	LLVMFuzzerInitialize(&argc, &argv);
	for (int i = verbose ? 2 : 1; i < argc; i++) {
		FILE *file = fopen(argv[i], "rb");
		if (!file)
			fail("%s: %s", argv[i], strerror(errno));
		static uint8_t input[1 << 20];
		size_t size = fread(input, 1, sizeof(input), file);
		fclose(file);
		/* An exactly sized copy, as libFuzzer passes it: reads past the end are caught. */
		uint8_t *copy = malloc(size ? size : 1);
		memcpy(copy, input, size);
		LLVMFuzzerTestOneInput(copy, size);
		free(copy);
	}
	if (verbose)
		for (int command = 0; command < 256; command++)
			for (int error = 0; error < 160; error++)
				if (reached[command][error])
					printf("reply %d %d %u\n", command, error, reached[command][error]);
	free(rx_buffer);
	return 0;
}
#endif
