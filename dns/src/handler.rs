//! The hickory [`RequestHandler`] that answers for `ferry.` from a [`Directory`].
//!
//! [`Responder`] turns one question into an [`Answer`]; [`DnsHandler`] is the thin adapter that
//! checks the message (opcode, question count, EDNS version), echoes EDNS and sends the response.
//!
//! Truncation is left to hickory-server on purpose: when it encodes a response for UDP it caps
//! the message at the payload size of the response's EDNS record, or at 512 bytes without EDNS
//! (RFC 1035 section 4.2.1), stops adding records at that cap and sets the TC bit, so a resolver
//! retries over TCP, where the cap is 65535. The one thing that is ours to do is echo an OPT
//! record carrying the client's advertised size, which RFC 6891 section 6.1.1 requires anyway.
//!
//! Two properties of hickory's truncation are accepted as they are: the truncated answer keeps
//! the records that fit (a partial RRset, which RFC 2181 section 9 allows and which resolvers
//! without TCP fallback can still use), and since the OPT record is written last it is left out
//! when the records fill the whole budget. Resolvers retry over TCP on TC either way.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use hickory_proto::{
    op::{Edns, Header, HeaderCounts, LowerQuery, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, Name},
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::sync::Semaphore;

use crate::{
    Directory, DnsConfig, Lookup,
    answer::{Answer, Zone},
    name::MeshName,
};

/// How long a question may wait on [`Directory::lookup`] before the answer is SERVFAIL. The
/// sidecar may subscribe on demand; stub resolvers give up after about 5 s, so answer before.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How many questions may wait on the directory at once; past that they get SERVFAIL at once,
/// so a flood of queries cannot pile up tasks behind a slow directory.
pub const MAX_CONCURRENT_LOOKUPS: usize = 1024;
/// The EDNS version this server speaks (RFC 6891 section 6.1.3).
const EDNS_VERSION: u8 = 0;

/// Why a question got no answer from the directory.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("directory lookup timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0} directory lookups already in flight")]
    Overloaded(usize),
}

/// Answers single questions about the `ferry.` zone.
pub(crate) struct Responder {
    directory: Arc<dyn Directory>,
    zone: Zone,
    /// Bumped once per service answer; its value is the round-robin offset.
    rotation: AtomicUsize,
    lookups: Semaphore,
    max_lookups: usize,
    lookup_timeout: Duration,
}

impl Responder {
    pub(crate) fn new(directory: Arc<dyn Directory>, config: &DnsConfig) -> Self {
        Self::with_limits(directory, config, MAX_CONCURRENT_LOOKUPS, LOOKUP_TIMEOUT)
    }

    fn with_limits(directory: Arc<dyn Directory>, config: &DnsConfig, max_lookups: usize, lookup_timeout: Duration) -> Self {
        Self {
            directory,
            zone: Zone::new(config),
            rotation: AtomicUsize::new(0),
            lookups: Semaphore::new(max_lookups),
            max_lookups,
            lookup_timeout,
        }
    }

    /// The answer to `query`. Owner names in the answer are spelled as the question spelled
    /// them; matching itself ignores case.
    pub(crate) async fn respond(&self, query: &LowerQuery) -> Answer {
        let qname: &Name = query.original().name();
        let qtype = query.query_type();
        // Ferry's names exist in class IN only; other classes are not ours to answer.
        if query.query_class() != DNSClass::IN {
            return Answer::refused();
        }
        match MeshName::parse(query.name()) {
            MeshName::OutOfZone => Answer::refused(),
            MeshName::NotFound => self.zone.nxdomain(),
            MeshName::Apex => self.zone.apex(qtype),
            MeshName::EmptyNonTerminal => self.zone.nodata(),
            MeshName::Addr(ip) => self.zone.addr(qname, qtype, ip),
            MeshName::Service { name, tag } => match self.lookup(&name).await {
                Ok(Lookup::NoSuchService) => self.zone.nxdomain(),
                Ok(Lookup::Unknown) => {
                    tracing::debug!(service = %name, "the directory cannot tell; answering SERVFAIL");
                    Answer::servfail()
                }
                Ok(Lookup::Endpoints(endpoints)) => {
                    let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
                    self.zone.service(qname, qtype, &endpoints, tag.as_deref(), rotation)
                }
                Err(error @ LookupError::Timeout(_)) => {
                    tracing::warn!(service = %name, %error, "answering SERVFAIL");
                    Answer::servfail()
                }
                // Logged quietly: under a flood, one line per shed query would flood the log too.
                Err(error @ LookupError::Overloaded(_)) => {
                    tracing::debug!(service = %name, %error, "answering SERVFAIL");
                    Answer::servfail()
                }
            },
        }
    }

