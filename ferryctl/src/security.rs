//! The trust commands of `ferryctl`: `token create|list|revoke` and `ca bundle|status|rotate|retire`.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use ferry_proto::v1::{self, ca_client::CaClient, tokens_client::TokensClient};

use super::{ControlPlane, Output, UsageError, ago, connect, encode, table::Table};

/// `ferryctl token ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print its secret alone on standard output (shown once: only its hash is
    /// kept).
    Create {
        /// admin (everything), read (every read) or sidecar (one service's sidecars).
        #[arg(long, value_enum)]
        kind: TokenKindArg,
        /// The service a sidecar token acts for.
        #[arg(long, required_if_eq("kind", "sidecar"))]
        service: Option<String>,
        /// How long it lives; forever by default.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// A note, such as who it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tokens (never their secrets).
    List,
    /// Revoke a token: calls with it fail from now on, and the config streams it opened end.
    Revoke {
        /// The token's id, from `ferryctl token list`.
        id: String,
    },
}

/// A kind of token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenKindArg {
    Admin,
    Read,
    Sidecar,
}

/// `ferryctl ca ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CaCommand {
    /// Print the trust bundle (PEM): the roots to give clients as --ca-file or curl --cacert.
    Bundle,
    /// How far a rotation has come, and which sidecars hold leaves of the current issuer.
    Status,
    /// Add a new root; once every connected sidecar trusts it, its issuer signs and every leaf
    /// rolls. Waits for that, up to --wait.
    Rotate {
        /// How long to wait for the new issuer to take over.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Duration,
    },
    /// Drop every root but the newest, once every connected sidecar holds a leaf of the new issuer.
    Retire {
        /// Retire even though some sidecars still hold older leaves.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a token command.
pub async fn token(api: &ControlPlane, output: Output, command: TokenCommand) -> anyhow::Result<String> {
    let mut client = TokensClient::new(connect(api).await?);
    match command {
        TokenCommand::Create { kind, service, ttl, description } => {
            let kind = match kind {
                TokenKindArg::Admin => v1::TokenKind::Admin,
                TokenKindArg::Read => v1::TokenKind::Read,
                TokenKindArg::Sidecar => v1::TokenKind::Sidecar,
            };
            if let Some(service) = &service {
                ferry_proto::validate::service_name("--service", service).map_err(|e| UsageError(e.to_string()))?;
            }
            let request = v1::CreateTokenRequest {
                kind: kind as i32,
                service: service.unwrap_or_default(),
                ttl: ttl.map(ferry_health::spec::proto_duration),
                description,
            };
            let response = client.create(request).await?.into_inner();
            // Which row of `token list` it is, on stderr: stdout stays the secret alone.
            if let (Output::Table, Some(token)) = (output, &response.token) {
                crate::out::stderr(&created_line(token));
            }
            match output {
                // The secret alone, so that `$(ferryctl token create ...)` is the token.
                Output::Table => Ok(format!("{}\n", response.secret)),
                _ => encode(output, &response),
            }
        }
        TokenCommand::List => {
            let response = client.list(v1::ListTokensRequest {}).await?.into_inner();
            match output {
                Output::Table => {
                    let mut table = Table::new(&["ID", "KIND", "SERVICE", "CREATED", "EXPIRES", "DESCRIPTION"]);
                    for token in &response.tokens {
                        let expires = expires(token);
                        table.row(vec![
                            token.id.clone(),
                            kind(token).into(),
                            if token.service.is_empty() { "-".into() } else { token.service.clone() },
                            ago(token.created_at.as_ref()),
                            expires,
                            if token.description.is_empty() { "-".into() } else { token.description.clone() },
                        ]);
                    }
                    Ok(table.render())
                }
                _ => encode(output, &response),
            }
        }
        TokenCommand::Revoke { id } => {
            let response = client.revoke(v1::RevokeTokenRequest { id: id.clone() }).await?.into_inner();
            match output {
                Output::Table => Ok(format!("revoked {id}\n")),
                _ => encode(output, &response),
            }
        }
    }
}

/// A token's kind in one word.
fn kind(token: &v1::Token) -> &'static str {
    v1::TokenKind::try_from(token.kind).map_or("unknown", |k| match k {
        v1::TokenKind::Admin => "admin",
        v1::TokenKind::Read => "read",
        v1::TokenKind::Sidecar => "sidecar",
        v1::TokenKind::Unspecified => "unknown",
    })
}

