//! Who may call the control plane's APIs.
//!
//! Every call carries `authorization: Bearer <secret>`; [`Auth::authenticate`] turns it into a
//! [`Principal`], which the gRPC and HTTP layers put in the request's extensions. A missing or
//! unknown token is refused there (`UNAUTHENTICATED`, 401); what a known token may do is decided
//! by each handler, which knows the service a call is about (`PERMISSION_DENIED`, 403).
//! `GET /metrics`, `GET /ready`, the gRPC health service and DNS stay open. With `--auth none`
//! every call acts as an admin.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, Request, Response};
use tonic::Status;

pub mod tokens;

pub use self::tokens::Tokens;

/// Who makes a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `--auth none`: anyone, with every right.
    Anonymous,
    Admin {
        id: Arc<str>,
    },
    Read {
        id: Arc<str>,
    },
    /// A sidecar of `service`.
    Sidecar {
        id: Arc<str>,
        service: Arc<str>,
    },
}

/// A call the principal may not make.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl From<Denied> for Status {
    fn from(denied: Denied) -> Self {
        Status::permission_denied(denied.0)
    }
}

impl Principal {
    /// The token's id; empty without authentication.
    pub fn id(&self) -> &str {
        match self {
            Self::Anonymous => "",
            Self::Admin { id } | Self::Read { id } | Self::Sidecar { id, .. } => id,
        }
    }

    /// The principal in words, for refusals: `the read token read-1a2b`.
    pub fn describe(&self) -> String {
        match self {
            Self::Anonymous => "an unauthenticated caller".into(),
            Self::Admin { id } => format!("the admin token {id}"),
            Self::Read { id } => format!("the read token {id}"),
            Self::Sidecar { id, service } => format!("the sidecar token {id} (service {service})"),
        }
    }

    /// May read everything.
    pub fn require_read(&self, what: &str) -> Result<(), Denied> {
        match self {
            Self::Anonymous | Self::Admin { .. } | Self::Read { .. } => Ok(()),
            Self::Sidecar { .. } => Err(Denied(format!("{what} needs a read or admin token; this is {}", self.describe()))),
        }
    }

    /// May change anything.
    pub fn require_admin(&self, what: &str) -> Result<(), Denied> {
        match self {
            Self::Anonymous | Self::Admin { .. } => Ok(()),
            _ => Err(Denied(format!("{what} needs an admin token; this is {}", self.describe()))),
        }
    }

    /// May act for `service`: its instances, its stream, its certificate.
    pub fn require_service(&self, service: &str, what: &str) -> Result<(), Denied> {
        match self {
            Self::Anonymous | Self::Admin { .. } => Ok(()),
            Self::Sidecar { service: own, .. } if **own == *service => Ok(()),
            Self::Sidecar { service: own, .. } => {
                Err(Denied(format!("{what} for service {service:?} is refused: {} may act for {own:?} only", self.describe())))
            }
            Self::Read { .. } => Err(Denied(format!("{what} needs an admin or sidecar token; this is {}", self.describe()))),
        }
    }

    /// The principal of a gRPC request, put there by [`AuthLayer`].
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
        request.extensions().get::<Principal>().cloned().ok_or_else(|| Status::unauthenticated("no credentials"))
    }
}

/// A call that presented no token, or one nobody knows.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// How calls are authenticated.
#[derive(Clone)]
pub struct Auth {
    pub tokens: Arc<Tokens>,
    /// `--auth token`; false for `--auth none`.
    pub required: bool,
    /// Counts the calls refused here.
    pub unauthenticated: prometheus_client::metrics::counter::Counter,
}

impl Auth {
    /// The principal behind a request's `authorization` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Unauthenticated> {
        if !self.required {
            return Ok(Principal::Anonymous);
        }
        let principal = self.principal(headers);
        if principal.is_err() {
            self.unauthenticated.inc();
        }
        principal
    }

    fn principal(&self, headers: &HeaderMap) -> Result<Principal, Unauthenticated> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Unauthenticated(
                "this control plane needs a token: send authorization: Bearer <token> (ferryctl --token or FERRY_TOKEN; the admin token of a new control plane is in <data-dir>/admin.token)"
                    .into(),
            ));
        };
        let text = value.to_str().unwrap_or_default().trim();
        let secret = match text.split_once(' ') {
            Some((scheme, secret)) if scheme.eq_ignore_ascii_case("bearer") => secret.trim(),
            _ => return Err(Unauthenticated("the authorization header must be \"Bearer <token>\"".into())),
        };
        self.tokens.authenticate(secret).ok_or_else(|| {
            Unauthenticated("the token is not known here: it was revoked, has expired, or is another mesh's".into())
        })
    }
}

/// Paths of the gRPC API that need no token.
fn open_grpc(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// The tower layer in front of the gRPC services: authenticates every call (but the health
/// service's) and hands the principal to the handlers.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Auth,
}

impl AuthLayer {
    pub fn new(auth: Auth) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { auth: self.auth.clone(), inner }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    auth: Auth,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for AuthService<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, futures::future::Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        use futures::future::Either;
        let path = request.uri().path();
        let principal = if open_grpc(path) { Ok(Principal::Anonymous) } else { self.auth.authenticate(request.headers()) };
        let principal = principal.map_err(|e| Status::unauthenticated(e.0)).and_then(|p| {
            // Reflection has no handler of ours to decide: it reads the API's shape.
            if path.starts_with("/grpc.reflection.") {
                p.require_read("reflection")?;
            }
            Ok(p)
        });
        match principal {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Either::Left(self.inner.call(request))
            }
            Err(status) => Either::Right(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_follow_the_kind_of_token() {
        let admin = Principal::Admin { id: "a".into() };
        let read = Principal::Read { id: "r".into() };
        let sidecar = Principal::Sidecar { id: "s".into(), service: "catalog".into() };
        assert!(admin.require_admin("x").is_ok() && admin.require_service("any", "x").is_ok());
        assert!(read.require_read("x").is_ok() && read.require_admin("x").is_err() && read.require_service("a", "x").is_err());
        assert!(sidecar.require_read("x").is_err() && sidecar.require_admin("x").is_err());
        assert!(sidecar.require_service("catalog", "x").is_ok());
        let refused = sidecar.require_service("payments", "registering").expect_err("another service");
        assert!(refused.0.contains("\"payments\"") && refused.0.contains("\"catalog\" only"), "{refused}");
        assert!(Principal::Anonymous.require_admin("x").is_ok());
    }
}
