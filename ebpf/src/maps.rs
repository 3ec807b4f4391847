//! Every map of the programs. Names are the kernel object names (at most 15 characters) the
//! agent finds them by.
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use netsieve_common::*;

#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
#[map(name = "REVISIONS")]
pub static REVISIONS: Array<u32> = Array::with_max_entries(MAX_ENDPOINT_SLOTS, 0);
#[map(name = "POD_ADDRESSES")]
pub static POD_ADDRESSES: HashMap<IpcacheKey, u32> = HashMap::with_max_entries(MAX_POD_ADDRESSES, 0);
#[map(name = "IPCACHE")]
pub static IPCACHE: HashMap<IpcacheKey, IpcacheValue> = HashMap::with_max_entries(MAX_IPCACHE_ENTRIES, 0);
#[map(name = "POLICY_IDENTITY")]
pub static POLICY_IDENTITY: HashMap<PolicyIdentityKey, RuleMask> =
    HashMap::with_max_entries(MAX_POLICY_IDENTITY_ENTRIES, 0);
#[map(name = "POLICY_CIDR")]
pub static POLICY_CIDR: LpmTrie<PolicyCidrKeyData, RuleMask> = LpmTrie::with_max_entries(MAX_POLICY_CIDR_ENTRIES, 0);
#[map(name = "POLICY_PORT")]
pub static POLICY_PORT: HashMap<PolicyPortKey, RuleMask> = HashMap::with_max_entries(MAX_POLICY_PORT_ENTRIES, 0);
#[map(name = "POLICY_RANGE")]
pub static POLICY_RANGE: LpmTrie<PolicyPortRangeKeyData, RuleMask> =
    LpmTrie::with_max_entries(MAX_POLICY_PORT_RANGE_ENTRIES, 0);
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(MAX_CONNTRACK_ENTRIES, 0);
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::with_max_entries(MAX_FRAGMENT_ENTRIES, 0);
#[map(name = "DROP_COUNTERS")]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT * 2, 0);
#[map(name = "AUDIT_COUNTERS")]
pub static AUDIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT * 2, 0);
#[map(name = "ENDPOINT_STATS")]
pub static ENDPOINT_STATS: PerCpuArray<EndpointStats> = PerCpuArray::with_max_entries(MAX_ENDPOINT_SLOTS, 0);
#[map(name = "RULE_STATS")]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULE_COUNTERS, 0);
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "NF_OFFSETS")]
pub static NF_OFFSETS: Array<NfOffsets> = Array::with_max_entries(1, 0);
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map(name = "EVENT_BUCKETS")]
pub static EVENT_BUCKETS: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "EVENT_COUNTERS")]
pub static EVENT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNTER_COUNT, 0);
/// Per CPU: the coarse clock's last reading and the jiffies value it was read at. The coarse
/// clock only moves at a tick, and `bpf_jiffies64` is inlined by the verifier into a plain
/// load, while every real helper call costs a call and a (mitigated) return: a packet reads
/// the clock through this cache and calls the helper once per tick and CPU.
#[map(name = "CLOCK_CACHE")]
pub static CLOCK_CACHE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);
/// Per CPU: the network and transport headers of a packet the netfilter program parses without
/// conntrack state, copied with one helper call instead of one call per header field.
#[map(name = "NF_HEADERS")]
pub static NF_HEADERS: PerCpuArray<HeaderCopy> = PerCpuArray::with_max_entries(1, 0);

/// The value of [`NF_HEADERS`]. A run of the program can be interrupted on its CPU by another
/// run (a softirq's packet during a local process's, or a preempting task's), which takes the
/// same buffer: every copy bumps `generation` first, and a parse whose copy's generation moved
/// meanwhile is done again from the packet itself.
#[repr(C)]
pub struct HeaderCopy {
    pub generation: u64,
    pub bytes: [u8; NF_HEADER_COPY_BYTES],
}

/// Per CPU: verdicts the conntrack fast path gave recently, by flow and packet direction, so
/// that the next packets of a busy flow skip the conntrack hash lookup (docs/DATAPATH.md,
/// "The flow cache"). Direct-mapped: a flow whose slot another flow took goes to conntrack.
#[map(name = "FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<FlowCacheEntry> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Per interface (`flow_epoch_index`), a count of the conntrack entries inserted for it: moved
/// after every insert, read before a conntrack lookup that misses, so a denial the flow cache
/// holds for a flow with no entry is dropped as soon as an entry for the interface may exist
/// (docs/DATAPATH.md, "Denials in the flow cache"). Pinned beside `CONNTRACK` across restarts.
#[map(name = "FLOW_EPOCHS")]
pub static FLOW_EPOCHS: Array<u64> = Array::with_max_entries(FLOW_EPOCH_SLOTS, 0);
