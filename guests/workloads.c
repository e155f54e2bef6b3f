/* Ring-3 workloads: heartbeat, memory, registers, timer, action (the virtio
 * ones, disk/diskbench/net/rng, are in virtio_workloads.c). */
#include "guest.h"
#include "virtio.h"

static u64 ms_ticks(u64 ms)
{
    return ms * cfg.tsc_khz;
}

/* ------------------------------------------------------- VM generation ID */

/* stasis puts the 16-byte VM generation ID at this reserved address (the
 * DSDT's VGEN device says so too) and a u64 restore counter after it. */
#define VMGENID_ADDR 0x9F000ul

static u8 genid_seen[24];
static int genid_printed;

/* Prints `GENID cpu= generation= id_hex=` when the ID changes (and once at
 * start): a restored clone sees a new ID and a higher generation. */
static void genid_check(u32 cpu)
{
    static const char digits[] = "0123456789abcdef";
    const volatile u8 *g = (const volatile u8 *)VMGENID_ADDR;
    int changed = !genid_printed;
    for (int i = 0; i < 24; i++) {
        u8 b = g[i];
        if (b != genid_seen[i])
            changed = 1;
        genid_seen[i] = b;
    }
    if (!changed)
        return;
    genid_printed = 1;
    u64 generation = 0;
    for (int i = 7; i >= 0; i--)
        generation = (generation << 8) | genid_seen[16 + i];
    struct line l;
    l_init(&l, "GENID");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "generation", generation);
    l_str(&l, " id_hex=");
    for (int i = 0; i < 16; i++) {
        l_chr(&l, digits[genid_seen[i] >> 4]);
        l_chr(&l, digits[genid_seen[i] & 0xF]);
    }
    l_emit(&l, cpu);
}

/* Routes IOAPIC pin `pin` to `vector` on the BSP: fixed delivery,
 * physical destination, edge triggered, active high, unmasked. */
static void ioapic_route(u32 pin, u32 vector)
{
    volatile u32 *sel = (volatile u32 *)0xFEC00000ul;
    volatile u32 *win = (volatile u32 *)0xFEC00010ul;
    *sel = 0x10 + 2 * pin + 1;
    *win = cfg.bsp << 24;
    *sel = 0x10 + 2 * pin;
    *win = vector;
}

/* Prints `GENID-NOTIFY count=` when the GED interrupt (the VMM's "your VM
 * generation ID changed") arrived since the last check. */
static void genid_notify_check(u32 cpu)
{
    static u64 seen;
    u64 n = irq_count_ged;
    if (n == seen)
        return;
    seen = n;
    struct line l;
    l_init(&l, "GENID-NOTIFY");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "count", n);
    l_emit(&l, cpu);
}

/* ---------------------------------------------------------------- heartbeat */

static __attribute__((noreturn)) void heartbeat(u32 cpu)
{
    u64 period = ms_ticks(cfg.hb_ms), next = rdtsc() + period, counter = 0, seq = 0;
    if (cpu == cfg.bsp)
        ioapic_route(GED_GSI, VEC_GED);
    for (;;) {
        counter++;
        if ((counter & 0x3FF) == 0) {
            u64 t = rdtsc();
            if (t >= next) {
                if (cpu == 0) {
                    genid_check(cpu);
                    genid_notify_check(cpu);
                }
                struct line l;
                l_init(&l, "HB");
                l_kv(&l, "cpu", cpu);
                l_kv(&l, "seq", ++seq);
                l_kv(&l, "counter", counter);
                l_kv(&l, "tsc", t);
                l_emit(&l, cpu);
                next += period;
                if (t >= next)          /* fell behind (e.g. paused): resync */
                    next = t + period;
            }
        }
    }
}

/* ------------------------------------------------------------------ memory */

#define MEM_MAGIC 0x53544153495350ul    /* "PSISATS" */
#define PAGE_WORDS 512

