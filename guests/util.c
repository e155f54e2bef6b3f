/* Freestanding helpers: memory/string functions, line formatting, COM1 output. */
#include "guest.h"

#define COM1 0x3F8

void *memcpy(void *d, const void *s, u64 n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, u64 n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp) {
        while (n--)
            *dp++ = *sp++;
    } else {
        while (n--)
            dp[n] = sp[n];
    }
    return d;
}

void *memset(void *d, int c, u64 n)
{
    u8 *dp = d;
    while (n--)
        *dp++ = (u8)c;
    return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

u64 strlen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

u64 mix64(u64 z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ul;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBul;
    return z ^ (z >> 31);
}

u64 splitmix64(u64 *state)
{
    *state += 0x9E3779B97F4A7C15ul;
    return mix64(*state);
}

/* ---- line building ---- */

void l_chr(struct line *l, char c)
{
    if (l->n < LINE_CAP - 2)
        l->buf[l->n++] = c;
}

void l_str(struct line *l, const char *s)
{
    while (*s)
        l_chr(l, *s++);
}

void l_init(struct line *l, const char *tag)
{
    l->n = 0;
    l_str(l, tag);
}

void l_dec(struct line *l, u64 v)
{
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        l_chr(l, tmp[--i]);
}

void l_hex(struct line *l, u64 v)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    while (shift > 0 && ((v >> shift) & 0xF) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        l_chr(l, digits[(v >> shift) & 0xF]);
}

void l_kv(struct line *l, const char *key, u64 v)
{
    l_chr(l, ' ');
    l_str(l, key);
    l_chr(l, '=');
    l_dec(l, v);
}

void l_kx(struct line *l, const char *key, u64 v)
{
    l_chr(l, ' ');
    l_str(l, key);
    l_chr(l, '=');
    l_hex(l, v);
}

void l_ks(struct line *l, const char *key, const char *s)
{
    l_chr(l, ' ');
    l_str(l, key);
    l_chr(l, '=');
    l_str(l, s);
}

/* ---- output lock: holds (cpu + 1) of the owner ---- */

static volatile u32 print_lock;

static void serial_write(const char *s, u32 n)
{
    for (u32 i = 0; i < n; i++)
        outb(COM1, (u8)s[i]);
}

void l_emit(struct line *l, u32 cpu)
{
    l->buf[l->n++] = '\n';
    for (;;) {
        u32 expect = 0;
        if (__atomic_compare_exchange_n(&print_lock, &expect, cpu + 1, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
        while (print_lock)
            cpu_relax();
    }
    serial_write(l->buf, l->n);
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
    l->n--;
}

void guest_error(u32 cpu, const char *what)
{
    struct line l;
    l_init(&l, "GUEST-ERROR");
    l_ks(&l, "what", what);
    l_kv(&l, "cpu", cpu);
    l_emit(&l, cpu);
}

/*
 * Ring 0: report an exception and return (the caller halts).
 * frame: vector, error, rip, cs, rflags, rsp, ss.
 * The lock is taken with a bounded spin (this CPU may hold it from ring 3,
 * or another CPU may have died holding it).
 */
void kexception(u64 *frame)
{
    struct line l;
    u32 a, b, c, d, cpu;
    cpuid(1, 0, &a, &b, &c, &d);
    cpu = b >> 24;
    l_init(&l, "GUEST-EXCEPTION");
    l_kv(&l, "cpu", cpu);
    l_kv(&l, "vector", frame[0]);
    l_kx(&l, "error", frame[1]);
    l_kx(&l, "rip", frame[2]);
    l_kx(&l, "cs", frame[3]);
    l.buf[l.n++] = '\n';
    int locked = 0;
    if (print_lock != cpu + 1) {
        for (u32 i = 0; i < 20000; i++) {
            u32 expect = 0;
            if (__atomic_compare_exchange_n(&print_lock, &expect, cpu + 1, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                locked = 1;
                break;
            }
        }
    }
    serial_write(l.buf, l.n);
    if (locked)
        __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}
