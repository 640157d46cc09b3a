//! Dropping a connection whose stream cannot end.
//!
//! A stream whose client stopped reading cannot write its closing event:
//! its writer is blocked on the socket and never asks the stream for more.
//! Each connection task carries a [`ConnectionAbort`], which its streams
//! tell when they are asked to close and when they have ended; the task runs
//! inside [`DropWhenStuck`], which drops the connection once a stream has
//! been closing for longer than `stream.close_timeout`. No task is spawned
//! for it, and an idle connection holds no timer: one is armed only while a
//! stream of the connection is closing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::stream::CloseWatch;

/// The streams of one connection that are closing, each with the time by
/// which it must have ended.
#[derive(Default)]
pub struct ConnectionAbort {
    closing: Mutex<Vec<(u64, Instant)>>,
    /// The connection's task, woken when a stream starts closing (its
    /// writer may be blocked on the socket, with nothing else to wake it).
    task: AtomicWaker,
}

impl CloseWatch for ConnectionAbort {
    fn closing(&self, stream: u64, within: Duration) {
        let by = Instant::now()
            .checked_add(within)
            .unwrap_or_else(Instant::now);
        self.closing.lock().push((stream, by));
        self.task.wake();
    }

    fn ended(&self, stream: u64) {
        self.closing.lock().retain(|(s, _)| *s != stream);
    }
}

impl ConnectionAbort {
    /// When the first closing stream must have ended, if any is closing.
    fn first_due(&self) -> Option<Instant> {
        self.closing.lock().iter().map(|(_, by)| *by).min()
    }
}

/// A connection's future that ends, dropping the connection, when one of
/// its streams is overdue; otherwise it is the inner future.
pub struct DropWhenStuck<F> {
    inner: Pin<Box<F>>,
    abort: Arc<ConnectionAbort>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future<Output = ()>> DropWhenStuck<F> {
    /// `inner` watched through `abort`.
    pub fn new(inner: F, abort: Arc<ConnectionAbort>) -> Self {
        Self {
            inner: Box::pin(inner),
            abort,
            timer: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for DropWhenStuck<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.abort.task.register(cx.waker());
        if this.inner.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // A stream that starts closing wakes this task, is seen here and
        // arms the timer.
        let Some(due) = this.abort.first_due() else {
            this.timer = None;
            return Poll::Pending;
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_ready()
            && this.abort.first_due().is_some_and(|d| d <= Instant::now())
        {
            tracing::debug!("a closing stream did not end in time; dropping its connection");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