static u64 page_checksum(const volatile u64 *w)
{
    u64 c = 0xCBF29CE484222325ul;
    for (u32 i = 4; i < PAGE_WORDS; i++)
        c = (c ^ w[i]) * 0x100000001B3ul;
    return c;
}

/* mem_words=N: only the first N words after the header are random, the
 * rest zero (a page that compresses); 0 = all of them. The checksum
 * covers the zeros too. */
static void stamp_page(volatile u64 *w, u64 addr, u64 pass)
{
    u64 st = addr ^ (pass * 0xD1B54A32D192ED03ul);
    u64 c = 0xCBF29CE484222325ul;
    u64 random_end = cfg.mem_words ? 4 + cfg.mem_words : PAGE_WORDS;
    for (u32 i = 4; i < PAGE_WORDS; i++) {
        u64 v = i < random_end ? splitmix64(&st) : 0;
        w[i] = v;
        c = (c ^ v) * 0x100000001B3ul;
    }
    w[0] = MEM_MAGIC;
    w[1] = pass;
    w[2] = addr;
    w[3] = c;
}

/* 0 = good, else reason string */
static const char *check_page(const volatile u64 *w, u64 addr, u64 pass)
{
    if (w[0] != MEM_MAGIC)
        return "magic";
    if (w[2] != addr)
        return "addr";
    if (w[1] != pass)
        return "pass";
    if (page_checksum(w) != w[3])
        return "checksum";
    return 0;
}

