//! Forwarding the names an intercepting server does not answer to upstream resolvers.
//!
//! An intercepting sidecar is its app's only resolver, so every name outside the mesh
//! (`example.com.`, a Kubernetes service) goes on to the resolvers the app would have asked:
//! `--dns-upstream`, or the nameservers of /etc/resolv.conf. Each question is asked as a fresh
//! message (a random id from hickory and a fresh socket, so a random source port: RFC 5452's
//! defence against spoofed answers) over UDP; an answer with the TC bit is asked again over TCP
//! (RFC 7766). Upstreams are tried in order, each for at most [`UPSTREAM_TIMEOUT`]; the answer
//! relayed is the first NOERROR or NXDOMAIN, else the last answer of any other code, else
//! SERVFAIL. The client's own id and question are kept: the handler builds the response around
//! the relayed sections.
//!
//! The upstreams must not send these queries back to this server (say a nameserver line naming
//! the address the intercepted port 53 is redirected to): an upstream equal to the server's own
//! address is dropped when the server starts, and the sidecar's own traffic is left out of the
//! redirect.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
};

use crate::answer::Answer;

/// How long one upstream may take to answer (over UDP, and over TCP after a truncated answer)
/// before the next is tried. Stub resolvers wait about 5 s; one upstream that does not answer
/// must leave time for the next.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How many questions may wait on upstreams at once; past that they get SERVFAIL at once. Each
/// holds a socket, so this also bounds the descriptors that forwarding uses. Kept apart from the
/// directory's limit so that a flood of outside names cannot starve the mesh's own.
pub const MAX_CONCURRENT_FORWARDS: usize = 256;
/// The UDP payload size advertised upstream: the DNS Flag Day 2020 value, which avoids IP
/// fragmentation on any usual path.
const EDNS_PAYLOAD: u16 = 1232;
/// The receive buffer for a UDP answer: more than the size advertised, so an upstream that
/// ignores it is still read whole.
const UDP_BUFFER: usize = 4096;

/// The bits of the client's request that its forwarded copy carries on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RequestFlags {
    /// RD: whether the client wants recursion (an app's stub resolver always does).
    pub(crate) recursion_desired: bool,
    /// CD: whether the client checks DNSSEC itself.
    pub(crate) checking_disabled: bool,
    /// The EDNS DO bit: whether the client wants DNSSEC records.
    pub(crate) dnssec_ok: bool,
}

/// Why one upstream gave no usable answer.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the answer over TCP is not a response to the question asked")]
    Mismatch,
    #[error("undecodable answer: {0}")]
    Decode(String),
}

/// Asks upstream resolvers on behalf of clients.
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    permits: Semaphore,
    max_in_flight: usize,
}

impl Forwarder {
    /// Forwards to `upstreams`, in order, waiting at most `timeout` on each.
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self::with_limit(upstreams, timeout, MAX_CONCURRENT_FORWARDS)
    }

    pub(crate) fn with_limit(upstreams: Vec<SocketAddr>, timeout: Duration, max_in_flight: usize) -> Self {
        Self { upstreams, timeout, permits: Semaphore::new(max_in_flight), max_in_flight }
    }

    /// The upstreams' answer to `query`, or SERVFAIL when none gave one.
    pub(crate) async fn forward(&self, query: &Query, flags: RequestFlags) -> Answer {
        if self.upstreams.is_empty() {
            // Said at warn level once, when the server started; per query it would flood.
            tracing::debug!(
                name = %query.name(),
                "answering SERVFAIL: no upstream resolver (none configured and none in resolv.conf)"
            );
            return Answer::servfail();
        }
        let Ok(_permit) = self.permits.try_acquire() else {
            tracing::debug!(name = %query.name(), "answering SERVFAIL: {} forwarded queries already in flight", self.max_in_flight);
            return Answer::servfail();
        };
        let request = request(query, flags);
        let bytes = match request.to_vec() {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(name = %query.name(), %error, "answering SERVFAIL: the query cannot be encoded");
                return Answer::servfail();
            }
        };

        let mut fallback = None;
        for &upstream in &self.upstreams {
            let exchange = tokio::time::timeout(self.timeout, exchange(upstream, &request, &bytes));
            match exchange.await.unwrap_or(Err(UpstreamError::Timeout(self.timeout))) {
                // NOERROR and NXDOMAIN are the name's answer; SERVFAIL, REFUSED and the like
                // are the upstream's trouble, which another upstream may not have.
                Ok(response) if matches!(response.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => {
                    return Answer::relayed(response);
                }
                Ok(response) => {
                    tracing::debug!(%upstream, name = %query.name(), code = %response.metadata.response_code, "trying the next upstream");
                    fallback = Some(response);
                }
                Err(error) => tracing::debug!(%upstream, name = %query.name(), %error, "trying the next upstream"),
            }
        }
        match fallback {
            Some(response) => Answer::relayed(response),
            None => {
                tracing::warn!(name = %query.name(), upstreams = ?self.upstreams, "answering SERVFAIL: no upstream answered");
                Answer::servfail()
            }
        }
    }
}

