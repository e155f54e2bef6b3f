/* Ring-3 workloads on virtio-mmio devices: disk (blk), net, rng. */
#include "virtio.h"

static u64 ms_ticks(u64 ms)
{
    return ms * cfg.tsc_khz;
}

static void put64(u8 *p, u64 v)
{
    memcpy(p, &v, 8);
}

static u64 get64(const u8 *p)
{
    u64 v;
    memcpy(&v, p, 8);
    return v;
}

static u64 fnv1a(const u8 *p, u32 n)
{
    u64 c = 0xCBF29CE484222325ul;
    for (u32 i = 0; i < n; i++)
        c = (c ^ p[i]) * 0x100000001B3ul;
    return c;
}

/* Once per (device, queue, kind): the used length the device reported is
 * not what it wrote (2.7.8: len = bytes written into device-writable
 * buffers). */
static void used_len_error(struct vq *q, const char *op, u64 want, u64 got)
{
    static u32 reported;
    if (reported >= 4)
        return;
    reported++;
    struct line l;
    l_init(&l, "GUEST-ERROR what=virtio-used-len");
    l_kv(&l, "cpu", q->dev->cpu);
    l_ks(&l, "dev", q->dev->name);
    l_kv(&l, "slot", q->dev->slot);
    l_kv(&l, "queue", q->index);
    l_ks(&l, "op", op);
    l_kv(&l, "want", want);
    l_kv(&l, "got", got);
    l_emit(&l, q->dev->cpu);
}

static __attribute__((noreturn)) void no_device(u32 cpu, const char *type, u64 index, u64 slot)
{
    struct line l;
    l_init(&l, "GUEST-ERROR what=virtio-no-device");
    l_kv(&l, "cpu", cpu);
    l_ks(&l, "type", type);
    if (slot == VSLOT_ANY)
        l_kv(&l, "index", index);
    else
        l_kv(&l, "slot", slot);
    l_kv(&l, "devices", virtio_nslots);
    l_emit(&l, cpu);
    halt_forever();
}

/* ===================================================================== disk */

#define BLK_T_IN        0
#define BLK_T_OUT       1
#define BLK_T_FLUSH     4
#define BLK_T_GET_ID    8
#define BLK_S_OK        0

#define DISK_MAGIC      0x4B53494453415453ul    /* "STASDISK" */
#define DISK_BLOCK      4096
#define DISK_WORDS      (DISK_BLOCK / 8)
#define DISK_BATCH      8

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
    u8 status;
    u8 pad[15];
} __attribute__((aligned(32)));

static struct vdev disk_dev;
static struct blk_req disk_req[DISK_BATCH];
static u64 disk_buf[DISK_BATCH][DISK_WORDS] __attribute__((aligned(4096)));
static u8 disk_id[32] __attribute__((aligned(32)));
static u32 disk_len[DISK_BATCH];

static u64 block_checksum(const u64 *w)
{
    u64 c = 0xCBF29CE484222325ul;
    for (u32 i = 4; i < DISK_WORDS; i++)
        c = (c ^ w[i]) * 0x100000001B3ul;
    return c;
}

/* Header {magic, pass, block, checksum of words 4..511}, then 508
 * splitmix64 words derived from (block, pass). */
static void stamp_block(u64 *w, u64 block, u64 pass)
{
    u64 st = (block * 0x9E3779B97F4A7C15ul) ^ (pass * 0xD1B54A32D192ED03ul) ^ DISK_MAGIC;
    for (u32 i = 4; i < DISK_WORDS; i++)
        w[i] = splitmix64(&st);
    w[0] = DISK_MAGIC;
    w[1] = pass;
    w[2] = block;
    w[3] = block_checksum(w);
}

static const char *check_block(const u64 *w, u64 block, u64 pass)
{
    if (w[0] != DISK_MAGIC)
        return "magic";
    if (w[2] != block)
        return "block";
    if (w[1] != pass)
        return "pass";
    if (block_checksum(w) != w[3])
        return "checksum";
    return 0;
}

/*
 * Submits `count` requests of `type` for blocks first.. (4 KiB each, data in
 * disk_buf[0..count)), kicks once, waits for all of them (any completion
 * order). Each request is header (device-readable) + data (device-writable
 * for IN) + status byte (device-writable). Statuses stay in disk_req[].
 */
