/*
 * Snapshots of the object model (CAPBUS_CMD_SNAPSHOT): see snapshot.c.
 */
#ifndef CB_SNAPSHOT_H
#define CB_SNAPSHOT_H

struct cb_kernel;
struct cb_peer;

/* Writes the kernel's whole object model, as `asker` sees it asked, to a new sealed memfd
 * (uapi.h: struct capbus_snapshot). Returns the fd, or -1 with *error an errno. */
int cb_snapshot_write(struct cb_kernel *kernel, const struct cb_peer *asker, int *error);

#endif