static __attribute__((noreturn)) void memory(u32 cpu)
{
    struct line l;
    u64 avail = 0;
    for (u32 i = 0; i < cfg.nranges; i++)
        avail += cfg.range_pages[i];
    u64 want = cfg.mem_mib << 8, total = want, clamped = 0;
    if (total > avail) {
        total = avail;
        clamped = 1;
    }
    u32 nshares = 1, share = 0;
    if (cfg.smp && cfg.ncpus > 1) {
        nshares = (u32)cfg.ncpus;
        for (u32 i = 0; i < cfg.ncpus; i++)
            if (cfg.apic_ids[i] == cpu)
                share = i;
    }
    u64 first = total * share / nshares, last = total * (share + 1) / nshares;
    u64 npages = last - first;

    /* locate the first page of this CPU's share */
    u32 r0 = 0;
    u64 off0 = first;
    while (r0 < cfg.nranges && off0 >= cfg.range_pages[r0]) {
        off0 -= cfg.range_pages[r0];
        r0++;
    }
    l_init(&l, "MEM-CONFIG");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "requested_mib", cfg.mem_mib);
    l_kv(&l, "available_mib", avail >> 8);
    l_kv(&l, "used_mib", total >> 8);
    l_kv(&l, "clamped", clamped);
    l_kv(&l, "pages", npages);
    l_kx(&l, "first_page_hex", r0 < cfg.nranges ? cfg.range_start[r0] + (off0 << 12) : 0);
    l_kv(&l, "ranges", cfg.nranges);
    l_kv(&l, "rate", cfg.mem_rate);
    l_emit(&l, cpu);
    if (clamped) {
        l_init(&l, "GUEST-ERROR what=mem-clamped");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "requested_mib", cfg.mem_mib);
        l_kv(&l, "available_mib", avail >> 8);
        l_emit(&l, cpu);
    }

    /* With mem_hot_mib, passes after the first rewrite only the first
     * (hot) pages of each CPU's share and only check the rest, which keep
     * their first stamp: memory that is written once and then read. */
    u64 nhot = npages;
    if (cfg.mem_hot_mib && total && (cfg.mem_hot_mib << 8) < total)
        nhot = npages * (cfg.mem_hot_mib << 8) / total;
    u64 report = ms_ticks(cfg.report_ms);
    u64 per_page = cfg.mem_rate ? cfg.tsc_khz * 1000 / cfg.mem_rate : 0;
    u64 total_bad = 0;
    for (u64 pass = 1;; pass++) {
        u64 verified = 0, bad = 0, done = 0;
        u64 t0 = rdtsc(), last_report = t0;
        u32 r = r0;
        u64 off = off0;
        while (done < npages && r < cfg.nranges) {
            u64 addr = cfg.range_start[r] + (off << 12);
            volatile u64 *w = phys(addr);
            int cold = pass > 1 && done >= nhot;
            if (pass > 1) {
                const char *why = check_page(w, addr, cold ? 1 : pass - 1);
                verified++;
                if (why) {
                    if (!bad) {
                        l_init(&l, "MEM-BAD");
                        l_kv(&l, "cpu", cpu);
                        l_kx(&l, "page_hex", addr);
                        l_kv(&l, "pass", pass);
                        l_kv(&l, "want", cold ? 1 : pass - 1);
                        l_kv(&l, "found_pass", w[1]);
                        l_ks(&l, "reason", why);
                        l_emit(&l, cpu);
                    }
                    bad++;
                }
            }
            if (!cold)
                stamp_page(w, addr, pass);
            done++;
            if (++off >= cfg.range_pages[r]) {
                off = 0;
                r++;
            }
            for (;;) {
                u64 t = rdtsc();
                if (t - last_report >= report && done < npages) {
                    l_init(&l, "MEM-PROGRESS");
                    l_kv(&l, "cpu", cpu);
                    l_kv(&l, "pass", pass);
                    l_kv(&l, "done", done);
                    l_emit(&l, cpu);
                    last_report = t;
                }
                /* mem_fill: the first pass writes at full speed (RAM
                 * filled), the later ones at mem_rate. */
                if (!per_page || (cfg.mem_fill && pass == 1) || t - t0 >= done * per_page)
                    break;
                cpu_relax();
            }
        }
        if (pass == cfg.mem_inject && npages) {
            /* negative control: corrupt the last page's body after stamping */
            u64 last_addr = 0, rem = npages - 1;
            for (u32 i = r0; i < cfg.nranges; i++) {
                u64 start = (i == r0) ? off0 : 0, n = cfg.range_pages[i] - start;
                if (rem < n) {
                    last_addr = cfg.range_start[i] + ((start + rem) << 12);
                    break;
                }
                rem -= n;
            }
            if (last_addr)
                ((volatile u64 *)phys(last_addr))[100] ^= 1;
        }
        total_bad += bad;
        l_init(&l, "MEM");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "pass", pass);
        l_kv(&l, "pages", done);
        l_kv(&l, "verified", verified);
        l_kv(&l, "bad", bad);
        l_kv(&l, "total_bad", total_bad);
        l_emit(&l, cpu);
        if (npages == 0) {
            guest_error(cpu, "mem-no-pages");
            halt_forever();
        }
    }
}

/* --------------------------------------------------------------- registers */

void regs_hold(const void *in, u64 *gpr_out, void *xsave_area, u64 spins, u64 flags, u64 xcr0);

static u8 ri_buf[MAX_CPUS][RI_SIZE] __attribute__((aligned(64)));
static u8 xs_buf[MAX_CPUS][4096] __attribute__((aligned(64)));
static u64 gpr_buf[MAX_CPUS][16];

static const char *const gpr_names[16] = {
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};

struct regs_ctx {
    u32 cpu;
    u64 round, checks, mismatches, round_mismatches;
};

static void mismatch(struct regs_ctx *c, const char *name, int idx, int part, u64 want, u64 got)
{
    c->mismatches++;
    if (++c->round_mismatches > 4)
        return;
    struct line l;
    l_init(&l, "REGS-MISMATCH");
    l_kv(&l, "cpu", c->cpu);
    l_kv(&l, "round", c->round);
    l_str(&l, " reg=");
    l_str(&l, name);
    if (idx >= 0)
        l_dec(&l, (u64)idx);
    if (part >= 0) {
        l_chr(&l, '.');
        l_str(&l, "q");
        l_dec(&l, (u64)part);
    }
    l_kx(&l, "want_hex", want);
    l_kx(&l, "got_hex", got);
    l_emit(&l, c->cpu);
}

