/*
 * Ring-3 boot logic: boot-info and command-line parsing, e820, ACPI/MP
 * tables, TSC frequency, the boot line, AP start-up.
 */
#include "guest.h"
#include "virtio.h"

struct config cfg;
volatile u32 cpu_online[MAX_CPUS];

static char cmdline[2048];
static u32 n_e820;
static u64 e820_addr[128], e820_size[128];
static u32 e820_type[128];
static u64 rsdp_hint;

static const char *tsc_src = "default";
static char acpi_status[40] = "missing";
static const char *mp_status = "missing";
static u32 acpi_ids[MAX_CPUS], n_acpi_ids, mp_ids[MAX_CPUS], n_mp_ids;
static u32 acpi_total, mp_total;     /* entries found, including ids >= MAX_CPUS */

static inline u8 rd8(u64 a) { return *(volatile u8 *)phys(a); }
static inline u16 rd16(u64 a) { return *(volatile u16 *)phys(a); }
static inline u32 rd32(u64 a) { return *(volatile u32 *)phys(a); }
static inline u64 rd64(u64 a) { return *(volatile u64 *)phys(a); }

void wait_ms(u64 ms)
{
    u64 start = rdtsc(), ticks = ms * cfg.tsc_khz;
    while (rdtsc() - start < ticks)
        cpu_relax();
}

void halt_forever(void)
{
    for (;;)
        svc(SVC_HALT, 0, 0, 0);
}

/* ---- boot information ---- */

static void copy_cmdline(u64 addr)
{
    u32 i = 0;
    if (addr)
        for (; i < sizeof(cmdline) - 1; i++) {
            char c = (char)rd8(addr + i);
            if (!c)
                break;
            cmdline[i] = c;
        }
    cmdline[i] = 0;
}

static void add_e820(u64 addr, u64 size, u32 type)
{
    if (n_e820 < 128) {
        e820_addr[n_e820] = addr;
        e820_size[n_e820] = size;
        e820_type[n_e820] = type;
        n_e820++;
    }
}

/* Returns 0 on success. */
static int read_boot_info(u32 cpu)
{
    u64 info = boot_info;
    if (boot_proto == PROTO_LINUX64) {
        u64 cmd = rd32(info + 0x228) | ((u64)rd32(info + 0x0C8) << 32);
        copy_cmdline(cmd);
        u32 n = rd8(info + 0x1E8);
        if (n > 128)
            n = 128;
        for (u32 i = 0; i < n; i++) {
            u64 e = info + 0x2D0 + 20 * i;
            add_e820(rd64(e), rd64(e + 8), rd32(e + 16));
        }
        return 0;
    }
    u32 magic = rd32(info);
    if (magic != 0x336ec578) {
        struct line l;
        l_init(&l, "GUEST-ERROR what=pvh-bad-magic");
        l_kv(&l, "cpu", cpu);
        l_kx(&l, "magic_hex", magic);
        l_kx(&l, "start_info_hex", info);
        l_emit(&l, cpu);
        return -1;
    }
    u32 version = rd32(info + 4);
    copy_cmdline(rd64(info + 24));
    rsdp_hint = rd64(info + 32);
    if (version >= 1) {
        u64 map = rd64(info + 40);
        u32 n = rd32(info + 48);
        if (n > 128)
            n = 128;
        for (u32 i = 0; map && i < n; i++)
            add_e820(rd64(map + 24 * i), rd64(map + 24 * i + 8), rd32(map + 24 * i + 16));
    }
    if (n_e820 == 0) {
        struct line l;
        l_init(&l, "GUEST-ERROR what=pvh-no-memmap");
        l_kv(&l, "cpu", cpu);
        l_kv(&l, "version", version);
        l_emit(&l, cpu);
    }
    return 0;
}

/* ---- command line ---- */

static u64 parse_num(const char *s, int *ok)
{
    u64 v = 0;
    int base = 10, digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; *s; s++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * base + d;
        digits++;
    }
    *ok = digits > 0 && *s == 0;
    return v;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static void copy_str(char *dst, u64 cap, const char *src)
{
    u64 i = 0;
    for (; src[i] && i < cap - 1; i++)
        dst[i] = src[i];
    dst[i] = 0;
}

