//! The proxy listener: one single-threaded runtime per CPU, each with its own
//! `SO_REUSEPORT` socket, connection pool and connection limit (the connections spread
//! evenly over them, see `spread`), and a graceful drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::caller_http1;
use crate::caller_stall::StallLimited;
use crate::config::{Limits, ListenAddr};
use crate::credential::manager::Shutdown;
use crate::proxy::Forwarder;
use crate::spread::{Counted, Inbox, Shares, SpreadListener};

/// Sockets bound before the workers start, so start-up errors surface at once.
pub enum BoundListeners {
    Tcp(Vec<std::net::TcpListener>),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundListeners {
    /// How many workers will serve these listeners (one per socket).
    pub fn workers(&self) -> usize {
        match self {
            BoundListeners::Tcp(sockets) => sockets.len(),
            BoundListeners::Unix(_) => 1,
        }
    }
}

/// Binds the proxy listener: `workers` TCP sockets sharing one port, or one Unix socket
/// created with mode 0600. Returns the sockets and the address actually bound.
pub fn bind(listen: &ListenAddr, workers: usize) -> anyhow::Result<(BoundListeners, ListenAddr)> {
    match listen {
        ListenAddr::Tcp(addr) => {
            let first = reuseport_socket(*addr)?;
            let bound = first.local_addr()?;
            let mut sockets = vec![first];
            for _ in 1..workers {
                sockets.push(reuseport_socket(bound)?);
            }
            Ok((BoundListeners::Tcp(sockets), ListenAddr::Tcp(bound)))
        }
        ListenAddr::Unix(path) => Ok((BoundListeners::Unix(bind_unix(path)?), listen.clone())),
    }
}

/// Binds the admin listener; `[::]` accepts IPv4 too, so probes reach it on any cluster.
pub fn bind_admin(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tcp_socket("admin_listen", addr, false, 1024)?;
    Ok(tokio::net::TcpListener::from_std(socket)?)
}

/// One of the workers' proxy sockets, all bound to the same port.
fn reuseport_socket(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    tcp_socket("listen", addr, true, 4096)
}

/// A non-blocking listening TCP socket; `[::]` is dual-stack. `setting` names the address in
/// errors.
fn tcp_socket(
    setting: &str,
    addr: SocketAddr,
    reuse_port: bool,
    backlog: i32,
) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| anyhow::anyhow!("{setting}: cannot bind {addr}: {e}"))?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

fn bind_unix(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            anyhow::bail!(
                "listen: {} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    // The socket must never exist with looser permissions, not even for a moment.
    // SAFETY: umask only changes this process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    unsafe { libc::umask(previous) };
    let listener =
        bound.map_err(|e| anyhow::anyhow!("listen: cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What a worker needs to serve connections.
#[derive(Clone)]
pub struct WorkerSettings {
    pub limits: Limits,
    pub max_connections: usize,
    pub grace: Duration,
}

/// The running workers: one receiver per worker, told when it has drained, and their shares
/// of the open connections.
pub struct Workers {
    pub done: Vec<tokio::sync::oneshot::Receiver<()>>,
    pub shares: Arc<Shares>,
}

/// Starts one worker thread per listener; each returns when its connections have drained
/// after `stop_accepting` fires (or the grace period ran out).
pub fn spawn_workers(
    listeners: BoundListeners,
    make_forwarder: impl Fn() -> Forwarder,
    settings: WorkerSettings,
    stop_accepting: Shutdown,
) -> anyhow::Result<Workers> {
    let (shares, inboxes) = Shares::new(listeners.workers());
    let mut done = Vec::new();
    let mut start =
        |index: usize, listener: WorkerListener, max_connections: usize| -> anyhow::Result<()> {
            let forwarder = make_forwarder();
            let settings = WorkerSettings {
                max_connections,
                ..settings.clone()
            };
            let stop = stop_accepting.clone();
            let shares = shares.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("proxy-worker-{index}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime
                            .block_on(serve(listener, index, shares, forwarder, settings, stop)),
                        Err(e) => tracing::error!("worker {index} could not start: {e}"),
                    }
                    let _ = tx.send(());
                })?;
            done.push(rx);
            Ok(())
        };
    match listeners {
        BoundListeners::Tcp(sockets) => {
            let per_worker = settings.max_connections.div_ceil(sockets.len()).max(1);
            for (i, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
                start(i, WorkerListener::Tcp(socket, inbox), per_worker)?;
            }
        }
        // One worker, so nothing to hand over: its inbox goes unused.
        BoundListeners::Unix(socket) => {
            start(0, WorkerListener::Unix(socket), settings.max_connections)?
        }
    }
    Ok(Workers { done, shares })
}

enum WorkerListener {
    Tcp(std::net::TcpListener, Inbox),
    Unix(std::os::unix::net::UnixListener),
}

/// A listener a worker accepts connections from.
trait Acceptor {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Each connection is counted in its worker's share until it closes.
    async fn accept_one(&mut self) -> std::io::Result<(Self::Stream, Counted)>;
}

impl Acceptor for SpreadListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&mut self) -> std::io::Result<(Self::Stream, Counted)> {
        self.accept().await
    }
}

