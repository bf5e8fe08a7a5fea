//! Codecs for Ferry. A codec spec such as `dedup,xor-delta,lz4`, `zstd:9` or `auto` names an
//! ordered pipeline of stages; each channel gets its own encoder and decoder (stages may
//! keep history, and the engine pins every unit to one channel so its versions arrive in
//! order). Batches are encoded and decoded in parallel on rayon's pool; the last
//! compressor of a pipeline compresses a batch's units in groups, so neighbouring pages
//! share history ([`GROUP_BYTES`]).
//!
//! Zero pages never reach a codec: the engine sends them as a flag.

mod auto;
mod dedup;
mod group;
mod lz4;
mod pipeline;
mod sized;
mod spec;
mod stage;
mod xor_delta;
mod zstd_stage;

pub use group::GROUP_BYTES;
pub use pipeline::{parse, Pipeline, XOR_CACHE};
pub use spec::{SpecError, StageSpec, STAGE_NAMES};
pub use stage::Stage;

use std::sync::Arc;

use ferry_core::codec::CodecFactory;

/// Resolves a spec into a factory (the destination's side of negotiation).
pub fn resolve(spec: &str) -> Result<Arc<dyn CodecFactory>, String> {
    parse(spec)
        .map(|p| Arc::new(p) as Arc<dyn CodecFactory>)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
