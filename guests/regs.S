/*
 * Register-holding loop for the `registers` workload (ring 3).
 *
 * void regs_hold(const void *in, u64 *gpr_out, void *xsave_area,
 *                u64 spins, u64 flags, u64 xcr0);
 *
 * Loads x87 ST0-7, XMM/YMM/ZMM, opmask registers and every GPR except RSP
 * from `in` (layout RI_* in guest.h), spins `spins` times with RCX as the
 * only changing register, then stores the GPRs (encoding order, RSP slot 0)
 * to gpr_out and the vector/x87 state with XSAVE (flags & RF_XSAVE, mask =
 * xcr0) or FXSAVE to xsave_area (64-byte aligned, pre-zeroed by the caller).
 */
#include "guest.h"

        .text
        .globl  regs_hold
regs_hold:
        pushq   %rbx
        pushq   %rbp
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        pushq   %rsi                    /* [32] gpr_out */
        pushq   %rdx                    /* [24] xsave area */
        pushq   %r8                     /* [16] flags */
        pushq   %r9                     /* [8]  xcr0 */
        pushq   %rcx                    /* [0]  spins */

        fninit
        i = 0
        .rept 8
        fldt    RI_X87 + 16 * i(%rdi)
        i = i + 1
        .endr

        testl   $RF_AVX512, %r8d
        jnz     .Lload512
        testl   $RF_AVX, %r8d
        jnz     .Lload256
        movdqu  RI_VEC + 64 * 0(%rdi), %xmm0
        movdqu  RI_VEC + 64 * 1(%rdi), %xmm1
        movdqu  RI_VEC + 64 * 2(%rdi), %xmm2
        movdqu  RI_VEC + 64 * 3(%rdi), %xmm3
        movdqu  RI_VEC + 64 * 4(%rdi), %xmm4
        movdqu  RI_VEC + 64 * 5(%rdi), %xmm5
        movdqu  RI_VEC + 64 * 6(%rdi), %xmm6
        movdqu  RI_VEC + 64 * 7(%rdi), %xmm7
        movdqu  RI_VEC + 64 * 8(%rdi), %xmm8
        movdqu  RI_VEC + 64 * 9(%rdi), %xmm9
        movdqu  RI_VEC + 64 * 10(%rdi), %xmm10
        movdqu  RI_VEC + 64 * 11(%rdi), %xmm11
        movdqu  RI_VEC + 64 * 12(%rdi), %xmm12
        movdqu  RI_VEC + 64 * 13(%rdi), %xmm13
        movdqu  RI_VEC + 64 * 14(%rdi), %xmm14
        movdqu  RI_VEC + 64 * 15(%rdi), %xmm15
        jmp     .Lloaded
.Lload256:
        vmovdqu RI_VEC + 64 * 0(%rdi), %ymm0
        vmovdqu RI_VEC + 64 * 1(%rdi), %ymm1
        vmovdqu RI_VEC + 64 * 2(%rdi), %ymm2
        vmovdqu RI_VEC + 64 * 3(%rdi), %ymm3
        vmovdqu RI_VEC + 64 * 4(%rdi), %ymm4
        vmovdqu RI_VEC + 64 * 5(%rdi), %ymm5
        vmovdqu RI_VEC + 64 * 6(%rdi), %ymm6
        vmovdqu RI_VEC + 64 * 7(%rdi), %ymm7
        vmovdqu RI_VEC + 64 * 8(%rdi), %ymm8
        vmovdqu RI_VEC + 64 * 9(%rdi), %ymm9
        vmovdqu RI_VEC + 64 * 10(%rdi), %ymm10
        vmovdqu RI_VEC + 64 * 11(%rdi), %ymm11
        vmovdqu RI_VEC + 64 * 12(%rdi), %ymm12
        vmovdqu RI_VEC + 64 * 13(%rdi), %ymm13
        vmovdqu RI_VEC + 64 * 14(%rdi), %ymm14
        vmovdqu RI_VEC + 64 * 15(%rdi), %ymm15
        jmp     .Lloaded
