//! Codecs for Ferry. A codec spec such as `xor-delta,lz4` or `zstd:9` names an ordered
//! pipeline of stages; each
//! channel gets its own encoder and decoder (stages may keep history, and the engine pins
//! every unit to one channel so its versions arrive in order).
//!
//! Zero pages never reach a codec: the engine sends them as a flag.

mod lz4;
mod pipeline;
mod sized;
mod xor_delta;
mod zstd_stage;

pub use pipeline::{parse, Pipeline, SpecError, Stage, STAGE_NAMES};

use std::sync::Arc;

use ferry_core::codec::CodecFactory;

/// Resolves a spec into a factory (the destination's side of negotiation).
pub fn resolve(spec: &str) -> Result<Arc<dyn CodecFactory>, String> {
    parse(spec)
        .map(|p| Arc::new(p) as Arc<dyn CodecFactory>)
        .map_err(|e| e.to_string())
}