static u64 cmdline_tsc_khz;

static void parse_cmdline(u32 cpu)
{
    static char tmp[sizeof(cmdline)];
    copy_str(tmp, sizeof(tmp), cmdline);
    char *p = tmp;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        if (!*p)
            break;
        char *key = p, *val = 0;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
            if (*p == '=' && !val) {
                *p = 0;
                val = p + 1;
            }
            p++;
        }
        if (*p)
            *p++ = 0;
        if (!val)
            continue;
        struct { const char *name; u64 *dst; } nums[] = {
            { "smp", &cfg.smp }, { "hb_ms", &cfg.hb_ms }, { "mem_mib", &cfg.mem_mib },
            { "mem_rate", &cfg.mem_rate }, { "report_ms", &cfg.report_ms },
            { "timer_hz", &cfg.timer_hz }, { "after_ms", &cfg.after_ms },
            { "mmio_addr", &cfg.mmio_addr }, { "regs_hold_ms", &cfg.regs_hold_ms },
            { "regs_inject", &cfg.regs_inject },
            { "mem_inject", &cfg.mem_inject }, { "mem_hot_mib", &cfg.mem_hot_mib },
            { "mem_fill", &cfg.mem_fill }, { "mem_words", &cfg.mem_words },
            { "touch_hot_mib", &cfg.touch_hot_mib },
            { "disk_index", &cfg.disk_index }, { "disk_slot", &cfg.disk_slot },
            { "disk_blocks", &cfg.disk_blocks }, { "disk_start", &cfg.disk_start },
            { "disk_verify_only", &cfg.disk_verify_only }, { "disk_pass_ms", &cfg.disk_pass_ms },
            { "net_index", &cfg.net_index }, { "net_slot", &cfg.net_slot },
            { "net_ms", &cfg.net_ms },
            { "rng_index", &cfg.rng_index }, { "rng_slot", &cfg.rng_slot },
            { "rng_bytes", &cfg.rng_bytes }, { "rng_ms", &cfg.rng_ms },
            { "virtio_timeout_ms", &cfg.virtio_timeout_ms },
            { "bench_ms", &cfg.bench_ms }, { "bench_qd", &cfg.bench_qd },
            { "tsc_khz", &cmdline_tsc_khz }, { "xsave", &cfg.xsave },
        };
        if (streq(key, "workload")) {
            copy_str(cfg.workload, sizeof(cfg.workload), val);
            continue;
        }
        if (streq(key, "bench_mode")) {
            copy_str(cfg.bench_mode, sizeof(cfg.bench_mode), val);
            continue;
        }
        if (streq(key, "do")) {
            copy_str(cfg.action, sizeof(cfg.action), val);
            continue;
        }
        if (streq(key, "timer_mode")) {
            copy_str(cfg.timer_mode, sizeof(cfg.timer_mode), val);
            continue;
        }
        for (u32 i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
            if (!streq(key, nums[i].name))
                continue;
            int ok;
            u64 v = parse_num(val, &ok);
            if (ok) {
                *nums[i].dst = v;
            } else {
                struct line l;
                l_init(&l, "GUEST-ERROR what=bad-number");
                l_kv(&l, "cpu", cpu);
                l_ks(&l, "key", key);
                l_emit(&l, cpu);
            }
        }
    }
}

/* ---- ACPI and MP tables ---- */

static u8 sum8(u64 a, u64 n)
{
    u8 s = 0;
    for (u64 i = 0; i < n; i++)
        s += rd8(a + i);
    return s;
}

static int sig_at(u64 a, const char *sig, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (rd8(a + i) != (u8)sig[i])
            return 0;
    return 1;
}

static u64 scan(u64 from, u64 to, const char *sig, u32 n)
{
    for (u64 a = from; a + n <= to; a += 16)
        if (sig_at(a, sig, n))
            return a;
    return 0;
}

