/*
 * Ring 3: virtio-mmio discovery, device initialisation (3.1.1, 4.2.3) and
 * split virtqueues (2.7) driven by polling. No interrupts, no CPL0 work:
 * MMIO accesses to the device windows exit to the VMM directly.
 */
#include "virtio.h"

struct vslot virtio_slots[VIRTIO_SLOTS];
u32 virtio_nslots;

/* Queue memory: one 4 KiB page per queue, descriptor table at 0 (16 * 64
 * bytes), available ring at 1024 (6 + 2 * 64), used ring at 2048
 * (6 + 8 * 64). Far stricter than the 16/2/4-byte alignments of 2.7. */
#define VQ_PAGES 8
static u8 vq_mem[VQ_PAGES][4096] __attribute__((aligned(4096)));
static u32 vq_pages_used;

const char *virtio_id_name(u32 id)
{
    switch (id) {
    case VIRTIO_ID_NET: return "net";
    case VIRTIO_ID_BLK: return "blk";
    case 3: return "console";
    case VIRTIO_ID_RNG: return "rng";
    case 5: return "balloon";
    case 9: return "9p";
    case 16: return "gpu";
    case 18: return "input";
    case 19: return "vsock";
    case 26: return "fs";
    default: return "other";
    }
}

/* ---------------------------------------------------------------- discovery */

u32 virtio_scan(void)
{
    virtio_nslots = 0;
    for (u32 n = 0; n < VIRTIO_SLOTS; n++) {
        struct vslot *s = &virtio_slots[n];
        u64 base = VIRTIO_BASE + n * VIRTIO_STRIDE;
        memset(s, 0, sizeof(*s));
        s->slot = n;
        s->base = base;
        if (*(volatile u32 *)phys(base + VIRTIO_MMIO_MAGIC) != VIRTIO_MAGIC)
            continue;
        s->present = 1;
        s->version = *(volatile u32 *)phys(base + VIRTIO_MMIO_VERSION);
        s->device_id = *(volatile u32 *)phys(base + VIRTIO_MMIO_DEVICE_ID);
        s->vendor_id = *(volatile u32 *)phys(base + VIRTIO_MMIO_VENDOR_ID);
        virtio_nslots++;
    }
    return virtio_nslots;
}

void virtio_print_slots(u32 cpu)
{
    for (u32 n = 0; n < VIRTIO_SLOTS; n++) {
        struct vslot *s = &virtio_slots[n];
        if (!s->present)
            continue;
        struct line l;
        l_init(&l, "VIRTIO");
        l_kv(&l, "slot", n);
        l_kx(&l, "addr_hex", s->base);
        l_kv(&l, "device_id", s->device_id);
        l_kv(&l, "version", s->version);
        l_kx(&l, "vendor_hex", s->vendor_id);
        l_ks(&l, "type", s->device_id ? virtio_id_name(s->device_id) : "none");
        l_emit(&l, cpu);
    }
}

int virtio_find(u32 device_id, u64 index, u64 slot, u32 *ordinal)
{
    u32 k = 0;
    for (u32 n = 0; n < VIRTIO_SLOTS; n++) {
        struct vslot *s = &virtio_slots[n];
        if (!s->present || s->version != 2 || s->device_id != device_id)
            continue;
        if (slot == VSLOT_ANY ? k == index : n == slot) {
            *ordinal = k;
            return (int)n;
        }
        k++;
    }
    return -1;
}

/* ------------------------------------------------------------------ timing */

u64 active_tsc(void)
{
    static u64 acc, last;
    u64 t = rdtsc();
    if (!last)
        last = t;
    u64 d = t - last;
    last = t;
    if (d < 50 * cfg.tsc_khz)
        acc += d;
    return acc;
}

u64 virtio_timeout_ticks(void)
{
    return (cfg.virtio_timeout_ms ? cfg.virtio_timeout_ms : 1) * cfg.tsc_khz;
}

