//! Prints KVM's supported CPUID on this host.
fn main() {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let c = stasis_vmm::cpu::cpuid::supported(&kvm).expect("supported cpuid");
    for e in c.as_slice() {
        println!(
            "{:#010x}/{:<2} flags={} eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
        );
    }
}