static u64 ebda_base(void)
{
    u64 e = (u64)rd16(0x40E) << 4;
    return (e >= 0x80000 && e < 0xA0000) ? e : 0;
}

static void add_id(u32 *ids, u32 *n, u32 *total, u32 id)
{
    (*total)++;
    if (id >= MAX_CPUS) {
        struct line l;
        l_init(&l, "GUEST-ERROR what=apic-id-too-large");
        l_kv(&l, "apic_id", id);
        l_kv(&l, "max", MAX_CPUS - 1);
        l_emit(&l, 0);
        return;
    }
    for (u32 i = 0; i < *n; i++)
        if (ids[i] == id)
            return;
    ids[(*n)++] = id;
}

static void acpi_bad(const char *table)
{
    copy_str(acpi_status, sizeof(acpi_status), "bad-checksum:");
    copy_str(acpi_status + 13, sizeof(acpi_status) - 13, table);
}

static void parse_acpi(void)
{
    u64 rsdp = 0;
    if (rsdp_hint && sig_at(rsdp_hint, "RSD PTR ", 8))
        rsdp = rsdp_hint;
    if (!rsdp && ebda_base())
        rsdp = scan(ebda_base(), ebda_base() + 1024, "RSD PTR ", 8);
    if (!rsdp)
        rsdp = scan(0xE0000, 0x100000, "RSD PTR ", 8);
    if (!rsdp)
        return;
    if (sum8(rsdp, 20)) {
        acpi_bad("RSDP");
        return;
    }
    u8 rev = rd8(rsdp + 15);
    u64 sdt = 0;
    u32 esz = 4;
    if (rev >= 2) {
        u32 len = rd32(rsdp + 20);
        if (len < 36 || len > 4096 || sum8(rsdp, len)) {
            acpi_bad("RSDP-ext");
            return;
        }
        sdt = rd64(rsdp + 24);
        esz = 8;
    }
    if (!sdt) {
        sdt = rd32(rsdp + 16);
        esz = 4;
    }
    const char *sdt_name = esz == 8 ? "XSDT" : "RSDT";
    if (!sdt || !sig_at(sdt, sdt_name, 4))
        return;                                 /* missing */
    u32 len = rd32(sdt + 4);
    if (len < 36 || len > 0x10000 || sum8(sdt, len)) {
        acpi_bad(sdt_name);
        return;
    }
    u64 madt = 0;
    for (u32 off = 36; off + esz <= len; off += esz) {
        u64 t = esz == 8 ? rd64(sdt + off) : rd32(sdt + off);
        if (t && sig_at(t, "APIC", 4)) {
            madt = t;
            break;
        }
    }
    if (!madt)
        return;
    len = rd32(madt + 4);
    if (len < 44 || len > 0x10000 || sum8(madt, len)) {
        acpi_bad("MADT");
        return;
    }
    for (u32 off = 44; off + 2 <= len;) {
        u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
        if (elen < 2 || off + elen > len)
            break;
        if (type == 0 && elen >= 8 && (rd32(madt + off + 4) & 1))
            add_id(acpi_ids, &n_acpi_ids, &acpi_total, rd8(madt + off + 3));
        if (type == 9 && elen >= 16 && (rd32(madt + off + 8) & 1))
            add_id(acpi_ids, &n_acpi_ids, &acpi_total, rd32(madt + off + 4));
        off += elen;
    }
    copy_str(acpi_status, sizeof(acpi_status), "ok");
}

