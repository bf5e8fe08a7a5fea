//! The stage seam inside a pipeline. Stages are shared by the worker threads that encode
//! one batch in parallel, so they take `&self` and keep any history behind their own locks,
//! keyed by unit: a unit's versions are still seen in order, because one batch holds a unit
//! once and batches are handed over one after another.

use ferry_core::codec::{CodecError, Unit};

/// One step of a pipeline (`xor-delta`, `lz4`, `zstd`).
pub trait Stage: Send + Sync {
    /// Canonical name.
    fn name(&self) -> &'static str;
    /// Encodes `input` into `out` (replacing its content); false when it does not pay.
    fn encode(&self, unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool;
    /// Decodes `input` into `out` (replacing its content), producing at most `max_len`
    /// bytes; `base` is the destination's current copy of the unit (for deltas). Hostile
    /// input: errors, never panics.
    fn decode(
        &self,
        unit: Unit,
        input: &[u8],
        base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError>;
    /// The unit was sent as `data` without passing through this stage (history stays in
    /// step with the destination's copy).
    fn note_plain(&self, _unit: Unit, _data: &[u8]) {}
    /// The unit was sent in a way this stage cannot follow cheaply: drop its history.
    fn forget(&self, _unit: Unit) {}
    /// Units will be sent without this stage hearing of them: drop all history.
    fn reset(&self) {}
    /// Whether decoding needs the destination's current copy.
    fn needs_base(&self) -> bool {
        false
    }
    /// Whether, as a pipeline's last stage, it compresses a batch's units in groups
    /// ([`crate::group`]) rather than one by one.
    fn groups(&self) -> bool {
        false
    }
    /// (hits, lookups) of a history cache, for stages that keep one.
    fn cache_stats(&self) -> (u64, u64) {
        (0, 0)
    }
}
