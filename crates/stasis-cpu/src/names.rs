//! The names of x86 CPUID feature bits, as Linux prints them in
//! `/proc/cpuinfo`.
//!
//! Data, not code: the table was generated from Linux's
//! `arch/x86/include/asm/cpufeatures.h` (a tree newer than 6.18) and
//! `arch/x86/include/uapi/asm/kvm_para.h`, and checked against the
//! `/proc/cpuinfo` of a 6.18 host. `shown == false` marks bits Linux keeps
//! out of `/proc/cpuinfo`; they are named after the kernel's macro. Only
//! hardware-defined CPUID words are here (Linux's synthetic words are not
//! CPUID bits). See [`crate::feature`] for the lookups built on it.

use crate::feature::Reg;

/// (name, leaf, subleaf, register, bit, shown_in_proc_cpuinfo)
pub(crate) const LINUX_FEATURES: &[(&str, u32, u32, Reg, u8, bool)] = &[
    // CPUID 0x1 EDX (word 0)
    ("fpu", 0x00000001, 0, Reg::Edx, 0, true), // X86_FEATURE_FPU
    ("vme", 0x00000001, 0, Reg::Edx, 1, true), // X86_FEATURE_VME
    ("de", 0x00000001, 0, Reg::Edx, 2, true),  // X86_FEATURE_DE
    ("pse", 0x00000001, 0, Reg::Edx, 3, true), // X86_FEATURE_PSE
    ("tsc", 0x00000001, 0, Reg::Edx, 4, true), // X86_FEATURE_TSC
    ("msr", 0x00000001, 0, Reg::Edx, 5, true), // X86_FEATURE_MSR
    ("pae", 0x00000001, 0, Reg::Edx, 6, true), // X86_FEATURE_PAE
    ("mce", 0x00000001, 0, Reg::Edx, 7, true), // X86_FEATURE_MCE
    ("cx8", 0x00000001, 0, Reg::Edx, 8, true), // X86_FEATURE_CX8
    ("apic", 0x00000001, 0, Reg::Edx, 9, true), // X86_FEATURE_APIC
    ("sep", 0x00000001, 0, Reg::Edx, 11, true), // X86_FEATURE_SEP
    ("mtrr", 0x00000001, 0, Reg::Edx, 12, true), // X86_FEATURE_MTRR
    ("pge", 0x00000001, 0, Reg::Edx, 13, true), // X86_FEATURE_PGE
    ("mca", 0x00000001, 0, Reg::Edx, 14, true), // X86_FEATURE_MCA
    ("cmov", 0x00000001, 0, Reg::Edx, 15, true), // X86_FEATURE_CMOV
    ("pat", 0x00000001, 0, Reg::Edx, 16, true), // X86_FEATURE_PAT
    ("pse36", 0x00000001, 0, Reg::Edx, 17, true), // X86_FEATURE_PSE36
    ("pn", 0x00000001, 0, Reg::Edx, 18, true), // X86_FEATURE_PN
    ("clflush", 0x00000001, 0, Reg::Edx, 19, true), // X86_FEATURE_CLFLUSH
    ("dts", 0x00000001, 0, Reg::Edx, 21, true), // X86_FEATURE_DS
    ("acpi", 0x00000001, 0, Reg::Edx, 22, true), // X86_FEATURE_ACPI
    ("mmx", 0x00000001, 0, Reg::Edx, 23, true), // X86_FEATURE_MMX
    ("fxsr", 0x00000001, 0, Reg::Edx, 24, true), // X86_FEATURE_FXSR
    ("sse", 0x00000001, 0, Reg::Edx, 25, true), // X86_FEATURE_XMM
    ("sse2", 0x00000001, 0, Reg::Edx, 26, true), // X86_FEATURE_XMM2
    ("ss", 0x00000001, 0, Reg::Edx, 27, true), // X86_FEATURE_SELFSNOOP
    ("ht", 0x00000001, 0, Reg::Edx, 28, true), // X86_FEATURE_HT
    ("tm", 0x00000001, 0, Reg::Edx, 29, true), // X86_FEATURE_ACC
    ("ia64", 0x00000001, 0, Reg::Edx, 30, true), // X86_FEATURE_IA64
    ("pbe", 0x00000001, 0, Reg::Edx, 31, true), // X86_FEATURE_PBE
    // CPUID 0x1 ECX (word 4)
    ("pni", 0x00000001, 0, Reg::Ecx, 0, true), // X86_FEATURE_XMM3
    ("pclmulqdq", 0x00000001, 0, Reg::Ecx, 1, true), // X86_FEATURE_PCLMULQDQ
    ("dtes64", 0x00000001, 0, Reg::Ecx, 2, true), // X86_FEATURE_DTES64
    ("monitor", 0x00000001, 0, Reg::Ecx, 3, true), // X86_FEATURE_MWAIT
    ("ds_cpl", 0x00000001, 0, Reg::Ecx, 4, true), // X86_FEATURE_DSCPL
    ("vmx", 0x00000001, 0, Reg::Ecx, 5, true), // X86_FEATURE_VMX
    ("smx", 0x00000001, 0, Reg::Ecx, 6, true), // X86_FEATURE_SMX
    ("est", 0x00000001, 0, Reg::Ecx, 7, true), // X86_FEATURE_EST
    ("tm2", 0x00000001, 0, Reg::Ecx, 8, true), // X86_FEATURE_TM2
    ("ssse3", 0x00000001, 0, Reg::Ecx, 9, true), // X86_FEATURE_SSSE3
    ("cid", 0x00000001, 0, Reg::Ecx, 10, true), // X86_FEATURE_CID
    ("sdbg", 0x00000001, 0, Reg::Ecx, 11, true), // X86_FEATURE_SDBG
    ("fma", 0x00000001, 0, Reg::Ecx, 12, true), // X86_FEATURE_FMA
    ("cx16", 0x00000001, 0, Reg::Ecx, 13, true), // X86_FEATURE_CX16
    ("xtpr", 0x00000001, 0, Reg::Ecx, 14, true), // X86_FEATURE_XTPR
    ("pdcm", 0x00000001, 0, Reg::Ecx, 15, true), // X86_FEATURE_PDCM
    ("pcid", 0x00000001, 0, Reg::Ecx, 17, true), // X86_FEATURE_PCID
    ("dca", 0x00000001, 0, Reg::Ecx, 18, true), // X86_FEATURE_DCA
    ("sse4_1", 0x00000001, 0, Reg::Ecx, 19, true), // X86_FEATURE_XMM4_1
    ("sse4_2", 0x00000001, 0, Reg::Ecx, 20, true), // X86_FEATURE_XMM4_2
    ("x2apic", 0x00000001, 0, Reg::Ecx, 21, true), // X86_FEATURE_X2APIC
    ("movbe", 0x00000001, 0, Reg::Ecx, 22, true), // X86_FEATURE_MOVBE
    ("popcnt", 0x00000001, 0, Reg::Ecx, 23, true), // X86_FEATURE_POPCNT
    ("tsc_deadline_timer", 0x00000001, 0, Reg::Ecx, 24, true), // X86_FEATURE_TSC_DEADLINE_TIMER
    ("aes", 0x00000001, 0, Reg::Ecx, 25, true), // X86_FEATURE_AES
    ("xsave", 0x00000001, 0, Reg::Ecx, 26, true), // X86_FEATURE_XSAVE
    ("osxsave", 0x00000001, 0, Reg::Ecx, 27, false), // X86_FEATURE_OSXSAVE
    ("avx", 0x00000001, 0, Reg::Ecx, 28, true), // X86_FEATURE_AVX
    ("f16c", 0x00000001, 0, Reg::Ecx, 29, true), // X86_FEATURE_F16C
    ("rdrand", 0x00000001, 0, Reg::Ecx, 30, true), // X86_FEATURE_RDRAND
    ("hypervisor", 0x00000001, 0, Reg::Ecx, 31, true), // X86_FEATURE_HYPERVISOR
    // CPUID 0x80000001 EDX (word 1)
    ("syscall", 0x80000001, 0, Reg::Edx, 11, true), // X86_FEATURE_SYSCALL
    ("mp", 0x80000001, 0, Reg::Edx, 19, true),      // X86_FEATURE_MP
    ("nx", 0x80000001, 0, Reg::Edx, 20, true),      // X86_FEATURE_NX
    ("mmxext", 0x80000001, 0, Reg::Edx, 22, true),  // X86_FEATURE_MMXEXT
    ("fxsr_opt", 0x80000001, 0, Reg::Edx, 25, true), // X86_FEATURE_FXSR_OPT
    ("pdpe1gb", 0x80000001, 0, Reg::Edx, 26, true), // X86_FEATURE_GBPAGES
    ("rdtscp", 0x80000001, 0, Reg::Edx, 27, true),  // X86_FEATURE_RDTSCP
    ("lm", 0x80000001, 0, Reg::Edx, 29, true),      // X86_FEATURE_LM
    ("3dnowext", 0x80000001, 0, Reg::Edx, 30, true), // X86_FEATURE_3DNOWEXT
    ("3dnow", 0x80000001, 0, Reg::Edx, 31, true),   // X86_FEATURE_3DNOW
    // CPUID 0x80000001 ECX (word 6)
    ("lahf_lm", 0x80000001, 0, Reg::Ecx, 0, true), // X86_FEATURE_LAHF_LM
    ("cmp_legacy", 0x80000001, 0, Reg::Ecx, 1, true), // X86_FEATURE_CMP_LEGACY
    ("svm", 0x80000001, 0, Reg::Ecx, 2, true),     // X86_FEATURE_SVM
    ("extapic", 0x80000001, 0, Reg::Ecx, 3, true), // X86_FEATURE_EXTAPIC
    ("cr8_legacy", 0x80000001, 0, Reg::Ecx, 4, true), // X86_FEATURE_CR8_LEGACY
    ("abm", 0x80000001, 0, Reg::Ecx, 5, true),     // X86_FEATURE_ABM
    ("sse4a", 0x80000001, 0, Reg::Ecx, 6, true),   // X86_FEATURE_SSE4A
    ("misalignsse", 0x80000001, 0, Reg::Ecx, 7, true), // X86_FEATURE_MISALIGNSSE
    ("3dnowprefetch", 0x80000001, 0, Reg::Ecx, 8, true), // X86_FEATURE_3DNOWPREFETCH
    ("osvw", 0x80000001, 0, Reg::Ecx, 9, true),    // X86_FEATURE_OSVW
    ("ibs", 0x80000001, 0, Reg::Ecx, 10, true),    // X86_FEATURE_IBS
    ("xop", 0x80000001, 0, Reg::Ecx, 11, true),    // X86_FEATURE_XOP
    ("skinit", 0x80000001, 0, Reg::Ecx, 12, true), // X86_FEATURE_SKINIT
    ("wdt", 0x80000001, 0, Reg::Ecx, 13, true),    // X86_FEATURE_WDT
    ("lwp", 0x80000001, 0, Reg::Ecx, 15, true),    // X86_FEATURE_LWP
    ("fma4", 0x80000001, 0, Reg::Ecx, 16, true),   // X86_FEATURE_FMA4
    ("tce", 0x80000001, 0, Reg::Ecx, 17, true),    // X86_FEATURE_TCE
    ("nodeid_msr", 0x80000001, 0, Reg::Ecx, 19, true), // X86_FEATURE_NODEID_MSR
    ("tbm", 0x80000001, 0, Reg::Ecx, 21, true),    // X86_FEATURE_TBM
    ("topoext", 0x80000001, 0, Reg::Ecx, 22, true), // X86_FEATURE_TOPOEXT
    ("perfctr_core", 0x80000001, 0, Reg::Ecx, 23, true), // X86_FEATURE_PERFCTR_CORE
    ("perfctr_nb", 0x80000001, 0, Reg::Ecx, 24, true), // X86_FEATURE_PERFCTR_NB
    ("bpext", 0x80000001, 0, Reg::Ecx, 26, true),  // X86_FEATURE_BPEXT
    ("ptsc", 0x80000001, 0, Reg::Ecx, 27, true),   // X86_FEATURE_PTSC
    ("perfctr_llc", 0x80000001, 0, Reg::Ecx, 28, true), // X86_FEATURE_PERFCTR_LLC
    ("mwaitx", 0x80000001, 0, Reg::Ecx, 29, true), // X86_FEATURE_MWAITX
    // CPUID 0x7.0 EBX (word 9)
    ("fsgsbase", 0x00000007, 0, Reg::Ebx, 0, true), // X86_FEATURE_FSGSBASE
    ("tsc_adjust", 0x00000007, 0, Reg::Ebx, 1, true), // X86_FEATURE_TSC_ADJUST
    ("sgx", 0x00000007, 0, Reg::Ebx, 2, true),      // X86_FEATURE_SGX
    ("bmi1", 0x00000007, 0, Reg::Ebx, 3, true),     // X86_FEATURE_BMI1
    ("hle", 0x00000007, 0, Reg::Ebx, 4, true),      // X86_FEATURE_HLE
    ("avx2", 0x00000007, 0, Reg::Ebx, 5, true),     // X86_FEATURE_AVX2
    ("fdp_excptn_only", 0x00000007, 0, Reg::Ebx, 6, false), // X86_FEATURE_FDP_EXCPTN_ONLY
    ("smep", 0x00000007, 0, Reg::Ebx, 7, true),     // X86_FEATURE_SMEP
    ("bmi2", 0x00000007, 0, Reg::Ebx, 8, true),     // X86_FEATURE_BMI2
    ("erms", 0x00000007, 0, Reg::Ebx, 9, true),     // X86_FEATURE_ERMS
    ("invpcid", 0x00000007, 0, Reg::Ebx, 10, true), // X86_FEATURE_INVPCID
    ("rtm", 0x00000007, 0, Reg::Ebx, 11, true),     // X86_FEATURE_RTM
    ("cqm", 0x00000007, 0, Reg::Ebx, 12, true),     // X86_FEATURE_CQM
    ("zero_fcs_fds", 0x00000007, 0, Reg::Ebx, 13, false), // X86_FEATURE_ZERO_FCS_FDS
    ("mpx", 0x00000007, 0, Reg::Ebx, 14, true),     // X86_FEATURE_MPX
    ("rdt_a", 0x00000007, 0, Reg::Ebx, 15, true),   // X86_FEATURE_RDT_A
    ("avx512f", 0x00000007, 0, Reg::Ebx, 16, true), // X86_FEATURE_AVX512F
    ("avx512dq", 0x00000007, 0, Reg::Ebx, 17, true), // X86_FEATURE_AVX512DQ
    ("rdseed", 0x00000007, 0, Reg::Ebx, 18, true),  // X86_FEATURE_RDSEED
    ("adx", 0x00000007, 0, Reg::Ebx, 19, true),     // X86_FEATURE_ADX
    ("smap", 0x00000007, 0, Reg::Ebx, 20, true),    // X86_FEATURE_SMAP
    ("avx512ifma", 0x00000007, 0, Reg::Ebx, 21, true), // X86_FEATURE_AVX512IFMA
    ("clflushopt", 0x00000007, 0, Reg::Ebx, 23, true), // X86_FEATURE_CLFLUSHOPT
    ("clwb", 0x00000007, 0, Reg::Ebx, 24, true),    // X86_FEATURE_CLWB
    ("intel_pt", 0x00000007, 0, Reg::Ebx, 25, true), // X86_FEATURE_INTEL_PT
    ("avx512pf", 0x00000007, 0, Reg::Ebx, 26, true), // X86_FEATURE_AVX512PF
    ("avx512er", 0x00000007, 0, Reg::Ebx, 27, true), // X86_FEATURE_AVX512ER
    ("avx512cd", 0x00000007, 0, Reg::Ebx, 28, true), // X86_FEATURE_AVX512CD
    ("sha_ni", 0x00000007, 0, Reg::Ebx, 29, true),  // X86_FEATURE_SHA_NI
    ("avx512bw", 0x00000007, 0, Reg::Ebx, 30, true), // X86_FEATURE_AVX512BW
    ("avx512vl", 0x00000007, 0, Reg::Ebx, 31, true), // X86_FEATURE_AVX512VL
    // CPUID 0x7.0 ECX (word 16)
    ("avx512vbmi", 0x00000007, 0, Reg::Ecx, 1, true), // X86_FEATURE_AVX512VBMI
    ("umip", 0x00000007, 0, Reg::Ecx, 2, true),       // X86_FEATURE_UMIP
    ("pku", 0x00000007, 0, Reg::Ecx, 3, true),        // X86_FEATURE_PKU
    ("ospke", 0x00000007, 0, Reg::Ecx, 4, true),      // X86_FEATURE_OSPKE
    ("waitpkg", 0x00000007, 0, Reg::Ecx, 5, true),    // X86_FEATURE_WAITPKG
    ("avx512_vbmi2", 0x00000007, 0, Reg::Ecx, 6, true), // X86_FEATURE_AVX512_VBMI2
    ("shstk", 0x00000007, 0, Reg::Ecx, 7, false),     // X86_FEATURE_SHSTK
    ("gfni", 0x00000007, 0, Reg::Ecx, 8, true),       // X86_FEATURE_GFNI
    ("vaes", 0x00000007, 0, Reg::Ecx, 9, true),       // X86_FEATURE_VAES
    ("vpclmulqdq", 0x00000007, 0, Reg::Ecx, 10, true), // X86_FEATURE_VPCLMULQDQ
    ("avx512_vnni", 0x00000007, 0, Reg::Ecx, 11, true), // X86_FEATURE_AVX512_VNNI
    ("avx512_bitalg", 0x00000007, 0, Reg::Ecx, 12, true), // X86_FEATURE_AVX512_BITALG
    ("tme", 0x00000007, 0, Reg::Ecx, 13, true),       // X86_FEATURE_TME
    ("avx512_vpopcntdq", 0x00000007, 0, Reg::Ecx, 14, true), // X86_FEATURE_AVX512_VPOPCNTDQ
    ("la57", 0x00000007, 0, Reg::Ecx, 16, true),      // X86_FEATURE_LA57
    ("rdpid", 0x00000007, 0, Reg::Ecx, 22, true),     // X86_FEATURE_RDPID
    ("bus_lock_detect", 0x00000007, 0, Reg::Ecx, 24, true), // X86_FEATURE_BUS_LOCK_DETECT
    ("cldemote", 0x00000007, 0, Reg::Ecx, 25, true),  // X86_FEATURE_CLDEMOTE
    ("movdiri", 0x00000007, 0, Reg::Ecx, 27, true),   // X86_FEATURE_MOVDIRI
    ("movdir64b", 0x00000007, 0, Reg::Ecx, 28, true), // X86_FEATURE_MOVDIR64B
    ("enqcmd", 0x00000007, 0, Reg::Ecx, 29, true),    // X86_FEATURE_ENQCMD
    ("sgx_lc", 0x00000007, 0, Reg::Ecx, 30, true),    // X86_FEATURE_SGX_LC
    // CPUID 0x7.0 EDX (word 18)
    ("avx512_4vnniw", 0x00000007, 0, Reg::Edx, 2, true), // X86_FEATURE_AVX512_4VNNIW
    ("avx512_4fmaps", 0x00000007, 0, Reg::Edx, 3, true), // X86_FEATURE_AVX512_4FMAPS
    ("fsrm", 0x00000007, 0, Reg::Edx, 4, true),          // X86_FEATURE_FSRM
    ("avx512_vp2intersect", 0x00000007, 0, Reg::Edx, 8, true), // X86_FEATURE_AVX512_VP2INTERSECT
    ("srbds_ctrl", 0x00000007, 0, Reg::Edx, 9, false),   // X86_FEATURE_SRBDS_CTRL
    ("md_clear", 0x00000007, 0, Reg::Edx, 10, true),     // X86_FEATURE_MD_CLEAR
    ("rtm_always_abort", 0x00000007, 0, Reg::Edx, 11, false), // X86_FEATURE_RTM_ALWAYS_ABORT
    ("tsx_force_abort", 0x00000007, 0, Reg::Edx, 13, false), // X86_FEATURE_TSX_FORCE_ABORT
    ("serialize", 0x00000007, 0, Reg::Edx, 14, true),    // X86_FEATURE_SERIALIZE
    ("hybrid_cpu", 0x00000007, 0, Reg::Edx, 15, false),  // X86_FEATURE_HYBRID_CPU
    ("tsxldtrk", 0x00000007, 0, Reg::Edx, 16, true),     // X86_FEATURE_TSXLDTRK
    ("pconfig", 0x00000007, 0, Reg::Edx, 18, true),      // X86_FEATURE_PCONFIG
    ("arch_lbr", 0x00000007, 0, Reg::Edx, 19, true),     // X86_FEATURE_ARCH_LBR
    ("ibt", 0x00000007, 0, Reg::Edx, 20, true),          // X86_FEATURE_IBT
    ("amx_bf16", 0x00000007, 0, Reg::Edx, 22, true),     // X86_FEATURE_AMX_BF16
    ("avx512_fp16", 0x00000007, 0, Reg::Edx, 23, true),  // X86_FEATURE_AVX512_FP16
    ("amx_tile", 0x00000007, 0, Reg::Edx, 24, true),     // X86_FEATURE_AMX_TILE
    ("amx_int8", 0x00000007, 0, Reg::Edx, 25, true),     // X86_FEATURE_AMX_INT8
    ("spec_ctrl", 0x00000007, 0, Reg::Edx, 26, false),   // X86_FEATURE_SPEC_CTRL
    ("intel_stibp", 0x00000007, 0, Reg::Edx, 27, false), // X86_FEATURE_INTEL_STIBP
    ("flush_l1d", 0x00000007, 0, Reg::Edx, 28, true),    // X86_FEATURE_FLUSH_L1D
    ("arch_capabilities", 0x00000007, 0, Reg::Edx, 29, true), // X86_FEATURE_ARCH_CAPABILITIES
    ("core_capabilities", 0x00000007, 0, Reg::Edx, 30, false), // X86_FEATURE_CORE_CAPABILITIES
    ("spec_ctrl_ssbd", 0x00000007, 0, Reg::Edx, 31, false), // X86_FEATURE_SPEC_CTRL_SSBD
    // CPUID 0x7.1 EAX (word 12)
    ("sha512", 0x00000007, 1, Reg::Eax, 0, false), // X86_FEATURE_SHA512
    ("sm3", 0x00000007, 1, Reg::Eax, 1, false),    // X86_FEATURE_SM3
    ("sm4", 0x00000007, 1, Reg::Eax, 2, false),    // X86_FEATURE_SM4
    ("avx_vnni", 0x00000007, 1, Reg::Eax, 4, true), // X86_FEATURE_AVX_VNNI
    ("avx512_bf16", 0x00000007, 1, Reg::Eax, 5, true), // X86_FEATURE_AVX512_BF16
    ("lass", 0x00000007, 1, Reg::Eax, 6, true),    // X86_FEATURE_LASS
    ("cmpccxadd", 0x00000007, 1, Reg::Eax, 7, false), // X86_FEATURE_CMPCCXADD
    ("arch_perfmon_ext", 0x00000007, 1, Reg::Eax, 8, false), // X86_FEATURE_ARCH_PERFMON_EXT
    ("fzrm", 0x00000007, 1, Reg::Eax, 10, false),  // X86_FEATURE_FZRM
    ("fsrs", 0x00000007, 1, Reg::Eax, 11, false),  // X86_FEATURE_FSRS
    ("fsrc", 0x00000007, 1, Reg::Eax, 12, false),  // X86_FEATURE_FSRC
    ("fred", 0x00000007, 1, Reg::Eax, 17, true),   // X86_FEATURE_FRED
    ("lkgs", 0x00000007, 1, Reg::Eax, 18, false),  // X86_FEATURE_LKGS
    ("wrmsrns", 0x00000007, 1, Reg::Eax, 19, false), // X86_FEATURE_WRMSRNS
    ("amx_fp16", 0x00000007, 1, Reg::Eax, 21, false), // X86_FEATURE_AMX_FP16
    ("avx_ifma", 0x00000007, 1, Reg::Eax, 23, false), // X86_FEATURE_AVX_IFMA
    ("lam", 0x00000007, 1, Reg::Eax, 26, true),    // X86_FEATURE_LAM
    ("movrs", 0x00000007, 1, Reg::Eax, 31, false), // X86_FEATURE_MOVRS
    // CPUID 0xD.1 EAX (word 10)
    ("xsaveopt", 0x0000000D, 1, Reg::Eax, 0, true), // X86_FEATURE_XSAVEOPT
    ("xsavec", 0x0000000D, 1, Reg::Eax, 1, true),   // X86_FEATURE_XSAVEC
    ("xgetbv1", 0x0000000D, 1, Reg::Eax, 2, true),  // X86_FEATURE_XGETBV1
    ("xsaves", 0x0000000D, 1, Reg::Eax, 3, true),   // X86_FEATURE_XSAVES
    ("xfd", 0x0000000D, 1, Reg::Eax, 4, false),     // X86_FEATURE_XFD
    // CPUID 0x80000008 EBX (word 13)
    ("clzero", 0x80000008, 0, Reg::Ebx, 0, true), // X86_FEATURE_CLZERO
    ("irperf", 0x80000008, 0, Reg::Ebx, 1, true), // X86_FEATURE_IRPERF
    ("xsaveerptr", 0x80000008, 0, Reg::Ebx, 2, true), // X86_FEATURE_XSAVEERPTR
    ("invlpgb", 0x80000008, 0, Reg::Ebx, 3, false), // X86_FEATURE_INVLPGB
    ("rdpru", 0x80000008, 0, Reg::Ebx, 4, true),  // X86_FEATURE_RDPRU
    ("wbnoinvd", 0x80000008, 0, Reg::Ebx, 9, true), // X86_FEATURE_WBNOINVD
    ("amd_ibpb", 0x80000008, 0, Reg::Ebx, 12, false), // X86_FEATURE_AMD_IBPB
    ("amd_ibrs", 0x80000008, 0, Reg::Ebx, 14, false), // X86_FEATURE_AMD_IBRS
    ("amd_stibp", 0x80000008, 0, Reg::Ebx, 15, false), // X86_FEATURE_AMD_STIBP
    ("amd_stibp_always_on", 0x80000008, 0, Reg::Ebx, 17, false), // X86_FEATURE_AMD_STIBP_ALWAYS_ON
    ("amd_ibrs_same_mode", 0x80000008, 0, Reg::Ebx, 19, false), // X86_FEATURE_AMD_IBRS_SAME_MODE
    ("efer_lmsle_mbz", 0x80000008, 0, Reg::Ebx, 20, false), // X86_FEATURE_EFER_LMSLE_MBZ
    ("amd_ppin", 0x80000008, 0, Reg::Ebx, 23, true), // X86_FEATURE_AMD_PPIN
    ("amd_ssbd", 0x80000008, 0, Reg::Ebx, 24, false), // X86_FEATURE_AMD_SSBD
    ("virt_ssbd", 0x80000008, 0, Reg::Ebx, 25, true), // X86_FEATURE_VIRT_SSBD
    ("amd_ssb_no", 0x80000008, 0, Reg::Ebx, 26, false), // X86_FEATURE_AMD_SSB_NO
    ("cppc", 0x80000008, 0, Reg::Ebx, 27, true),  // X86_FEATURE_CPPC
    ("amd_psfd", 0x80000008, 0, Reg::Ebx, 28, false), // X86_FEATURE_AMD_PSFD
    ("btc_no", 0x80000008, 0, Reg::Ebx, 29, false), // X86_FEATURE_BTC_NO
    ("amd_ibpb_ret", 0x80000008, 0, Reg::Ebx, 30, false), // X86_FEATURE_AMD_IBPB_RET
    ("brs", 0x80000008, 0, Reg::Ebx, 31, true),   // X86_FEATURE_BRS
    // CPUID 0x6 EAX (word 14)
    ("dtherm", 0x00000006, 0, Reg::Eax, 0, true), // X86_FEATURE_DTHERM
    ("ida", 0x00000006, 0, Reg::Eax, 1, true),    // X86_FEATURE_IDA
    ("arat", 0x00000006, 0, Reg::Eax, 2, true),   // X86_FEATURE_ARAT
    ("pln", 0x00000006, 0, Reg::Eax, 4, true),    // X86_FEATURE_PLN
    ("pts", 0x00000006, 0, Reg::Eax, 6, true),    // X86_FEATURE_PTS
    ("hwp", 0x00000006, 0, Reg::Eax, 7, true),    // X86_FEATURE_HWP
    ("hwp_notify", 0x00000006, 0, Reg::Eax, 8, true), // X86_FEATURE_HWP_NOTIFY
    ("hwp_act_window", 0x00000006, 0, Reg::Eax, 9, true), // X86_FEATURE_HWP_ACT_WINDOW
    ("hwp_epp", 0x00000006, 0, Reg::Eax, 10, true), // X86_FEATURE_HWP_EPP
    ("hwp_pkg_req", 0x00000006, 0, Reg::Eax, 11, true), // X86_FEATURE_HWP_PKG_REQ
    (
        "hwp_highest_perf_change",
        0x00000006,
        0,
        Reg::Eax,
        15,
        false,
    ), // X86_FEATURE_HWP_HIGHEST_PERF_CHANGE
    ("hfi", 0x00000006, 0, Reg::Eax, 19, true),   // X86_FEATURE_HFI
    // CPUID 0x8000000A EDX (word 15)
    ("npt", 0x8000000A, 0, Reg::Edx, 0, true), // X86_FEATURE_NPT
    ("lbrv", 0x8000000A, 0, Reg::Edx, 1, true), // X86_FEATURE_LBRV
    ("svm_lock", 0x8000000A, 0, Reg::Edx, 2, true), // X86_FEATURE_SVML
    ("nrip_save", 0x8000000A, 0, Reg::Edx, 3, true), // X86_FEATURE_NRIPS
    ("tsc_scale", 0x8000000A, 0, Reg::Edx, 4, true), // X86_FEATURE_TSCRATEMSR
    ("vmcb_clean", 0x8000000A, 0, Reg::Edx, 5, true), // X86_FEATURE_VMCBCLEAN
    ("flushbyasid", 0x8000000A, 0, Reg::Edx, 6, true), // X86_FEATURE_FLUSHBYASID
    ("decodeassists", 0x8000000A, 0, Reg::Edx, 7, true), // X86_FEATURE_DECODEASSISTS
    ("pausefilter", 0x8000000A, 0, Reg::Edx, 10, true), // X86_FEATURE_PAUSEFILTER
    ("pfthreshold", 0x8000000A, 0, Reg::Edx, 12, true), // X86_FEATURE_PFTHRESHOLD
    ("avic", 0x8000000A, 0, Reg::Edx, 13, true), // X86_FEATURE_AVIC
    ("v_vmsave_vmload", 0x8000000A, 0, Reg::Edx, 15, true), // X86_FEATURE_V_VMSAVE_VMLOAD
    ("vgif", 0x8000000A, 0, Reg::Edx, 16, true), // X86_FEATURE_VGIF
    ("x2avic", 0x8000000A, 0, Reg::Edx, 18, true), // X86_FEATURE_X2AVIC
    ("v_spec_ctrl", 0x8000000A, 0, Reg::Edx, 20, true), // X86_FEATURE_V_SPEC_CTRL
    ("vnmi", 0x8000000A, 0, Reg::Edx, 25, true), // X86_FEATURE_VNMI
    ("svme_addr_chk", 0x8000000A, 0, Reg::Edx, 28, false), // X86_FEATURE_SVME_ADDR_CHK
    ("bus_lock_threshold", 0x8000000A, 0, Reg::Edx, 29, false), // X86_FEATURE_BUS_LOCK_THRESHOLD
    ("idle_hlt", 0x8000000A, 0, Reg::Edx, 30, false), // X86_FEATURE_IDLE_HLT
    // CPUID 0x80000007 EBX (word 17; scattered in newest kernels, see NOTES)
    ("overflow_recov", 0x80000007, 0, Reg::Ebx, 0, true), // X86_FEATURE_OVERFLOW_RECOV
    ("succor", 0x80000007, 0, Reg::Ebx, 1, true),         // X86_FEATURE_SUCCOR
    ("smca", 0x80000007, 0, Reg::Ebx, 3, true),           // X86_FEATURE_SMCA
    // CPUID 0x8000001F EAX (word 19)
    ("sme", 0x8000001F, 0, Reg::Eax, 0, true), // X86_FEATURE_SME
    ("sev", 0x8000001F, 0, Reg::Eax, 1, true), // X86_FEATURE_SEV
    ("vm_page_flush", 0x8000001F, 0, Reg::Eax, 2, false), // X86_FEATURE_VM_PAGE_FLUSH
    ("sev_es", 0x8000001F, 0, Reg::Eax, 3, true), // X86_FEATURE_SEV_ES
    ("sev_snp", 0x8000001F, 0, Reg::Eax, 4, true), // X86_FEATURE_SEV_SNP
    ("snp_secure_tsc", 0x8000001F, 0, Reg::Eax, 8, false), // X86_FEATURE_SNP_SECURE_TSC
    ("v_tsc_aux", 0x8000001F, 0, Reg::Eax, 9, false), // X86_FEATURE_V_TSC_AUX
    ("sme_coherent", 0x8000001F, 0, Reg::Eax, 10, false), // X86_FEATURE_SME_COHERENT
    ("debug_swap", 0x8000001F, 0, Reg::Eax, 14, true), // X86_FEATURE_DEBUG_SWAP
    ("rmpread", 0x8000001F, 0, Reg::Eax, 21, false), // X86_FEATURE_RMPREAD
    ("segmented_rmp", 0x8000001F, 0, Reg::Eax, 23, false), // X86_FEATURE_SEGMENTED_RMP
    ("allowed_sev_features", 0x8000001F, 0, Reg::Eax, 27, false), // X86_FEATURE_ALLOWED_SEV_FEATURES
    ("svsm", 0x8000001F, 0, Reg::Eax, 28, true),                  // X86_FEATURE_SVSM
    ("hv_inuse_wr_allowed", 0x8000001F, 0, Reg::Eax, 30, false),  // X86_FEATURE_HV_INUSE_WR_ALLOWED
    // CPUID 0x80000021 EAX (word 20)
    ("no_nested_data_bp", 0x80000021, 0, Reg::Eax, 0, false), // X86_FEATURE_NO_NESTED_DATA_BP
    ("wrmsr_xx_base_ns", 0x80000021, 0, Reg::Eax, 1, false),  // X86_FEATURE_WRMSR_XX_BASE_NS
    ("lfence_rdtsc", 0x80000021, 0, Reg::Eax, 2, false),      // X86_FEATURE_LFENCE_RDTSC
    ("verw_clear", 0x80000021, 0, Reg::Eax, 5, false),        // X86_FEATURE_VERW_CLEAR
    ("null_sel_clr_base", 0x80000021, 0, Reg::Eax, 6, false), // X86_FEATURE_NULL_SEL_CLR_BASE
    ("autoibrs", 0x80000021, 0, Reg::Eax, 8, false),          // X86_FEATURE_AUTOIBRS
    ("no_smm_ctl_msr", 0x80000021, 0, Reg::Eax, 9, false),    // X86_FEATURE_NO_SMM_CTL_MSR
    ("gp_on_user_cpuid", 0x80000021, 0, Reg::Eax, 17, false), // X86_FEATURE_GP_ON_USER_CPUID
    ("prefetchi", 0x80000021, 0, Reg::Eax, 20, false),        // X86_FEATURE_PREFETCHI
    ("avx512_bmm", 0x80000021, 0, Reg::Eax, 23, false),       // X86_FEATURE_AVX512_BMM
    ("eraps", 0x80000021, 0, Reg::Eax, 24, false),            // X86_FEATURE_ERAPS
    ("sbpb", 0x80000021, 0, Reg::Eax, 27, false),             // X86_FEATURE_SBPB
    ("ibpb_brtype", 0x80000021, 0, Reg::Eax, 28, false),      // X86_FEATURE_IBPB_BRTYPE
    ("srso_no", 0x80000021, 0, Reg::Eax, 29, false),          // X86_FEATURE_SRSO_NO
    ("srso_user_kernel_no", 0x80000021, 0, Reg::Eax, 30, false), // X86_FEATURE_SRSO_USER_KERNEL_NO
    ("srso_bp_spec_reduce", 0x80000021, 0, Reg::Eax, 31, false), // X86_FEATURE_SRSO_BP_SPEC_REDUCE
];

