//! A deadline for a connection that sets one after another (a head to read, an answer to
//! wait for, a stream that stalls): one timer, moved only when it fires before the deadline
//! at hand, instead of a timer set and cancelled for each; and the stall clock that uses it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct LazyDeadline {
    timer: Pin<Box<Sleep>>,
    at: Instant,
}

impl LazyDeadline {
    pub fn new(at: Instant) -> LazyDeadline {
        LazyDeadline {
            timer: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    /// `timer` moved to `at`, or a new one when there is none yet.
    pub fn reused(timer: Option<LazyDeadline>, at: Instant) -> LazyDeadline {
        match timer {
            Some(mut timer) => {
                timer.set(at);
                timer
            }
            None => LazyDeadline::new(at),
        }
    }

    /// Moves the deadline; the timer itself only when the deadline moves earlier, which
    /// callers setting `now + a fixed timeout` never do (one alternating between two timeouts,
    /// as an upstream connection does for heads and stalled bodies, does at most once a switch).
    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if self.timer.deadline() > at {
            self.timer.as_mut().reset(at);
        }
    }

    /// Ready once the deadline has passed; a timer that fires early is moved to it.
    pub fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.at);
        }
        Poll::Pending
    }
}

/// Times a stream's waits: the first wait after progress starts the clock, progress stops
/// it, and a wait that lasts `limit` is a stall. The timer is passed in, so that a connection
/// can share one with its other deadlines.
#[derive(Default)]
pub struct StallWatch {
    waiting: bool,
}

impl StallWatch {
    pub fn progressed(&mut self) {
        self.waiting = false;
    }

    /// For a stream that has to wait (again): ready once it has waited `limit` since its last
    /// progress.
    pub fn poll_stalled(
        &mut self,
        timer: &mut Option<LazyDeadline>,
        limit: Duration,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let timer = match timer {
            Some(timer) if self.waiting => timer,
            _ => {
                self.waiting = true;
                let started = LazyDeadline::reused(timer.take(), Instant::now() + limit);
                timer.insert(started)
            }
        };
        timer.poll_passed(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test]
    async fn the_deadline_at_hand_counts_whether_it_moved_later_or_earlier() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut deadline = LazyDeadline::new(start + ms(100));
        deadline.set(start + ms(300));
        poll_fn(|cx| deadline.poll_passed(cx)).await;
        let waited = Instant::now() - start;
        assert!(waited >= ms(300) && waited < ms(900), "{waited:?}");

        let before = Instant::now();
        deadline.set(before + ms(2000));
        deadline.set(before + ms(100));
        poll_fn(|cx| deadline.poll_passed(cx)).await;
        let waited = Instant::now() - before;
        assert!(waited >= ms(100) && waited < ms(700), "{waited:?}");
    }
}
