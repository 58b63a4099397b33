/*
 * Snapshots of the object model (CAPBUS_CMD_SNAPSHOT): see snapshot.c.
 */
#ifndef CB_SNAPSHOT_H
#define CB_SNAPSHOT_H

struct cb_kernel;
struct cb_peer;

#include <stddef.h>

/* Writes the kernel's whole object model, as `asker` sees it asked, to a new sealed memfd
 * (uapi.h: struct capbus_snapshot) of at most `max_size` bytes. Returns the fd (its size in
 * *written), or -1 with *error an errno (EDQUOT: larger than max_size). */
int cb_snapshot_write(struct cb_kernel *kernel, const struct cb_peer *asker, size_t max_size, size_t *written,
		      int *error);

#endif
