#include "retry.h"

void cb_retry_queue_init(struct cb_retry_queue *queue)
{
	for (unsigned int i = 0; i < CB_RETRY_LEVELS; i++)
		cb_list_init(&queue->levels[i]);
	queue->count = 0;
}

void cb_retry_item_init(struct cb_retry_item *item)
{
	cb_list_init(&item->link);
	item->due_ms = 0;
	item->level = 0;
}

void cb_retry_cancel(struct cb_retry_queue *queue, struct cb_retry_item *item)
{
	if (!cb_retry_queued(item))
		return;
	cb_list_del(&item->link);
	queue->count--;
}

void cb_retry_schedule(struct cb_retry_queue *queue, struct cb_retry_item *item, uint64_t now_ms,
		       unsigned int level)
{
	cb_retry_cancel(queue, item);
	if (level >= CB_RETRY_LEVELS)
		level = CB_RETRY_LEVELS - 1;
	item->level = level;
	item->due_ms = now_ms + (1u << level);
	cb_list_add_tail(&queue->levels[level], &item->link);
	queue->count++;
}

void cb_retry_back_off(struct cb_retry_queue *queue, struct cb_retry_item *item, uint64_t now_ms)
{
	cb_retry_schedule(queue, item, now_ms, item->level + 1);
}

struct cb_retry_item *cb_retry_take_due(struct cb_retry_queue *queue, uint64_t now_ms)
{
	for (unsigned int i = 0; i < CB_RETRY_LEVELS; i++) {
		struct cb_retry_item *item = cb_list_first(&queue->levels[i], struct cb_retry_item, link);
		if (item && item->due_ms <= now_ms) {
			cb_retry_cancel(queue, item);
			return item;
		}
	}
	return NULL;
}

uint64_t cb_retry_next_due(const struct cb_retry_queue *queue)
{
	uint64_t due = UINT64_MAX;
	for (unsigned int i = 0; i < CB_RETRY_LEVELS; i++) {
		const struct cb_link *head = &queue->levels[i];
		if (cb_list_empty(head))
			continue;
		const struct cb_retry_item *item = cb_container_of(head->next, struct cb_retry_item, link);
		if (item->due_ms < due)
			due = item->due_ms;
	}
	return due;
}
