//! Request bodies, read within a size and a time limit: the one body reader
//! of both HTTP/1 paths and HTTP/2.

use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::metrics::Metrics;
use crate::request::BodyError;

/// Reads a body of at most `max` bytes within `timeout`. A declared length
/// over `max` is refused unread.
pub async fn read_limited<B>(
    body: B,
    declared: Option<u64>,
    max: usize,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        metrics
            .limit_rejections
            .with_label_values(&["max_body_bytes"])
            .inc();
        BodyError::TooLarge { limit: max }
    };
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(_)) => Err(BodyError::Unreadable),
    }
}