static void disk_batch(u32 type, u64 first, u32 count)
{
    struct vq *q = &disk_dev.vq[0];
    for (u32 k = 0; k < count; k++) {
        struct blk_req *r = &disk_req[k];
        struct vbuf b[3];
        u32 n = 0;
        r->type = type;
        r->reserved = 0;
        r->sector = (type == BLK_T_IN || type == BLK_T_OUT) ? (first + k) * (DISK_BLOCK / 512) : 0;
        r->status = 0xFF;
        disk_len[k] = 0;
        b[n++] = (struct vbuf){ (u64)r, 16, 0 };
        if (type == BLK_T_IN || type == BLK_T_OUT)
            b[n++] = (struct vbuf){ (u64)disk_buf[k], DISK_BLOCK, type == BLK_T_IN };
        else if (type == BLK_T_GET_ID)
            b[n++] = (struct vbuf){ (u64)disk_id, 20, 1 };
        b[n++] = (struct vbuf){ (u64)&r->status, 1, 1 };
        if (vq_add(q, b, n, k) < 0) {
            guest_error(disk_dev.cpu, "virtio-queue-full");
            halt_forever();
        }
    }
    vq_kick(q);
    const char *op = type == BLK_T_IN ? "blk-read" : type == BLK_T_OUT ? "blk-write" :
                     type == BLK_T_FLUSH ? "blk-flush" : "blk-get-id";
    for (u32 k = 0; k < count; k++) {
        u32 head, len;
        u64 cookie;
        vq_wait(q, &head, &len, &cookie, op);
        if (cookie < DISK_BATCH)
            disk_len[cookie] = len;
    }
    vbarrier();
    for (u32 k = 0; k < count; k++) {
        u32 want = type == BLK_T_IN ? DISK_BLOCK + 1 : 1;
        if (type == BLK_T_GET_ID) {
            if (disk_len[k] < 1 || disk_len[k] > 21)
                used_len_error(q, op, 21, disk_len[k]);
        } else if (disk_req[k].status == BLK_S_OK && disk_len[k] != want) {
            used_len_error(q, op, want, disk_len[k]);
        }
    }
}

static void disk_bad(u32 cpu, u64 index, u64 block, u64 want, u64 found, const char *why)
{
    struct line l;
    l_init(&l, "DISK-BAD");
    l_kv(&l, "index", index);
    l_kv(&l, "block", block);
    l_kv(&l, "want_pass", want);
    l_kv(&l, "found_pass", found);
    l_ks(&l, "reason", why);
    l_emit(&l, cpu);
}

static void disk_io_error(u32 cpu, u64 index, const char *op, u64 block, u32 status)
{
    struct line l;
    l_init(&l, "GUEST-ERROR what=disk-io-error");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "index", index);
    l_ks(&l, "op", op);
    l_kv(&l, "block", block);
    l_kv(&l, "status", status);
    l_emit(&l, cpu);
}

/* Read-only check of what is on the disk: block `start` tells the pass P;
 * every block must hold P's stamp, or P-1's (a pass that was interrupted,
 * e.g. by a snapshot, rewrites the region in order). Then halt. */
/* Reads blocks first..first+k-1 and checks that each holds the stamp of
 * `pass` (or, with accept_older, of pass-1: a pass cut short leaves both,
 * counted in *older). Reports the first bad block of the pass (while *bad is
 * still 0) and counts bad ones in *bad. Returns the number of blocks read. */
static u64 read_and_check(u32 cpu, u64 index, u64 first, u32 k, u64 pass, int accept_older,
                          u64 *bad, u64 *older)
{
    disk_batch(BLK_T_IN, first, k);
    for (u32 j = 0; j < k; j++) {
        u64 blk = first + j;
        const char *why;
        if (disk_req[j].status != BLK_S_OK) {
            disk_io_error(cpu, index, "read", blk, disk_req[j].status);
            why = "io";
        } else {
            why = check_block(disk_buf[j], blk, pass);
            if (why && accept_older && pass > 1 && !check_block(disk_buf[j], blk, pass - 1)) {
                (*older)++;
                why = 0;
            }
        }
        if (why) {
            if (!*bad)
                disk_bad(cpu, index, blk, pass, disk_buf[j][1], why);
            (*bad)++;
        }
    }
    return k;
}