/// When a token expires, as `token list` shows it.
fn expires(token: &v1::Token) -> String {
    token
        .expires_at
        .map_or("never".to_owned(), |at| humantime::format_rfc3339_seconds(ferry_proto::time::system_time(at)).to_string())
}

/// What `token create` says on stderr of the token it made: never its secret.
fn created_line(token: &v1::Token) -> String {
    let service = if token.service.is_empty() { String::new() } else { format!(" for service {}", token.service) };
    format!("created token {} (kind {}{service}, expires {})\n", token.id, kind(token), expires(token))
}

/// Runs a CA command.
pub async fn ca(api: &ControlPlane, output: Output, command: CaCommand) -> anyhow::Result<String> {
    let mut client = CaClient::new(connect(api).await?);
    let status = match command {
        CaCommand::Bundle => {
            let bundle = client.get_bundle(v1::GetBundleRequest {}).await?.into_inner();
            return match output {
                Output::Table => Ok(bundle.roots_pem),
                _ => encode(output, &bundle),
            };
        }
        CaCommand::Status => client.status(v1::CaStatusRequest {}).await?.into_inner(),
        CaCommand::Rotate { wait } => {
            let mut status = client.rotate(v1::RotateRequest {}).await?.into_inner();
            let deadline = tokio::time::Instant::now() + wait;
            while waiting(&status) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                status = client.status(v1::CaStatusRequest {}).await?.into_inner();
            }
            status
        }
        CaCommand::Retire { force } => client.retire(v1::RetireRequest { force }).await?.into_inner(),
    };
    match output {
        Output::Table => Ok(status_text(&status)),
        _ => encode(output, &status),
    }
}

/// Whether a rotation still waits for sidecars to trust its root.
fn waiting(status: &v1::CaStatus) -> bool {
    status.rotation.starts_with("waiting")
}

fn status_text(status: &v1::CaStatus) -> String {
    let bundle = status.bundle.clone().unwrap_or_default();
    let issuer_until = status
        .issuer_not_after
        .map_or("-".to_owned(), |at| humantime::format_rfc3339_seconds(ferry_proto::time::system_time(at)).to_string());
    let mut out = format!(
        "trust domain  {}\nbundle        version {}, {} root(s){}\nissuer until  {issuer_until}\nsidecars      {} connected, {} with a leaf of the current issuer\n",
        bundle.trust_domain,
        bundle.version,
        status.roots,
        if status.external { " (the operator's issuer, --ca-cert)" } else { "" },
        status.sidecars,
        status.sidecars_current,
    );
    if !status.rotation.is_empty() {
        out.push_str(&format!("rotation      {}\n", status.rotation));
    }
    if !status.behind.is_empty() {
        out.push_str(&format!("behind        {}\n", status.behind.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_created_line_names_the_row_of_token_list_and_never_the_secret() {
        let token = v1::Token {
            id: "tok-7f3a".into(),
            kind: v1::TokenKind::Sidecar as i32,
            service: "catalog".into(),
            expires_at: Some(ferry_proto::types::Timestamp { seconds: 1_800_000_000, nanos: 0 }),
            ..Default::default()
        };
        assert_eq!(
            created_line(&token),
            "created token tok-7f3a (kind sidecar for service catalog, expires 2027-01-15T08:00:00Z)\n"
        );
        let token = v1::Token { id: "tok-1".into(), kind: v1::TokenKind::Read as i32, ..Default::default() };
        assert_eq!(created_line(&token), "created token tok-1 (kind read, expires never)\n");
    }
}
