//! Cross-crate test harnesses (netns clusters, fake API server).
