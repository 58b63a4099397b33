/*
 * The check every received RPC message passes before any reader sees it (capwire.py's
 * check_tree, in C because it runs on every call and return: ~10 us in Python, well under
 * one here). A message must be a tree: every pointer well-formed and in bounds, no two
 * pointers to overlapping content (no Cap'n Proto writer makes a DAG or a loop, and it is how
 * a small message claims to be a huge one), within a traversal budget that charges
 * zero-sized list elements a word each (as libcapnp does) and within a nesting limit.
 *
 * Input: the message in the standard stream framing (segment table, then segments), as the
 * RPC envelope travels; or one segment alone (capwire_check_segment). No allocation survives the call; everything is bounded by the
 * message's size. Hand-written because no C library offers a schema-less pointer walk.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEGMENTS_MAX 512u

struct pending {
	uint32_t segment;
	uint32_t nesting;
	uint64_t location;
};

struct walk {
	const uint64_t *words[SEGMENTS_MAX];
	uint64_t sizes[SEGMENTS_MAX];
	uint8_t *claimed[SEGMENTS_MAX]; /* one byte per word: already part of some object */
	uint32_t n_segments;
	int64_t budget;
	/* Zero-sized list elements the message may still have: no more than it has words. They
	 * take no room, so the budget's floor (for small messages) would let a message of a few
	 * words be read as tens of thousands of values, each a reader's work. */
	int64_t zero_sized;
	struct pending *stack;
	size_t depth, capacity;
	char *error;
	size_t error_size;
};

#define TOO_MANY_ZERO_SIZED "traversal limit exceeded: more zero-sized list elements than the message has words"

static int fail(struct walk *walk, const char *message, uint32_t segment, uint64_t word)
{
	snprintf(walk->error, walk->error_size, "%s (segment %u, word %llu)", message, segment,
		 (unsigned long long)word);
	return -1;
}

static int in_bounds(const struct walk *walk, uint32_t segment, uint64_t start, uint64_t count)
{
	return segment < walk->n_segments && start <= walk->sizes[segment] && count <= walk->sizes[segment] - start;
}

static int claim(struct walk *walk, uint32_t segment, uint64_t start, uint64_t count)
{
	uint8_t *claimed = walk->claimed[segment];
	if (count == 0)
		return 0;
	if (memchr(claimed + start, 1, count))
		return fail(walk, "pointers share content: not a tree", segment, start);
	memset(claimed + start, 1, count);
	return 0;
}

static int push(struct walk *walk, uint32_t segment, uint64_t location, uint32_t nesting)
{
	if (walk->depth == walk->capacity) {
		size_t capacity = walk->capacity ? walk->capacity * 2 : 64;
		struct pending *stack = realloc(walk->stack, capacity * sizeof(*stack));
		if (!stack)
			return fail(walk, "out of memory", segment, location);
		walk->stack = stack;
		walk->capacity = capacity;
	}
	walk->stack[walk->depth++] = (struct pending){ segment, nesting, location };
	return 0;
}

/* Follows the pointer at (segment, location): 1 and the target, 0 for null, -1 on error. */
static int deref(struct walk *walk, uint32_t segment, uint64_t location, uint32_t *target_segment,
		 uint64_t *start, uint64_t *tag)
{
	uint64_t word = walk->words[segment][location];
	if (word == 0)
		return 0;
	if ((word & 3) == 2) {
		uint32_t far_segment = (uint32_t)(word >> 32);
		uint64_t pad = (word & 0xFFFFFFFFu) >> 3;
		if (!((word >> 2) & 1)) {
			if (!in_bounds(walk, far_segment, pad, 1))
				return fail(walk, "far pointer out of bounds", segment, location);
			uint64_t landing = walk->words[far_segment][pad];
			if ((landing & 3) == 2)
				return fail(walk, "far pointer to a far pointer", far_segment, pad);
			segment = far_segment;
			location = pad;
			word = landing;
		} else {
			if (!in_bounds(walk, far_segment, pad, 2))
				return fail(walk, "far pointer out of bounds", segment, location);
			uint64_t far = walk->words[far_segment][pad];
			if ((far & 7) != 2)
				return fail(walk, "bad double-far landing pad", far_segment, pad);
			*target_segment = (uint32_t)(far >> 32);
			*start = (far & 0xFFFFFFFFu) >> 3;
			*tag = walk->words[far_segment][pad + 1];
			if ((*tag & 3) == 2 || (*tag & 3) == 3)
				return fail(walk, "bad double-far tag", far_segment, pad + 1);
			if (*target_segment >= walk->n_segments)
				return fail(walk, "far pointer to a missing segment", far_segment, pad);
			return 1;
		}
	}
	if ((word & 3) == 3) {
		*target_segment = segment;
		*start = location;
		*tag = word;
		return 1;
	}
	int64_t offset = (int64_t)((word & 0xFFFFFFFFu) >> 2);
	if (offset >= (1 << 29))
		offset -= (int64_t)1 << 30;
	int64_t target = (int64_t)location + 1 + offset;
	if (target < 0)
		return fail(walk, "pointer out of bounds", segment, location);
	*target_segment = segment;
	*start = (uint64_t)target;
	*tag = word;
	return 1;
}

