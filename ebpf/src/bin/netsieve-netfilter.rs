//! The netfilter program: the egress verdict of pod flows after kube-proxy's DNAT (see the
//! library's `netfilter` module). Loaded by the agent as BPF_PROG_TYPE_NETFILTER and attached
//! per network namespace at POST_ROUTING and LOCAL_IN for IPv4 and IPv6.
#![no_std]
#![no_main]

use netsieve_ebpf::netfilter::{NfContext, judge_netfilter};

/// The entry point. aya-obj, which the agent uses to relocate this object against the maps of
/// the TC object, only parses sections it knows, so the section carries a TC name; the agent
/// loads the function as a netfilter program, never as a classifier.
///
/// # Safety
/// Only the kernel calls it, with a valid `struct bpf_nf_ctx`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier/netsieve_netfilter")]
pub unsafe extern "C" fn netsieve_netfilter(ctx: *const NfContext) -> i32 {
    // SAFETY: the kernel calls the program with its context.
    unsafe { judge_netfilter(ctx) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
