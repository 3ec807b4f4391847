//! The CNI side of netsieve: the chained plugin `netsieve-cni` ([`plugin`]) that has the
//! agent enforce a pod before its containers start, and its installation into a node's CNI
//! configuration ([`install`], `netsieve cni install | uninstall`). See docs/CNI.md.
pub mod install;
pub mod plugin;