    async fn lookup(&self, service: &str) -> Result<Lookup, LookupError> {
        let _permit = self.lookups.try_acquire().map_err(|_| LookupError::Overloaded(self.max_lookups))?;
        tokio::time::timeout(self.lookup_timeout, self.directory.lookup(service))
            .await
            .map_err(|_| LookupError::Timeout(self.lookup_timeout))
    }
}

/// Serves `ferry.` to hickory-server.
pub(crate) struct DnsHandler {
    responder: Responder,
}

impl DnsHandler {
    pub(crate) fn new(responder: Responder) -> Self {
        Self { responder }
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);

        // RFC 6891 section 6.1.1: a request with OPT gets a response with OPT. Its payload size
        // is the client's (at least 512), which is also the size hickory truncates UDP at.
        let response_edns = request.edns.as_ref().map(|request_edns| {
            let mut edns = Edns::new();
            edns.set_max_payload(request_edns.max_payload().max(512)).set_version(EDNS_VERSION);
            edns
        });
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());

        let code = if request.edns.as_ref().is_some_and(|edns| edns.version() > EDNS_VERSION) {
            Some(ResponseCode::BADVERS)
        } else if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else {
            None
        };
        let info = match (code, request.request_info()) {
            (Some(code), _) => Err(code),
            // Not exactly one question: RFC 9619 makes QDCOUNT != 1 a format error.
            (None, Err(_)) => Err(ResponseCode::FormErr),
            (None, Ok(info)) => Ok(info),
        };

        let result = match info {
            Err(code) => {
                metadata.response_code = code;
                response_handle.send_response(builder.build_no_records(metadata)).await
            }
            Ok(info) => {
                let answer = self.responder.respond(info.query).await;
                metadata.response_code = answer.code;
                metadata.authoritative = answer.authoritative;
                let response = builder.build(metadata, &answer.answers, &[], &answer.soa, &answer.additionals);
                response_handle.send_response(response).await
            }
        };
        result.unwrap_or_else(|error| {
            tracing::warn!(%error, "failed to send DNS response");
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
        })
    }
}

