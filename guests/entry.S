/*
 * stasis guest kit: everything that runs at CPL0.
 *
 * PVM-flavoured KVM emulates CPL0 code (~0.3 M instructions/s), so this file
 * keeps privileged work to a minimum: page tables and the GDT are static data,
 * the IDT is filled by one short loop on the BSP, each CPU then loads its
 * GDT/IDT/TSS, sets CR0/CR4/XCR0, enables its LAPIC and irets to ring 3
 * (IOPL=3, IF=1) where all the real work (C code) happens.
 */
#include "guest.h"

#define EFER_MSR        0xC0000080
#define CR4_BASE        0x620           /* PAE | OSFXSR | OSXMMEXCPT */
#define CR4_OSXSAVE     0x40000
#define MSR_TSC_DEADLINE 0x6E0

/* ------------------------------------------------------------------------ */
/* Xen PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) -> pvh_entry              */
/* ------------------------------------------------------------------------ */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_entry

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */
        .section .text.entry, "ax"

/* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
        .code32
        .globl  pvh_entry
pvh_entry:
        cli
        cld
        movl    %ebx, %edi
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax             /* PAE */
        movl    %eax, %cr4
        movl    $EFER_MSR, %ecx
        rdmsr
        orl     $0x100, %eax            /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* PG | PE */
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $SEL_KCODE64, $pvh_64

        .code64
pvh_64:
        movl    %edi, %r15d             /* zero-extends: start_info paddr */
        movl    $PROTO_PVH, %r14d
        jmp     common64

/* 64-bit Linux boot protocol (ELF e_entry): RSI = boot_params, no stack. */
        .globl  _start
_start:
        cli
        cld
        movq    %rsi, %r15
        movl    $PROTO_LINUX64, %r14d
        /* fall through */

common64:
        leaq    kstacks + KSTACK_SIZE(%rip), %rsp       /* provisional stack */
        leaq    pml4(%rip), %rax
        movq    %rax, %cr3
        lgdt    gdt_ptr(%rip)
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        pushq   $SEL_KCODE64
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:
        movl    %r14d, boot_proto(%rip)
        movq    %r15, boot_info(%rip)

        /* IDT: exception stubs 0..31 are 16 bytes apart. */
        leaq    idt(%rip), %rdi
        leaq    isr_stubs(%rip), %rsi
        movl    $0x8E00, %edx                   /* P, DPL0, 64-bit interrupt gate */
        movl    $32, %ecx
2:      call    set_gate
        addq    $16, %rdi
        addq    $16, %rsi
        decl    %ecx
        jnz     2b
        leaq    idt + 16 * VEC_TIMER(%rip), %rdi
        leaq    timer_isr(%rip), %rsi
        call    set_gate
        leaq    idt + 16 * VEC_SPURIOUS(%rip), %rdi
        leaq    spurious_isr(%rip), %rsi
        call    set_gate
        leaq    idt + 16 * VEC_UART(%rip), %rdi
        leaq    uart_isr(%rip), %rsi
        call    set_gate
        leaq    idt + 16 * VEC_GED(%rip), %rdi
        leaq    ged_isr(%rip), %rsi
        call    set_gate
        leaq    idt + 16 * VEC_SVC(%rip), %rdi
        leaq    svc_isr(%rip), %rsi
        movl    $0xEE00, %edx                   /* P, DPL3 (int $0x80 from ring 3) */
        call    set_gate

        movl    $1, %r13d                       /* BSP */
        jmp     cpu_common

/* rdi = gate, rsi = handler (< 4 GiB), edx = type/attr word */
set_gate:
        movl    %esi, %eax
        movw    %ax, (%rdi)
        movw    $SEL_KCODE64, 2(%rdi)
        movw    %dx, 4(%rdi)
        shrl    $16, %eax
        movw    %ax, 6(%rdi)
        movq    $0, 8(%rdi)
        ret

/* APs arrive here from the trampoline in long mode, no stack yet. */
ap_long64:
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        xorl    %r13d, %r13d                    /* not the BSP */
        /* fall through */

/*
 * Per-CPU setup, r13 = 1 on the BSP. Uses the initial APIC ID as CPU index.
 */
