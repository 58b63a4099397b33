#include "map.h"

#include <errno.h>
#include <stdlib.h>

static inline size_t slot_of(uint64_t key, size_t capacity)
{
	/* Fibonacci hashing: ids are sequential, so spread them before masking. */
	return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & (capacity - 1);
}

void cb_map_init(struct cb_map *map, cb_map_key_fn key_of)
{
	map->slots = NULL;
	map->capacity = 0;
	map->count = 0;
	map->key_of = key_of;
}

void cb_map_free(struct cb_map *map)
{
	free(map->slots);
	map->slots = NULL;
	map->capacity = 0;
	map->count = 0;
}

void *cb_map_get(const struct cb_map *map, uint64_t key)
{
	if (map->capacity == 0)
		return NULL;
	for (size_t i = slot_of(key, map->capacity);; i = (i + 1) & (map->capacity - 1)) {
		void *value = map->slots[i];
		if (!value)
			return NULL;
		if (map->key_of(value) == key)
			return value;
	}
}

static void insert_unchecked(void **slots, size_t capacity, uint64_t key, void *value)
{
	size_t i = slot_of(key, capacity);
	while (slots[i])
		i = (i + 1) & (capacity - 1);
	slots[i] = value;
}

static int resize(struct cb_map *map, size_t capacity)
{
	void **slots = calloc(capacity, sizeof(*slots));
	if (!slots)
		return -ENOMEM;
	for (size_t i = 0; i < map->capacity; i++)
		if (map->slots[i])
			insert_unchecked(slots, capacity, map->key_of(map->slots[i]), map->slots[i]);
	free(map->slots);
	map->slots = slots;
	map->capacity = capacity;
	return 0;
}

int cb_map_reserve(struct cb_map *map, size_t extra)
{
	size_t need = map->count + extra;
	size_t capacity = map->capacity ? map->capacity : 8;
	while (need * 4 > capacity * 3)
		capacity *= 2;
	if (capacity == map->capacity)
		return 0;
	return resize(map, capacity);
}

int cb_map_put(struct cb_map *map, void *value)
{
	int r = cb_map_reserve(map, 1);
	if (r < 0)
		return r;
	insert_unchecked(map->slots, map->capacity, map->key_of(value), value);
	map->count++;
	return 0;
}

void *cb_map_remove(struct cb_map *map, uint64_t key)
{
	if (map->capacity == 0)
		return NULL;
	size_t mask = map->capacity - 1;
	size_t i = slot_of(key, map->capacity);
	while (!map->slots[i] || map->key_of(map->slots[i]) != key) {
		if (!map->slots[i])
			return NULL;
		i = (i + 1) & mask;
	}
	void *value = map->slots[i];
	/* Backward shift: pull later members of the probe run into the hole. */
	size_t hole = i;
	for (size_t j = (i + 1) & mask; map->slots[j]; j = (j + 1) & mask) {
		size_t home = slot_of(map->key_of(map->slots[j]), map->capacity);
		if (((j - home) & mask) >= ((j - hole) & mask)) {
			map->slots[hole] = map->slots[j];
			hole = j;
		}
	}
	map->slots[hole] = NULL;
	map->count--;
	if (map->count == 0)
		cb_map_free(map);
	else if (map->capacity > 64 && map->count * 8 < map->capacity)
		resize(map, map->capacity / 4); /* on ENOMEM it simply stays large */
	return value;
}

size_t cb_map_bytes(const struct cb_map *map)
{
	return map->capacity * sizeof(void *);
}
