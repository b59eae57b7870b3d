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
//!
//! [`LineBlocks`] splits the same way and hands over every whole line of the read buffer at once
//! (one buffer and the lines' positions), which is what the push side uses.
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
#[non_exhaustive]
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

    /// One step of splitting `buf[pos..]`, where a line starts at `pos`: the next whole line
    /// (and where it ends in `buf`), or that the rest of `buf` belongs to an over-long line being
    /// skipped, or that more input is needed. Both [`LineCodec`] and [`LineBlocks`] split with it.
    fn step(&mut self, buf: &[u8], pos: usize) -> Step {
        if let Some((skipped, last_cr)) = self.skipping {
            return match memchr::memchr(b'\n', &buf[pos..]) {
                Some(i) => {
                    let cr = if i > 0 { buf[pos + i - 1] == b'\r' } else { last_cr };
                    self.skipping = None;
                    let content = skipped + i as u64;
                    let (number, offset) = self.advance(content + 1);
                    let len = content - u64::from(cr);
                    Step::Frame(BlockFrame::TooLong { number, offset, len, next_offset: self.next_offset }, pos + i + 1)
                }
                None => {
                    let rest = &buf[pos..];
                    let last_cr = rest.last().map_or(last_cr, |b| *b == b'\r');
                    self.skipping = Some((skipped + rest.len() as u64, last_cr));
                    Step::Discard
                }
            };
        }
        match memchr::memchr(b'\n', &buf[pos + self.scanned..]) {
            Some(i) => {
                let end = pos + self.scanned + i + 1;
                Step::Frame(self.line_frame(buf, pos, end, true), end)
            }
            None if buf.len() - pos > self.max_line_bytes + 1 => {
                // Over the limit (+1 leaves room for a '\r'): stop buffering, skip to the newline.
                self.skipping = Some(((buf.len() - pos) as u64, buf.last() == Some(&b'\r')));
                Step::Discard
            }
            None => {
                self.scanned = buf.len() - pos;
                Step::More
            }
        }
    }

    /// At the end of input, after [`LineCodec::step`] needs more: the last line if it has no
    /// terminator, or the over-long line being skipped.
    fn finish(&mut self, buf: &[u8], pos: usize) -> Option<(BlockFrame, usize)> {
        if let Some((skipped, _)) = self.skipping.take() {
            let (number, offset) = self.advance(skipped);
            return Some((BlockFrame::TooLong { number, offset, len: skipped, next_offset: self.next_offset }, pos));
        }
        (pos < buf.len()).then(|| (self.line_frame(buf, pos, buf.len(), false), buf.len()))
    }

    /// The frame of `buf[start..end]`, a whole line (`terminated`: ending in its `\n`).
    fn line_frame(&mut self, buf: &[u8], start: usize, end: usize, terminated: bool) -> BlockFrame {
        let mut content_end = if terminated { end - 1 } else { end };
        if content_end > start && buf[content_end - 1] == b'\r' {
            content_end -= 1;
        }
        let (number, offset) = self.advance((end - start) as u64);
        let len = content_end - start;
        let next_offset = self.next_offset;
        if len > self.max_line_bytes {
            BlockFrame::TooLong { number, offset, len: len as u64, next_offset }
        } else {
            BlockFrame::Line { number, offset, start, end: content_end, next_offset }
        }
    }
}

/// What [`LineCodec::step`] found.
enum Step {
    /// A frame, and where its line ends (terminator included) in the buffer.
    Frame(BlockFrame, usize),
    /// The rest of the buffer is part of an over-long line: drop it.
    Discard,
    /// No whole line yet.
    More,
}

/// The [`Frame`] of a line split off the front of the buffer (`line`: terminator included).
fn frame_of(f: BlockFrame, line: Bytes) -> Frame {
    match f {
        BlockFrame::Line { number, offset, start, end, .. } => {
            Frame::Line(Line { number, offset, bytes: line.slice(start..end) })
        }
        BlockFrame::TooLong { number, offset, len, .. } => Frame::TooLong { number, offset, len },
    }
}

