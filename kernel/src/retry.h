/*
 * Retry queues: things the loop must look at again later because nothing will wake it for
 * them (a stalled peer's next frame waiting for fd room, a socket with fds perhaps unread),
 * each with a delay of its own that doubles while looking finds nothing changed.
 *
 * An item waits at one of CB_RETRY_LEVELS levels, with delays 1, 2, 4, ... 128 ms; each
 * level is a FIFO list, so its items are in order of due time (the clock only goes forward)
 * and taking the due ones is O(due), whatever the number waiting. So a uid that gets
 * thousands of its peers stalled, or parks fds in thousands of sockets, costs each of them
 * one look per 128 ms once nothing moves for them, and costs nothing to the retry rounds
 * of others (loop.c bounds the number of items one round takes).
 */
#ifndef CB_RETRY_H
#define CB_RETRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "list.h"

#define CB_RETRY_LEVELS 8 /* delays of 1 << level ms: 1 to 128 ms */

struct cb_retry_item {
	struct cb_link link; /* in one level's list while queued */
	uint64_t due_ms;
	unsigned int level;  /* of its last wait: the next one, if nothing moved, is one more */
};

struct cb_retry_queue {
	struct cb_link levels[CB_RETRY_LEVELS];
	size_t count;
};

void cb_retry_queue_init(struct cb_retry_queue *queue);
void cb_retry_item_init(struct cb_retry_item *item);
static inline bool cb_retry_queued(const struct cb_retry_item *item) { return cb_link_linked(&item->link); }
/* Queues (or requeues) `item` to be due `1 << level` ms after `now_ms`. */
void cb_retry_schedule(struct cb_retry_queue *queue, struct cb_retry_item *item, uint64_t now_ms,
		       unsigned int level);
/* Queues it again after looking found nothing changed: one level slower. */
void cb_retry_back_off(struct cb_retry_queue *queue, struct cb_retry_item *item, uint64_t now_ms);
/* Takes it out of the queue, if it is in it. */
void cb_retry_cancel(struct cb_retry_queue *queue, struct cb_retry_item *item);
/* Takes out and returns one item due at `now_ms`, or NULL. */
struct cb_retry_item *cb_retry_take_due(struct cb_retry_queue *queue, uint64_t now_ms);
/* When the next item is due, or UINT64_MAX if none waits. */
uint64_t cb_retry_next_due(const struct cb_retry_queue *queue);

#endif