// `RequestHandler` is declared with `#[async_trait]`; this is what that macro would expand the
// impl to. Writing it out spares the crate a proc-macro dependency for one method.
impl RequestHandler for DnsHandler {
    fn handle_request<'this, 'request, 'fut, R, T>(
        &'this self,
        request: &'request Request,
        response_handle: R,
    ) -> BoxFuture<'fut, ResponseInfo>
    where
        R: ResponseHandler + 'fut,
        T: Time + 'fut,
        'this: 'fut,
        'request: 'fut,
        Self: 'fut,
    {
        Box::pin(self.handle(request, response_handle))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::IpAddr};

    use futures::FutureExt;
    use hickory_proto::{
        op::Query,
        rr::{RData, RecordType},
    };
    use tokio::sync::Notify;

    use super::*;
    use crate::{DnsEndpoint, answer::addresses_of};

    /// A directory held in memory; `hang` makes every lookup wait until notified.
    #[derive(Default)]
    struct Memory {
        services: HashMap<String, Vec<DnsEndpoint>>,
        hang: Option<Arc<Notify>>,
    }

    impl Directory for Memory {
        fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
            let found = Lookup::from(self.services.get(service).cloned());
            let hang = self.hang.clone();
            async move {
                if let Some(hang) = hang {
                    hang.notified().await;
                }
                found
            }
            .boxed()
        }
    }

    fn endpoint(address: &str) -> DnsEndpoint {
        DnsEndpoint { id: address.to_owned(), address: address.to_owned(), port: 80, version: None }
    }

    fn responder(directory: Memory) -> Responder {
        Responder::new(Arc::new(directory), &DnsConfig::default())
    }

    fn catalog() -> Memory {
        let mut services = HashMap::new();
        services.insert("catalog".to_owned(), vec![endpoint("10.0.0.1"), endpoint("10.0.0.2")]);
        services.insert("empty".to_owned(), Vec::new());
        Memory { services, hang: None }
    }

    fn query(name: &str, qtype: RecordType) -> LowerQuery {
        LowerQuery::query(Query::query(Name::from_ascii(name).expect("test names are valid"), qtype))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses are valid")
    }

    #[tokio::test]
    async fn successive_answers_rotate() {
        let responder = responder(catalog());
        let first = responder.respond(&query("catalog.service.ferry.", RecordType::A)).await;
        let second = responder.respond(&query("catalog.service.ferry.", RecordType::A)).await;
        assert_eq!(addresses_of(&first.answers), [ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(addresses_of(&second.answers), [ip("10.0.0.2"), ip("10.0.0.1")]);
    }

    #[tokio::test]
    async fn answers_keep_the_question_spelling() {
        let responder = responder(catalog());
        let answer = responder.respond(&query("Catalog.Service.FERRY.", RecordType::A)).await;
        assert_eq!(answer.answers.len(), 2);
        assert!(answer.answers.iter().all(|r| r.name.to_ascii() == "Catalog.Service.FERRY."));
    }

    #[tokio::test]
    async fn existence_decides_between_nxdomain_and_nodata() {
        let responder = responder(catalog());
        let code = |answer: Answer| (answer.code, answer.answers.len(), answer.soa.is_some());
        let ask = |name: &'static str, qtype| responder.respond_owned(query(name, qtype));
        assert_eq!(code(ask("unknown.service.ferry.", RecordType::A).await), (ResponseCode::NXDomain, 0, true));
        assert_eq!(code(ask("v2.unknown.service.ferry.", RecordType::A).await), (ResponseCode::NXDomain, 0, true));
        assert_eq!(code(ask("empty.service.ferry.", RecordType::A).await), (ResponseCode::NoError, 0, true));
        assert_eq!(code(ask("catalog.service.ferry.", RecordType::TXT).await), (ResponseCode::NoError, 0, true));
        assert_eq!(code(ask("service.ferry.", RecordType::A).await), (ResponseCode::NoError, 0, true));
        assert_eq!(code(ask("bad_name.service.ferry.", RecordType::A).await), (ResponseCode::NXDomain, 0, true));
        assert_eq!(code(ask("example.com.", RecordType::A).await), (ResponseCode::Refused, 0, false));
    }

    #[tokio::test]
    async fn other_classes_are_refused() {
        let responder = responder(catalog());
        let mut chaos = Query::query(Name::from_ascii("catalog.service.ferry.").expect("valid"), RecordType::A);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(responder.respond(&LowerQuery::query(chaos)).await.code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn addr_names_need_no_directory() {
        let responder = responder(Memory::default());
        let answer = responder.respond(&query("0A000001.addr.ferry.", RecordType::A)).await;
        assert_eq!(addresses_of(&answer.answers), [ip("10.0.0.1")]);
        assert!(matches!(answer.answers[0].data, RData::A(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_directory_gets_servfail_after_the_timeout() {
        let hang = Arc::new(Notify::new());
        let directory = Memory { hang: Some(hang), ..catalog() };
        let responder = Responder::with_limits(Arc::new(directory), &DnsConfig::default(), 4, Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let answer = responder.respond(&query("catalog.service.ferry.", RecordType::A)).await;
        assert_eq!(answer.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_beyond_the_limit_get_servfail_at_once() {
        let hang = Arc::new(Notify::new());
        let directory = Memory { hang: Some(hang.clone()), ..catalog() };
        let responder = Responder::with_limits(Arc::new(directory), &DnsConfig::default(), 1, Duration::from_secs(60));
        let q = query("catalog.service.ferry.", RecordType::A);
        let mut waiting = Box::pin(responder.respond(&q));
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "the first lookup waits on the directory");

        let started = tokio::time::Instant::now();
        let second = responder.respond(&q).await;
        assert_eq!(second.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::ZERO);

        hang.notify_one();
        assert_eq!(waiting.await.answers.len(), 2);
    }

    impl Responder {
        /// `respond` for a question built in place.
        async fn respond_owned(&self, query: LowerQuery) -> Answer {
            self.respond(&query).await
        }
    }
}
