//! Splitting a byte stream into NDJSON lines in bounded memory.
//!
//! [`LineCodec`] is a [`tokio_util::codec::Decoder`]: wrap any `AsyncRead` (an S3 body, a gzip
//! decoder, a file) in a [`tokio_util::codec::FramedRead`] and get [`Frame`]s. A line longer than
//! the configured maximum is never buffered whole: its bytes are skipped as they arrive and it is
//! reported as [`Frame::TooLong`] with its number, offset and length, so memory stays bounded by
//! the maximum line length whatever the input.
//!
//! ```
//! use futures_util::StreamExt;
//! use pushpull::lines::{Frame, LineCodec};
//! use tokio_util::codec::FramedRead;
//!
//! # tokio_test_block_on(async {
//! let input: &[u8] = b"{\"a\":1}\r\n\n{\"too\":\"long.............\"}\n{\"b\":2}";
//! let mut frames = FramedRead::new(input, LineCodec::new(16));
//! let mut seen = Vec::new();
//! while let Some(frame) = frames.next().await {
//!     seen.push(frame.unwrap());
//! }
//! assert!(matches!(&seen[0], Frame::Line(l) if l.number == 1 && &l.bytes[..] == b"{\"a\":1}"));
//! assert!(matches!(&seen[1], Frame::Line(l) if l.number == 2 && l.bytes.is_empty()));
//! assert!(matches!(&seen[2], Frame::TooLong { number: 3, offset: 10, len: 27 }));
//! assert!(matches!(&seen[3], Frame::Line(l) if l.number == 4 && l.offset == 38));
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```
use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// One line of input, without its line terminator (`\n` or `\r\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub number: u64,
    /// Byte offset of the line's first byte in the (decompressed) input.
    pub offset: u64,
    /// The line's bytes. Not checked for UTF-8 or JSON here.
    pub bytes: Bytes,
}

/// What the codec yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A line within the length limit (possibly empty).
    Line(Line),
    /// A line longer than the limit; its bytes were skipped.
    TooLong {
        /// 1-based line number.
        number: u64,
        /// Byte offset of the line's first byte.
        offset: u64,
        /// The line's length in bytes, without terminator.
        len: u64,
    },
}

/// Splits input at `\n` into [`Frame`]s, holding at most `max_line_bytes` of one line in memory.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_line_bytes: usize,
    next_number: u64,
    next_offset: u64,
    /// Bytes of the current line already known to hold no `\n`.
    scanned: usize,
    /// Set while skipping an over-long line: how many of its bytes were skipped, and whether the
    /// last of them was a `\r` (which belongs to the terminator if a `\n` follows).
    skipping: Option<(u64, bool)>,
}

impl LineCodec {
    /// A codec that reports lines longer than `max_line_bytes` as [`Frame::TooLong`].
    pub fn new(max_line_bytes: usize) -> Self {
        LineCodec { max_line_bytes, next_number: 1, next_offset: 0, scanned: 0, skipping: None }
    }

    /// Starts numbering at `number` and `offset`, for input that resumes part-way through an
    /// object (a ranged read from a checkpoint).
    pub fn starting_at(mut self, number: u64, offset: u64) -> Self {
        self.next_number = number;
        self.next_offset = offset;
        self
    }

    /// The line number the next frame will carry.
    pub fn next_line_number(&self) -> u64 {
        self.next_number
    }

    /// The byte offset where the next frame starts.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    fn advance(&mut self, consumed: u64) -> (u64, u64) {
        let at = (self.next_number, self.next_offset);
        self.next_number += 1;
        self.next_offset += consumed;
        self.scanned = 0;
        at
    }

    fn frame(&mut self, mut line: BytesMut, terminated: bool) -> Frame {
        let consumed = line.len() as u64;
        if terminated {
            line.truncate(line.len() - 1);
        }
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        let (number, offset) = self.advance(consumed);
        if line.len() > self.max_line_bytes {
            Frame::TooLong { number, offset, len: line.len() as u64 }
        } else {
            Frame::Line(Line { number, offset, bytes: line.freeze() })
        }
    }
}

