//! Reading an S3 object as one byte stream that survives dropped connections.
//!
//! A long read of a large object can be cut by the server or the network part-way ("end of file
//! before message length reached"), especially when the reader is slower than the network
//! because it waits for Kinesis. [`ObjectReader`] counts the bytes it has delivered and, when
//! the body fails, asks S3 again for the rest (`Range: bytes=<offset>-`, pinned to the same
//! version or ETag), so the bytes above it (a gzip decoder, the line codec) never notice. It
//! gives up after [`MAX_CONSECUTIVE_REOPENS`] failures in a row without progress.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::{AsyncRead, ReadBuf};

/// Reopens in a row, without a byte read between them, before the read fails.
pub const MAX_CONSECUTIVE_REOPENS: u32 = 5;

type Body = Pin<Box<dyn AsyncRead + Send>>;
type Reopen = Pin<Box<dyn Future<Output = io::Result<Body>> + Send>>;

enum State {
    Reading(Body),
    Reopening(Reopen),
}

/// Which object to read again, exactly.
#[derive(Debug, Clone)]
pub struct ObjectRef {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Version id, if the bucket is versioned.
    pub version_id: Option<String>,
    /// ETag (with its quotes), to refuse a replaced object.
    pub etag: Option<String>,
}

/// An object's body that resumes with a ranged GET when the connection drops.
pub struct ObjectReader {
    s3: aws_sdk_s3::Client,
    object: ObjectRef,
    offset: u64,
    failures: u32,
    reopens: u32,
    state: State,
}

impl ObjectReader {
    /// Wraps `body`, which starts at byte `offset` of `object`.
    pub fn new(s3: aws_sdk_s3::Client, object: ObjectRef, offset: u64, body: ByteStream) -> Self {
        ObjectReader {
            s3,
            object,
            offset,
            failures: 0,
            reopens: 0,
            state: State::Reading(Box::pin(body.into_async_read())),
        }
    }

    /// How many times the read was resumed.
    pub fn reopens(&self) -> u32 {
        self.reopens
    }

    fn reopen(&self) -> Reopen {
        let (s3, object, offset) = (self.s3.clone(), self.object.clone(), self.offset);
        Box::pin(async move {
            let mut get = s3.get_object().bucket(&object.bucket).key(&object.key).range(format!("bytes={offset}-"));
            if let Some(v) = &object.version_id {
                get = get.version_id(v);
            }
            if let Some(etag) = &object.etag {
                get = get.if_match(etag);
            }
            let out = get.send().await.map_err(|e| {
                io::Error::other(format!(
                    "reopening s3://{}/{} at byte {offset}: {}",
                    object.bucket,
                    object.key,
                    crate::aws::describe(&e)
                ))
            })?;
            Ok(Box::pin(out.body.into_async_read()) as Body)
        })
    }
}

impl AsyncRead for ObjectReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let this = &mut *self;
            match &mut this.state {
                State::Reading(body) => {
                    let before = buf.filled().len();
                    match body.as_mut().poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {
                            let n = (buf.filled().len() - before) as u64;
                            if n > 0 {
                                this.failures = 0;
                            }
                            this.offset += n;
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(e)) if this.failures < MAX_CONSECUTIVE_REOPENS => {
                            this.failures += 1;
                            this.reopens += 1;
                            tracing::warn!(bucket = %this.object.bucket, key = %this.object.key, offset = this.offset,
                                error = %crate::aws::error_chain(&e), "object read failed part-way; resuming with a ranged read");
                            this.state = State::Reopening(this.reopen());
                        }
                        other => return other,
                    }
                }
                State::Reopening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(body)) => this.state = State::Reading(body),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}