/* Compare nq u64 words; one check. */
static void cmp_words(struct regs_ctx *c, const char *name, int idx, const u8 *want, const u8 *got,
                      u32 nq, u32 part_base)
{
    c->checks++;
    for (u32 q = 0; q < nq; q++) {
        u64 w, g;
        memcpy(&w, want + 8 * q, 8);
        memcpy(&g, got + 8 * q, 8);
        if (w != g) {
            mismatch(c, name, idx, (int)(part_base + q), w, g);
            return;
        }
    }
}

static __attribute__((noreturn)) void registers(u32 cpu)
{
    u8 *in = ri_buf[cpu], *xs = xs_buf[cpu];
    u64 *gpr = gpr_buf[cpu];
    u32 a, b, cc, d;
    u32 off_ymm = 576, off_k = 1088, off_zmmh = 1152, off_hi16 = 1664, xsize = 512;
    u64 flags = 0;
    if (cfg.xcr0) {
        flags |= RF_XSAVE;
        vcpuid(0xD, 0, &a, &b, &cc, &d);
        xsize = b;
        if (cfg.avx) {
            vcpuid(0xD, 2, &a, &b, &cc, &d);
            off_ymm = b;
            flags |= RF_AVX;
        }
        if (cfg.avx512) {
            vcpuid(0xD, 5, &a, &b, &cc, &d);
            off_k = b;
            vcpuid(0xD, 6, &a, &b, &cc, &d);
            off_zmmh = b;
            vcpuid(0xD, 7, &a, &b, &cc, &d);
            off_hi16 = b;
            flags |= RF_AVX512;
            if (cfg.kmovq)
                flags |= RF_KMOVQ;
        }
    }
    if (xsize > sizeof(xs_buf[0])) {
        struct line l;
        l_init(&l, "GUEST-ERROR what=xsave-area-too-large");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "size", xsize);
        l_emit(&l, cpu);
        halt_forever();
    }
    {
        struct line l;
        l_init(&l, "REGS-CONFIG");
        l_kv(&l, "cpu", cpu);
        l_kx(&l, "xcr0_hex", cfg.xcr0);
        l_kv(&l, "xsave_size", xsize);
        l_kv(&l, "avx", cfg.avx);
        l_kv(&l, "avx512", cfg.avx512);
        l_kv(&l, "kmovq", (flags & RF_KMOVQ) ? 1 : 0);
        l_kv(&l, "hold_ms", cfg.regs_hold_ms);
        l_emit(&l, cpu);
    }

    struct regs_ctx c = { .cpu = cpu };
    u64 spins = 1 << 20, target = ms_ticks(cfg.regs_hold_ms ? cfg.regs_hold_ms : 1);
    u64 report = ms_ticks(cfg.report_ms), last_report = rdtsc();
    for (c.round = 1;; c.round++) {
        u64 seed = mix64((c.round << 8) ^ cpu ^ 0x5265677300000000ul);
        u64 *g = (u64 *)(in + RI_GPR);
        for (u32 i = 0; i < 16; i++)
            g[i] = mix64(seed + i);
        for (u32 j = 0; j < 8; j++) {
            u8 *slot = in + RI_X87 + 16 * j;
            u64 m = mix64(seed + 100 + j) | (1ul << 63);
            u16 e = (u16)(0x3FFF + (mix64(seed + 200 + j) & 0x3F));
            memset(slot, 0, 16);
            memcpy(slot, &m, 8);
            memcpy(slot + 8, &e, 2);
        }
        u64 *v = (u64 *)(in + RI_VEC);
        for (u32 i = 0; i < 32 * 8; i++)
            v[i] = mix64(seed + 1000 + i);
        u64 *k = (u64 *)(in + RI_K);
        for (u32 i = 0; i < 8; i++) {
            k[i] = mix64(seed + 2000 + i);
            if (!(flags & RF_KMOVQ))
                k[i] &= 0xFFFF;
        }
        memset(xs, 0, xsize);
        memset(gpr, 0xA5, 16 * 8);

        u64 t0 = rdtsc();
        regs_hold(in, gpr, xs, spins, flags, cfg.xcr0);
        u64 dt = rdtsc() - t0;
        if (dt) {
            u64 ns = spins * target / dt;   /* aim for hold_ms per round */
            if (ns < (1 << 10))
                ns = 1 << 10;
            if (ns > (1ul << 34))
                ns = 1ul << 34;
            if (ns > spins * 4)
                ns = spins * 4;
            spins = ns;
        }

        if (c.round == cfg.regs_inject) {
            /* negative control: corrupt the saved state of this round */
            gpr[3] ^= 1;                                    /* rbx */
            xs[160 + 16 * 5 + 8] ^= 0x80;                   /* xmm5.q1 */
            if (flags & RF_AVX512) {
                xs[off_hi16 + 64 * 4 + 56] ^= 1;            /* zmm20.q7 */
                xs[off_k + 8 * 3] ^= 1;                     /* k3 */
            }
        }
        c.round_mismatches = 0;
        for (u32 i = 0; i < 16; i++) {
            if (i == 4)
                continue;
            u64 want = i == 1 ? 0 : g[i];
            c.checks++;
            if (gpr[i] != want)
                mismatch(&c, gpr_names[i], -1, -1, want, gpr[i]);
        }
        for (u32 i = 0; i < 8; i++) {
            u8 want[16] = { 0 }, got[16] = { 0 };
            memcpy(want, in + RI_X87 + 16 * (7 - i), 10);
            memcpy(got, xs + 32 + 16 * i, 10);
            cmp_words(&c, "st", (int)i, want, got, 2, 0);
        }
        for (u32 i = 0; i < 16; i++)
            cmp_words(&c, "xmm", (int)i, in + RI_VEC + 64 * i, xs + 160 + 16 * i, 2, 0);
        if (flags & RF_AVX)
            for (u32 i = 0; i < 16; i++)
                cmp_words(&c, "ymm", (int)i, in + RI_VEC + 64 * i + 16, xs + off_ymm + 16 * i, 2, 2);
        if (flags & RF_AVX512) {
            for (u32 i = 0; i < 16; i++)
                cmp_words(&c, "zmm", (int)i, in + RI_VEC + 64 * i + 32, xs + off_zmmh + 32 * i, 4, 4);
            for (u32 i = 16; i < 32; i++)
                cmp_words(&c, "zmm", (int)i, in + RI_VEC + 64 * i, xs + off_hi16 + 64 * (i - 16), 8, 0);
            for (u32 i = 0; i < 8; i++)
                cmp_words(&c, "k", (int)i, in + RI_K + 8 * i, xs + off_k + 8 * i, 1, 0);
        }

        u64 t = rdtsc();
        if (t - last_report >= report) {
            struct line l;
            l_init(&l, "REGS");
            l_kv(&l, "cpu", cpu);
            l_kv(&l, "round", c.round);
            l_kv(&l, "checks", c.checks);
            l_kv(&l, "mismatches", c.mismatches);
            l_kv(&l, "avx", (flags & RF_AVX) ? 1 : 0);
            l_kv(&l, "avx512", (flags & RF_AVX512) ? 1 : 0);
            l_emit(&l, cpu);
            last_report = t;
        }
    }
}

