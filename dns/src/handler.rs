//! The hickory [`RequestHandler`] that answers for `ferry.` and its aliases from a
//! [`Directory`](crate::Directory).
//!
//! [`Responder`] turns one question into an [`Answer`](crate::answer::Answer); [`DnsHandler`] is
//! the thin adapter that checks the message (opcode, question count, EDNS version), echoes EDNS
//! and sends the response, with the client's id and question whoever answered it.
//!
//! Truncation is left to hickory-server on purpose: when it encodes a response for UDP it caps
//! the message at the payload size of the response's EDNS record, or at 512 bytes without EDNS
//! (RFC 1035 section 4.2.1), stops adding records at that cap and sets the TC bit, so a resolver
//! retries over TCP, where the cap is 65535. The one thing that is ours to do is echo an OPT
//! record carrying the client's advertised size, which RFC 6891 section 6.1.1 requires anyway,
//! capped at [`MAX_UDP_PAYLOAD`] (1232 bytes) so no answer relies on IP fragmentation.
//!
//! Two properties of hickory's truncation are accepted as they are: the truncated answer keeps
//! the records that fit (a partial RRset, which RFC 2181 section 9 allows and which resolvers
//! without TCP fallback can still use), and since the OPT record is written last it is left out
//! when the records fill the whole budget. Resolvers retry over TCP on TC either way.

use std::time::Instant;

use futures::future::BoxFuture;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::{
    net::{runtime::Time, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

use crate::{
    forward::RequestFlags,
    limit::{ResponseLimiter, Verdict},
    respond::Responder,
};

/// The EDNS version this server speaks (RFC 6891 section 6.1.3).
const EDNS_VERSION: u8 = 0;

/// The largest UDP answer, whatever size the client advertises: the DNS Flag Day 2020 value,
/// which fits the IPv6 minimum MTU without fragmentation (fragments are dropped or spoofed on
/// real networks). A larger answer is truncated with TC set and the resolver asks over TCP.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;

/// Serves `ferry.` and its aliases (and, intercepting, every name) to hickory-server.
pub(crate) struct DnsHandler {
    responder: Responder,
    limiter: ResponseLimiter,
}

impl DnsHandler {
    pub(crate) fn new(responder: Responder, limiter: ResponseLimiter) -> Self {
        Self { responder, limiter }
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);

        // RFC 6891 section 6.1.1: a request with OPT gets a response with OPT. Its payload size
        // is the client's (at least 512) up to MAX_UDP_PAYLOAD, which is also the size hickory
        // truncates UDP at.
        let response_edns = request.edns.as_ref().map(|request_edns| {
            let mut edns = Edns::new();
            edns.set_max_payload(request_edns.max_payload().clamp(512, MAX_UDP_PAYLOAD)).set_version(EDNS_VERSION);
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
                let flags = RequestFlags {
                    recursion_desired: request.metadata.recursion_desired,
                    checking_disabled: request.metadata.checking_disabled,
                    dnssec_ok: request.edns.as_ref().is_some_and(|edns| edns.flags().dnssec_ok),
                };
                let answer = self.responder.respond(info.query, flags).await;
                metadata.response_code = answer.code;
                metadata.authoritative = answer.authoritative;
                metadata.authentic_data = answer.authentic_data;
                // An intercepting server recurses for its app, through the upstreams.
                metadata.recursion_available = self.responder.intercepts();
                // UDP answers are rate limited per client network (see `limit`).
                let verdict = match request.protocol() {
                    Protocol::Udp => self.limiter.check(
                        request.src().ip(),
                        &info.query.name().to_string(),
                        u16::from(info.query.query_type()),
                        u16::from(answer.code),
                        Instant::now(),
                    ),
                    _ => Verdict::Send,
                };
                match verdict {
                    Verdict::Send => {
                        let response = builder.build(metadata, &answer.answers, &answer.authorities, &[], &answer.additionals);
                        response_handle.send_response(response).await
                    }
                    Verdict::Slip => {
                        metadata.truncation = true;
                        response_handle.send_response(builder.build_no_records(metadata)).await
                    }
                    Verdict::Drop => return ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() }),
                }
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
