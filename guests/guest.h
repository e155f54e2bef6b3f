/* Shared definitions for the stasis guest kit (C and GNU assembly). */
#ifndef STASIS_GUEST_H
#define STASIS_GUEST_H

#define MAX_CPUS        32
#define KSTACK_SHIFT    14                  /* 16 KiB ring-0 stack per CPU   */
#define KSTACK_SIZE     (1 << KSTACK_SHIFT)
#define USTACK_SHIFT    16                  /* 64 KiB ring-3 stack per CPU   */
#define USTACK_SIZE     (1 << USTACK_SHIFT)
#define TSS_STRIDE      128

/* GDT selectors */
#define SEL_KCODE64     0x08
#define SEL_KDATA       0x10
#define SEL_KCODE32     0x18
#define SEL_UDATA       0x23                /* entry 4, RPL 3 */
#define SEL_UCODE64     0x2B                /* entry 5, RPL 3 */
#define SEL_TSS0        0x30                /* 16-byte descriptor per CPU */

/* Real-mode AP trampoline page (SIPI vector = TRAMP_ADDR >> 12) */
#define TRAMP_ADDR      0x8000

/* Interrupt vectors */
#define VEC_TIMER       0x40
#define VEC_UART        0x41                /* COM1 receive, IOAPIC pin 4 */
#define VEC_GED         0x42                /* ACPI GED (VM generation ID notify) */
#define GED_GSI         13                  /* must match stasis-vmm's layout::GED_GSI */
#define COM1_GSI        4
#define VEC_SVC         0x80                /* handlers also match the bytes CD 80 */
#define VEC_SPURIOUS    0xFF

/* Ring-3 services: int $0x80, RAX = number, args in RDI, RSI, RDX; result in RAX */
#define SVC_NOP         0   /* returns 0x5354415349530000 ("STASIS") */
#define SVC_START_AP    1   /* rdi = apic id, rsi = SIPI vector, rdx = TSC ticks of 10 ms */
#define SVC_TRIPLE      2   /* load a zero-limit IDT, then ud2 */
#define SVC_HALT        3   /* cli; hlt forever */
#define SVC_MMIO_EXEC   4   /* jump to rdi (default 0xD0000000) at CPL0 */
#define SVC_TIMER_START 5   /* rdi = hz, rsi = TSC kHz; returns the LAPIC initial count */
#define SVC_CPUID       6   /* rdi = leaf, rsi = sub-leaf; returns eax, ebx, ecx, edx */
#define SVC_XSETBV      7   /* rdi = XCR0; returns 0, or 1 if XSETBV raised #GP (XCR0 unchanged) */
#define SVC_XSAVE_OFF   8   /* XCR0 = x87 only, then clear CR4.OSXSAVE; returns 0 */
#define SVC_TIMER_DEADLINE 9 /* rdi = period in TSC ticks: LAPIC timer in TSC-deadline mode, re-armed by its handler */

#define SVC_NOP_MAGIC   0x5354415349530000

/* LAPIC (xAPIC MMIO) */
#define LAPIC_BASE      0xFEE00000
#define LAPIC_ID        0x020
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TMR_INIT  0x380
#define LAPIC_TMR_CUR   0x390
#define LAPIC_TMR_DIV   0x3E0

/* Boot protocols recorded by the entry code */
#define PROTO_LINUX64   1
#define PROTO_PVH       2

/* Layout of struct regs_in used by regs_hold() (guests/regs.S) */
#define RI_GPR          0       /* 16 x u64 in encoding order rax,rcx,rdx,rbx,rsp,rbp,rsi,rdi,r8..r15 */
#define RI_X87          128     /* 8 x 16-byte slots, 10 bytes used, load order */
#define RI_VEC          256     /* 32 x 64-byte vector values (zmm0..31) */
#define RI_K            2304    /* 8 x u64 opmask values */
#define RI_SIZE         2368

/* regs_hold() flags */
#define RF_AVX          1
#define RF_AVX512       2
#define RF_KMOVQ        4
#define RF_XSAVE        8

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

/* Per-CPU ring-0 data at the bottom of each kernel stack block. */
struct kcpu {
    volatile u64 timer_ticks;
    volatile u64 lapic_count;
    volatile u64 deadline_period;   /* TSC ticks; 0 = not in TSC-deadline mode */
};