/* ------------------------------------------------------------------- timer */

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static __attribute__((noreturn)) void timer(u32 cpu)
{
    struct kcpu *k = kcpu_of(cpu);
    struct line l;
    u64 hz = cfg.timer_hz;
    int deadline = streq(cfg.timer_mode, "deadline");
    u64 count = deadline ? svc(SVC_TIMER_DEADLINE, cfg.tsc_khz * 1000 / hz, 0, 0)
                         : svc(SVC_TIMER_START, hz, cfg.tsc_khz, 0);
    l_init(&l, "TIMER-START");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "hz", hz);
    l_kv(&l, "lapic_count", count);
    l_ks(&l, "mode", deadline ? "deadline" : "periodic");
    l_emit(&l, cpu);

    u64 report = ms_ticks(cfg.report_ms);
    u64 last_t = rdtsc(), last_ticks = k->timer_ticks;
    for (;;) {
        u64 t = rdtsc();
        if (t - last_t < report) {
            cpu_relax();
            continue;
        }
        u64 ticks = k->timer_ticks;
        u64 hz_x100 = (ticks - last_ticks) * 100 * cfg.tsc_khz * 1000 / (t - last_t);
        l_init(&l, "TIMER");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "ticks", ticks);
        l_kv(&l, "hz_x100", hz_x100);
        l_kv(&l, "tsc", t);
        l_emit(&l, cpu);
        last_t = t;
        last_ticks = ticks;
    }
}

