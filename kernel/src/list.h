/*
 * Intrusive doubly linked lists. Hand-written because the kernel has no dependencies
 * beyond libc (c-list would do the same job but is not packaged where capbus installs).
 * A list head is a struct cb_link whose prev/next point at itself when empty.
 */
#ifndef CB_LIST_H
#define CB_LIST_H

#include <stddef.h>
#include <stdbool.h>

struct cb_link {
	struct cb_link *prev;
	struct cb_link *next;
};

#define CB_LIST_INIT(head) { &(head), &(head) }
#define cb_container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

static inline void cb_list_init(struct cb_link *head) { head->prev = head->next = head; }
static inline bool cb_list_empty(const struct cb_link *head) { return head->next == head; }
static inline bool cb_link_linked(const struct cb_link *link) { return link->next != NULL && link->next != link; }

static inline void cb_list_add_tail(struct cb_link *head, struct cb_link *link)
{
	link->prev = head->prev;
	link->next = head;
	head->prev->next = link;
	head->prev = link;
}

static inline void cb_list_del(struct cb_link *link)
{
	link->prev->next = link->next;
	link->next->prev = link->prev;
	link->prev = link->next = link;
}

#define cb_list_first(head, type, member) \
	(cb_list_empty(head) ? NULL : cb_container_of((head)->next, type, member))
#define cb_list_last(head, type, member) \
	(cb_list_empty(head) ? NULL : cb_container_of((head)->prev, type, member))

#endif
