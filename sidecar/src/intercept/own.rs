//! The sidecar's own outgoing connections to endpoints and outside the mesh, while it
//! intercepts.
//!
//! - They are remembered by source port and destination, so that one redirected back to the
//!   sidecar's own outbound listener (the sidecar not run as the user or group `iptables
//!   install` exempts) is recognised and closed instead of relayed again and again. [`connect`]
//!   binds the socket first, so its source port is known (and recorded) before the first packet
//!   leaves; the listener asks [`is_own`] of each connection it accepts, with the destination
//!   it was sent to. Entries are kept for [`REMEMBER`], long enough for a looped connection to
//!   be accepted, and their number is bounded.
//! - A connection to the sidecar's own instance (its app calling its own service) goes to its
//!   inbound listener: dialled at the instance's address, it would be delivered to the app's
//!   port straight away, since the rules leave the sidecar's own traffic alone.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, TcpStream};

/// How long a connection's source address is remembered.
pub const REMEMBER: Duration = Duration::from_secs(30);

/// The most source addresses remembered at once.
const MAX_REMEMBERED: usize = 16_384;

static INTERCEPTING: AtomicBool = AtomicBool::new(false);
static OWN: Mutex<Option<HashMap<u16, (SocketAddr, Instant)>>> = Mutex::new(None);
/// The instance's registered address, and the inbound listener that stands for it.
static SELF_ROUTE: Mutex<Option<(SocketAddr, SocketAddr)>> = Mutex::new(None);

/// Turns the bookkeeping on: the sidecar intercepts.
pub fn enable() {
    INTERCEPTING.store(true, Ordering::Relaxed);
}

/// Sends the sidecar's connections to `instance` (its own instance's registered address) to
/// `inbound`, its inbound listener.
pub fn route_self(instance: SocketAddr, inbound: SocketAddr) {
    *ferry_runtime::lock(&SELF_ROUTE) = Some((super::canonical(instance), inbound));
}

/// Whether `peer` (the source of an accepted connection that was going to `destination`) is
/// one of the sidecar's own recent connections.
pub fn is_own(peer: SocketAddr, destination: SocketAddr) -> bool {
    if !INTERCEPTING.load(Ordering::Relaxed) {
        return false;
    }
    let own = ferry_runtime::lock(&OWN);
    own.as_ref()
        .and_then(|own| own.get(&peer.port()))
        .is_some_and(|(to, at)| *to == super::canonical(destination) && at.elapsed() < REMEMBER)
}

fn remember(local: SocketAddr, destination: SocketAddr) {
    let mut own = ferry_runtime::lock(&OWN);
    let own = own.get_or_insert_with(HashMap::new);
    if own.len() >= MAX_REMEMBERED {
        own.retain(|_, (_, at)| at.elapsed() < REMEMBER);
        if own.len() >= MAX_REMEMBERED {
            // A storm of connections: forget the oldest half rather than grow.
            let mut ages: Vec<Instant> = own.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            own.retain(|_, (_, at)| *at > cut);
        }
    }
    own.insert(local.port(), (super::canonical(destination), Instant::now()));
}

/// Connects to `host:port` (each address it resolves to in turn), recording the source address
/// while the sidecar intercepts.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    if !INTERCEPTING.load(Ordering::Relaxed) {
        return TcpStream::connect((host, port)).await;
    }
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match connect_addr(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"))))
}

/// Connects to `addr`, recording the source address while the sidecar intercepts.
pub async fn connect_addr(addr: SocketAddr) -> io::Result<TcpStream> {
    if !INTERCEPTING.load(Ordering::Relaxed) {
        return TcpStream::connect(addr).await;
    }
    let route = *ferry_runtime::lock(&SELF_ROUTE);
    if let Some((instance, inbound)) = route
        && instance == super::canonical(addr)
    {
        return TcpStream::connect(inbound).await;
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    let any = if addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    socket.bind(any)?;
    remember(socket.local_addr()?, addr);
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_remembered_only_while_intercepting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let before = connect_addr(addr).await.expect("connects");
        let (_, peer) = listener.accept().await.expect("accepts");
        assert!(!is_own(peer, addr), "not intercepting: nothing is recorded");
        drop(before);
        enable();
        let stream = connect("127.0.0.1", addr.port()).await.expect("connects");
        let (_, peer) = listener.accept().await.expect("accepts");
        assert_eq!(Some(peer), stream.local_addr().ok());
        assert!(is_own(peer, addr), "the source of the sidecar's own connection is known");
        assert!(!is_own(peer, SocketAddr::from(([127, 0, 0, 2], addr.port()))), "going elsewhere: another socket's");
        assert!(!is_own(SocketAddr::from(([127, 0, 0, 1], 1)), addr));
        assert!(!is_own(stream.peer_addr().expect("peer"), addr), "the listener's port is not a source");

        // The sidecar's own instance is reached at its inbound listener.
        let instance = SocketAddr::from(([192, 0, 2, 7], 8080));
        route_self(instance, addr);
        let _to_self = connect_addr(instance).await.expect("connects to the stand-in");
        listener.accept().await.expect("the inbound listener took it");
    }
}