static __attribute__((noreturn)) void disk_verify(u32 cpu, u64 index, u64 start, u64 n)
{
    struct line l;
    u64 pass = 0, verified = 0, bad = 0, older = 0;
    disk_batch(BLK_T_IN, start, 1);
    if (disk_req[0].status != BLK_S_OK) {
        disk_io_error(cpu, index, "read", start, disk_req[0].status);
        bad++;
        verified++;
        disk_bad(cpu, index, start, 0, 0, "io");
    } else if (disk_buf[0][0] != DISK_MAGIC) {
        bad++;
        verified++;
        disk_bad(cpu, index, start, 0, 0, "magic");
    } else {
        pass = disk_buf[0][1];
    }
    for (u64 b = 0; pass && b < n; b += DISK_BATCH) {
        u32 k = (u32)(n - b < DISK_BATCH ? n - b : DISK_BATCH);
        verified += read_and_check(cpu, index, start + b, k, pass, 1, &bad, &older);
    }
    l_init(&l, "DISK");
    l_kv(&l, "index", index);
    l_kv(&l, "pass", pass);
    l_kv(&l, "written", 0);
    l_kv(&l, "verified", verified);
    l_kv(&l, "bad", bad);
    l_kv(&l, "total_bad", bad);
    l_kv(&l, "older", older);
    l_ks(&l, "mode", "verify");
    l_emit(&l, cpu);
    halt_forever();
}

void disk_workload(u32 cpu)
{
    struct line l;
    u32 index;
    int slot = virtio_find(VIRTIO_ID_BLK, cfg.disk_index, cfg.disk_slot, &index);
    if (slot < 0)
        no_device(cpu, "blk", cfg.disk_index, cfg.disk_slot);
    if (virtio_init(&disk_dev, (u32)slot,
                    VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE, 1, cpu))
        halt_forever();
    u64 capacity;
    u32 blk_size = 512;
    virtio_config_read(&disk_dev, 0, &capacity, 8, 4);
    if (disk_dev.features & VIRTIO_BLK_F_BLK_SIZE)
        virtio_config_read(&disk_dev, 20, &blk_size, 4, 4);
    int ro = (disk_dev.features & VIRTIO_BLK_F_RO) != 0;
    int flush = (disk_dev.features & VIRTIO_BLK_F_FLUSH) != 0;

    /* Device ID string (up to 20 bytes, NUL-terminated if shorter). */
    memset(disk_id, 0, sizeof(disk_id));
    disk_batch(BLK_T_GET_ID, 0, 1);
    char id[24];
    u32 idn = 0;
    if (disk_req[0].status == BLK_S_OK)
        for (; idn < 20 && disk_id[idn]; idn++)
            id[idn] = (disk_id[idn] > 0x20 && disk_id[idn] < 0x7F && disk_id[idn] != '"') ?
                      (char)disk_id[idn] : '_';
    if (!idn)
        id[idn++] = '-';
    id[idn] = 0;

    u64 cap_blocks = capacity / (DISK_BLOCK / 512), start = cfg.disk_start, n = cfg.disk_blocks;
    int clamped = 0;
    if (start >= cap_blocks)
        n = 0;
    else if (n > cap_blocks - start)
        n = cap_blocks - start, clamped = 1;
    int verify = ro || cfg.disk_verify_only;

    l_init(&l, "DISK-CONFIG");
    l_kv(&l, "index", index);
    l_kv(&l, "capacity_sectors", capacity);
    l_kv(&l, "ro", (u64)ro);
    l_kv(&l, "flush", (u64)flush);
    l_ks(&l, "id", id);
    l_kv(&l, "id_status", disk_req[0].status);
    l_kv(&l, "slot", (u64)slot);
    l_kv(&l, "blk_size", blk_size);
    l_kv(&l, "start", start);
    l_kv(&l, "blocks", n);
    l_kv(&l, "clamped", (u64)clamped);
    l_ks(&l, "mode", verify ? "verify" : "write");
    l_emit(&l, cpu);
    if (n == 0) {
        l_init(&l, "GUEST-ERROR what=disk-no-blocks");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "index", index);
        l_kv(&l, "start", start);
        l_kv(&l, "capacity_blocks", cap_blocks);
        l_emit(&l, cpu);
        halt_forever();
    }
    if (ro) {
        l_init(&l, "DISK-RO");
        l_kv(&l, "index", index);
        l_kv(&l, "slot", (u64)slot);
        l_kv(&l, "capacity_sectors", capacity);
        l_ks(&l, "action", "verify-only");
        l_emit(&l, cpu);
    }
    if (verify)
        disk_verify(cpu, index, start, n);

    u64 total_bad = 0;
    for (u64 pass = 1;; pass++) {
        u64 written = 0, verified = 0, bad = 0, t0 = rdtsc();
        for (u64 b = 0; b < n; b += DISK_BATCH) {
            u32 k = (u32)(n - b < DISK_BATCH ? n - b : DISK_BATCH);
            if (pass > 1)
                verified += read_and_check(cpu, index, start + b, k, pass - 1, 0, &bad, 0);
            for (u32 j = 0; j < k; j++)
                stamp_block(disk_buf[j], start + b + j, pass);
            disk_batch(BLK_T_OUT, start + b, k);
            for (u32 j = 0; j < k; j++) {
                if (disk_req[j].status == BLK_S_OK) {
                    written++;
                } else {
                    disk_io_error(cpu, index, "write", start + b + j, disk_req[j].status);
                    if (!bad)
                        disk_bad(cpu, index, start + b + j, pass, pass, "write-io");
                    bad++;
                }
            }
        }
        if (flush) {
            disk_batch(BLK_T_FLUSH, 0, 1);
            if (disk_req[0].status != BLK_S_OK)
                disk_io_error(cpu, index, "flush", 0, disk_req[0].status);
        }
        total_bad += bad;
        l_init(&l, "DISK");
        l_kv(&l, "index", index);
        l_kv(&l, "pass", pass);
        l_kv(&l, "written", written);
        l_kv(&l, "verified", verified);
        l_kv(&l, "bad", bad);
        l_kv(&l, "total_bad", total_bad);
        l_emit(&l, cpu);
        while (rdtsc() - t0 < ms_ticks(cfg.disk_pass_ms))
            cpu_relax();
    }
}