void virtio_timeout_error(struct vq *q, const char *what, u64 waited)
{
    struct vdev *d = q->dev;
    struct line l;
    u32 inflight = 0;
    for (u32 i = 0; i < q->num; i++)
        inflight += q->in_flight[i];
    l_init(&l, "GUEST-ERROR what=virtio-timeout");
    l_kv(&l, "cpu", d->cpu);
    l_ks(&l, "dev", d->name);
    l_kv(&l, "slot", d->slot);
    l_kv(&l, "queue", q->index);
    l_ks(&l, "op", what);
    l_kv(&l, "waited_ms", waited / cfg.tsc_khz);
    l_kv(&l, "avail_idx", q->avail_idx);
    l_kv(&l, "used_idx", q->used->idx);
    l_kv(&l, "last_used", q->last_used);
    l_kv(&l, "in_flight", inflight);
    l_kx(&l, "status_hex", vmmio_r32(d, VIRTIO_MMIO_STATUS));
    l_kx(&l, "isr_hex", vmmio_r32(d, VIRTIO_MMIO_INTERRUPT_STATUS));
    l_emit(&l, d->cpu);
}

/* ------------------------------------------------------------------ device */

static int init_fail(struct vdev *d, const char *reason, u64 value)
{
    struct line l;
    u32 st = vmmio_r32(d, VIRTIO_MMIO_STATUS);
    vmmio_w32(d, VIRTIO_MMIO_STATUS, st | VIRTIO_S_FAILED);
    l_init(&l, "GUEST-ERROR what=virtio-init");
    l_kv(&l, "cpu", d->cpu);
    l_kv(&l, "slot", d->slot);
    l_ks(&l, "dev", d->name);
    l_ks(&l, "reason", reason);
    l_kx(&l, "value_hex", value);
    l_kx(&l, "status_hex", st);
    l_emit(&l, d->cpu);
    return -1;
}

static int setup_queue(struct vdev *d, u32 qi)
{
    struct vq *q = &d->vq[qi];
    memset(q, 0, sizeof(*q));
    q->dev = d;
    q->index = (u16)qi;
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_SEL, qi);
    u32 ready = vmmio_r32(d, VIRTIO_MMIO_QUEUE_READY);
    if (ready)
        return init_fail(d, "queue-already-ready", qi);
    u32 max = vmmio_r32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        return init_fail(d, "queue-not-available", qi);
    if (vq_pages_used >= VQ_PAGES)
        return init_fail(d, "out-of-queue-memory", qi);
    u32 num = VQ_MAX;
    while (num > max)
        num >>= 1;
    u8 *mem = vq_mem[vq_pages_used++];
    memset(mem, 0, 4096);
    q->num = (u16)num;
    q->desc = (volatile struct virtq_desc *)mem;
    q->avail = (volatile struct virtq_avail *)(mem + 1024);
    q->used = (volatile struct virtq_used *)(mem + 2048);
    for (u32 i = 0; i < num; i++)
        q->next[i] = (u16)(i + 1 < num ? i + 1 : 0);
    q->free_head = 0;
    q->nfree = (u16)num;
    q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;   /* we poll */

    u64 da = (u64)q->desc, aa = (u64)q->avail, ua = (u64)q->used;
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_NUM, num);
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)da);
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(da >> 32));
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)aa);
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(aa >> 32));
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)ua);
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(ua >> 32));
    vmmio_w32(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (vmmio_r32(d, VIRTIO_MMIO_QUEUE_READY) != 1)
        return init_fail(d, "queue-ready-not-set", qi);
    return 0;
}