static void parse_mptable(void)
{
    u64 fp = 0;
    if (ebda_base())
        fp = scan(ebda_base(), ebda_base() + 1024, "_MP_", 4);
    if (!fp)
        fp = scan(0x9FC00, 0xA0000, "_MP_", 4);
    if (!fp)
        fp = scan(0xF0000, 0x100000, "_MP_", 4);
    if (!fp)
        return;
    u32 flen = rd8(fp + 8) * 16u;
    if (flen < 16 || sum8(fp, flen)) {
        mp_status = "bad";
        return;
    }
    u64 cfgt = rd32(fp + 4);
    if (!cfgt || !sig_at(cfgt, "PCMP", 4)) {
        mp_status = "bad";
        return;
    }
    u32 blen = rd16(cfgt + 4);
    if (blen < 44 || sum8(cfgt, blen)) {
        mp_status = "bad";
        return;
    }
    u32 count = rd16(cfgt + 34);
    u64 e = cfgt + 44, end = cfgt + blen;
    for (u32 i = 0; i < count && e < end; i++) {
        u8 type = rd8(e);
        if (type == 0) {
            if (rd8(e + 3) & 1)
                add_id(mp_ids, &n_mp_ids, &mp_total, rd8(e + 1));
            e += 20;
        } else if (type <= 4) {
            e += 8;
        } else {
            break;
        }
    }
    mp_status = "ok";
}

/* ---- memory map ---- */

static u64 usable_mib(void)
{
    u64 total = 0;
    for (u32 i = 0; i < n_e820; i++)
        if (e820_type[i] == 1)
            total += e820_size[i];
    return total >> 20;
}

static int is_ram(u64 a, u64 len)
{
    for (u32 i = 0; i < n_e820; i++)
        if (e820_type[i] == 1 && a >= e820_addr[i] && a + len <= e820_addr[i] + e820_size[i])
            return 1;
    return 0;
}

/* Usable RAM above the image, page aligned, sorted, below 64 GiB. */
static void build_ranges(void)
{
    u64 floor = ((u64)_end + 4095) & ~4095ul, limit = 64ul << 30;
    u64 s[128], e[128];
    u32 n = 0;
    for (u32 i = 0; i < n_e820; i++) {
        if (e820_type[i] != 1)
            continue;
        u64 a = e820_addr[i], b = e820_addr[i] + e820_size[i];
        if (a < floor)
            a = floor;
        if (b > limit)
            b = limit;
        a = (a + 4095) & ~4095ul;
        b &= ~4095ul;
        if (a >= b)
            continue;
        u32 j = n++;
        while (j > 0 && s[j - 1] > a) {     /* insertion sort */
            s[j] = s[j - 1];
            e[j] = e[j - 1];
            j--;
        }
        s[j] = a;
        e[j] = b;
    }
    u64 prev_end = 0;
    cfg.nranges = 0;
    for (u32 i = 0; i < n; i++) {
        if (s[i] < prev_end)
            s[i] = prev_end;                /* overlapping entries */
        if (s[i] >= e[i])
            continue;
        cfg.range_start[cfg.nranges] = s[i];
        cfg.range_pages[cfg.nranges] = (e[i] - s[i]) >> 12;
        cfg.nranges++;
        prev_end = e[i];
    }
}

/* ---- main ---- */

static int known_workload(const char *w)
{
    return streq(w, "heartbeat") || streq(w, "memory") || streq(w, "registers") ||
           streq(w, "timer") || streq(w, "action") || streq(w, "disk") || streq(w, "net") ||
           streq(w, "rng") || streq(w, "diskbench") || streq(w, "cpuid") ||
           streq(w, "serial") || streq(w, "touch");
}

static void detect_tsc(void)
{
    u32 a, b, c, d;
    vcpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40010000) {
        vcpuid(0x40000010, 0, &a, &b, &c, &d);
        if (a) {
            cfg.tsc_khz = a;
            tsc_src = "cpuid";
            return;
        }
    }
    if (cmdline_tsc_khz) {
        cfg.tsc_khz = cmdline_tsc_khz;
        tsc_src = "cmdline";
        return;
    }
    cfg.tsc_khz = 2000000;
    tsc_src = "default";
}

static void detect_vector_state(void)
{
    u32 a, b, c, d;
    cfg.xcr0 = xcr0_val;
    cfg.avx = (cfg.xcr0 & 0x6) == 0x6;
    cfg.avx512 = cfg.avx && (cfg.xcr0 & 0xE0) == 0xE0;
    vcpuid(0, 0, &a, &b, &c, &d);
    if (a >= 7) {
        vcpuid(7, 0, &a, &b, &c, &d);
        cfg.kmovq = (b >> 30) & 1;          /* AVX512BW */
    }
}