.Lload512:
        vmovdqu64 RI_VEC + 64 * 0(%rdi), %zmm0
        vmovdqu64 RI_VEC + 64 * 1(%rdi), %zmm1
        vmovdqu64 RI_VEC + 64 * 2(%rdi), %zmm2
        vmovdqu64 RI_VEC + 64 * 3(%rdi), %zmm3
        vmovdqu64 RI_VEC + 64 * 4(%rdi), %zmm4
        vmovdqu64 RI_VEC + 64 * 5(%rdi), %zmm5
        vmovdqu64 RI_VEC + 64 * 6(%rdi), %zmm6
        vmovdqu64 RI_VEC + 64 * 7(%rdi), %zmm7
        vmovdqu64 RI_VEC + 64 * 8(%rdi), %zmm8
        vmovdqu64 RI_VEC + 64 * 9(%rdi), %zmm9
        vmovdqu64 RI_VEC + 64 * 10(%rdi), %zmm10
        vmovdqu64 RI_VEC + 64 * 11(%rdi), %zmm11
        vmovdqu64 RI_VEC + 64 * 12(%rdi), %zmm12
        vmovdqu64 RI_VEC + 64 * 13(%rdi), %zmm13
        vmovdqu64 RI_VEC + 64 * 14(%rdi), %zmm14
        vmovdqu64 RI_VEC + 64 * 15(%rdi), %zmm15
        vmovdqu64 RI_VEC + 64 * 16(%rdi), %zmm16
        vmovdqu64 RI_VEC + 64 * 17(%rdi), %zmm17
        vmovdqu64 RI_VEC + 64 * 18(%rdi), %zmm18
        vmovdqu64 RI_VEC + 64 * 19(%rdi), %zmm19
        vmovdqu64 RI_VEC + 64 * 20(%rdi), %zmm20
        vmovdqu64 RI_VEC + 64 * 21(%rdi), %zmm21
        vmovdqu64 RI_VEC + 64 * 22(%rdi), %zmm22
        vmovdqu64 RI_VEC + 64 * 23(%rdi), %zmm23
        vmovdqu64 RI_VEC + 64 * 24(%rdi), %zmm24
        vmovdqu64 RI_VEC + 64 * 25(%rdi), %zmm25
        vmovdqu64 RI_VEC + 64 * 26(%rdi), %zmm26
        vmovdqu64 RI_VEC + 64 * 27(%rdi), %zmm27
        vmovdqu64 RI_VEC + 64 * 28(%rdi), %zmm28
        vmovdqu64 RI_VEC + 64 * 29(%rdi), %zmm29
        vmovdqu64 RI_VEC + 64 * 30(%rdi), %zmm30
        vmovdqu64 RI_VEC + 64 * 31(%rdi), %zmm31
        testl   $RF_KMOVQ, %r8d
        jz      .Lkmovw
        kmovq   RI_K + 8 * 0(%rdi), %k0
        kmovq   RI_K + 8 * 1(%rdi), %k1
        kmovq   RI_K + 8 * 2(%rdi), %k2
        kmovq   RI_K + 8 * 3(%rdi), %k3
        kmovq   RI_K + 8 * 4(%rdi), %k4
        kmovq   RI_K + 8 * 5(%rdi), %k5
        kmovq   RI_K + 8 * 6(%rdi), %k6
        kmovq   RI_K + 8 * 7(%rdi), %k7
        jmp     .Lloaded
.Lkmovw:
        kmovw   RI_K + 8 * 0(%rdi), %k0
        kmovw   RI_K + 8 * 1(%rdi), %k1
        kmovw   RI_K + 8 * 2(%rdi), %k2
        kmovw   RI_K + 8 * 3(%rdi), %k3
        kmovw   RI_K + 8 * 4(%rdi), %k4
        kmovw   RI_K + 8 * 5(%rdi), %k5
        kmovw   RI_K + 8 * 6(%rdi), %k6
        kmovw   RI_K + 8 * 7(%rdi), %k7
.Lloaded:
        movq    (%rsp), %rcx                    /* spins */
        movq    RI_GPR + 8 * 0(%rdi), %rax
        movq    RI_GPR + 8 * 2(%rdi), %rdx
        movq    RI_GPR + 8 * 3(%rdi), %rbx
        movq    RI_GPR + 8 * 5(%rdi), %rbp
        movq    RI_GPR + 8 * 6(%rdi), %rsi
        movq    RI_GPR + 8 * 8(%rdi), %r8
        movq    RI_GPR + 8 * 9(%rdi), %r9
        movq    RI_GPR + 8 * 10(%rdi), %r10
        movq    RI_GPR + 8 * 11(%rdi), %r11
        movq    RI_GPR + 8 * 12(%rdi), %r12
        movq    RI_GPR + 8 * 13(%rdi), %r13
        movq    RI_GPR + 8 * 14(%rdi), %r14
        movq    RI_GPR + 8 * 15(%rdi), %r15
        movq    RI_GPR + 8 * 7(%rdi), %rdi

        .balign 16
.Lhold:
        decq    %rcx
        jnz     .Lhold

        /* Push GPRs so that [rsp + 8*i] = register i in encoding order. */
        pushq   %r15
        pushq   %r14
        pushq   %r13
        pushq   %r12
        pushq   %r11
        pushq   %r10
        pushq   %r9
        pushq   %r8
        pushq   %rdi
        pushq   %rsi
        pushq   %rbp
        pushq   $0                              /* rsp slot */
        pushq   %rbx
        pushq   %rdx
        pushq   %rcx
        pushq   %rax
        movq    128 + 32(%rsp), %rdi            /* gpr_out */
        movq    %rsp, %rsi
        movl    $16, %ecx
        cld
        rep movsq
        addq    $128, %rsp

        popq    %rcx                            /* spins */
        popq    %rax                            /* xcr0 */
        popq    %r8                             /* flags */
        popq    %rdi                            /* xsave area */
        popq    %rsi                            /* gpr_out */
        testl   $RF_XSAVE, %r8d
        jz      .Lfxsave
        movq    %rax, %rdx
        shrq    $32, %rdx
        xsave   (%rdi)
        jmp     .Lsaved
.Lfxsave:
        fxsave  (%rdi)
.Lsaved:
        fninit
        testl   $(RF_AVX | RF_AVX512), %r8d
        jz      1f
        vzeroupper
1:
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbp
        popq    %rbx
        ret

        .section .note.GNU-stack, "", @progbits
