/*
 * An open-addressing hash map of pointers keyed by a uint64_t that each value carries
 * (linear probing, backward-shift deletion, power-of-two capacity, load kept between 1/8
 * and 3/4). Each peer keeps two: handle id -> handle and node serial -> handle, which is
 * what makes per-peer handle deduplication O(1). A slot holds only the pointer (8 bytes):
 * the key is read from the value through `key_of`, which keeps kernel memory per handle
 * small. Hand-written because no libc or well-kept C library offers that trade.
 */
#ifndef CB_MAP_H
#define CB_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef uint64_t (*cb_map_key_fn)(const void *value);

struct cb_map {
	void **slots;  /* NULL = empty */
	size_t capacity; /* 0 or a power of two */
	size_t count;
	cb_map_key_fn key_of;
};

void cb_map_init(struct cb_map *map, cb_map_key_fn key_of);
void cb_map_free(struct cb_map *map);
void *cb_map_get(const struct cb_map *map, uint64_t key);
/* Makes room so that `extra` more inserts cannot fail. Returns 0 or -ENOMEM. */
int cb_map_reserve(struct cb_map *map, size_t extra);
/* Inserts a value whose key is not present. Returns 0 or -ENOMEM (only when no room was
 * reserved). */
int cb_map_put(struct cb_map *map, void *value);
/* Removes the value with this key; returns it or NULL. */
void *cb_map_remove(struct cb_map *map, uint64_t key);
size_t cb_map_bytes(const struct cb_map *map);

#endif