static int visit(struct walk *walk, struct pending at)
{
	uint32_t segment;
	uint64_t start, tag;
	int found = deref(walk, at.segment, at.location, &segment, &start, &tag);
	if (found <= 0)
		return found;
	if (at.nesting == 0)
		return fail(walk, "nesting limit exceeded", at.segment, at.location);
	switch (tag & 3) {
	case 3: /* "other": a capability when bits 2..31 are 0 */
		if ((tag & 0xFFFFFFFCu) != 0)
			return fail(walk, "unknown other pointer", at.segment, at.location);
		return 0;
	case 0: {
		uint64_t data = (tag >> 32) & 0xFFFF, pointers = tag >> 48;
		if (!in_bounds(walk, segment, start, data + pointers))
			return fail(walk, "pointer out of bounds", segment, start);
		if (claim(walk, segment, start, data + pointers) < 0)
			return -1;
		walk->budget -= (int64_t)(data + pointers ? data + pointers : 1);
		for (uint64_t i = 0; i < pointers; i++)
			if (push(walk, segment, start + data + i, at.nesting - 1) < 0)
				return -1;
		return 0;
	}
	default: { /* 1: a list */
		uint32_t size = (uint32_t)((tag >> 32) & 7);
		uint64_t count = tag >> 35;
		if (size == 7) {
			if (!in_bounds(walk, segment, start, 1 + count))
				return fail(walk, "pointer out of bounds", segment, start);
			uint64_t list_tag = walk->words[segment][start];
			uint64_t elements = (list_tag & 0xFFFFFFFFu) >> 2;
			uint64_t data = (list_tag >> 32) & 0xFFFF, pointers = list_tag >> 48;
			if (elements * (data + pointers) > count)
				return fail(walk, "composite list overruns its words", segment, start);
			if (claim(walk, segment, start, 1 + count) < 0)
				return -1;
			/* Zero-sized elements cost a word each: a list of them claims to be huge. */
			walk->budget -= (int64_t)(elements * (data + pointers ? data + pointers : 1) + 1);
			if (!(data + pointers) && (walk->zero_sized -= (int64_t)elements) < 0)
				return fail(walk, TOO_MANY_ZERO_SIZED, segment, start);
			if (walk->budget < 0)
				return fail(walk, "traversal limit exceeded", segment, start);
			for (uint64_t e = 0; pointers && e < elements; e++)
				for (uint64_t i = 0; i < pointers; i++)
					if (push(walk, segment, start + 1 + e * (data + pointers) + data + i, at.nesting - 1) < 0)
						return -1;
			return 0;
		}
		static const uint64_t bits[] = { 0, 1, 8, 16, 32, 64, 64 };
		uint64_t words = (count * bits[size] + 63) / 64;
		if (!in_bounds(walk, segment, start, words))
			return fail(walk, "pointer out of bounds", segment, start);
		if (claim(walk, segment, start, words) < 0)
			return -1;
		walk->budget -= (int64_t)(size == 0 ? count : words); /* Void elements: a word each */
		if (size == 0 && (walk->zero_sized -= (int64_t)count) < 0)
			return fail(walk, TOO_MANY_ZERO_SIZED, segment, start);
		if (size == 6)
			for (uint64_t i = 0; i < count; i++)
				if (push(walk, segment, start + i, at.nesting - 1) < 0)
					return -1;
		return 0;
	}
	}
}

/* Walks the message whose segments `walk` holds from the root at segment 0, word 0. */
static int walk_tree(struct walk *walk, uint32_t nesting)
{
	int result = -1;

	if (walk->sizes[0] == 0)
		return fail(walk, "empty message", 0, 0);
	for (uint32_t i = 0; i < walk->n_segments; i++) {
		walk->claimed[i] = calloc(walk->sizes[i] + 1, 1);
		if (!walk->claimed[i]) {
			fail(walk, "out of memory", i, 0);
			goto out;
		}
	}
	if (push(walk, 0, 0, nesting) < 0)
		goto out;
	while (walk->depth) {
		struct pending at = walk->stack[--walk->depth];
		if (visit(walk, at) < 0)
			goto out;
		if (walk->budget < 0) {
			fail(walk, "traversal limit exceeded", at.segment, at.location);
			goto out;
		}
	}
	result = 0;
out:
	for (uint32_t i = 0; i < walk->n_segments; i++)
		free(walk->claimed[i]);
	free(walk->stack);
	return result;
}