int virtio_init(struct vdev *d, u32 slot, u64 want, u32 nqueues, u32 cpu)
{
    struct line l;
    memset(d, 0, sizeof(*d));
    d->slot = slot;
    d->base = VIRTIO_BASE + slot * VIRTIO_STRIDE;
    d->cpu = cpu;
    u32 magic = vmmio_r32(d, VIRTIO_MMIO_MAGIC);
    d->version = vmmio_r32(d, VIRTIO_MMIO_VERSION);
    d->device_id = vmmio_r32(d, VIRTIO_MMIO_DEVICE_ID);
    d->vendor_id = vmmio_r32(d, VIRTIO_MMIO_VENDOR_ID);
    d->name = virtio_id_name(d->device_id);
    if (magic != VIRTIO_MAGIC)
        return init_fail(d, "bad-magic", magic);
    if (d->version != 2)
        return init_fail(d, "not-version-2", d->version);
    if (nqueues > VDEV_MAX_QUEUES)
        return init_fail(d, "too-many-queues", nqueues);

    /* 3.1.1: reset, then wait for the reset to finish. */
    vmmio_w32(d, VIRTIO_MMIO_STATUS, 0);
    u64 t0 = active_tsc();
    while (vmmio_r32(d, VIRTIO_MMIO_STATUS) != 0) {
        if (active_tsc() - t0 > virtio_timeout_ticks())
            return init_fail(d, "reset-timeout", 0);
        cpu_relax();
    }
    vmmio_w32(d, VIRTIO_MMIO_STATUS, VIRTIO_S_ACKNOWLEDGE);
    vmmio_w32(d, VIRTIO_MMIO_STATUS, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);

    vmmio_w32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 lo = vmmio_r32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    vmmio_w32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u64 hi = vmmio_r32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    d->offered = lo | (hi << 32);
    if (!(d->offered & VIRTIO_F_VERSION_1))
        return init_fail(d, "no-version-1", d->offered);
    d->features = d->offered & (want | VIRTIO_F_VERSION_1);
    vmmio_w32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vmmio_w32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
    vmmio_w32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vmmio_w32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
    vmmio_w32(d, VIRTIO_MMIO_STATUS,
              VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK);
    u32 st = vmmio_r32(d, VIRTIO_MMIO_STATUS);
    if (!(st & VIRTIO_S_FEATURES_OK))
        return init_fail(d, "features-not-accepted", d->features);

    for (u32 i = 0; i < nqueues; i++)
        if (setup_queue(d, i))
            return -1;
    d->nqueues = nqueues;

    vmmio_w32(d, VIRTIO_MMIO_STATUS, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER |
                                     VIRTIO_S_FEATURES_OK | VIRTIO_S_DRIVER_OK);
    st = vmmio_r32(d, VIRTIO_MMIO_STATUS);
    if ((st & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) || !(st & VIRTIO_S_DRIVER_OK))
        return init_fail(d, "bad-status-after-driver-ok", st);

    l_init(&l, "VIRTIO-INIT");
    l_kv(&l, "slot", slot);
    l_ks(&l, "type", d->name);
    l_kx(&l, "offered_hex", d->offered);
    l_kx(&l, "features_hex", d->features);
    l_str(&l, " queue_sizes=");
    for (u32 i = 0; i < nqueues; i++) {
        if (i)
            l_chr(&l, ',');
        l_dec(&l, d->vq[i].num);
    }
    l_kx(&l, "status_hex", st);
    l_emit(&l, cpu);
    return 0;
}

void virtio_config_read(struct vdev *d, u32 off, void *dst, u32 len, u32 width)
{
    u8 *out = dst;
    for (u32 tries = 0; tries < 1000; tries++) {
        u32 g0 = vmmio_r32(d, VIRTIO_MMIO_CONFIG_GENERATION);
        for (u32 i = 0; i < len; i += width) {
            u64 a = d->base + VIRTIO_MMIO_CONFIG + off + i;
            if (width == 4) {
                u32 v = *(volatile u32 *)phys(a);
                memcpy(out + i, &v, 4);
            } else if (width == 2) {
                u16 v = *(volatile u16 *)phys(a);
                memcpy(out + i, &v, 2);
            } else {
                out[i] = *(volatile u8 *)phys(a);
            }
        }
        if (vmmio_r32(d, VIRTIO_MMIO_CONFIG_GENERATION) == g0)
            return;
    }
    guest_error(d->cpu, "virtio-config-generation-unstable");
}

/* ------------------------------------------------------------------- queues */