cpu_common:
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx
        movl    %ebx, %r12d                     /* r12 = APIC ID */
        cmpl    $MAX_CPUS, %r12d
        jae     dead
        movq    %r12, %rax
        incq    %rax
        shlq    $KSTACK_SHIFT, %rax
        leaq    kstacks(%rip), %rsp
        addq    %rax, %rsp                      /* kernel stack top */
        lgdt    gdt_ptr(%rip)
        lidt    idt_ptr(%rip)

        /* TSS: rsp0 = kernel stack top, no I/O bitmap. */
        movq    %r12, %rbx
        shlq    $7, %rbx                        /* * TSS_STRIDE */
        leaq    tss_array(%rip), %rax
        addq    %rax, %rbx                      /* rbx = this CPU's TSS */
        movq    %rsp, 4(%rbx)
        movw    $104, 102(%rbx)
        /* 16-byte available 64-bit TSS descriptor (base < 4 GiB). */
        movq    %r12, %rdi
        shlq    $4, %rdi
        leaq    gdt + SEL_TSS0(%rip), %rax
        addq    %rax, %rdi
        movl    %ebx, %eax
        shll    $16, %eax
        orl     $103, %eax                      /* limit 15:0, base 15:0 */
        movl    %eax, (%rdi)
        movl    %ebx, %eax
        shrl    $16, %eax
        andl    $0xFF, %eax                     /* base 23:16 */
        orl     $0x8900, %eax                   /* P, type 9 */
        movl    %ebx, %edx
        andl    $0xFF000000, %edx               /* base 31:24 */
        orl     %edx, %eax
        movl    %eax, 4(%rdi)
        movq    $0, 8(%rdi)
        movq    %r12, %rax
        shll    $4, %eax
        addl    $SEL_TSS0, %eax
        ltr     %ax

        /* CR0: MP | NE, clear EM and TS. */
        movq    %cr0, %rax
        andq    $~0xC, %rax
        orq     $0x22, %rax
        movq    %rax, %cr0

        /* CR4 / XCR0 from CPUID 1.ECX[26] and leaf 0xD sub-leaf 0. */
        xorl    %eax, %eax
        cpuid
        movl    %eax, %r8d                      /* max basic leaf */
        movl    $1, %eax
        cpuid
        movl    %ecx, %r9d
        xorl    %r10d, %r10d
        cmpl    $0xD, %r8d
        jb      3f
        movl    $0xD, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %eax, %r10d                     /* supported XCR0 bits 31:0 */
3:      movl    $CR4_BASE, %eax
        btl     $26, %r9d
        jc      4f
        testl   %r10d, %r10d
        jz      5f
4:      orl     $CR4_OSXSAVE, %eax
        movq    %rax, %cr4                      /* a #GP here = VMM CPUID problem */
        movl    %r10d, %eax
        andl    $0xE7, %eax
        orl     $3, %eax
        xorl    %edx, %edx
        xorl    %ecx, %ecx
        xsetbv
        movq    %rax, xcr0_val(%rip)
        jmp     6f
5:      movq    %rax, %cr4
6:      fninit

        /* LAPIC: software enable, spurious vector 0xFF; mask LINT0 and timer. */
        movl    $LAPIC_BASE, %edi
        movl    $0x1FF, LAPIC_SVR(%rdi)
        movl    $0x10000, LAPIC_LVT_LINT0(%rdi)
        movl    $(0x10000 | VEC_TIMER), LAPIC_LVT_TIMER(%rdi)

        /* iretq to ring 3: user_entry(cpu = rdi, is_bsp = rsi). */
        movq    %r12, %rax
        incq    %rax
        shlq    $USTACK_SHIFT, %rax
        leaq    ustacks(%rip), %rcx
        addq    %rcx, %rax
        pushq   $SEL_UDATA
        pushq   %rax
        pushq   $0x3202                         /* IF | IOPL=3 */
        pushq   $SEL_UCODE64
        leaq    user_entry(%rip), %rax
        pushq   %rax
        movl    %r12d, %edi
        movl    %r13d, %esi
        iretq

dead:   cli
        hlt
        jmp     dead

/* ------------------------------------------------------------------------ */
/* Interrupt and exception handlers                                          */
/* ------------------------------------------------------------------------ */
        .text
        .balign 16