/* entry.S */
extern char kstacks[];
extern volatile u64 irq_count_uart, irq_count_ged;
extern char tramp_start[], tramp_end[];
extern volatile u32 boot_proto;
extern volatile u64 boot_info;
extern volatile u64 xcr0_val;
extern volatile u32 svc_via_ud, svc_via_gp, pio_emulated;
extern char _end[], __bss_start[], __bss_end[], __image_start[];

static inline struct kcpu *kcpu_of(u32 cpu)
{
    return (struct kcpu *)(kstacks + ((u64)cpu << KSTACK_SHIFT));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* Raw CPUID: use in ring 0 only (ring 3 sees the host here, see vcpuid). */
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Port I/O always uses the DX forms (EE/EC/66 EF/66 ED/EF/ED), which the
 * #GP handler knows how to emulate if ring-3 port I/O faults. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "d"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "d"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "d"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "d"(port)); return v; }

/* CPUID as configured by the VMM. On this host a ring-3 CPUID is not
 * trapped and returns the host's values, so ring 3 asks ring 0. */
static inline void vcpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    u64 ra = SVC_CPUID, rb, rc, rd;
    __asm__ volatile("int %[vec]"
                     : "+a"(ra), "=b"(rb), "=c"(rc), "=d"(rd)
                     : "D"((u64)leaf), "S"((u64)sub), [vec] "i"(VEC_SVC)
                     : "memory");
    *a = (u32)ra;
    *b = (u32)rb;
    *c = (u32)rc;
    *d = (u32)rd;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static inline u64 svc(u64 n, u64 a, u64 b, u64 c)
{
    u64 r;
    __asm__ volatile("int %[vec]" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), [vec] "i"(VEC_SVC) : "memory");
    return r;
}

/* Turn a physical address into a pointer (identity map) without letting the
 * compiler reason about object bounds of literal addresses. */
static inline void *phys(u64 addr)
{
    void *p;
    __asm__("" : "=r"(p) : "0"(addr));
    return p;
}

/* util.c: strings, formatting, serial lines */
void *memcpy(void *d, const void *s, u64 n);
void *memset(void *d, int c, u64 n);
void *memmove(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);
u64 strlen(const char *s);

#define LINE_CAP 4400
struct line {
    u32 n;
    char buf[LINE_CAP];
};
void l_init(struct line *l, const char *tag);
void l_str(struct line *l, const char *s);
void l_chr(struct line *l, char c);
void l_dec(struct line *l, u64 v);
void l_hex(struct line *l, u64 v);
void l_kv(struct line *l, const char *key, u64 v);      /* " key=<dec>" */
void l_kx(struct line *l, const char *key, u64 v);      /* " key=<hex>" */
void l_ks(struct line *l, const char *key, const char *s);
void l_emit(struct line *l, u32 cpu);                   /* ring 3 */
void guest_error(u32 cpu, const char *what);            /* GUEST-ERROR what=... */
void kexception(u64 *frame);                            /* ring 0 */
u64 splitmix64(u64 *state);
u64 mix64(u64 x);

/* main.c: configuration shared by all CPUs */
struct config {
    char workload[32];
    char action[32];
    u64 smp, hb_ms, mem_mib, mem_rate, report_ms, timer_hz, after_ms;
    u64 mmio_addr, regs_hold_ms, regs_inject, mem_inject, mem_hot_mib, mem_fill, mem_words, tsc_khz;
    u64 touch_hot_mib;
    u64 ncpus;
    u64 avx, avx512, kmovq, xcr0, xsave;
    char timer_mode[16];
    u32 apic_ids[MAX_CPUS];
    /* memory workload: usable ranges above the image */
    u32 nranges;
    u64 range_start[128], range_pages[128];
    u64 mem_total_pages;    /* pages used by the workload, all CPUs */
    /* virtio workloads (slot keys: ~0 = not given) */
    u64 disk_index, disk_slot, disk_blocks, disk_start, disk_verify_only, disk_pass_ms;
    u64 net_index, net_slot, net_ms;
    u64 rng_index, rng_slot, rng_bytes, rng_ms;
    u64 virtio_timeout_ms;
    char bench_mode[16];    /* diskbench */
    u64 bench_ms, bench_qd;
    u32 bsp;                /* APIC ID of the boot CPU */
};
extern struct config cfg;
extern volatile u32 cpu_online[MAX_CPUS];
void wait_ms(u64 ms);
__attribute__((noreturn)) void halt_forever(void);

/* workloads.c */
__attribute__((noreturn)) void run_workload(u32 cpu);
#endif /* __ASSEMBLER__ */

#endif
