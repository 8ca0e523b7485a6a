//! Keeps the workers' shares of caller connections even. The kernel deals connections to the
//! workers' `SO_REUSEPORT` sockets by a hash of their addresses, which often leaves one worker
//! with more than its share (with 2 connections, half the time both on one worker); a worker
//! that accepts a connection while another holds fewer hands it over to that one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// A connection accepted by one worker for another, with its place in that worker's count.
type HandedOver = (std::net::TcpStream, Counted);

/// The open connections of every worker, and where to hand a connection to each.
pub struct Shares {
    open: Box<[AtomicUsize]>,
    inboxes: Box<[mpsc::UnboundedSender<HandedOver>]>,
}

/// Where one worker receives the connections handed over to it.
pub struct Inbox(mpsc::UnboundedReceiver<HandedOver>);

impl Shares {
    /// The shares of `workers` workers, and each worker's inbox.
    pub fn new(workers: usize) -> (Arc<Shares>, Vec<Inbox>) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let shares = Arc::new(Shares {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inboxes: senders.into(),
        });
        (shares, receivers.into_iter().map(Inbox).collect())
    }

    /// How many connections each worker serves now.
    pub fn open_connections(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect()
    }

    /// The worker with the fewest connections, when it has fewer than `worker`.
    fn fewer_than(&self, worker: usize) -> Option<usize> {
        let open = |w: usize| self.open[w].load(Ordering::Relaxed);
        let mine = open(worker);
        (0..self.open.len())
            .filter(|&w| w != worker)
            .map(|w| (open(w), w))
            .min()
            .filter(|&(theirs, _)| theirs < mine)
            .map(|(_, w)| w)
    }
}

/// Counts one connection in a worker's share until dropped.
pub struct Counted {
    shares: Arc<Shares>,
    worker: usize,
}

impl Counted {
    pub fn new(shares: &Arc<Shares>, worker: usize) -> Counted {
        shares.open[worker].fetch_add(1, Ordering::Relaxed);
        Counted {
            shares: shares.clone(),
            worker,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.shares.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker's TCP listener: its own socket, and the connections other workers hand over.
pub struct SpreadListener {
    listener: tokio::net::TcpListener,
    inbox: Inbox,
    shares: Arc<Shares>,
    worker: usize,
}

impl SpreadListener {
    pub fn new(
        listener: tokio::net::TcpListener,
        inbox: Inbox,
        shares: Arc<Shares>,
        worker: usize,
    ) -> SpreadListener {
        SpreadListener {
            listener,
            inbox,
            shares,
            worker,
        }
    }

    /// The next connection this worker serves: one handed over, or one accepted here while
    /// no worker holds fewer. The [`Counted`] keeps it in the count until dropped.
    pub async fn accept(&mut self) -> std::io::Result<(tokio::net::TcpStream, Counted)> {
        loop {
            tokio::select! {
                biased;
                Some((stream, counted)) = self.inbox.0.recv() => {
                    return Ok((tokio::net::TcpStream::from_std(stream)?, counted));
                }
                accepted = self.listener.accept() => {
                    let (stream, _) = accepted?;
                    stream.set_nodelay(true)?;
                    let Some(other) = self.shares.fewer_than(self.worker) else {
                        return Ok((stream, Counted::new(&self.shares, self.worker)));
                    };
                    let counted = Counted::new(&self.shares, other);
                    // Leaving this worker's runtime; the other registers it with its own.
                    let stream = stream.into_std()?;
                    if let Err(returned) = self.shares.inboxes[other].send((stream, counted)) {
                        // That worker has stopped: serve it here.
                        let (stream, _) = returned.0;
                        let stream = tokio::net::TcpStream::from_std(stream)?;
                        return Ok((stream, Counted::new(&self.shares, self.worker)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenAddr;
    use crate::server::{bind, BoundListeners};

    /// Two workers' sockets on one port, each accepting in a task of its own and reporting
    /// every connection it serves (kept open) with its worker's number.
    #[tokio::test]
    async fn connections_made_one_after_another_split_evenly_over_two_workers() {
        let any_port = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let (BoundListeners::Tcp(sockets), ListenAddr::Tcp(addr)) = bind(&any_port, 2).unwrap()
        else {
            panic!("TCP sockets expected");
        };
        let (shares, inboxes) = Shares::new(2);
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (worker, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let listener = tokio::net::TcpListener::from_std(socket).unwrap();
            let mut listener = SpreadListener::new(listener, inbox, shares.clone(), worker);
            let served_tx = served_tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let connection = listener.accept().await.unwrap();
                    served_tx.send((worker, connection)).unwrap();
                }
            }));
        }
        let mut callers = Vec::new();
        let mut kept = Vec::new();
        for made in 1..=32 {
            callers.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            kept.push(served.recv().await.unwrap());
            let open = shares.open_connections();
            assert!(open[0].abs_diff(open[1]) <= 1, "after {made}: {open:?}");
        }
        assert_eq!(shares.open_connections(), [16, 16]);
        let by_worker = |w| kept.iter().filter(|(worker, _)| *worker == w).count();
        assert_eq!(
            (by_worker(0), by_worker(1)),
            (16, 16),
            "served where counted"
        );

        // A connection handed over still carries its bytes to the worker that serves it.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (caller, (_, (stream, _))) in callers.iter_mut().zip(kept.iter_mut()) {
            caller.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }

        // Closing connections gives their places back.
        kept.retain(|(worker, _)| *worker == 1);
        assert_eq!(shares.open_connections(), [0, 16]);
        drop(kept);
        assert_eq!(shares.open_connections(), [0, 0]);
        for task in tasks {
            task.abort();
        }
    }

    #[test]
    fn a_connection_goes_to_the_worker_with_the_fewest_only_when_it_has_fewer() {
        let (shares, _inboxes) = Shares::new(3);
        let held: Vec<Counted> = [0, 0, 1, 1, 1, 2]
            .into_iter()
            .map(|w| Counted::new(&shares, w))
            .collect();
        assert_eq!(shares.open_connections(), [2, 3, 1]);
        assert_eq!(shares.fewer_than(0), Some(2));
        assert_eq!(shares.fewer_than(1), Some(2));
        assert_eq!(shares.fewer_than(2), None, "no worker has fewer");
        drop(held);
        assert_eq!(
            shares.fewer_than(0),
            None,
            "equal shares stay where they are"
        );
    }
}