isr_stubs:
        vec = 0
        .rept 32
        .balign 16
        .if vec == 13
        jmp     gp_handler
        .elseif vec == 6
        jmp     ud_handler
        .elseif (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        pushq   $vec
        jmp     exc_common
        .else
        pushq   $0
        pushq   $vec
        jmp     exc_common
        .endif
        vec = vec + 1
        .endr

/*
 * #GP from ring 3: `int $0x80` (CD 80) refused by the host becomes the service
 * call; with error code 0, a DX-form in/out is emulated (ring-3 port I/O
 * quirk of this host). Anything else is a real fault.
 * Frame: err, rip, cs, rflags, rsp, ss.
 */
gp_handler:
        testb   $3, 16(%rsp)
        jz      9f
        pushq   %rsi
        pushq   %rcx
        movq    24(%rsp), %rsi                  /* user rip */
        cmpw    $0x80CD, (%rsi)                 /* int $0x80 refused by the host? */
        je      10f
        cmpq    $0, 16(%rsp)                    /* port I/O #GP has error code 0 */
        jne     8f
        movzbl  (%rsi), %ecx
        cmpb    $0xEE, %cl
        jne     1f
        outb    %al, %dx
        jmp     7f
1:      cmpb    $0xEC, %cl
        jne     2f
        inb     %dx, %al
        jmp     7f
2:      cmpb    $0xEF, %cl
        jne     3f
        outl    %eax, %dx
        jmp     7f
3:      cmpb    $0xED, %cl
        jne     4f
        inl     %dx, %eax
        jmp     7f
4:      cmpb    $0x66, %cl
        jne     8f
        movzbl  1(%rsi), %ecx
        cmpb    $0xEF, %cl
        jne     5f
        outw    %ax, %dx
        movl    $2, %ecx
        jmp     6f
5:      cmpb    $0xED, %cl
        jne     8f
        inw     %dx, %ax
        movl    $2, %ecx
        jmp     6f
7:      movl    $1, %ecx
6:      addq    %rcx, 24(%rsp)
        incl    pio_emulated(%rip)
        popq    %rcx
        popq    %rsi
        addq    $8, %rsp
        iretq
8:      popq    %rcx
        popq    %rsi
9:      cmpq    $0, gp_fixup(%rip)              /* ring 0: an expected #GP? */
        je      11f
        pushq   %rax
        movq    gp_fixup(%rip), %rax
        movq    %rax, 16(%rsp)                  /* resume at the fixup */
        movq    $0, gp_fixup(%rip)
        popq    %rax
        addq    $8, %rsp                        /* drop the error code */
        iretq
11:     pushq   $13
        jmp     exc_common
10:     incl    svc_via_gp(%rip)
        popq    %rcx                            /* emulate the int $0x80 */
        popq    %rsi
        addq    $8, %rsp
        addq    $2, (%rsp)
        jmp     svc_isr

/*
 * #UD: this host may turn a ring-3 `int $0x80` into #UD. If the faulting
 * instruction is CD 80 in ring 3, perform the service call instead.
 * Frame: rip, cs, rflags, rsp, ss.
 */
ud_handler:
        testb   $3, 8(%rsp)
        jz      1f
        pushq   %rax
        movq    8(%rsp), %rax
        cmpw    $0x80CD, (%rax)
        popq    %rax
        jne     1f
        incl    svc_via_ud(%rip)
        addq    $2, (%rsp)
        jmp     svc_isr
1:      pushq   $0
        pushq   $6
        /* fall through */

/* Frame: vector, error, rip, cs, rflags, rsp, ss. Print and halt. */
exc_common:
        cli
        movq    %rsp, %rdi
        andq    $-16, %rsp
        call    kexception
        jmp     dead

/* LAPIC timer: count in the per-CPU block at the bottom of the kernel stack. */
timer_isr:
        pushq   %rax
        movq    %rsp, %rax
        andq    $-KSTACK_SIZE, %rax
        incq    (%rax)
        cmpq    $0, 16(%rax)                    /* kcpu.deadline_period */
        je      1f
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        movq    16(%rax), %rsi
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        addq    %rsi, %rax                      /* next deadline */
        movq    %rax, %rdx
        shrq    $32, %rdx
        movl    $MSR_TSC_DEADLINE, %ecx
        wrmsr
        popq    %rsi
        popq    %rdx
        popq    %rcx
1:      movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

spurious_isr:
        iretq

/* Device interrupts routed through the IOAPIC: count, EOI. Ring 3 does the
 * rest (reads the UART, the generation ID). */
uart_isr:
        lock incq irq_count_uart(%rip)
        jmp     eoi_iret
ged_isr:
        lock incq irq_count_ged(%rip)
eoi_iret:
        pushq   %rax
        movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

/* int $0x80: RAX = service, RDI/RSI/RDX = arguments. */
svc_isr:
        cmpq    $SVC_NOP, %rax
        je      svc_nop
        cmpq    $SVC_START_AP, %rax
        je      svc_start_ap
        cmpq    $SVC_TRIPLE, %rax
        je      svc_triple
        cmpq    $SVC_HALT, %rax
        je      dead
        cmpq    $SVC_MMIO_EXEC, %rax
        je      svc_mmio_exec
        cmpq    $SVC_TIMER_START, %rax
        je      svc_timer_start
        cmpq    $SVC_CPUID, %rax
        je      svc_cpuid
        cmpq    $SVC_XSETBV, %rax
        je      svc_xsetbv
        cmpq    $SVC_XSAVE_OFF, %rax
        je      svc_xsave_off
        cmpq    $SVC_TIMER_DEADLINE, %rax
        je      svc_timer_deadline
        movq    $-1, %rax
        iretq

svc_nop:
        movabsq $SVC_NOP_MAGIC, %rax
        iretq

/* CPUID as the VMM configured it (ring-3 CPUID is not trapped here). */
svc_cpuid:
        movl    %edi, %eax
        movl    %esi, %ecx
        cpuid
        iretq

/*
 * XSETBV with rdi, catching the #GP a component the VMM does not allow
 * raises: returns 0 (set) or 1 (refused, XCR0 unchanged).
 */
svc_xsetbv:
        pushq   %rcx
        pushq   %rdx
        leaq    1f(%rip), %rcx
        movq    %rcx, gp_fixup(%rip)
        movl    %edi, %eax
        movq    %rdi, %rdx
        shrq    $32, %rdx
        xorl    %ecx, %ecx
        xsetbv
        movq    $0, gp_fixup(%rip)
        movq    %rdi, xcr0_val(%rip)
        xorl    %eax, %eax
        jmp     2f
1:      movl    $1, %eax
2:      popq    %rdx
        popq    %rcx
        iretq

/* Back to FXSAVE-only state: XCR0 = x87, CR4.OSXSAVE cleared. */
svc_xsave_off:
        pushq   %rcx
        pushq   %rdx
        movq    %cr4, %rax
        btq     $18, %rax                       /* CR4.OSXSAVE */
        jnc     1f
        movl    $1, %eax
        xorl    %edx, %edx
        xorl    %ecx, %ecx
        xsetbv
        movq    %cr4, %rax
        btrq    $18, %rax
        movq    %rax, %cr4
1:      movq    $0, xcr0_val(%rip)
        xorl    %eax, %eax
        popq    %rdx
        popq    %rcx
        iretq

/* LAPIC timer in TSC-deadline mode, period rdi TSC ticks. */
svc_timer_deadline:
        pushq   %rcx
        pushq   %rdx
        movq    %rsp, %rcx
        andq    $-KSTACK_SIZE, %rcx
        movq    $0, (%rcx)                      /* kcpu.timer_ticks */
        movq    %rdi, 16(%rcx)                  /* kcpu.deadline_period */
        movl    $(LAPIC_BASE + LAPIC_LVT_TIMER), %eax
        movl    $(0x40000 | VEC_TIMER), (%rax)  /* TSC-deadline mode */
        mfence
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        addq    %rdi, %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        movl    $MSR_TSC_DEADLINE, %ecx
        wrmsr
        xorl    %eax, %eax
        popq    %rdx
        popq    %rcx
        iretq

/*
 * Triple fault: zero-limit IDT, then raise an exception. ud2 rather than int3:
 * the CPL0 instruction emulator of this host cannot emulate INT n outside
 * real mode (that is an emulation failure, not a triple fault).
 */
svc_triple:
        lidt    zero_idt_ptr(%rip)
        ud2
        int3
        jmp     dead

svc_mmio_exec:
        testq   %rdi, %rdi
        jnz     1f
        movl    $0xD0000000, %edi
1:      jmp     *%rdi

/* rdi = apic id, rsi = SIPI vector, rdx = TSC ticks for 10 ms */
svc_start_ap:
        pushq   %rcx
        pushq   %rdx
        pushq   %r8
        pushq   %r9
        pushq   %r10
        movq    %rdx, %r9                       /* 10 ms */
        movl    $LAPIC_BASE, %r10d
        movl    %edi, %eax
        shll    $24, %eax
        movl    %eax, LAPIC_ICR_HI(%r10)
        movl    $0x4500, LAPIC_ICR_LO(%r10)     /* INIT, level assert */
        call    tsc_delay
        shrq    $6, %r9                         /* ~160 us */
        movl    %edi, %eax
        shll    $24, %eax
        movl    %eax, LAPIC_ICR_HI(%r10)
        movl    %esi, %eax
        andl    $0xFF, %eax
        orl     $0x4600, %eax                   /* STARTUP */
        movl    %eax, LAPIC_ICR_LO(%r10)
        call    tsc_delay
        movl    %edi, %eax
        shll    $24, %eax
        movl    %eax, LAPIC_ICR_HI(%r10)
        movl    %esi, %eax
        andl    $0xFF, %eax
        orl     $0x4600, %eax
        movl    %eax, LAPIC_ICR_LO(%r10)
        xorl    %eax, %eax
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdx
        popq    %rcx
        iretq

/* Spin for r9 TSC ticks. Clobbers rax, rdx, r8. */
tsc_delay:
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, %r8
1:      pause
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        subq    %r8, %rax
        cmpq    %r9, %rax
        jb      1b
        ret

/*
 * rdi = hz, rsi = TSC kHz. Divide-by-1; counts LAPIC ticks over ~10 ms of
 * TSC (scaled by the TSC time actually elapsed between the start of the count
 * and the read-back, which absorbs emulation delays), then periodic mode.
 * Returns the initial count. Zeroes this CPU's tick counter.
 */
svc_timer_start:
        pushq   %rcx
        pushq   %rdx
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        testq   %rdi, %rdi
        jnz     1f
        movl    $100, %edi
1:      movl    $LAPIC_BASE, %r10d
        movl    $0xB, LAPIC_TMR_DIV(%r10)       /* divide by 1 */
        movl    $(0x10000 | VEC_TIMER), LAPIC_LVT_TIMER(%r10)
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, %r11                      /* t0 */
        movl    $0xFFFFFFFF, LAPIC_TMR_INIT(%r10)
        imulq   $10, %rsi, %r9                  /* 10 ms of TSC */
        call    tsc_delay
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, %rcx
        subq    %r11, %rcx                      /* TSC ticks elapsed */
        movl    LAPIC_TMR_CUR(%r10), %edx
        movl    $0xFFFFFFFF, %eax
        subl    %edx, %eax                      /* LAPIC ticks elapsed */
        movl    $0, LAPIC_TMR_INIT(%r10)
        imulq   %rsi, %rax
        imulq   $1000, %rax
        xorl    %edx, %edx
        divq    %rcx                            /* LAPIC ticks per second */
        xorl    %edx, %edx
        divq    %rdi                            /* per period */
        movl    $0xFFFFFFFF, %ecx
        cmpq    %rcx, %rax
        jbe     2f
        movq    %rcx, %rax
2:      testq   %rax, %rax
        jnz     3f
        movl    $1, %eax
3:      movq    %rsp, %rcx
        andq    $-KSTACK_SIZE, %rcx
        movq    $0, (%rcx)                      /* kcpu.timer_ticks */
        movq    %rax, 8(%rcx)                   /* kcpu.lapic_count */
        movl    $(0x20000 | VEC_TIMER), LAPIC_LVT_TIMER(%r10)   /* periodic */
        movl    %eax, LAPIC_TMR_INIT(%r10)
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdx
        popq    %rcx
        iretq

/* Ring-3 entry: rdi = cpu (APIC ID), rsi = 1 on the BSP. */
        .globl  user_entry
user_entry:
        andq    $-16, %rsp
        call    user_main
        ud2

/* ------------------------------------------------------------------------ */
/* AP real-mode trampoline, copied to TRAMP_ADDR by ring 3 before SIPI.      */
/* ------------------------------------------------------------------------ */
        .section .rodata.tramp, "a"
        .balign 16
        .globl  tramp_start, tramp_end
        .code16
tramp_start:
        cli
        cld
        movw    %cs, %ax
        movw    %ax, %ds
        lgdtl   tramp_gdtr - tramp_start
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $SEL_KCODE32, $(TRAMP_ADDR + tramp32 - tramp_start)
        .code32
tramp32:
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax                     /* PAE */
        movl    %eax, %cr4
        movl    $EFER_MSR, %ecx
        rdmsr
        orl     $0x100, %eax                    /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax
        movl    %eax, %cr0
        ljmp    $SEL_KCODE64, $ap_long64
        .balign 8
tramp_gdtr:
        .word   gdt_end - gdt - 1
        .long   gdt
tramp_end:
        .code64

/* ------------------------------------------------------------------------ */
/* Static data: GDT, IDT, TSSs, page tables                                  */
/* ------------------------------------------------------------------------ */
        .data
        .balign 16
        .globl  gdt
gdt:
        .quad   0                               /* null */
        .quad   0x00AF9A000000FFFF              /* 0x08 kernel code, 64-bit */
        .quad   0x00CF92000000FFFF              /* 0x10 kernel data */
        .quad   0x00CF9A000000FFFF              /* 0x18 kernel code, 32-bit */
        .quad   0x00CFF2000000FFFF              /* 0x20 user data, DPL3 */
        .quad   0x00AFFA000000FFFF              /* 0x28 user code, 64-bit, DPL3 */
        .fill   2 * MAX_CPUS, 8, 0              /* 0x30.. one TSS descriptor per CPU */
gdt_end:
        .balign 8
        .word   0, 0, 0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .word   0, 0, 0
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt
        .word   0, 0, 0
zero_idt_ptr:
        .word   0
        .quad   0

        .balign 8
        .globl  boot_proto, boot_info, xcr0_val, svc_via_ud, svc_via_gp, pio_emulated
gp_fixup:       .quad 0                         /* ring-0 #GP recovery address */
        .globl  irq_count_uart, irq_count_ged
irq_count_uart: .quad 0
irq_count_ged:  .quad 0
boot_info:      .quad 0
xcr0_val:       .quad 0
boot_proto:     .long 0
svc_via_ud:     .long 0                 /* int $0x80 arrived as #UD */
svc_via_gp:     .long 0                 /* int $0x80 arrived as #GP */
pio_emulated:   .long 0                 /* ring-3 in/out emulated by #GP */

        .balign 4096
idt:
        .fill   256 * 2, 8, 0
tss_array:
        .fill   MAX_CPUS * TSS_STRIDE / 8, 8, 0

/*
 * Identity map of the first 64 GiB with 2 MiB pages, U/S=1, R/W=1. The two
 * 2 MiB pages covering 0xFEC00000-0xFEFFFFFF (IOAPIC, LAPIC) and the eight
 * covering the virtio-mmio windows 0xD0000000-0xD0FFFFFF are PCD|PWT
 * (ring 3 drives the virtio devices through them).
 */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl  pml4
pml4:
        .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:
        n = 0
        .rept 64
        .quad   pd + n * 4096 + 0x7
        n = n + 1
        .endr
        .fill   512 - 64, 8, 0
pd:
        n = 0
        .rept 64 * 512
        .if (n == (0xFEC00000 >> 21)) || (n == (0xFEE00000 >> 21)) || ((n >= (0xD0000000 >> 21)) && (n < (0xD1000000 >> 21)))
        .quad   (n << 21) | 0x9F                /* P RW US PWT PCD PS */
        .else
        .quad   (n << 21) | 0x87                /* P RW US PS */
        .endif
        n = n + 1
        .endr

/* ------------------------------------------------------------------------ */
/* Stacks: not zeroed by anyone, not part of the file image                  */
/* ------------------------------------------------------------------------ */
        .section .kbss, "aw", @nobits
        .balign KSTACK_SIZE
        .globl  kstacks
kstacks:
        .skip   MAX_CPUS * KSTACK_SIZE
        .balign 4096
ustacks:
        .skip   MAX_CPUS * USTACK_SIZE

        .section .note.GNU-stack, "", @progbits
