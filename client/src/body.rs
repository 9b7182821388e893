//! An HTTP body fed from a channel, for streams written while they are being sent.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// A body whose data frames come from an unbounded channel; it ends when every sender is
/// dropped. Messages queued while the peer was not reading go out together in one frame
/// (up to [`COALESCE`] bytes): fewer frames, and no flood of tiny ones, which HTTP/2 peers
/// answer with `ENHANCE_YOUR_CALM`.
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl ChannelBody {
    /// A body and the sender that feeds it.
    pub fn new() -> (mpsc::UnboundedSender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, ChannelBody { rx })
    }
}

/// Most bytes of queued messages joined into one data frame (one HTTP/2 frame's payload).
pub const COALESCE: usize = 16 * 1024;

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => b,
            other => return other.map(|b| b.map(|b| Ok(Frame::data(b)))),
        };
        if first.len() >= COALESCE || self.rx.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let mut joined = Vec::from(first);
        while joined.len() < COALESCE {
            match self.rx.try_recv() {
                Ok(b) => joined.extend_from_slice(&b),
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(joined)))))
    }
}
