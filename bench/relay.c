/*
 * relay: the floor for any broker. Forwards every datagram read from one SOCK_SEQPACKET
 * socket to the other, both ways, with one epoll set and non-blocking sockets, the same
 * shape as the capbus kernel's loop (loop.c) minus everything that makes it a kernel: no
 * parsing, no handles, no quotas, no reply.
 *
 *     relay FD_A FD_B        (inherited fds, e.g. socketpair ends passed by the bench)
 *
 * A datagram goes straight to the output socket; when that is full it waits in a FIFO for
 * EPOLLOUT. While a FIFO holds QUEUE_MAX datagrams its input is not read (backpressure to
 * the writer, as a full socket would give). Exits 0 when either side hangs up.
 *
 * Built by bench/throughput.py with gcc -O2 into bench/build/relay.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#define DATAGRAM_MAX (160u * 1024u) /* above capbus's CAPBUS_FRAME_MAX */
#define READ_BUDGET 64              /* datagrams read from one side per wakeup, as the kernel */
#define QUEUE_MAX 4096              /* queued datagrams before the input is paused */
#define EVENT_BATCH 8

struct datagram {
	struct datagram *next;
	size_t size;
	uint8_t data[];
};

struct side {
	int fd;
	uint32_t events;            /* what epoll currently watches on fd */
	struct datagram *head;      /* FIFO of datagrams waiting to be written to this side */
	struct datagram *tail;
	size_t queued;
};

static int epoll_fd;
static uint8_t buffer[DATAGRAM_MAX];

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void watch(struct side *side, uint32_t events)
{
	if (events == side->events)
		return;
	struct epoll_event event = { .events = events, .data.ptr = side };
	if (epoll_ctl(epoll_fd, EPOLL_CTL_MOD, side->fd, &event) < 0)
		die("epoll_ctl");
	side->events = events;
}

/* Wants to read `in` unless its output FIFO is full; wants EPOLLOUT while a FIFO waits. */
static void rearm(struct side *side, const struct side *other)
{
	uint32_t events = EPOLLRDHUP;
	if (other->queued < QUEUE_MAX)
		events |= EPOLLIN;
	if (side->head)
		events |= EPOLLOUT;
	watch(side, events);
}

static int enqueue(struct side *out, const uint8_t *data, size_t size)
{
	struct datagram *d = malloc(sizeof(*d) + size);
	if (!d)
		return -1;
	d->next = NULL;
	d->size = size;
	memcpy(d->data, data, size);
	if (out->tail)
		out->tail->next = d;
	else
		out->head = d;
	out->tail = d;
	out->queued++;
	return 0;
}

/* Writes queued datagrams until the socket is full. Returns -1 on a broken socket. */
static int flush(struct side *out)
{
	while (out->head) {
		struct datagram *d = out->head;
		if (send(out->fd, d->data, d->size, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
			if (errno == EINTR)
				continue;
			return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
		}
		out->head = d->next;
		if (!out->head)
			out->tail = NULL;
		out->queued--;
		free(d);
	}
	return 0;
}

/* Reads up to READ_BUDGET datagrams from `in` and forwards them to `out`. -1 at the end. */
static int forward(struct side *in, struct side *out)
{
	for (int budget = 0; budget < READ_BUDGET && out->queued < QUEUE_MAX; budget++) {
		ssize_t n = recv(in->fd, buffer, sizeof(buffer), MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
		}
		if (n == 0)
			return -1; /* end of file (the benches never send empty datagrams) */
		if (!out->head) {
			if (send(out->fd, buffer, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				return -1;
		}
		if (enqueue(out, buffer, (size_t)n) < 0)
			return -1;
	}
	return 0;
}

static int open_side(struct side *side, const char *arg)
{
	char *end;
	long fd = strtol(arg, &end, 10);
	if (*arg == '\0' || *end != '\0' || fd < 0 || fd > INT32_MAX)
		return -1;
	int type = 0;
	socklen_t len = sizeof(type);
	if (getsockopt((int)fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET)
		return -1;
	if (fcntl((int)fd, F_SETFL, fcntl((int)fd, F_GETFL) | O_NONBLOCK) < 0)
		return -1;
	*side = (struct side){ .fd = (int)fd, .events = EPOLLIN | EPOLLRDHUP };
	struct epoll_event event = { .events = side->events, .data.ptr = side };
	return epoll_ctl(epoll_fd, EPOLL_CTL_ADD, side->fd, &event);
}

int main(int argc, char **argv)
{
	struct side sides[2];
	struct epoll_event events[EVENT_BATCH];

	if (argc != 3) {
		fprintf(stderr, "usage: %s FD_A FD_B (two SOCK_SEQPACKET sockets)\n", argv[0]);
		return 2;
	}
	epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (epoll_fd < 0)
		die("epoll_create1");
	if (open_side(&sides[0], argv[1]) < 0 || open_side(&sides[1], argv[2]) < 0) {
		fprintf(stderr, "relay: arguments must be SOCK_SEQPACKET fds\n");
		return 2;
	}
	for (;;) {
		int n = epoll_wait(epoll_fd, events, EVENT_BATCH, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			struct side *side = events[i].data.ptr;
			struct side *other = side == &sides[0] ? &sides[1] : &sides[0];
			if ((events[i].events & EPOLLOUT) && flush(side) < 0)
				return 0;
			if ((events[i].events & (EPOLLIN | EPOLLERR)) && forward(side, other) < 0)
				return 0;
			if ((events[i].events & (EPOLLHUP | EPOLLRDHUP)) && !(events[i].events & EPOLLIN))
				return 0;
		}
		for (int i = 0; i < 2; i++)
			rearm(&sides[i], &sides[1 - i]);
	}
}