/* ================================================================ diskbench */

/*
 * Throughput benchmark: keeps `bench_qd` requests in flight over the whole
 * capacity for `bench_ms` after a warm-up, prints one DISKBENCH line, halts. Data buffers come from usable RAM above the image (as for `memory`),
 * so the image does not grow by qd x 1 MiB of .bss.
 */
#define BENCH_WARMUP_MS 200
#define BENCH_SLOTS     (VQ_MAX / 3)    /* header + >= 1 data + status */
#define BENCH_SEQ_REQ   (1ul << 20)
#define BENCH_RND_REQ   4096ul
#define BENCH_PATTERN   0x484342534154535Aul    /* "ZSTASBCH", non-zero bytes */

static struct blk_req bench_req[BENCH_SLOTS];

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static __attribute__((noreturn)) void bench_fail(u32 cpu, const char *what, const char *k, u64 v)
{
    struct line l;
    l_init(&l, "GUEST-ERROR what=");
    l_str(&l, what);
    l_kv(&l, "cpu", cpu);
    l_kv(&l, k, v);
    l_emit(&l, cpu);
    halt_forever();
}

void diskbench_workload(u32 cpu)
{
    struct line l;
    u32 index;
    const char *mode = cfg.bench_mode;
    int wr = streq(mode, "randwrite4k") || streq(mode, "seqwrite1m");
    int seq = streq(mode, "seqread1m") || streq(mode, "seqwrite1m");
    if (!seq && !wr && !streq(mode, "randread4k")) {
        l_init(&l, "GUEST-ERROR what=diskbench-bad-mode");
        l_kv(&l, "cpu", cpu);
        l_ks(&l, "mode", mode);
        l_emit(&l, cpu);
        halt_forever();
    }
    int slot = virtio_find(VIRTIO_ID_BLK, cfg.disk_index, cfg.disk_slot, &index);
    if (slot < 0)
        no_device(cpu, "blk", cfg.disk_index, cfg.disk_slot);
    if (virtio_init(&disk_dev, (u32)slot, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_SIZE_MAX |
                    VIRTIO_BLK_F_SEG_MAX, 1, cpu))
        halt_forever();
    struct vq *q = &disk_dev.vq[0];
    u64 capacity;
    u32 size_max = 0, seg_max = 0;
    virtio_config_read(&disk_dev, 0, &capacity, 8, 4);
    if (disk_dev.features & VIRTIO_BLK_F_SIZE_MAX)
        virtio_config_read(&disk_dev, 8, &size_max, 4, 4);
    if (disk_dev.features & VIRTIO_BLK_F_SEG_MAX)
        virtio_config_read(&disk_dev, 12, &seg_max, 4, 4);
    if (wr && (disk_dev.features & VIRTIO_BLK_F_RO))
        bench_fail(cpu, "diskbench-read-only", "index", index);

    /* Request size and its split into data descriptors: each at most
     * size_max (if offered, rounded down to 4 KiB; else 1 MiB), at most
     * seg_max of them (if offered) and header + data + status within the
     * queue. What does not fit shrinks the request (req_bytes shows it). */
    u64 cap_bytes = capacity * 512;
    u64 req = seq ? BENCH_SEQ_REQ : BENCH_RND_REQ;
    u64 seg = BENCH_SEQ_REQ;
    if (size_max) {
        seg = size_max & ~4095ul;
        if (!seg)
            seg = 4096;     /* size_max < 4 KiB: not supported, try anyway */
        if (seg > BENCH_SEQ_REQ)
            seg = BENCH_SEQ_REQ;
    }
    if (q->num < 3)
        bench_fail(cpu, "diskbench-queue-too-small", "queue_size", q->num);
    u64 max_segs = q->num - 2u;
    if (seg_max && seg_max < max_segs)
        max_segs = seg_max;
    if (req > max_segs * seg)
        req = max_segs * seg;
    if (req > (cap_bytes & ~4095ul))
        req = cap_bytes & ~4095ul;
    if (req == 0)
        bench_fail(cpu, "disk-no-blocks", "capacity_sectors", capacity);
    u32 segs = (u32)((req + seg - 1) / seg);

    /* Queue depth: what the queue allows, then what the buffer RAM allows
     * (the largest usable range above the image). */
    u64 qd_max = q->num / (segs + 2u);
    if (qd_max > BENCH_SLOTS)
        qd_max = BENCH_SLOTS;
    u64 pool = 0, pool_bytes = 0;
    for (u32 i = 0; i < cfg.nranges; i++)
        if (cfg.range_pages[i] * 4096 > pool_bytes) {
            pool = cfg.range_start[i];
            pool_bytes = cfg.range_pages[i] * 4096;
        }
    if (pool_bytes / req < qd_max)
        qd_max = pool_bytes / req;
    if (qd_max == 0)
        bench_fail(cpu, "diskbench-no-buffer-memory", "available_bytes", pool_bytes);
    u64 qd = cfg.bench_qd ? cfg.bench_qd : 1;
    int clamped = 0;
    if (qd > qd_max)
        qd = qd_max, clamped = 1;
    u8 *buf = (u8 *)phys(pool);
    if (wr)
        for (u64 i = 0; i < qd * req; i += 8)
            put64(buf + i, BENCH_PATTERN);

    l_init(&l, "DISKBENCH-CONFIG");
    l_kv(&l, "index", index);
    l_kv(&l, "slot", (u64)slot);
    l_ks(&l, "mode", mode);
    l_kv(&l, "capacity_sectors", capacity);
    l_kv(&l, "req_bytes", req);
    l_kv(&l, "segs", segs);
    l_kv(&l, "size_max", size_max);
    l_kv(&l, "seg_max", seg_max);
    l_kv(&l, "qd", qd);
    l_kv(&l, "qd_max", qd_max);
    l_kv(&l, "clamped", (u64)clamped);
    l_kv(&l, "bench_ms", cfg.bench_ms);
    l_kv(&l, "warmup_ms", BENCH_WARMUP_MS);
    l_emit(&l, cpu);

    u64 nblocks = cap_bytes / BENCH_RND_REQ;    /* random: 4 KiB slots */
    u64 rng = 0x2545F4914F6CDD1Dul;             /* xorshift64, fixed seed */
    u64 seq_off = 0;
    u64 ops = 0, bytes = 0, errors = 0, in_flight = 0;
    u8 busy[BENCH_SLOTS] = { 0 };
    u64 t_start = rdtsc() + ms_ticks(BENCH_WARMUP_MS);
    u64 t_end = t_start + ms_ticks(cfg.bench_ms), now = rdtsc();
    u64 last_progress = active_tsc();
    int timeout_reported = 0;
    const char *op = wr ? "blk-write" : "blk-read";
    while (now < t_end || in_flight) {
        /* Refill (not after the end: then only drain). */
        int added = 0;
        for (u32 k = 0; k < qd && now < t_end; k++) {
            if (busy[k])
                continue;
            u64 off;
            if (seq) {
                if (seq_off + req > cap_bytes)
                    seq_off = 0;
                off = seq_off;
                seq_off += req;
            } else {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                off = (rng % nblocks) * BENCH_RND_REQ;
            }
            struct blk_req *r = &bench_req[k];
            struct vbuf b[VQ_MAX];
            u32 n = 0;
            r->type = wr ? BLK_T_OUT : BLK_T_IN;
            r->reserved = 0;
            r->sector = off / 512;
            r->status = 0xFF;
            b[n++] = (struct vbuf){ (u64)r, 16, 0 };
            for (u64 o = 0; o < req; o += seg)
                b[n++] = (struct vbuf){ (u64)(buf + k * req + o),
                                        (u32)(req - o < seg ? req - o : seg), !wr };
            b[n++] = (struct vbuf){ (u64)&r->status, 1, 1 };
            if (vq_add(q, b, n, k) < 0) {
                guest_error(cpu, "virtio-queue-full");
                halt_forever();
            }
            busy[k] = 1;
            in_flight++;
            added = 1;
        }
        if (added)
            vq_kick(q);

        u32 head, len;
        u64 cookie;
        int got = 0;
        while (vq_get_used(q, &head, &len, &cookie)) {
            got = 1;
            if (cookie >= BENCH_SLOTS || !busy[cookie])
                continue;
            vbarrier();
            u32 k = (u32)cookie, want = wr ? 1 : (u32)req + 1;
            busy[k] = 0;
            in_flight--;
            now = rdtsc();
            if (now < t_start || now >= t_end)
                continue;       /* warm-up or drain: not counted */
            if (bench_req[k].status != BLK_S_OK) {
                if (!errors)
                    disk_io_error(cpu, index, wr ? "write" : "read",
                                  bench_req[k].sector / 8, bench_req[k].status);
                errors++;
            } else if (len != want) {
                used_len_error(q, op, want, len);
                errors++;
            } else {
                ops++;
                bytes += req;
            }
        }
        u64 at = active_tsc();
        if (got || !in_flight)
            last_progress = at;
        else if (!timeout_reported && at - last_progress >= virtio_timeout_ticks()) {
            virtio_timeout_error(q, op, at - last_progress);
            timeout_reported = 1;
        }
        now = rdtsc();
    }

    u64 ticks = t_end - t_start;    /* completions counted in [t_start, t_end) */
    u64 ms = ticks / cfg.tsc_khz;
    l_init(&l, "DISKBENCH");
    l_ks(&l, "mode", mode);
    l_kv(&l, "qd", qd);
    l_kv(&l, "ops", ops);
    l_kv(&l, "bytes", bytes);
    l_kv(&l, "ms", ms);
    l_kv(&l, "iops", ticks ? ops * 1000 * cfg.tsc_khz / ticks : 0);
    l_kv(&l, "mb_s_x100", ticks ? bytes * cfg.tsc_khz / (ticks * 10) : 0);
    l_kv(&l, "errors", errors);
    l_emit(&l, cpu);
    halt_forever();
}

