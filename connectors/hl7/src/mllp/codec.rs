//! MLLP framing: `0x0B <payload> 0x1C 0x0D`.
//!
//! Bytes outside a frame (line noise, keep-alive newlines, a sender that lost sync) are
//! discarded as they arrive, so they never accumulate. A frame is limited to a maximum size:
//! the decoder fails as soon as an unterminated frame exceeds it, before buffering the rest,
//! and the connection is then answered with a NACK and closed.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Start block.
pub const START_BLOCK: u8 = 0x0B;
/// First byte of the end sequence (file separator).
pub const END_BLOCK: u8 = 0x1C;
/// Second byte of the end sequence.
pub const CARRIAGE_RETURN: u8 = 0x0D;

#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    #[error("MLLP frame exceeds the maximum of {max} bytes")]
    FrameTooLarge { max: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A tokio codec for MLLP frames; items are the payloads without the framing bytes.
#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_frame: usize,
    /// Whether the buffer starts with a start block whose end has not been seen yet.
    in_frame: bool,
    /// Where to resume looking for the end sequence, so a frame arriving in many small reads
    /// is scanned once, not once per read.
    scanned: usize,
    discarded: u64,
}

impl MllpCodec {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            in_frame: false,
            scanned: 0,
            discarded: 0,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Whether part of a frame has been received and its end is awaited: a read that stops
    /// now is a stalled sender, not an idle one.
    pub fn in_frame(&self) -> bool {
        self.in_frame
    }

    /// How many bytes outside frames were dropped so far (counted, never logged as content).
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Wraps a payload in MLLP framing.
    pub fn frame(payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(payload.len() + 3);
        out.put_u8(START_BLOCK);
        out.put_slice(payload);
        out.put_u8(END_BLOCK);
        out.put_u8(CARRIAGE_RETURN);
        out.freeze()
    }
}

impl Decoder for MllpCodec {
    type Item = Bytes;
    type Error = MllpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        if !self.in_frame {
            let Some(start) = src.iter().position(|&b| b == START_BLOCK) else {
                self.discarded += src.len() as u64;
                src.clear();
                return Ok(None);
            };
            self.discarded += start as u64;
            src.advance(start + 1);
            self.in_frame = true;
            self.scanned = 0;
        }
        // Resume one byte early: the end sequence may straddle two reads.
        let from = self.scanned.saturating_sub(1).min(src.len());
        let end = src[from..]
            .windows(2)
            .position(|w| w == [END_BLOCK, CARRIAGE_RETURN])
            .map(|i| from + i);
        match end {
            Some(end) if end > self.max_frame => Err(MllpError::FrameTooLarge {
                max: self.max_frame,
            }),
            Some(end) => {
                let payload = src.split_to(end).freeze();
                src.advance(2);
                self.in_frame = false;
                self.scanned = 0;
                Ok(Some(payload))
            }
            None => {
                // The pending END_BLOCK of a split end sequence is not payload yet.
                let pending = usize::from(src.last() == Some(&END_BLOCK));
                if src.len() - pending > self.max_frame {
                    return Err(MllpError::FrameTooLarge {
                        max: self.max_frame,
                    });
                }
                self.scanned = src.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        // A frame cut off by the end of the stream is not a message: the sender got no ACK
        // for it and will retransmit.
        let frame = self.decode(src)?;
        if frame.is_none() {
            src.clear();
        }
        Ok(frame)
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, payload: T, dst: &mut BytesMut) -> Result<(), MllpError> {
        let payload = payload.as_ref();
        dst.reserve(payload.len() + 3);
        dst.put_u8(START_BLOCK);
        dst.put_slice(payload);
        dst.put_u8(END_BLOCK);
        dst.put_u8(CARRIAGE_RETURN);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut MllpCodec, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(buf).expect("decode") {
            out.push(frame);
        }
        out
    }

    #[test]
    fn a_frame_split_over_many_reads_is_assembled() {
        let framed = MllpCodec::frame(b"MSH|^~\\&|A\rPID|1");
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in framed.iter() {
            buf.put_u8(*byte);
            frames.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(frames, vec![Bytes::from_static(b"MSH|^~\\&|A\rPID|1")]);
        assert!(buf.is_empty());
        assert!(!codec.in_frame());
    }

    #[test]
    fn several_frames_in_one_read_come_out_in_order() {
        let mut buf = BytesMut::new();
        for payload in [&b"one"[..], b"two", b"three"] {
            buf.extend_from_slice(&MllpCodec::frame(payload));
        }
        let frames = decode_all(&mut MllpCodec::new(1024), &mut buf);
        assert_eq!(
            frames,
            vec![Bytes::from("one"), Bytes::from("two"), Bytes::from("three")]
        );
    }

    #[test]
    fn bytes_outside_frames_are_dropped_and_counted() {
        let mut buf = BytesMut::from(&b"\r\njunk"[..]);
        buf.extend_from_slice(&MllpCodec::frame(b"a"));
        buf.extend_from_slice(b"xx\x1c\r");
        buf.extend_from_slice(&MllpCodec::frame(b"b"));
        buf.extend_from_slice(b"tail");
        let mut codec = MllpCodec::new(1024);
        let frames = decode_all(&mut codec, &mut buf);
        assert_eq!(frames, vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(codec.discarded(), 6 + 4 + 4);
        assert!(buf.is_empty(), "junk must not stay buffered");
    }

    #[test]
    fn a_lone_end_block_inside_a_frame_is_payload() {
        let mut buf = BytesMut::from(&b"\x0ba\x1cb\x1c\r"[..]);
        let frames = decode_all(&mut MllpCodec::new(1024), &mut buf);
        assert_eq!(frames, vec![Bytes::from_static(b"a\x1cb")]);
    }

    #[test]
    fn an_oversize_frame_fails_before_its_end_arrives() {
        let mut codec = MllpCodec::new(8);
        let mut buf = BytesMut::from(&b"\x0b12345678"[..]);
        assert!(codec.decode(&mut buf).expect("within the limit").is_none());
        buf.put_u8(b'9');
        assert!(matches!(
            codec.decode(&mut buf),
            Err(MllpError::FrameTooLarge { max: 8 })
        ));

        let mut codec = MllpCodec::new(8);
        let mut buf = BytesMut::from(&b"\x0b123456789\x1c\r"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(MllpError::FrameTooLarge { max: 8 })
        ));
    }

    #[test]
    fn a_frame_of_exactly_the_maximum_passes() {
        let mut codec = MllpCodec::new(8);
        let mut buf = BytesMut::from(&b"\x0b12345678\x1c"[..]);
        assert!(codec.decode(&mut buf).expect("pending end").is_none());
        buf.put_u8(b'\r');
        assert_eq!(
            codec.decode(&mut buf).expect("frame"),
            Some(Bytes::from("12345678"))
        );
    }

    #[test]
    fn a_truncated_frame_at_eof_is_not_a_message() {
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&b"\x0bMSH|partial"[..]);
        assert_eq!(codec.decode_eof(&mut buf).expect("eof"), None);
    }

    #[test]
    fn the_encoder_frames_payloads() {
        let mut dst = BytesMut::new();
        MllpCodec::new(16).encode(b"hi", &mut dst).expect("encode");
        assert_eq!(&dst[..], b"\x0bhi\x1c\r");
    }
}
