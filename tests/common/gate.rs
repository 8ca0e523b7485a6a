//! A TCP relay that holds every connection until the test opens it, then pipes it to a target: put it in
//! front of the IdP's token endpoint to keep the proxy without a credential for as long as a test needs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpGate {
    /// The relay's own address (connect here instead of the target).
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TcpGate {
    /// Starts a closed gate in front of `target`.
    pub async fn start(target: SocketAddr) -> TcpGate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (open, _) = watch::channel(false);
        let task = {
            let accepted = accepted.clone();
            let open = open.clone();
            tokio::spawn(async move {
                let mut relays = tokio::task::JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut opened = open.subscribe();
                    relays.spawn(async move {
                        if opened.wait_for(|open| *open).await.is_err() {
                            return;
                        }
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
                relays.abort_all();
            })
        };
        TcpGate {
            addr,
            accepted,
            open,
            task,
        }
    }

    /// Connections accepted so far (held or relayed).
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Relays the held connections and every later one.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Stops accepting and drops every relayed connection.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