/* ====================================================================== net */

#define NET_HDR         12              /* struct virtio_net_hdr_v1 */
#define NET_BUF         2048
#define NET_RX_BUFS     16
#define NET_TX_BUFS     8
#define NET_ETHERTYPE   0x88B5
#define NET_FRAME       60              /* minimum Ethernet frame, no FCS */
#define NET_PAYLOAD     32              /* magic, mac, pad, seq, checksum */

static struct vdev net_dev;
static u8 net_rx[NET_RX_BUFS][NET_BUF] __attribute__((aligned(4096)));
static u8 net_tx[NET_TX_BUFS][NET_BUF] __attribute__((aligned(4096)));

static void l_mac(struct line *l, const u8 *mac)
{
    static const char digits[] = "0123456789abcdef";
    for (u32 i = 0; i < 6; i++) {
        if (i)
            l_chr(l, ':');
        l_chr(l, digits[mac[i] >> 4]);
        l_chr(l, digits[mac[i] & 0xF]);
    }
}

static void net_post_rx(struct vq *rx, u32 i)
{
    struct vbuf b = { (u64)net_rx[i], NET_BUF, 1 };
    if (vq_add(rx, &b, 1, i) < 0)
        guest_error(net_dev.cpu, "virtio-queue-full");
}

void net_workload(u32 cpu)
{
    struct line l;
    u32 index;
    int slot = virtio_find(VIRTIO_ID_NET, cfg.net_index, cfg.net_slot, &index);
    if (slot < 0)
        no_device(cpu, "net", cfg.net_index, cfg.net_slot);
    if (virtio_init(&net_dev, (u32)slot, VIRTIO_NET_F_MAC, 2, cpu))
        halt_forever();
    struct vq *rx = &net_dev.vq[0], *tx = &net_dev.vq[1];
    u8 mac[6];
    const char *mac_src = "config";
    if (net_dev.features & VIRTIO_NET_F_MAC) {
        virtio_config_read(&net_dev, 0, mac, 6, 1);
    } else {
        u64 r = mix64(rdtsc());
        mac[0] = 0x02;          /* locally administered, unicast */
        mac[1] = 0x53;
        mac[2] = 0x54;
        mac[3] = (u8)r;
        mac[4] = (u8)(r >> 8);
        mac[5] = (u8)(r >> 16);
        mac_src = "generated";
    }
    u32 nrx = rx->num < NET_RX_BUFS ? rx->num : NET_RX_BUFS;
    u32 ntx = tx->num < NET_TX_BUFS ? tx->num : NET_TX_BUFS;
    for (u32 i = 0; i < nrx; i++)
        net_post_rx(rx, i);
    vq_kick(rx);

    l_init(&l, "NET-CONFIG");
    l_kv(&l, "index", index);
    l_kv(&l, "slot", (u64)slot);
    l_str(&l, " mac=");
    l_mac(&l, mac);
    l_ks(&l, "mac_src", mac_src);
    l_kv(&l, "rx_bufs", nrx);
    l_kv(&l, "tx_bufs", ntx);
    l_kv(&l, "net_ms", cfg.net_ms);
    l_emit(&l, cpu);

    u64 tx_busy[NET_TX_BUFS] = { 0 };   /* submit time (active_tsc) + 1 */
    u64 sent = 0, tx_done = 0, received = 0, replies = 0, bad = 0, last_reply_seq = 0;
    u64 tx_full = 0, bad_printed = 0, nbuf_warned = 0, timeout_reported = 0;
    u64 period = ms_ticks(cfg.net_ms ? cfg.net_ms : 1), report = ms_ticks(cfg.report_ms);
    u64 now = rdtsc(), next_send = now, next_report = now + report;
    for (;;) {
        u32 head, len;
        u64 cookie;
        int kick_rx = 0;
        while (vq_get_used(rx, &head, &len, &cookie)) {
            u32 i = (u32)cookie;
            kick_rx = 1;
            if (len < NET_HDR + 14 || len > NET_BUF) {
                used_len_error(rx, "net-rx", NET_HDR + 60, len);
                net_post_rx(rx, i);
                continue;
            }
            const u8 *h = net_rx[i];
            u16 num_buffers = (u16)(h[10] | (h[11] << 8));
            if (num_buffers != 1 && !nbuf_warned) {
                nbuf_warned = 1;
                l_init(&l, "GUEST-ERROR what=virtio-net-num-buffers");
                l_kv(&l, "cpu", cpu);
                l_kv(&l, "value", num_buffers);
                l_emit(&l, cpu);
            }
            const u8 *f = h + NET_HDR, *p = f + 14;
            u32 flen = len - NET_HDR;
            received++;
            if (flen >= 14 + NET_PAYLOAD && f[12] == (NET_ETHERTYPE >> 8) &&
                f[13] == (NET_ETHERTYPE & 0xFF) && !memcmp(p, "STASISRP", 8)) {
                u64 seq = get64(p + 16);
                const char *why = 0;
                if (fnv1a(p, 24) != get64(p + 24))
                    why = "checksum";
                else if (memcmp(p + 8, mac, 6))
                    why = "mac";
                else if (seq == 0 || seq > sent)
                    why = "seq";
                if (why) {
                    bad++;
                    if (bad_printed < 4) {
                        bad_printed++;
                        l_init(&l, "NET-BAD");
                        l_ks(&l, "reason", why);
                        l_kv(&l, "seq", seq);
                        l_kv(&l, "sent", sent);
                        l_kv(&l, "len", flen);
                        l_emit(&l, cpu);
                    }
                } else {
                    replies++;
                    last_reply_seq = seq;
                }
            }
            net_post_rx(rx, i);
        }
        if (kick_rx)
            vq_kick(rx);

        while (vq_get_used(tx, &head, &len, &cookie)) {
            if (cookie < NET_TX_BUFS)
                tx_busy[cookie] = 0;
            if (len != 0)
                used_len_error(tx, "net-tx", 0, len);
            tx_done++;
        }
        u64 at = active_tsc();
        for (u32 i = 0; i < ntx && !timeout_reported; i++)
            if (tx_busy[i] && at - (tx_busy[i] - 1) >= virtio_timeout_ticks()) {
                virtio_timeout_error(tx, "net-tx", at - (tx_busy[i] - 1));
                timeout_reported = 1;
            }

        now = rdtsc();
        if (now >= next_send) {
            u32 i = 0;
            while (i < ntx && tx_busy[i])
                i++;
            if (i < ntx) {
                u8 *b = net_tx[i], *f = b + NET_HDR, *p = f + 14;
                memset(b, 0, NET_HDR + NET_FRAME);      /* zero virtio_net_hdr_v1 */
                memset(f, 0xFF, 6);                     /* broadcast */
                memcpy(f + 6, mac, 6);
                f[12] = NET_ETHERTYPE >> 8;
                f[13] = NET_ETHERTYPE & 0xFF;
                memcpy(p, "STASISNT", 8);
                memcpy(p + 8, mac, 6);
                put64(p + 16, sent + 1);
                put64(p + 24, fnv1a(p, 24));
                struct vbuf vb = { (u64)b, NET_HDR + NET_FRAME, 0 };
                if (vq_add(tx, &vb, 1, i) >= 0) {
                    tx_busy[i] = active_tsc() + 1;
                    sent++;
                    vq_kick(tx);
                } else {
                    tx_full++;
                }
            } else {
                tx_full++;
            }
            next_send += period;
            if (now >= next_send)
                next_send = now + period;
        }
        if (now >= next_report) {
            l_init(&l, "NET");
            l_str(&l, " mac=");
            l_mac(&l, mac);
            l_kv(&l, "sent", sent);
            l_kv(&l, "received", received);
            l_kv(&l, "replies", replies);
            l_kv(&l, "bad", bad);
            l_kv(&l, "last_reply_seq", last_reply_seq);
            l_kv(&l, "tx_done", tx_done);
            l_kv(&l, "tx_full", tx_full);
            l_emit(&l, cpu);
            next_report += report;
            if (now >= next_report)
                next_report = now + report;
        }
        cpu_relax();
    }
}

