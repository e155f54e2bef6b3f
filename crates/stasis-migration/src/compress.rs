//! zstd-compressed memory batches (protocol version 2, `--compress
//! zstd`): the payload of a memory-batch-zstd frame is the uncompressed
//! length (`u32`, little endian, at most [`crate::MAX_PAYLOAD`]) and one
//! zstd frame holding a memory-batch payload (message.rs). A receiver
//! never decompresses more than the length announced, and refuses a
//! payload that does not decompress to exactly that length.

use crate::error::{io_ctx, Error, Result};
use crate::frame::{FrameKind, MAX_PAYLOAD};

/// The zstd level used: fast; migration is bound by the link or by the
/// CPU, and higher levels cost more CPU than they save on the link.
pub const LEVEL: i32 = 1;

fn bad(message: impl Into<String>) -> Error {
    Error::Decode {
        kind: FrameKind::MemoryBatchZstd.name().into(),
        message: message.into(),
    }
}

/// Compresses the batch payload made of `parts` (in order) into `out`
/// (cleared first) as a memory-batch-zstd payload.
pub fn compress_parts(parts: &[&[u8]], out: &mut Vec<u8>) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    out.clear();
    out.extend_from_slice(&(total as u32).to_le_bytes());
    let ctx = "compressing a memory batch";
    let mut enc =
        zstd::stream::write::Encoder::new(std::mem::take(out), LEVEL).map_err(io_ctx(ctx))?;
    enc.set_pledged_src_size(Some(total as u64))
        .map_err(io_ctx(ctx))?;
    for p in parts {
        std::io::Write::write_all(&mut enc, p).map_err(io_ctx(ctx))?;
    }
    *out = enc.finish().map_err(io_ctx(ctx))?;
    Ok(())
}

/// A memory-batch-zstd payload, not yet decompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedBatch<'a> {
    /// The length of the memory-batch payload it holds.
    pub len: usize,
    /// The zstd frame.
    pub data: &'a [u8],
}

impl<'a> CompressedBatch<'a> {
    /// Reads the header of a memory-batch-zstd payload.
    pub fn decode(p: &'a [u8]) -> Result<Self> {
        if p.len() < 4 {
            return Err(bad(format!("{} bytes, shorter than its length", p.len())));
        }
        let len = u32::from_le_bytes(p[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_PAYLOAD as usize {
            return Err(bad(format!(
                "it claims {len} bytes uncompressed (1..={MAX_PAYLOAD})"
            )));
        }
        Ok(Self { len, data: &p[4..] })
    }

    /// Decompresses into `out` (resized to the announced length): then a
    /// memory-batch payload for [`crate::MemoryBatch::decode`].
    pub fn decompress(&self, out: &mut Vec<u8>) -> Result<()> {
        // Exactly the announced length: a payload that decompresses to
        // more fails ("destination buffer too small").
        out.clear();
        out.resize(self.len, 0);
        let mut d =
            zstd::bulk::Decompressor::new().map_err(io_ctx("starting a zstd decompressor"))?;
        let n = d
            .decompress_to_buffer(self.data, &mut out[..])
            .map_err(|e| bad(format!("it does not decompress: {e}")))?;
        if n != self.len {
            return Err(bad(format!(
                "it decompresses to {n} bytes, {} announced",
                self.len
            )));
        }
        Ok(())
    }
}
