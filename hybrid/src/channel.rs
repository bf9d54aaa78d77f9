//! An encrypted, ordered message channel over a finished control handshake.
//!
//! Each frame is one Noise transport message (at most 65535 bytes). Application messages larger
//! than a frame are split: the first plaintext byte of a frame says whether more frames of the
//! same message follow. The carrier (a WebSocket) must deliver frames in order and without loss;
//! any failure to decrypt is fatal for the channel.

use std::fmt;

/// Largest application message a channel accepts (16 MiB): bounds memory per connection.
pub const MAX_MESSAGE_LEN: usize = 16 << 20;
const MAX_FRAME: usize = 65535;
const TAG_LEN: usize = 16;
const MAX_CHUNK: usize = MAX_FRAME - TAG_LEN - 1;
const FINAL: u8 = 0;
const MORE: u8 = 1;

/// A channel failure. All of them are fatal for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// A message (or a reassembled message) exceeds the channel's limit ([`MAX_MESSAGE_LEN`]
    /// unless lowered with [`Channel::limit_inbound`]).
    #[error("message exceeds the channel's size limit")]
    TooLarge,
    /// A frame failed authentication (tampered, replayed, reordered or truncated).
    #[error("frame failed authentication")]
    Authentication,
    /// A frame decrypted to something that is not a valid chunk.
    #[error("malformed frame")]
    Malformed,
}

/// See the module docs.
pub struct Channel {
    transport: snow::TransportState,
    partial: Vec<u8>,
    max_inbound: usize,
}

impl Channel {
    pub(crate) fn new(transport: snow::TransportState) -> Self {
        Self {
            transport,
            partial: Vec::new(),
            max_inbound: MAX_MESSAGE_LEN,
        }
    }

    /// Limits messages received to `max` bytes (at most [`MAX_MESSAGE_LEN`]): a side that
    /// only expects small messages should not buffer large ones.
    pub fn limit_inbound(&mut self, max: usize) {
        self.max_inbound = max.min(MAX_MESSAGE_LEN);
    }

    /// Encrypts one application message into one or more frames, in sending order.
    pub fn seal(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>, ChannelError> {
        if msg.len() > MAX_MESSAGE_LEN {
            return Err(ChannelError::TooLarge);
        }
        let mut frames = Vec::with_capacity(msg.len() / MAX_CHUNK + 1);
        let mut chunks = msg.chunks(MAX_CHUNK).peekable();
        if chunks.peek().is_none() {
            frames.push(self.seal_chunk(FINAL, &[])?);
        }
        while let Some(chunk) = chunks.next() {
            let flag = if chunks.peek().is_some() { MORE } else { FINAL };
            frames.push(self.seal_chunk(flag, chunk)?);
        }
        Ok(frames)
    }

    /// Decrypts one frame. Returns the message once its last frame has arrived.
    pub fn open(&mut self, frame: &[u8]) -> Result<Option<Vec<u8>>, ChannelError> {
        if frame.len() > MAX_FRAME || frame.len() < TAG_LEN + 1 {
            return Err(ChannelError::Malformed);
        }
        let mut plain = vec![0u8; frame.len()];
        let n = self
            .transport
            .read_message(frame, &mut plain)
            .map_err(|_| ChannelError::Authentication)?;
        let Some((&flag, chunk)) = plain[..n].split_first() else {
            return Err(ChannelError::Malformed);
        };
        if self.partial.len() + chunk.len() > self.max_inbound {
            return Err(ChannelError::TooLarge);
        }
        self.partial.extend_from_slice(chunk);
        match flag {
            FINAL => Ok(Some(std::mem::take(&mut self.partial))),
            MORE => Ok(None),
            _ => Err(ChannelError::Malformed),
        }
    }

    fn seal_chunk(&mut self, flag: u8, chunk: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let mut plain = Vec::with_capacity(chunk.len() + 1);
        plain.push(flag);
        plain.extend_from_slice(chunk);
        let mut out = vec![0u8; plain.len() + TAG_LEN];
        let n = self
            .transport
            .write_message(&plain, &mut out)
            .map_err(|_| ChannelError::TooLarge)?;
        out.truncate(n);
        Ok(out)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("sending_nonce", &self.transport.sending_nonce())
            .field("receiving_nonce", &self.transport.receiving_nonce())
            .finish_non_exhaustive()
    }
}
