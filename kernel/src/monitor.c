/*
 * Monitors (kdbus's idea on bus1's model): a peer the kernel's owner granted the monitor
 * capability (capbus_kernel_grant_monitor) receives a CAPBUS_MSG_MONITOR copy of every
 * committed send and destroy: a struct capbus_monitor_record, then up to
 * MONITOR_PAYLOAD_MAX bytes of the payload. Fds and handle ids are never copied. A monitor
 * that does not keep up loses records, never blocks anyone: the next record it gets says
 * how many it lost (`dropped`). Monitors are observers, not receivers, so their losses do
 * not break the "nothing accepted is lost" rule.
 */
#include <stdlib.h>
#include <string.h>

#include "capbus/uapi.h"
#include "kernel.h"
#include "message.h"
#include "node.h"
#include "peer.h"
#include "queue.h"

#define MONITOR_PAYLOAD_MAX 4096u
/* What one monitor's unread records may take: charged to nobody (a record is no sender's
 * message, and charging the monitor's uid would let anyone's traffic fill that uid's
 * backlog and gate its other peers), so bounded here; past it, records are dropped and
 * counted (`dropped`). */
#define CB_MONITOR_BYTES_MAX (1u << 20)

void cb_monitor_revoke(struct cb_kernel *kernel, const struct cb_node *node)
{
	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next) {
		struct cb_peer *peer = cb_container_of(link, struct cb_peer, kernel_link);
		if (peer->monitor && peer->monitor_via == node->serial) {
			peer->monitor = false;
			peer->monitor_via = 0;
			kernel->n_monitors--;
		}
	}
}

void cb_monitor_observe(struct cb_kernel *kernel, uint16_t event, uint64_t seq, uint32_t uid, uint32_t pid,
			uint32_t n_destinations, uint32_t n_handles, uint32_t n_fds, const struct cb_message *message)
{
	if (kernel->n_monitors == 0)
		return;
	uint32_t copied = message ? message->payload_size : 0;
	if (copied > MONITOR_PAYLOAD_MAX)
		copied = MONITOR_PAYLOAD_MAX;
	struct cb_link *link;
	for (link = kernel->peers.next; link != &kernel->peers; link = link->next) {
		struct cb_peer *monitor = cb_container_of(link, struct cb_peer, kernel_link);
		if (!monitor->monitor || monitor->fd < 0)
			continue;
		uint32_t payload_size = sizeof(struct capbus_monitor_record) + copied;
		uint32_t size = sizeof(struct capbus_frame) + sizeof(struct capbus_message) + payload_size;
		struct cb_qentry *entry = NULL;
		if (monitor->queue.n_entries < kernel->limits.peer_messages)
			entry = cb_qentry_new(size);
		if (entry && monitor->monitor_bytes + cb_qentry_cost(entry) > CB_MONITOR_BYTES_MAX) {
			cb_qentry_free(entry);
			entry = NULL;
		}
		if (!entry) {
			monitor->monitor_dropped++;
			continue;
		}
		entry->prepaid = true; /* in no backlog: bounded by CB_MONITOR_BYTES_MAX instead */
		entry->monitor_record = true;
		monitor->monitor_bytes += cb_qentry_cost(entry);
		struct capbus_frame *frame = (struct capbus_frame *)entry->header;
		struct capbus_message *header = (struct capbus_message *)(frame + 1);
		struct capbus_monitor_record *record = (struct capbus_monitor_record *)(header + 1);
		*frame = (struct capbus_frame){ .size = size, .type = CAPBUS_FRAME_MESSAGE };
		*header = (struct capbus_message){
			.kind = CAPBUS_MSG_MONITOR,
			.destination = CAPBUS_HANDLE_INVALID,
			.seq = seq,
			.uid = UINT32_MAX,
			.gid = UINT32_MAX,
			.payload_size = payload_size,
		};
		*record = (struct capbus_monitor_record){
			.event = event,
			.n_destinations = n_destinations > UINT16_MAX ? UINT16_MAX : (uint16_t)n_destinations,
			.payload_size = message ? message->payload_size : 0,
			.seq = seq,
			.uid = uid,
			.pid = pid,
			.n_handles = n_handles,
			.n_fds = n_fds,
			.dropped = monitor->monitor_dropped,
		};
		if (copied)
			memcpy(record + 1, message->payload, copied);
		cb_queue_push(monitor, entry);
	}
}