/// Reading the input failed.
pub type LinesError = std::io::Error;

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = LinesError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, LinesError> {
        Ok(match self.step(buf, 0) {
            Step::Frame(f, end) => Some(frame_of(f, buf.split_to(end).freeze())),
            Step::Discard => {
                buf.clear();
                None
            }
            Step::More => None,
        })
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, LinesError> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        Ok(self.finish(buf, 0).map(|(f, end)| frame_of(f, buf.split_to(end).freeze())))
    }
}

/// A frame of a [`LineBlock`]: where the line lies in the block, or that it was too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockFrame {
    /// A line within the length limit: `block.bytes[start..end]`, without its terminator.
    Line {
        /// 1-based line number.
        number: u64,
        /// Byte offset of the line's first byte in the (decompressed) input.
        offset: u64,
        /// Where the line starts in the block.
        start: usize,
        /// Where it ends (exclusive), terminator excluded.
        end: usize,
        /// Offset just past the line's terminator (where the next line starts).
        next_offset: u64,
    },
    /// A line longer than the limit; its bytes were skipped.
    TooLong {
        /// 1-based line number.
        number: u64,
        /// Byte offset of the line's first byte.
        offset: u64,
        /// The line's length in bytes, without terminator.
        len: u64,
        /// Offset just past the line's terminator (where the next line starts).
        next_offset: u64,
    },
}

/// Whole lines read in one go: one buffer and where each line lies in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineBlock {
    /// The bytes the lines are in.
    pub bytes: Bytes,
    /// The lines, in input order.
    pub frames: Vec<BlockFrame>,
}

impl LineBlock {
    /// The bytes of a [`BlockFrame::Line`] (empty for [`BlockFrame::TooLong`]).
    pub fn line(&self, frame: &BlockFrame) -> &[u8] {
        match *frame {
            BlockFrame::Line { start, end, .. } => &self.bytes[start..end],
            BlockFrame::TooLong { .. } => &[],
        }
    }
}

/// [`LineCodec`]'s splitting, yielding every whole line of the read buffer at once as a
/// [`LineBlock`] instead of a `Bytes` per line: a block is one buffer handed over, where per-line
/// `Bytes` cost a reference count up and down for every line (measurable at millions of lines a
/// second). Same frames, same numbering, same bounded memory.
///
/// ```
/// use futures_util::StreamExt;
/// use pushpull::lines::{BlockFrame, LineBlocks, LineCodec};
/// use tokio_util::codec::FramedRead;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let input: &[u8] = b"{\"a\":1}\r\n{\"too\":\"long.............\"}\n{\"b\":2}";
/// let mut blocks = FramedRead::new(input, LineBlocks::new(LineCodec::new(16)));
/// let block = blocks.next().await.unwrap().unwrap(); // the lines read so far
/// assert_eq!(block.line(&block.frames[0]), b"{\"a\":1}");
/// assert_eq!(block.frames[1], BlockFrame::TooLong { number: 2, offset: 9, len: 27, next_offset: 37 });
/// let last = blocks.next().await.unwrap().unwrap(); // the unterminated last line, at the end
/// assert_eq!(last.line(&last.frames[0]), b"{\"b\":2}");
/// assert!(blocks.next().await.is_none());
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct LineBlocks {
    codec: LineCodec,
}

impl LineBlocks {
    /// Blocks split as `codec` splits lines (its limit and starting number).
    pub fn new(codec: LineCodec) -> Self {
        LineBlocks { codec }
    }

    fn decode_block(&mut self, buf: &mut BytesMut, eof: bool) -> Option<LineBlock> {
        let mut frames = Vec::new();
        let mut pos = 0usize; // start of the current line; everything before it is in the block
        let mut discard_tail = false;
        loop {
            match self.codec.step(buf, pos) {
                Step::Frame(f, end) => {
                    frames.push(f);
                    pos = end;
                }
                Step::Discard => {
                    discard_tail = true;
                    break;
                }
                Step::More => break,
            }
        }
        if eof && let Some((f, end)) = self.codec.finish(buf, pos) {
            frames.push(f);
            pos = end;
        }
        let block = buf.split_to(pos).freeze();
        if discard_tail {
            buf.clear();
        }
        (!frames.is_empty()).then_some(LineBlock { bytes: block, frames })
    }
}

