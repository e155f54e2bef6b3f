/*
 * Minimal virtio 1.x over MMIO (register layout version 2) with split
 * virtqueues, driven entirely from ring 3 by polling the used rings.
 */
#ifndef STASIS_VIRTIO_H
#define STASIS_VIRTIO_H

#include "guest.h"

/* Device windows: VIRTIO_BASE + n * VIRTIO_STRIDE, n < VIRTIO_SLOTS. */
#define VIRTIO_BASE             0xD0000000ul
#define VIRTIO_STRIDE           0x1000ul
#define VIRTIO_SLOTS            16

/* MMIO registers (virtio 1.x, section 4.2.2) */
#define VIRTIO_MMIO_MAGIC               0x000   /* 0x74726976 "virt" */
#define VIRTIO_MMIO_VERSION             0x004   /* 2 */
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MAGIC            0x74726976u

/* Device status bits (2.1) */
#define VIRTIO_S_ACKNOWLEDGE    1
#define VIRTIO_S_DRIVER         2
#define VIRTIO_S_DRIVER_OK      4
#define VIRTIO_S_FEATURES_OK    8
#define VIRTIO_S_NEEDS_RESET    64
#define VIRTIO_S_FAILED         128

/* Device IDs (5) */
#define VIRTIO_ID_NET           1
#define VIRTIO_ID_BLK           2
#define VIRTIO_ID_RNG           4

/* Feature bits */
#define VIRTIO_F_VERSION_1      (1ul << 32)
#define VIRTIO_BLK_F_SIZE_MAX   (1ul << 1)
#define VIRTIO_BLK_F_SEG_MAX    (1ul << 2)
#define VIRTIO_BLK_F_RO         (1ul << 5)
#define VIRTIO_BLK_F_BLK_SIZE   (1ul << 6)
#define VIRTIO_BLK_F_FLUSH      (1ul << 9)
#define VIRTIO_NET_F_MAC        (1ul << 5)

/* Split virtqueue (2.7) */
#define VIRTQ_DESC_F_NEXT       1
#define VIRTQ_DESC_F_WRITE      2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY  1

#define VQ_MAX                  64      /* our largest queue size */
#define VDEV_MAX_QUEUES         2

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[VQ_MAX];
    u16 used_event;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[VQ_MAX];
    u16 avail_event;
};

/* One buffer of a descriptor chain. */
struct vbuf {
    u64 addr;
    u32 len;
    u32 write;          /* 1 = device-writable */
};

struct vdev;

struct vq {
    struct vdev *dev;
    u16 index;          /* queue index on the device */
    u16 num;            /* queue size (power of 2, <= VQ_MAX) */
    u16 free_head, nfree;
    u16 avail_idx;      /* our copy of avail->idx */
    u16 last_used;      /* next used->idx position to consume */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u16 next[VQ_MAX];       /* free list / chain links (our copy) */
    u16 chain_len[VQ_MAX];  /* descriptors in the chain headed here */
    u8 in_flight[VQ_MAX];   /* head is owned by the device */
    u64 cookie[VQ_MAX];     /* caller's tag per head */
    u64 added;              /* chains made available */
    u64 completed;          /* chains returned in the used ring */
    u32 bad_used_reported;
};

struct vdev {
    u64 base;
    u32 slot, device_id, vendor_id, version;
    u64 offered, features;  /* device features, negotiated features */
    u32 nqueues;
    struct vq vq[VDEV_MAX_QUEUES];
    const char *name;       /* blk, net, rng, ... for messages */
    u32 cpu;
};

/* Devices found by virtio_scan (version 2 and version 1 alike). */
struct vslot {
    u32 present, slot, version, device_id, vendor_id;
    u64 base;
};
extern struct vslot virtio_slots[VIRTIO_SLOTS];
extern u32 virtio_nslots;

static inline u32 vmmio_r32(const struct vdev *d, u32 off)
{
    return *(volatile u32 *)phys(d->base + off);
}

static inline void vmmio_w32(const struct vdev *d, u32 off, u32 v)
{
    *(volatile u32 *)phys(d->base + off) = v;
}

static inline u8 vmmio_r8(const struct vdev *d, u32 off)
{
    return *(volatile u8 *)phys(d->base + off);
}

static inline void vbarrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void vmb(void) { __asm__ volatile("mfence" ::: "memory"); }

const char *virtio_id_name(u32 id);
u32 virtio_scan(void);                                  /* no output */
void virtio_print_slots(u32 cpu);                       /* VIRTIO lines */
/* The device with `device_id` at `slot` (if slot != VSLOT_ANY), else the
 * index-th such device in slot order. Returns the slot number or -1. */
#define VSLOT_ANY (~0ul)
int virtio_find(u32 device_id, u64 index, u64 slot, u32 *ordinal);
/* Reset, negotiate (VERSION_1 | (offered & want)), set up nqueues queues,
 * DRIVER_OK. Returns 0 on success; prints GUEST-ERROR what=virtio-init. */
int virtio_init(struct vdev *d, u32 slot, u64 want, u32 nqueues, u32 cpu);
/* Device config space, read with the ConfigGeneration retry loop, using
 * `width`-byte accesses (1, 2 or 4; 64-bit fields are read as two 32-bit
 * halves, as 4.2.2.2 requires). */
void virtio_config_read(struct vdev *d, u32 off, void *dst, u32 len, u32 width);

/* Queue operations. vq_add returns the head descriptor or -1 if there are
 * not enough free descriptors; the chain is made available immediately. */
int vq_add(struct vq *q, const struct vbuf *bufs, u32 n, u64 cookie);
void vq_kick(struct vq *q);
/* Takes one used element: returns 1 and fills head/len/cookie, or 0. */
int vq_get_used(struct vq *q, u32 *head, u32 *len, u64 *cookie);
/* Polls until a used element arrives (timeout reporting, never gives up). */
void vq_wait(struct vq *q, u32 *head, u32 *len, u64 *cookie, const char *what);

/* Stall-discounting clock (TSC ticks) for timeouts: gaps over 50 ms between
 * calls (a paused VM, a descheduled vCPU) are not counted. */
u64 active_tsc(void);
u64 virtio_timeout_ticks(void);
void virtio_timeout_error(struct vq *q, const char *what, u64 waited_ticks);

/* virtio_workloads.c */
__attribute__((noreturn)) void disk_workload(u32 cpu);
__attribute__((noreturn)) void diskbench_workload(u32 cpu);
__attribute__((noreturn)) void net_workload(u32 cpu);
__attribute__((noreturn)) void rng_workload(u32 cpu);

#endif
