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

    /// The worker with the fewest connections, when it has fewer than `worker`; a worker that
    /// has stopped taking connections is passed over.
    fn least_loaded_below(&self, worker: usize) -> Option<usize> {
        let open = |w: usize| self.open[w].load(Ordering::Relaxed);
        let mine = open(worker);
        (0..self.open.len())
            .filter(|&w| w != worker && !self.inboxes[w].is_closed())
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
    /// no worker holds fewer. The [`Counted`] keeps it in the count until dropped. Errors are
    /// the listener's; a connection that cannot be handed over is closed and logged.
    pub async fn accept(&mut self) -> std::io::Result<(tokio::net::TcpStream, Counted)> {
        loop {
            tokio::select! {
                biased;
                Some((stream, counted)) = self.inbox.0.recv() => {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => return Ok((stream, counted)),
                        Err(e) => tracing::warn!("a connection handed over could not be taken: {e}"),
                    }
                }
                accepted = self.listener.accept() => {
                    let (stream, _) = accepted?;
                    // Without it, only small answers wait a little longer.
                    let _ = stream.set_nodelay(true);
                    match self.keep_or_hand_over(stream) {
                        Ok(Some(kept)) => return Ok(kept),
                        Ok(None) => {}
                        Err(e) => tracing::warn!("a connection could not be handed over: {e}"),
                    }
                }
            }
        }
    }

    /// Hands `stream` to the worker with the fewest connections when that is fewer than this
    /// worker's (None), or returns it to be served here.
    fn keep_or_hand_over(
        &self,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<Option<(tokio::net::TcpStream, Counted)>> {
        let Some(other) = self.shares.least_loaded_below(self.worker) else {
            return Ok(Some((stream, Counted::new(&self.shares, self.worker))));
        };
        let counted = Counted::new(&self.shares, other);
        // Leaving this worker's runtime; the other registers it with its own.
        let stream = stream.into_std()?;
        match self.shares.inboxes[other].send((stream, counted)) {
            Ok(()) => Ok(None),
            Err(returned) => {
                // That worker has just stopped taking connections: serve it here.
                let (stream, counted_there) = returned.0;
                drop(counted_there);
                let stream = tokio::net::TcpStream::from_std(stream)?;
                Ok(Some((stream, Counted::new(&self.shares, self.worker))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::config::ListenAddr;
    use crate::server::{bind, BoundListeners};

    /// Two workers' sockets on one port, each with a runtime on a thread of its own, as in
    /// the proxy. Each worker reads the caller's first bytes (sent at once, before any hand
    /// over) from every connection it serves, and reports the connection, kept open.
    #[tokio::test]
    async fn connections_made_one_after_another_split_evenly_over_two_workers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let any_port = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let (BoundListeners::Tcp(sockets), ListenAddr::Tcp(addr)) = bind(&any_port, 2).unwrap()
        else {
            panic!("TCP sockets expected");
        };
        let (shares, inboxes) = Shares::new(2);
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut workers = Vec::new();
        for (worker, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let (shares, served_tx, mut stop) = (shares.clone(), served_tx.clone(), stop.clone());
            workers.push(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(socket).unwrap();
                    let mut listener = SpreadListener::new(listener, inbox, shares, worker);
                    loop {
                        let (mut stream, counted) = tokio::select! {
                            accepted = listener.accept() => accepted.unwrap(),
                            _ = stop.changed() => return,
                        };
                        let mut first = [0u8; 4];
                        stream.read_exact(&mut first).await.unwrap();
                        served_tx.send((worker, first, stream, counted)).unwrap();
                    }
                });
            }));
        }
        drop(served_tx);
        let mut callers = Vec::new();
        let mut kept = Vec::new();
        for made in 1..=32 {
            let mut caller = tokio::net::TcpStream::connect(addr).await.unwrap();
            caller.write_all(b"ping").await.unwrap();
            callers.push(caller);
            let (worker, first, stream, counted) =
                tokio::time::timeout(Duration::from_secs(10), served.recv())
                    .await
                    .expect("a connection served within 10 s")
                    .expect("the workers are running");
            assert_eq!(&first, b"ping", "the caller's bytes reach worker {worker}");
            kept.push((worker, stream, counted));
            let open = shares.open_connections();
            assert!(open[0].abs_diff(open[1]) <= 1, "after {made}: {open:?}");
        }
        assert_eq!(shares.open_connections(), [16, 16]);
        let by_worker = |w| kept.iter().filter(|(worker, ..)| *worker == w).count();
        assert_eq!(
            (by_worker(0), by_worker(1)),
            (16, 16),
            "served where counted"
        );

        // Closing connections gives their places back.
        kept.retain(|(worker, ..)| *worker == 1);
        assert_eq!(shares.open_connections(), [0, 16]);
        drop(kept);
        assert_eq!(shares.open_connections(), [0, 0]);
        stop_tx.send(true).unwrap();
        for worker in workers {
            worker.join().unwrap();
        }
    }

    #[test]
    fn a_connection_goes_to_the_worker_with_the_fewest_only_when_it_has_fewer() {
        let (shares, mut inboxes) = Shares::new(3);
        let held: Vec<Counted> = [0, 0, 1, 1, 1, 2]
            .into_iter()
            .map(|w| Counted::new(&shares, w))
            .collect();
        assert_eq!(shares.open_connections(), [2, 3, 1]);
        assert_eq!(shares.least_loaded_below(0), Some(2));
        assert_eq!(shares.least_loaded_below(1), Some(2));
        assert_eq!(shares.least_loaded_below(2), None, "no worker has fewer");
        // A worker that stopped taking connections (its inbox gone) is passed over.
        drop(inboxes.remove(2));
        assert_eq!(shares.least_loaded_below(1), Some(0));
        assert_eq!(shares.least_loaded_below(0), None);
        drop(held);
        assert_eq!(
            shares.least_loaded_below(0),
            None,
            "equal shares stay where they are"
        );
    }
}