impl Decoder for LineBlocks {
    type Item = LineBlock;
    type Error = LinesError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<LineBlock>, LinesError> {
        Ok(self.decode_block(buf, false))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<LineBlock>, LinesError> {
        Ok(self.decode_block(buf, true))
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

    /// The same input through [`LineBlocks`], flattened back to [`Frame`]s.
    async fn block_frames(input: &[u8], max: usize, chunk: usize) -> Vec<Frame> {
        let reader = tokio_test_reader(input, chunk);
        let blocks: Vec<LineBlock> =
            FramedRead::new(reader, LineBlocks::new(LineCodec::new(max))).map(|b| b.unwrap()).collect().await;
        let mut out = Vec::new();
        let mut expect_offset = 0;
        for b in &blocks {
            assert!(!b.frames.is_empty(), "no empty blocks");
            for f in &b.frames {
                let (BlockFrame::Line { offset, next_offset, .. } | BlockFrame::TooLong { offset, next_offset, .. }) =
                    *f;
                assert_eq!(offset, expect_offset, "each line starts where the one before ended");
                expect_offset = next_offset;
                out.push(match *f {
                    BlockFrame::Line { number, offset, .. } => {
                        Frame::Line(Line { number, offset, bytes: Bytes::copy_from_slice(b.line(f)) })
                    }
                    BlockFrame::TooLong { number, offset, len, .. } => Frame::TooLong { number, offset, len },
                });
            }
        }
        out
    }

    #[tokio::test]
    async fn blocks_hold_the_same_frames_as_lines() {
        let inputs: [&[u8]; 6] = [
            b"ab\r\n\ncdef\nlonglonglong\r\nxy",
            b"",
            b"\n\n\r\n",
            b"exactly8\r\nexactly8\nnine12345\n\r\r\r\r\r\r\r\r\r\r\n",
            b"waytoolongforthelimit-waytoolongforthelimit\rno-newline-at-the-end-and-too-long",
            b"a\nbb\nccc\ndddddddddddddddddddd\r\ne\r",
        ];
        for input in inputs {
            for chunk in 1..input.len() + 2 {
                assert_eq!(
                    block_frames(input, 8, chunk).await,
                    frames(input, 8, chunk).await,
                    "input {:?}, chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However the input is chunked, the frames are the naive split on LF (a CR before it
            /// dropped), numbered from 1, each at its byte offset; lines over the limit are
            /// reported as too long instead of returned.
            #[test]
            fn frames_are_the_naive_split(input in prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..400),
                                          chunk in 1usize..64, max in 1usize..40) {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let got = rt.block_on(async {
                    let reader = tokio_test_reader(&input, chunk);
                    FramedRead::new(reader, LineCodec::new(max)).map(|f| f.unwrap()).collect::<Vec<_>>().await
                });
                let mut offset = 0u64;
                let mut expected = Vec::new();
                let mut parts: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
                if parts.last().is_some_and(|p| p.is_empty()) {
                    parts.pop(); // a final LF ends the last line; it does not start another
                }
                for (i, part) in parts.iter().enumerate() {
                    let content = part.strip_suffix(b"\r").unwrap_or(part);
                    let number = i as u64 + 1;
                    expected.push((number, offset, content.len() > max, if content.len() > max { Vec::new() } else { content.to_vec() }));
                    offset += part.len() as u64 + 1;
                }
                let got: Vec<_> = got
                    .into_iter()
                    .map(|f| match f {
                        Frame::Line(l) => (l.number, l.offset, false, l.bytes.to_vec()),
                        Frame::TooLong { number, offset, .. } => (number, offset, true, Vec::new()),
                    })
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