/// The Unix socket's one worker, which counts its connections.
struct UnixAcceptor {
    listener: tokio::net::UnixListener,
    shares: Arc<Shares>,
}

impl Acceptor for UnixAcceptor {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&mut self) -> std::io::Result<(Self::Stream, Counted)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((stream, Counted::new(&self.shares, 0)))
    }
}

async fn serve(
    listener: WorkerListener,
    index: usize,
    shares: Arc<Shares>,
    forwarder: Forwarder,
    settings: WorkerSettings,
    stop: Shutdown,
) {
    let result = match listener {
        WorkerListener::Tcp(socket, inbox) => match tokio::net::TcpListener::from_std(socket) {
            Ok(listener) => {
                let listener = SpreadListener::new(listener, inbox, shares, index);
                accept_loop(listener, &forwarder, &settings, &stop).await
            }
            Err(e) => Err(e),
        },
        WorkerListener::Unix(socket) => match tokio::net::UnixListener::from_std(socket) {
            Ok(listener) => {
                let listener = UnixAcceptor { listener, shares };
                accept_loop(listener, &forwarder, &settings, &stop).await
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        tracing::error!("proxy listener failed: {e}");
    }
}

async fn accept_loop<A: Acceptor>(
    mut listener: A,
    forwarder: &Forwarder,
    settings: &WorkerSettings,
    stop: &Shutdown,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    // Waiting for a request head starts one clock, for slowloris heads and idle keep-alive
    // connections alike: the shorter setting wins.
    let head_timeout = settings
        .limits
        .header_read_timeout
        .min(settings.limits.idle_timeout);
    let connection_settings = caller_http1::Settings {
        head_timeout,
        max_head_bytes: settings.limits.max_header_bytes,
    };
    // For connections handed to hyper (requests with bodies and the unusual ones).
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(settings.limits.max_header_bytes)
        .keep_alive(true);
    // The worker's own token: its connections wait on it without contending with the other
    // workers' for the shared one.
    let stop_connections = stop.child_token();
    loop {
        // Beyond the limit, connections wait in the kernel's backlog rather than be refused.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, held) = tokio::select! {
            accepted = listener.accept_one() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let connection = caller_http1::serve(
            StallLimited::new(stream, settings.limits.idle_timeout),
            forwarder.clone(),
            http.clone(),
            connection_settings,
            stop_connections.clone(),
        );
        tokio::spawn(async move {
            connection.await;
            drop(permit);
            drop(held);
        });
    }
    // Stop accepting at once: new callers get a refused connection, not a hang.
    drop(listener);
    // Every connection holds a permit until it closes: all of them back means all closed.
    // (At most a million: the settings are checked.)
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => {}
        _ = tokio::time::sleep(settings.grace) => {
            tracing::warn!("shutdown grace period ended with requests still in flight");
        }
    }
    Ok(())
}