/// The message that asks `query` upstream.
fn request(query: &Query, flags: RequestFlags) -> Message {
    // `Message::query` draws the id from hickory's cryptographic generator.
    let mut request = Message::query();
    request.metadata.recursion_desired = flags.recursion_desired;
    request.metadata.checking_disabled = flags.checking_disabled;
    request.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD).set_dnssec_ok(flags.dnssec_ok);
    request.set_edns(edns);
    request
}

/// One upstream's answer: over UDP, then over TCP when that one is truncated.
async fn exchange(upstream: SocketAddr, request: &Message, bytes: &[u8]) -> Result<Message, UpstreamError> {
    let response = udp_exchange(upstream, request, bytes).await?;
    if response.metadata.truncation {
        return tcp_exchange(upstream, request, bytes).await;
    }
    Ok(response)
}

async fn udp_exchange(upstream: SocketAddr, request: &Message, bytes: &[u8]) -> Result<Message, UpstreamError> {
    let local = match upstream {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from any other address, and an ICMP port
    // unreachable ends the wait at once (as ECONNREFUSED) instead of at the timeout.
    socket.connect(upstream).await?;
    socket.send(bytes).await?;
    let mut buffer = vec![0; UDP_BUFFER];
    loop {
        let len = socket.recv(&mut buffer).await?;
        // Anything that is not the answer to this question (a late answer, a spoof attempt) is
        // dropped and the wait goes on, bounded by the caller's timeout.
        match Message::from_vec(&buffer[..len]) {
            Ok(response) if answers(request, &response) => return Ok(response),
            Ok(_) => tracing::debug!(%upstream, "dropped a UDP message that does not answer the question"),
            Err(error) => tracing::debug!(%upstream, %error, "dropped an undecodable UDP message"),
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, request: &Message, bytes: &[u8]) -> Result<Message, UpstreamError> {
    let mut stream = TcpStream::connect(upstream).await?;
    // RFC 1035 section 4.2.2: each message is preceded by its length; sent in one write.
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("query longer than a TCP message"))?;
    let mut framed = Vec::with_capacity(2 + bytes.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buffer = vec![0; usize::from(len)];
    stream.read_exact(&mut buffer).await?;
    let response = Message::from_vec(&buffer).map_err(|error| UpstreamError::Decode(error.to_string()))?;
    if answers(request, &response) { Ok(response) } else { Err(UpstreamError::Mismatch) }
}

/// Whether `response` answers `request`: same id, a response, the same question (names compare
/// without case, as upstreams that randomise it, RFC draft "0x20", send it back). An error
/// answer may leave the question out.
fn answers(request: &Message, response: &Message) -> bool {
    response.metadata.id == request.metadata.id
        && response.metadata.message_type == MessageType::Response
        && match response.queries.as_slice() {
            [question] => request.queries.first() == Some(question),
            [] => !matches!(response.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain),
            _ => false,
        }
}

/// A stand-in upstream resolver on loopback, for tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::{
        net::{IpAddr, SocketAddr},
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use hickory_proto::{
        op::{Message, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, UdpSocket},
        task::JoinHandle,
    };

    /// How the fake answers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Behaviour {
        /// Answers every question (see [`FakeUpstream::answer`]).
        Answer,
        /// Over UDP, an empty answer with TC set; over TCP, the whole answer.
        TruncateUdp,
        /// SERVFAIL to everything.
        ServFail,
        /// First a message with the wrong id, then the answer.
        WrongIdFirst,
        /// Reads nothing, answers nothing.
        Silent,
    }

    /// A fake upstream on 127.0.0.1 (UDP and TCP on one port), served until dropped.
    pub(crate) struct FakeUpstream {
        pub(crate) addr: SocketAddr,
        pub(crate) udp_queries: Arc<AtomicUsize>,
        pub(crate) tcp_queries: Arc<AtomicUsize>,
        tasks: Vec<JoinHandle<()>>,
        /// Held so that a silent fake's port stays bound (no ICMP unreachable).
        _sockets: Option<(UdpSocket, TcpListener)>,
    }

    impl Drop for FakeUpstream {
        fn drop(&mut self) {
            self.tasks.iter().for_each(JoinHandle::abort);
        }
    }

    impl FakeUpstream {
        /// The A record this fake gives for `name`; names starting `missing.` are NXDOMAIN.
        pub(crate) const ANSWER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 99));

        pub(crate) async fn start(behaviour: Behaviour) -> Self {
            let (udp, tcp) = crate::bind("127.0.0.1:0".parse().expect("address")).await.expect("bind the fake upstream");
            let addr = udp.local_addr().expect("address");
            let (udp_queries, tcp_queries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            if behaviour == Behaviour::Silent {
                return Self { addr, udp_queries, tcp_queries, tasks: Vec::new(), _sockets: Some((udp, tcp)) };
            }
            let udp_task = tokio::spawn(serve_udp(udp, behaviour, udp_queries.clone()));
            let tcp_task = tokio::spawn(serve_tcp(tcp, behaviour, tcp_queries.clone()));
            Self { addr, udp_queries, tcp_queries, tasks: vec![udp_task, tcp_task], _sockets: None }
        }

        pub(crate) fn udp_count(&self) -> usize {
            self.udp_queries.load(Ordering::SeqCst)
        }

        pub(crate) fn tcp_count(&self) -> usize {
            self.tcp_queries.load(Ordering::SeqCst)
        }
    }

    async fn serve_udp(socket: UdpSocket, behaviour: Behaviour, count: Arc<AtomicUsize>) {
        let mut buffer = vec![0; 4096];
        while let Ok((len, from)) = socket.recv_from(&mut buffer).await {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(request) = Message::from_vec(&buffer[..len]) else { continue };
            if behaviour == Behaviour::WrongIdFirst {
                let mut spoof = response(&request, Behaviour::Answer);
                spoof.metadata.id = request.metadata.id.wrapping_add(1);
                spoof.answers[0].data = RData::A(A([127, 0, 0, 66].into()));
                let _ = socket.send_to(&spoof.to_vec().expect("encode"), from).await;
            }
            let mut answer = response(&request, behaviour);
            if behaviour == Behaviour::TruncateUdp {
                answer.metadata.truncation = true;
                answer.answers.clear();
                answer.additionals.clear();
            }
            let _ = socket.send_to(&answer.to_vec().expect("encode"), from).await;
        }
    }

    async fn serve_tcp(listener: TcpListener, behaviour: Behaviour, count: Arc<AtomicUsize>) {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(len) = stream.read_u16().await else { continue };
            let mut buffer = vec![0; usize::from(len)];
            if stream.read_exact(&mut buffer).await.is_err() {
                continue;
            }
            let Ok(request) = Message::from_vec(&buffer) else { continue };
            let bytes = response(&request, behaviour).to_vec().expect("encode");
            let len = u16::try_from(bytes.len()).expect("fits");
            let _ = stream.write_all(&[&len.to_be_bytes()[..], &bytes].concat()).await;
        }
    }

    /// The full answer: an A record and an additional one for the name, an NXDOMAIN with an
    /// SOA for `missing.*`, or SERVFAIL.
    fn response(request: &Message, behaviour: Behaviour) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_available = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.queries = request.queries.clone();
        let Some(query) = request.queries.first() else { return response };
        let name = query.name().clone();
        if behaviour == Behaviour::ServFail {
            response.metadata.response_code = ResponseCode::ServFail;
        } else if name.iter().next().is_some_and(|label| label.eq_ignore_ascii_case(b"missing")) {
            response.metadata.response_code = ResponseCode::NXDomain;
            let zone = name.base_name();
            let soa = hickory_proto::rr::rdata::SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 30);
            response.authorities.push(Record::from_rdata(zone, 30, RData::SOA(soa)));
        } else if query.query_type() == RecordType::A {
            let IpAddr::V4(v4) = FakeUpstream::ANSWER else { unreachable!("the fake's answer is IPv4") };
            response.answers.push(Record::from_rdata(name, 60, RData::A(A(v4))));
            let extra = Name::from_ascii("extra.example.").expect("valid");
            response.additionals.push(Record::from_rdata(extra, 60, RData::A(A([127, 0, 0, 98].into()))));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::{Name, RecordType};

    use super::{
        fake::{Behaviour, FakeUpstream},
        *,
    };
    use crate::answer::addresses_of;

    fn question(name: &str, qtype: RecordType) -> Query {
        Query::query(Name::from_ascii(name).expect("test names are valid"), qtype)
    }

    fn flags() -> RequestFlags {
        RequestFlags { recursion_desired: true, ..RequestFlags::default() }
    }

    #[tokio::test]
    async fn relays_the_upstream_answer_whole() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let forwarder = Forwarder::new(vec![upstream.addr], UPSTREAM_TIMEOUT);
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(answer.code, ResponseCode::NoError);
        assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER]);
        assert_eq!(answer.answers[0].name.to_ascii(), "www.example.com.");
        assert_eq!(addresses_of(&answer.additionals), ["127.0.0.98".parse::<std::net::IpAddr>().expect("valid")]);

        let missing = forwarder.forward(&question("missing.example.com.", RecordType::A), flags()).await;
        assert_eq!(missing.code, ResponseCode::NXDomain);
        assert!(missing.answers.is_empty());
        assert_eq!(missing.authorities.len(), 1, "the upstream's SOA is relayed");
        assert_eq!(upstream.udp_count(), 2);
        assert_eq!(upstream.tcp_count(), 0);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        let upstream = FakeUpstream::start(Behaviour::TruncateUdp).await;
        let forwarder = Forwarder::new(vec![upstream.addr], UPSTREAM_TIMEOUT);
        let answer = forwarder.forward(&question("big.example.com.", RecordType::A), flags()).await;
        assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER]);
        assert_eq!((upstream.udp_count(), upstream.tcp_count()), (1, 1));
    }

    #[tokio::test]
    async fn messages_that_do_not_answer_the_question_are_dropped() {
        let upstream = FakeUpstream::start(Behaviour::WrongIdFirst).await;
        let forwarder = Forwarder::new(vec![upstream.addr], UPSTREAM_TIMEOUT);
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER], "the spoofed answer is not taken");
    }

    #[tokio::test]
    async fn a_failing_upstream_gives_way_to_the_next() {
        let failing = FakeUpstream::start(Behaviour::ServFail).await;
        let working = FakeUpstream::start(Behaviour::Answer).await;
        let forwarder = Forwarder::new(vec![failing.addr, working.addr], UPSTREAM_TIMEOUT);
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER]);

        // With no better answer, the failure itself is relayed.
        let alone = Forwarder::new(vec![failing.addr], UPSTREAM_TIMEOUT);
        let answer = alone.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(answer.code, ResponseCode::ServFail);
        assert_eq!(failing.udp_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn upstreams_that_do_not_answer_get_servfail_after_their_timeouts() {
        let silent = [FakeUpstream::start(Behaviour::Silent).await, FakeUpstream::start(Behaviour::Silent).await];
        let forwarder = Forwarder::new(silent.iter().map(|u| u.addr).collect(), Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(answer.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::from_secs(4), "2 s for each upstream, one after the other");
    }

    /// In real time: with the clock paused, tokio could jump past the working upstream's
    /// timeout while its answer is on the way (the runtime looks idle then).
    #[tokio::test]
    async fn a_silent_upstream_gives_way_to_the_next_after_its_timeout() {
        let silent = FakeUpstream::start(Behaviour::Silent).await;
        let working = FakeUpstream::start(Behaviour::Answer).await;
        let timeout = Duration::from_millis(500);
        let forwarder = Forwarder::new(vec![silent.addr, working.addr], timeout);
        let started = tokio::time::Instant::now();
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER]);
        assert!(started.elapsed() >= timeout, "the silent one was waited on first");
        assert_eq!(working.udp_count(), 1);
    }

    #[tokio::test]
    async fn no_upstream_is_servfail_at_once() {
        let forwarder = Forwarder::new(Vec::new(), UPSTREAM_TIMEOUT);
        let answer = forwarder.forward(&question("www.example.com.", RecordType::A), flags()).await;
        assert_eq!(answer.code, ResponseCode::ServFail);
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_beyond_the_limit_get_servfail_at_once() {
        let silent = FakeUpstream::start(Behaviour::Silent).await;
        let forwarder = Forwarder::with_limit(vec![silent.addr], Duration::from_secs(60), 1);
        let q = question("www.example.com.", RecordType::A);
        let mut waiting = Box::pin(forwarder.forward(&q, flags()));
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "the first waits on the upstream");
        let started = tokio::time::Instant::now();
        assert_eq!(forwarder.forward(&q, flags()).await.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn the_request_carries_the_client_bits_and_a_fresh_id() {
        let q = question("www.example.com.", RecordType::AAAA);
        let flags = RequestFlags { recursion_desired: true, checking_disabled: true, dnssec_ok: true };
        let request = request(&q, flags);
        assert!(request.metadata.recursion_desired && request.metadata.checking_disabled);
        assert_eq!(request.queries, std::slice::from_ref(&q));
        let edns = request.edns.as_ref().expect("EDNS is sent");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
        let ids: std::collections::HashSet<u16> = (0..8).map(|_| super::request(&q, flags).metadata.id).collect();
        assert!(ids.len() > 1, "ids are drawn at random");
    }

    #[test]
    fn only_a_response_to_the_question_is_an_answer() {
        let request = request(&question("www.example.com.", RecordType::A), flags());
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.queries = vec![question("WWW.Example.COM.", RecordType::A)];
        assert!(answers(&request, &response), "case is ignored");
        let mut other_type = response.clone();
        other_type.queries = vec![question("www.example.com.", RecordType::AAAA)];
        assert!(!answers(&request, &other_type));
        let mut other_id = response.clone();
        other_id.metadata.id = request.metadata.id.wrapping_add(1);
        assert!(!answers(&request, &other_id));
        let mut empty = response.clone();
        empty.queries.clear();
        assert!(!answers(&request, &empty), "a NOERROR must carry the question");
        empty.metadata.response_code = ResponseCode::ServFail;
        assert!(answers(&request, &empty), "an error may leave it out");
        assert!(!answers(&request, &request.clone()), "a query is no answer");
    }
}