/* ------------------------------------------------------------------ action */


static __attribute__((noreturn)) void action(u32 cpu)
{
    const char *what = cfg.action;
    struct line l;
    int known = streq(what, "reset") || streq(what, "shutdown") || streq(what, "acpi-reset") ||
                streq(what, "triple-fault") || streq(what, "mmio-exec") || streq(what, "halt") ||
                streq(what, "ud2");
    if (!known) {
        l_init(&l, "GUEST-ERROR what=unknown-action");
        l_kv(&l, "cpu", cpu);
        l_ks(&l, "do", what);
        l_emit(&l, cpu);
        halt_forever();
    }
    wait_ms(cfg.after_ms);
    l_init(&l, "ACTION");
    l_ks(&l, "do", what);
    l_kv(&l, "cpu", cpu);
    l_emit(&l, cpu);
    if (streq(what, "reset"))
        outb(0x64, 0xFE);
    else if (streq(what, "shutdown"))
        outb(0x3C0, 0x34);
    else if (streq(what, "acpi-reset"))
        outb(0x3C2, 0x01);
    else if (streq(what, "triple-fault"))
        svc(SVC_TRIPLE, 0, 0, 0);
    else if (streq(what, "mmio-exec"))
        svc(SVC_MMIO_EXEC, cfg.mmio_addr, 0, 0);
    else if (streq(what, "ud2"))
        __asm__ volatile("ud2");                /* -> GUEST-EXCEPTION vector=6 */
    else
        svc(SVC_HALT, 0, 0, 0);
    wait_ms(1000);
    l_init(&l, "GUEST-ERROR what=action-returned");
    l_kv(&l, "cpu", cpu);
    l_ks(&l, "do", what);
    l_emit(&l, cpu);
    halt_forever();
}

/* ------------------------------------------------------------------ serial */

/*
 * COM1 input, interrupt driven: the UART raises IRQ 4 (IOAPIC pin 4) when
 * bytes arrive; the ring-0 handler counts it, and this loop drains the
 * receive buffer after each interrupt and prints what came. Bytes that
 * arrive without an interrupt are never read: the test of interrupts.
 */
static __attribute__((noreturn)) void serial_workload(u32 cpu)
{
    static const char digits[] = "0123456789abcdef";
    if (cpu != cfg.bsp)
        halt_forever();
    ioapic_route(COM1_GSI, VEC_UART);
    outb(0x3F9, 0x01);                      /* IER: received-data interrupt */
    outb(0x3FC, inb(0x3FC) | 0x08);         /* MCR: OUT2 gates the IRQ */
    struct line l;
    l_init(&l, "SERIAL-READY");
    l_kv(&l, "cpu", cpu);
    l_emit(&l, cpu);
    u64 seen = 0, total = 0;
    for (;;) {
        u64 irqs = irq_count_uart;
        if (irqs == seen) {
            cpu_relax();
            continue;
        }
        seen = irqs;
        u8 buf[64];
        u32 n = 0;
        while (n < sizeof(buf) && (inb(0x3FD) & 1))
            buf[n++] = inb(0x3F8);
        if (!n)
            continue;
        total += n;
        l_init(&l, "SERIAL-RX");
        l_kv(&l, "irqs", irqs);
        l_kv(&l, "total", total);
        l_str(&l, " data_hex=");
        for (u32 i = 0; i < n; i++) {
            l_chr(&l, digits[buf[i] >> 4]);
            l_chr(&l, digits[buf[i] & 0xF]);
        }
        l_emit(&l, cpu);
    }
}