/// KVM paravirt feature bits, CPUID 0x40000001 EAX (KVM_CPUID_FEATURES),
/// from arch/x86/include/uapi/asm/kvm_para.h. (name, bit)
pub(crate) const KVM_PV_FEATURES: &[(&str, u8)] = &[
    ("kvmclock", 0),               // KVM_FEATURE_CLOCKSOURCE
    ("kvm_nop_io_delay", 1),       // KVM_FEATURE_NOP_IO_DELAY
    ("kvm_mmu_op", 2),             // KVM_FEATURE_MMU_OP
    ("kvmclock2", 3),              // KVM_FEATURE_CLOCKSOURCE2
    ("kvm_async_pf", 4),           // KVM_FEATURE_ASYNC_PF
    ("kvm_steal_time", 5),         // KVM_FEATURE_STEAL_TIME
    ("kvm_pv_eoi", 6),             // KVM_FEATURE_PV_EOI
    ("kvm_pv_unhalt", 7),          // KVM_FEATURE_PV_UNHALT
    ("kvm_pv_tlb_flush", 9),       // KVM_FEATURE_PV_TLB_FLUSH
    ("kvm_async_pf_vmexit", 10),   // KVM_FEATURE_ASYNC_PF_VMEXIT
    ("kvm_pv_send_ipi", 11),       // KVM_FEATURE_PV_SEND_IPI
    ("kvm_poll_control", 12),      // KVM_FEATURE_POLL_CONTROL
    ("kvm_pv_sched_yield", 13),    // KVM_FEATURE_PV_SCHED_YIELD
    ("kvm_async_pf_int", 14),      // KVM_FEATURE_ASYNC_PF_INT
    ("kvm_msi_ext_dest_id", 15),   // KVM_FEATURE_MSI_EXT_DEST_ID
    ("kvm_hc_map_gpa_range", 16),  // KVM_FEATURE_HC_MAP_GPA_RANGE
    ("kvm_migration_control", 17), // KVM_FEATURE_MIGRATION_CONTROL
    ("kvmclock_stable_bit", 24),   // KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
];

/// CPUID bits Linux keeps out of its feature words but that a VMM must
/// still name: (name, leaf, subleaf, register, bit). `invtsc` is
/// 0x80000007 EDX bit 8 (Linux derives `constant_tsc` and `nonstop_tsc`
/// from it); the 0x7.1 EDX bits are named after KVM's
/// `arch/x86/kvm/reverse_cpuid.h`.
pub(crate) const EXTRA_FEATURES: &[(&str, u32, u32, Reg, u8)] = &[
    ("invtsc", 0x80000007, 0, Reg::Edx, 8),
    ("avx_vnni_int8", 0x00000007, 1, Reg::Edx, 4),
    ("avx_ne_convert", 0x00000007, 1, Reg::Edx, 5),
    ("amx_complex", 0x00000007, 1, Reg::Edx, 8),
    ("avx_vnni_int16", 0x00000007, 1, Reg::Edx, 10),
    ("prefetchiti", 0x00000007, 1, Reg::Edx, 14),
    ("avx10", 0x00000007, 1, Reg::Edx, 19),
    ("apx", 0x00000007, 1, Reg::Edx, 21),
];
