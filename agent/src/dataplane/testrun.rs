//! Running a loaded classifier on a crafted frame with `BPF_PROG_TEST_RUN`, for tests and
//! benchmarks. The kernel runs the real program on a real skb; nothing is sent anywhere.
//! (The netfilter program has its own runner: `netfilter::test_run`.)
use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult};

/// What the programs return for a packet they let through (`TC_ACT_UNSPEC`, TCX "next").
pub const RETURN_PASS: u32 = -1i32 as u32;
/// What the programs return for a dropped packet (`TC_ACT_SHOT`).
pub const RETURN_DROP: u32 = 2;

/// `struct __sk_buff` up to and including `ifindex` (offset 40): the context fields the
/// programs read (`ingress_ifindex` at 36, `ifindex`). The kernel requires the other fields of
/// this prefix to be zero.
const SKB_CONTEXT_LEN: usize = 48;
const SKB_INGRESS_IFINDEX_OFFSET: usize = 36;
const SKB_IFINDEX_OFFSET: usize = 40;

/// Runs `program` on `frame` as if it were on `ifindex` (1, loopback, or an interface of
/// the caller's network namespace), `repeat` times.
pub fn run_classifier(
    program: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<TestRunResult, ProgramError> {
    run_classifier_from(program, frame, ifindex, 0, repeat)
}

/// Like [`run_classifier`], with the interface the packet entered the node by
/// (`ingress_ifindex`; equal to `ifindex` for a packet hairpinned back to its sender).
pub fn run_classifier_from(
    program: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    ingress_ifindex: u32,
    repeat: u32,
) -> Result<TestRunResult, ProgramError> {
    let mut context = [0u8; SKB_CONTEXT_LEN];
    context[SKB_INGRESS_IFINDEX_OFFSET..SKB_INGRESS_IFINDEX_OFFSET + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    context[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&context),
        repeat: repeat.max(1),
        ..Default::default()
    };
    program.test_run(opts)
}