/* ====================================================================== rng */

#define RNG_MAX 4096

static struct vdev rng_dev;
static u8 rng_buf[RNG_MAX] __attribute__((aligned(4096)));

void rng_workload(u32 cpu)
{
    struct line l;
    u32 index;
    int slot = virtio_find(VIRTIO_ID_RNG, cfg.rng_index, cfg.rng_slot, &index);
    if (slot < 0)
        no_device(cpu, "rng", cfg.rng_index, cfg.rng_slot);
    if (virtio_init(&rng_dev, (u32)slot, 0, 1, cpu))
        halt_forever();
    struct vq *q = &rng_dev.vq[0];
    u32 want = (u32)(cfg.rng_bytes == 0 ? 1 : cfg.rng_bytes > RNG_MAX ? RNG_MAX : cfg.rng_bytes);

    l_init(&l, "RNG-CONFIG");
    l_kv(&l, "index", index);
    l_kv(&l, "slot", (u64)slot);
    l_kv(&l, "bytes", want);
    l_kv(&l, "rng_ms", cfg.rng_ms);
    l_emit(&l, cpu);

    static u8 seen[256];
    u8 last[8] = { 0 };
    u32 last_n = 0;
    u64 requests = 0, bytes = 0;
    u64 period = ms_ticks(cfg.rng_ms), report = ms_ticks(cfg.report_ms);
    u64 now = rdtsc(), next_req = now, next_report = now + report;
    for (;;) {
        memset(rng_buf, 0, want);
        struct vbuf b = { (u64)rng_buf, want, 1 };
        u32 head, len;
        u64 cookie;
        vq_add(q, &b, 1, 0);
        vq_kick(q);
        vq_wait(q, &head, &len, &cookie, "rng");
        vbarrier();
        if (len == 0 || len > want)
            used_len_error(q, "rng", want, len);
        if (len > want)
            len = want;
        requests++;
        bytes += len;
        for (u32 i = 0; i < len; i++)
            seen[rng_buf[i]] = 1;
        if (len) {
            last_n = len < 8 ? len : 8;
            memcpy(last, rng_buf, last_n);
        }
        now = rdtsc();
        if (now >= next_report) {
            static const char digits[] = "0123456789abcdef";
            u32 distinct = 0;
            for (u32 i = 0; i < 256; i++)
                distinct += seen[i];
            l_init(&l, "RNG");
            l_kv(&l, "requests", requests);
            l_kv(&l, "bytes", bytes);
            l_str(&l, " last_hex=");
            for (u32 i = 0; i < last_n; i++) {
                l_chr(&l, digits[last[i] >> 4]);
                l_chr(&l, digits[last[i] & 0xF]);
            }
            if (!last_n)
                l_chr(&l, '0');
            l_kv(&l, "distinct", distinct);
            l_emit(&l, cpu);
            next_report += report;
            if (now >= next_report)
                next_report = now + report;
        }
        if (period) {
            next_req += period;
            if (now >= next_req)
                next_req = now;
            while (rdtsc() < next_req)
                cpu_relax();
        }
    }
}
