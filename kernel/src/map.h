/*
 * An open-addressing hash map from uint64_t keys to pointers (linear probing, backward
 * shift deletion, power-of-two capacity, load kept at or below 3/4). Each peer keeps two:
 * handle id -> handle and node serial -> handle, which is what makes per-peer handle
 * deduplication O(1). Key 0 is reserved as "empty"; callers never use it (ids and node
 * serials start at 1). Hand-written: 16 bytes per slot keeps kernel memory per handle
 * small, which a generic library map would not.
 */
#ifndef CB_MAP_H
#define CB_MAP_H

#include <stddef.h>
#include <stdint.h>

struct cb_map_slot {
	uint64_t key;
	void *value;
};

struct cb_map {
	struct cb_map_slot *slots;
	size_t capacity; /* 0 or a power of two */
	size_t count;
};

void cb_map_init(struct cb_map *map);
void cb_map_free(struct cb_map *map);
void *cb_map_get(const struct cb_map *map, uint64_t key);
/* Makes room so that `extra` more inserts cannot fail. Returns 0 or -ENOMEM. */
int cb_map_reserve(struct cb_map *map, size_t extra);
/* Inserts a key not present. Returns 0 or -ENOMEM (only when no room was reserved). */
int cb_map_put(struct cb_map *map, uint64_t key, void *value);
/* Removes a key; returns its value or NULL. */
void *cb_map_remove(struct cb_map *map, uint64_t key);
size_t cb_map_bytes(const struct cb_map *map);

#endif