static void bad_used(struct vq *q, const char *why, u64 v1, u64 v2)
{
    if (q->bad_used_reported >= 4)
        return;
    q->bad_used_reported++;
    struct line l;
    l_init(&l, "GUEST-ERROR what=virtio-bad-used");
    l_kv(&l, "cpu", q->dev->cpu);
    l_ks(&l, "dev", q->dev->name);
    l_kv(&l, "slot", q->dev->slot);
    l_kv(&l, "queue", q->index);
    l_ks(&l, "reason", why);
    l_kv(&l, "value", v1);
    l_kv(&l, "last_used", v2);
    l_emit(&l, q->dev->cpu);
}

int vq_add(struct vq *q, const struct vbuf *bufs, u32 n, u64 cookie)
{
    if (n == 0 || n > q->nfree)
        return -1;
    u16 head = q->free_head, i = head;
    for (u32 k = 0; k < n; k++) {
        volatile struct virtq_desc *dsc = &q->desc[i];
        u16 nxt = q->next[i];
        dsc->addr = bufs[k].addr;
        dsc->len = bufs[k].len;
        dsc->flags = (u16)((bufs[k].write ? VIRTQ_DESC_F_WRITE : 0) |
                           (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        dsc->next = k + 1 < n ? nxt : 0;
        i = nxt;
    }
    q->free_head = i;
    q->nfree = (u16)(q->nfree - n);
    q->chain_len[head] = (u16)n;
    q->in_flight[head] = 1;
    q->cookie[head] = cookie;
    q->avail->ring[q->avail_idx & (q->num - 1)] = head;
    vbarrier();                 /* ring entry before idx (x86: stores in order) */
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    q->added++;
    return head;
}

void vq_kick(struct vq *q)
{
    vmb();                      /* avail->idx visible before reading used->flags */
    if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY))
        vmmio_w32(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int vq_get_used(struct vq *q, u32 *head, u32 *len, u64 *cookie)
{
    u16 uidx = q->used->idx;
    if (uidx == q->last_used)
        return 0;
    u16 pending = (u16)(uidx - q->last_used);
    if (pending > q->num) {
        bad_used(q, "used-idx-ahead", uidx, q->last_used);
        return 0;
    }
    vbarrier();                 /* idx before the element (x86: loads in order) */
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->num - 1)];
    u32 id = e->id, n = e->len;
    q->last_used++;
    if (id >= q->num || !q->in_flight[id]) {
        bad_used(q, id >= q->num ? "id-out-of-range" : "id-not-in-flight", id,
                 (u16)(q->last_used - 1));
        return 0;
    }
    u16 tail = (u16)id;
    for (u32 k = 1; k < q->chain_len[id]; k++)
        tail = q->next[tail];
    q->next[tail] = q->free_head;
    q->free_head = (u16)id;
    q->nfree = (u16)(q->nfree + q->chain_len[id]);
    q->in_flight[id] = 0;
    q->completed++;
    *head = id;
    *len = n;
    *cookie = q->cookie[id];
    return 1;
}

void vq_wait(struct vq *q, u32 *head, u32 *len, u64 *cookie, const char *what)
{
    u64 t0 = active_tsc(), limit = virtio_timeout_ticks();
    int reported = 0;
    for (;;) {
        if (vq_get_used(q, head, len, cookie)) {
            if (reported) {
                struct line l;
                l_init(&l, "GUEST-ERROR what=virtio-late");
                l_kv(&l, "cpu", q->dev->cpu);
                l_ks(&l, "dev", q->dev->name);
                l_kv(&l, "slot", q->dev->slot);
                l_kv(&l, "queue", q->index);
                l_ks(&l, "op", what);
                l_kv(&l, "waited_ms", (active_tsc() - t0) / cfg.tsc_khz);
                l_emit(&l, q->dev->cpu);
            }
            return;
        }
        if (!reported && active_tsc() - t0 >= limit) {
            virtio_timeout_error(q, what, active_tsc() - t0);
            reported = 1;
        }
        cpu_relax();
    }
}