static void start_aps(u32 self)
{
    struct line l;
    u64 len = (u64)(tramp_end - tramp_start);
    if (!is_ram(TRAMP_ADDR, 4096)) {
        l_init(&l, "GUEST-ERROR what=trampoline-not-in-ram");
        l_kx(&l, "addr_hex", TRAMP_ADDR);
        l_emit(&l, self);
    }
    memcpy(phys(TRAMP_ADDR), tramp_start, len);
    u32 expected = 0;
    for (u32 i = 0; i < cfg.ncpus; i++) {
        u32 id = cfg.apic_ids[i];
        if (id == self)
            continue;
        expected++;
        svc(SVC_START_AP, id, TRAMP_ADDR >> 12, cfg.tsc_khz * 10);
    }
    u64 start = rdtsc(), limit = 2000 * cfg.tsc_khz;
    u32 up = 0;
    while (rdtsc() - start < limit) {
        up = 0;
        for (u32 i = 0; i < cfg.ncpus; i++)
            if (cfg.apic_ids[i] != self && cpu_online[cfg.apic_ids[i]])
                up++;
        if (up == expected)
            break;
        cpu_relax();
    }
    l_init(&l, "SMP-START");
    l_kv(&l, "expected", expected);
    l_kv(&l, "started", up);
    l_kv(&l, "wait_ms", (rdtsc() - start) / cfg.tsc_khz);
    l_emit(&l, self);
    for (u32 i = 0; i < cfg.ncpus; i++) {
        u32 id = cfg.apic_ids[i];
        if (id != self && !cpu_online[id]) {
            l_init(&l, "GUEST-ERROR what=ap-timeout");
            l_kv(&l, "cpu", id);
            l_emit(&l, self);
        }
    }
}

static void print_boot_line(u32 cpu, const char *acpi)
{
    struct line l;
    l_init(&l, "STASIS-GUEST boot");
    l_ks(&l, "proto", boot_proto == PROTO_PVH ? "pvh" : "linux64");
    l_kv(&l, "cpus", cfg.ncpus);
    l_ks(&l, "acpi", acpi);
    l_ks(&l, "mptable", mp_status);
    l_kv(&l, "tsc_khz", cfg.tsc_khz);
    l_ks(&l, "tsc_src", tsc_src);
    l_kx(&l, "xcr0_hex", cfg.xcr0);
    l_kv(&l, "avx512", cfg.avx512);
    l_kv(&l, "mem_mib", usable_mib());
    l_ks(&l, "workload", cfg.workload);
    l_str(&l, " cmdline=\"");
    for (const char *p = cmdline; *p; p++)
        l_chr(&l, *p == '"' ? '\'' : (*p < 0x20 || *p > 0x7E) ? '?' : *p);
    l_chr(&l, '"');
    l_emit(&l, cpu);
}

static void print_platform_line(u32 cpu, const char *src)
{
    struct line l;
    l_init(&l, "PLATFORM");
    l_kv(&l, "cpus", cfg.ncpus);
    l_ks(&l, "cpu_src", src);
    l_kv(&l, "acpi_cpus", acpi_total);
    l_kv(&l, "mptable_cpus", mp_total);
    l_str(&l, " apic_ids=");
    for (u32 i = 0; i < cfg.ncpus; i++) {
        if (i)
            l_chr(&l, ',');
        l_dec(&l, cfg.apic_ids[i]);
    }
    l_kv(&l, "e820_entries", n_e820);
    l_kv(&l, "avx", cfg.avx);
    l_kv(&l, "smp", cfg.smp);
    l_ks(&l, "svc_trap", svc_via_ud ? "ud" : svc_via_gp ? "gp" : "int80");
    l_kv(&l, "pio_emulated", pio_emulated);
    l_kv(&l, "virtio_devices", virtio_nslots);
    l_emit(&l, cpu);
}