/* ------------------------------------------------------------------- cpuid */

/*
 * What the VMM's CPU model gives this guest: the CPUID leaves that carry
 * features, as ring 0 reads them, and which XSAVE components XSETBV really
 * accepts (each tried on its own; XCR0 is put back afterwards).
 */
static __attribute__((noreturn)) void cpuid_workload(u32 cpu)
{
    static const u32 leaves[][2] = {
        { 0x1, 0 }, { 0x6, 0 }, { 0x7, 0 }, { 0x7, 1 }, { 0xD, 0 }, { 0xD, 1 },
        { 0x40000001, 0 }, { 0x80000001, 0 }, { 0x80000007, 0 }, { 0x80000008, 0 },
        { 0x8000000A, 0 }, { 0x8000001F, 0 }, { 0x80000021, 0 },
    };
    struct line l;
    if (cpu != cfg.bsp)
        halt_forever();
    for (u32 i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
        u32 a, b, c, d;
        vcpuid(leaves[i][0], leaves[i][1], &a, &b, &c, &d);
        l_init(&l, "CPUID");
        l_kx(&l, "leaf_hex", leaves[i][0]);
        l_kv(&l, "sub", leaves[i][1]);
        l_kx(&l, "eax_hex", a);
        l_kx(&l, "ebx_hex", b);
        l_kx(&l, "ecx_hex", c);
        l_kx(&l, "edx_hex", d);
        l_emit(&l, cpu);
    }
    /* Components in the groups XSETBV takes: AVX, MPX, AVX-512, PKRU, AMX. */
    static const u64 groups[] = { 0x4, 0x18, 0xE4, 0x200, 0x60000 };
    u64 set = xcr0_val, usable = 0;
    if (set) {
        usable = 0x3;
        for (u32 i = 0; i < sizeof(groups) / sizeof(groups[0]); i++)
            if (svc(SVC_XSETBV, 0x3 | groups[i], 0, 0) == 0)
                usable |= groups[i];
        svc(SVC_XSETBV, set, 0, 0);
    }
    l_init(&l, "XCR0");
    l_kx(&l, "set_hex", set);
    l_kx(&l, "usable_hex", usable);
    l_kv(&l, "xsave", set != 0);
    l_emit(&l, cpu);
    l_init(&l, "CPUID-DONE");
    l_kv(&l, "leaves", sizeof(leaves) / sizeof(leaves[0]));
    l_emit(&l, cpu);
    halt_forever();
}

/* ---------------------------------------------------------------- dispatch */

/* touch: the guest side of restore benchmarks. Writes one word into every
 * page of its working set (mem_mib, over all RAM ranges), says
 * TOUCH-READY, then waits for a restore (the restore counter after the VM
 * generation ID changes). After each restore it reads the first word of
 * every page of the hot set (the last touch_hot_mib MiB of the working
 * set), then of every page, then writes every page, and prints how long
 * each took by its TSC and how many pages held a wrong word. BSP only. */
static u64 touch_word(u64 addr, u64 round)
{
    return addr ^ (round * 0x9E3779B97F4A7C15ul) ^ 0x544F554348000000ul;
}