static int check_aligned(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting, int framed,
			 char *error, size_t error_size)
{
	struct walk walk = {
		.budget = budget, .zero_sized = (int64_t)(size / 8), .error = error, .error_size = error_size
	};
	uint32_t count;

	if (!framed) { /* one segment, as a reader handed only these words sees them */
		if (size % 8)
			return fail(&walk, "a segment is not a whole number of words", 0, 0);
		walk.n_segments = 1;
		walk.words[0] = (const uint64_t *)data;
		walk.sizes[0] = size / 8;
		return walk_tree(&walk, nesting);
	}
	if (size < 8)
		return fail(&walk, "message shorter than its segment table", 0, 0);
	memcpy(&count, data, 4);
	if (count >= SEGMENTS_MAX)
		return fail(&walk, "too many segments", count, 0);
	walk.n_segments = count + 1;
	size_t offset = 4 + 4 * (size_t)walk.n_segments;
	offset += offset % 8;
	if (offset > size)
		return fail(&walk, "message shorter than its segment table", 0, 0);
	for (uint32_t i = 0; i < walk.n_segments; i++) {
		uint32_t words;
		memcpy(&words, data + 4 + 4 * (size_t)i, 4);
		if ((size - offset) / 8 < words)
			return fail(&walk, "message ends before its last segment", i, 0);
		walk.words[i] = (const uint64_t *)(data + offset);
		walk.sizes[i] = words;
		offset += (size_t)words * 8;
	}
	if (offset != size)
		return fail(&walk, "bytes after the last segment", 0, 0);
	return walk_tree(&walk, nesting);
}

/*
 * The check of a message given as separate segments (some of them mapped memfds: the
 * attached segments of segments.py). A segment whose start is not word-aligned is copied.
 */
const char *capwire_check_segments(const uint8_t *const *data, const size_t *sizes, uint32_t count,
				   int64_t budget, uint32_t nesting)
{
	static _Thread_local char error[160];
	struct walk walk = { .budget = budget, .error = error, .error_size = sizeof(error) };
	uint64_t *copies[SEGMENTS_MAX] = { 0 };
	int result = -1;

	if (count == 0 || count > SEGMENTS_MAX)
		return "too many segments";
	walk.n_segments = count;
	for (uint32_t i = 0; i < count; i++) {
		if (sizes[i] % 8) {
			fail(&walk, "a segment is not a whole number of words", i, 0);
			goto out;
		}
		walk.sizes[i] = sizes[i] / 8;
		walk.zero_sized += (int64_t)walk.sizes[i];
		if (((uintptr_t)data[i] & 7) == 0) {
			walk.words[i] = (const uint64_t *)data[i];
			continue;
		}
		copies[i] = malloc(sizes[i] + 8);
		if (!copies[i]) {
			fail(&walk, "out of memory", i, 0);
			goto out;
		}
		memcpy(copies[i], data[i], sizes[i]);
		walk.words[i] = copies[i];
	}
	result = walk_tree(&walk, nesting);
out:
	for (uint32_t i = 0; i < count; i++)
		free(copies[i]);
	return result < 0 ? error : NULL;
}

static const char *check(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting, int framed)
{
	static _Thread_local char error[160];
	int result;
	if (((uintptr_t)data & 7) == 0) {
		result = check_aligned(data, size, budget, nesting, framed, error, sizeof(error));
	} else {
		/* A view into a larger buffer may start anywhere: words are read in place, so align. */
		uint64_t *copy = malloc(size + 8);
		if (!copy)
			return "out of memory";
		memcpy(copy, data, size);
		result = check_aligned((const uint8_t *)copy, size, budget, nesting, framed, error, sizeof(error));
		free(copy);
	}
	return result < 0 ? error : NULL;
}

const char *capwire_check_tree(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting)
{
	return check(data, size, budget, nesting, 1);
}

/*
 * The same check of one unframed segment read as a whole message (its far pointers can only
 * land in itself): what a reader handed that segment alone sees, which is not what the
 * framed message around it reads as when a far pointer names another of its segments.
 */
const char *capwire_check_segment(const uint8_t *data, size_t size, int64_t budget, uint32_t nesting)
{
	return check(data, size, budget, nesting, 0);
}