static __attribute__((noreturn)) void bsp_main(u32 cpu)
{
    memset(__bss_start, 0, (u64)(__bss_end - __bss_start));
    copy_str(cfg.workload, sizeof(cfg.workload), "heartbeat");
    cfg.hb_ms = 100;
    cfg.mem_mib = 64;
    cfg.report_ms = 1000;
    cfg.timer_hz = 100;
    cfg.after_ms = 200;
    cfg.mmio_addr = 0xD0000000;
    cfg.regs_hold_ms = 20;
    cfg.tsc_khz = 2000000;
    cfg.bsp = cpu;
    cfg.disk_slot = cfg.net_slot = cfg.rng_slot = VSLOT_ANY;
    cfg.disk_blocks = 256;
    cfg.net_ms = 100;
    cfg.rng_bytes = 64;
    cfg.rng_ms = 10;
    cfg.virtio_timeout_ms = 2000;
    copy_str(cfg.bench_mode, sizeof(cfg.bench_mode), "randread4k");
    copy_str(cfg.timer_mode, sizeof(cfg.timer_mode), "periodic");
    cfg.bench_ms = 2000;
    cfg.bench_qd = 8;
    cfg.xsave = 1;

    if (read_boot_info(cpu))
        halt_forever();
    parse_cmdline(cpu);
    if (!cfg.xsave)
        svc(SVC_XSAVE_OFF, 0, 0, 0);        /* xsave=0: FXSAVE state only */
    detect_tsc();
    detect_vector_state();
    parse_acpi();
    parse_mptable();

    const char *src = "default";
    if (streq(acpi_status, "ok") && n_acpi_ids) {
        for (u32 i = 0; i < n_acpi_ids; i++)
            cfg.apic_ids[i] = acpi_ids[i];
        cfg.ncpus = n_acpi_ids;
        src = "acpi";
    } else if (streq(mp_status, "ok") && n_mp_ids) {
        for (u32 i = 0; i < n_mp_ids; i++)
            cfg.apic_ids[i] = mp_ids[i];
        cfg.ncpus = n_mp_ids;
        src = "mptable";
    } else {
        cfg.apic_ids[0] = cpu;
        cfg.ncpus = 1;
    }
    if (cfg.hb_ms == 0)
        cfg.hb_ms = 1;
    if (cfg.report_ms == 0)
        cfg.report_ms = 1;
    if (cfg.timer_hz == 0)
        cfg.timer_hz = 1;
    build_ranges();

    u64 nop = svc(SVC_NOP, 0, 0, 0);
    virtio_scan();
    print_boot_line(cpu, acpi_status);
    print_platform_line(cpu, src);
    if (nop != SVC_NOP_MAGIC)
        guest_error(cpu, "svc-nop-mismatch");
    for (u32 i = 0; i < n_e820; i++) {
        struct line l;
        l_init(&l, "E820");
        l_kv(&l, "index", i);
        l_kx(&l, "addr_hex", e820_addr[i]);
        l_kx(&l, "size_hex", e820_size[i]);
        l_kv(&l, "type", e820_type[i]);
        l_emit(&l, cpu);
    }
    virtio_print_slots(cpu);

    if (!known_workload(cfg.workload)) {
        struct line l;
        l_init(&l, "GUEST-ERROR what=unknown-workload");
        l_kv(&l, "cpu", cpu);
        l_ks(&l, "name", cfg.workload);
        l_emit(&l, cpu);
        halt_forever();
    }
    cpu_online[cpu] = 1;
    if (cfg.smp && cfg.ncpus > 1)
        start_aps(cpu);
    run_workload(cpu);
}

__attribute__((noreturn)) void user_main(u32 cpu, u32 is_bsp);

void user_main(u32 cpu, u32 is_bsp)
{
    if (is_bsp)
        bsp_main(cpu);
    if (!cfg.xsave)
        svc(SVC_XSAVE_OFF, 0, 0, 0);
    cpu_online[cpu] = 1;
    run_workload(cpu);
}