static u64 touch_page_addr(u64 idx)
{
    for (u32 r = 0; r < cfg.nranges; r++) {
        if (idx < cfg.range_pages[r])
            return cfg.range_start[r] + (idx << 12);
        idx -= cfg.range_pages[r];
    }
    return 0;
}

static __attribute__((noreturn)) void touch(u32 cpu)
{
    struct line l;
    if (cpu != cfg.bsp)
        halt_forever();
    u64 avail = 0;
    for (u32 i = 0; i < cfg.nranges; i++)
        avail += cfg.range_pages[i];
    u64 npages = cfg.mem_mib << 8;
    if (npages > avail)
        npages = avail;
    u64 nhot = cfg.touch_hot_mib << 8;
    if (nhot > npages)
        nhot = npages;
    static u64 round;                   /* survives snapshots: guest RAM */
    for (u64 i = 0; i < npages; i++) {
        u64 a = touch_page_addr(i);
        *(volatile u64 *)phys(a) = touch_word(a, round);
    }
    l_init(&l, "TOUCH-READY");
    l_kv(&l, "pages", npages);
    l_kx(&l, "first_page_hex", touch_page_addr(0));
    l_kv(&l, "hot_pages", nhot);
    l_emit(&l, cpu);
    const volatile u64 *restores = (const volatile u64 *)phys(VMGENID_ADDR + 16);
    for (;;) {
        u64 seen = *restores;
        while (*restores == seen)
            cpu_relax();
        u64 t0 = rdtsc(), bad = 0;
        for (u64 i = npages - nhot; i < npages; i++) {
            u64 a = touch_page_addr(i);
            bad += *(volatile u64 *)phys(a) != touch_word(a, round);
        }
        u64 t1 = rdtsc();
        for (u64 i = 0; i < npages; i++) {
            u64 a = touch_page_addr(i);
            bad += *(volatile u64 *)phys(a) != touch_word(a, round);
        }
        u64 t2 = rdtsc();
        round++;
        for (u64 i = 0; i < npages; i++) {
            u64 a = touch_page_addr(i);
            *(volatile u64 *)phys(a) = touch_word(a, round);
        }
        u64 t3 = rdtsc();
        u64 khz = cfg.tsc_khz ? cfg.tsc_khz : 1;
        l_init(&l, "TOUCH");
        l_kv(&l, "restores", *restores);
        l_kv(&l, "pages", npages);
        l_kv(&l, "hot_pages", nhot);
        l_kv(&l, "hot_us", (t1 - t0) * 1000 / khz);
        l_kv(&l, "read_us", (t2 - t1) * 1000 / khz);
        l_kv(&l, "write_us", (t3 - t2) * 1000 / khz);
        l_kv(&l, "bad", bad);
        l_emit(&l, cpu);
    }
}

void run_workload(u32 cpu)
{
    struct line l;
    l_init(&l, "CPU-UP");
    l_kv(&l, "cpu", cpu);
    l_emit(&l, cpu);
    const char *w = cfg.workload;
    if (streq(w, "heartbeat"))
        heartbeat(cpu);
    if (streq(w, "memory"))
        memory(cpu);
    if (streq(w, "registers"))
        registers(cpu);
    if (streq(w, "timer"))
        timer(cpu);
    if (streq(w, "cpuid"))
        cpuid_workload(cpu);
    if (streq(w, "serial"))
        serial_workload(cpu);
    if (streq(w, "action"))
        action(cpu);
    if (streq(w, "touch"))
        touch(cpu);
    if (streq(w, "disk") || streq(w, "net") || streq(w, "rng") || streq(w, "diskbench")) {
        if (cpu != cfg.bsp)
            halt_forever();             /* one driver per device: the BSP */
        if (streq(w, "disk"))
            disk_workload(cpu);
        if (streq(w, "diskbench"))
            diskbench_workload(cpu);
        if (streq(w, "net"))
            net_workload(cpu);
        rng_workload(cpu);
    }
    guest_error(cpu, "unknown-workload");
    halt_forever();
}