/// Reading the input failed.
pub type LinesError = std::io::Error;

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = LinesError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, LinesError> {
        if let Some((skipped, last_cr)) = self.skipping {
            return Ok(match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    let cr = if i > 0 { buf[i - 1] == b'\r' } else { last_cr };
                    let _ = buf.split_to(i + 1);
                    self.skipping = None;
                    let content = skipped + i as u64;
                    let (number, offset) = self.advance(content + 1);
                    Some(Frame::TooLong { number, offset, len: content - u64::from(cr) })
                }
                None => {
                    let last_cr = buf.last().map_or(last_cr, |b| *b == b'\r');
                    self.skipping = Some((skipped + buf.len() as u64, last_cr));
                    buf.clear();
                    None
                }
            });
        }
        match memchr::memchr(b'\n', &buf[self.scanned..]) {
            Some(i) => {
                let line = buf.split_to(self.scanned + i + 1);
                Ok(Some(self.frame(line, true)))
            }
            None if buf.len() > self.max_line_bytes + 1 => {
                // Over the limit (+1 leaves room for a '\r'): stop buffering, skip to the newline.
                self.skipping = Some((buf.len() as u64, buf.last() == Some(&b'\r')));
                buf.clear();
                Ok(None)
            }
            None => {
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, LinesError> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if let Some((skipped, _)) = self.skipping.take() {
            let (number, offset) = self.advance(skipped);
            return Ok(Some(Frame::TooLong { number, offset, len: skipped }));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let rest = buf.split_to(buf.len());
        Ok(Some(self.frame(rest, false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_util::codec::FramedRead;

    /// Feeds `input` in chunks of `chunk` bytes, to exercise every split point.
    async fn frames(input: &[u8], max: usize, chunk: usize) -> Vec<Frame> {
        let reader = tokio_test_reader(input, chunk);
        FramedRead::new(reader, LineCodec::new(max)).map(|f| f.unwrap()).collect().await
    }

    fn tokio_test_reader(input: &[u8], chunk: usize) -> impl tokio::io::AsyncRead + Unpin {
        let chunks: Vec<std::io::Result<Bytes>> =
            input.chunks(chunk.max(1)).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        tokio_util::io::StreamReader::new(futures_util::stream::iter(chunks))
    }

    fn line(number: u64, offset: u64, s: &str) -> Frame {
        Frame::Line(Line { number, offset, bytes: Bytes::copy_from_slice(s.as_bytes()) })
    }

    #[tokio::test]
    async fn splits_at_every_chunk_size() {
        let input = b"ab\r\n\ncdef\nlonglonglong\r\nxy";
        for chunk in 1..input.len() + 1 {
            let got = frames(input, 8, chunk).await;
            assert_eq!(
                got,
                vec![
                    line(1, 0, "ab"),
                    line(2, 4, ""),
                    line(3, 5, "cdef"),
                    Frame::TooLong { number: 4, offset: 10, len: 12 },
                    line(5, 24, "xy"),
                ],
                "chunk size {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn empty_input_and_trailing_newline() {
        assert!(frames(b"", 8, 4).await.is_empty());
        assert_eq!(frames(b"a\n", 8, 4).await, vec![line(1, 0, "a")]);
        assert_eq!(frames(b"toolongline", 4, 3).await, vec![Frame::TooLong { number: 1, offset: 0, len: 11 }]);
    }

    #[tokio::test]
    async fn line_of_exactly_max_is_kept() {
        assert_eq!(
            frames(b"abcd\r\nabcde\n", 4, 1).await,
            vec![line(1, 0, "abcd"), Frame::TooLong { number: 2, offset: 6, len: 5 }]
        );
    }

    #[test]
    fn resumes_numbering() {
        let mut c = LineCodec::new(10).starting_at(41, 1000);
        let mut buf = BytesMut::from(&b"x\n"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(line(41, 1000, "x")));
        assert_eq!((c.next_line_number(), c.next_offset()), (42, 1002));
    }
}
