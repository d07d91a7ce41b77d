//! The usual ports of the control plane and the client sidecar (the README's), and what a run
//! says when it cannot take them: which, why, and what the README's commands need instead.

/// A port a child listens on: the usual one (the README's) when it is free, else any.
#[derive(Debug, Clone)]
pub struct Port {
    /// What listens there, such as "the control plane's gRPC".
    pub what: &'static str,
    /// The key of the child's "listening" line that reports it.
    pub key: &'static str,
    pub usual: &'static str,
    /// Why the usual address is not used, when it is not, such as "cannot be bound (TCP:
    /// Address already in use (os error 98))".
    pub not_usual: Option<String>,
}

impl Port {
    /// A TCP port: `usual` if it can be bound now.
    pub fn tcp(what: &'static str, key: &'static str, usual: &'static str) -> Self {
        let not_usual = std::net::TcpListener::bind(usual).err().map(|e| format!("cannot be bound (TCP: {e})"));
        Self { what, key, usual, not_usual }
    }

    /// A DNS port: `usual` if it can be bound now over UDP and TCP.
    pub fn dns(what: &'static str, key: &'static str, usual: &'static str) -> Self {
        let not_usual = match std::net::UdpSocket::bind(usual) {
            Err(e) => Some(format!("cannot be bound (UDP: {e})")),
            Ok(_udp) => std::net::TcpListener::bind(usual).err().map(|e| format!("cannot be bound (TCP: {e})")),
        };
        Self { what, key, usual, not_usual }
    }

    /// Gives up the usual address, for `why`.
    pub fn any(&mut self, why: &str) {
        self.not_usual.get_or_insert_with(|| why.to_owned());
    }

    /// The address to pass the child.
    pub fn arg(&self) -> String {
        match self.not_usual {
            None => self.usual.to_owned(),
            Some(_) => "127.0.0.1:0".to_owned(),
        }
    }
}

/// Says which usual ports (the README's) a run could not take, why, and what the README's
/// commands need instead: each port with the address it got.
pub fn port_notes(bound: &[(&Port, String)]) -> Vec<String> {
    let moved: Vec<&(&Port, String)> = bound.iter().filter(|(port, actual)| port.usual != actual).collect();
    if moved.is_empty() {
        return Vec::new();
    }
    let mut lines = vec!["ports          not the usual ones, so the README's commands need other addresses:".to_owned()];
    for (port, actual) in &moved {
        let why = port.not_usual.as_deref().unwrap_or("was taken when the child bound it");
        lines.push(format!("               {} ({}) {why}: it listens on {actual}", port.usual, port.what));
    }
    for (port, actual) in &moved {
        let line = match port.key {
            "grpc" => {
                format!("ferryctl --control-plane https://{actual} ...   (or: export FERRY_CONTROL_PLANE=https://{actual})")
            }
            "http" => format!("curl https://{actual}/v1/...   instead of https://{}/v1/...", port.usual),
            "dns" => format!("dig @127.0.0.1 -p {} ...   instead of -p {}", port_of(actual), port_of(port.usual)),
            "outbound" => format!("curl -x http://{actual} ...   instead of -x http://{}", port.usual),
            "admin" => {
                format!("curl http://{actual}/config, ferryctl explain ... --sidecar {actual}   instead of {}", port.usual)
            }
            _ => continue,
        };
        lines.push(format!("                 {line}"));
    }
    lines.push(
        "               (`ss -ltnup` shows what holds the usual ones, such as another ferry-demo still running)".to_owned(),
    );
    lines
}

/// The port of `host:port`.
fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port as [`Port::tcp`] would make it, without binding anything.
    fn port(what: &'static str, key: &'static str, usual: &'static str, not_usual: Option<&str>) -> Port {
        Port { what, key, usual, not_usual: not_usual.map(str::to_owned) }
    }

    #[test]
    fn a_moved_port_says_why_and_what_to_type_instead() {
        let in_use = "cannot be bound (TCP: Address already in use (os error 98))";
        let grpc = port("the control plane's gRPC (ferryctl)", "grpc", "127.0.0.1:7070", Some(in_use));
        let http = port("the control plane's HTTP API", "http", "127.0.0.1:7071", None);
        let lines = port_notes(&[(&grpc, "127.0.0.1:36867".to_owned()), (&http, "127.0.0.1:7071".to_owned())]).join("\n");
        assert!(
            lines.contains(&format!(
                "127.0.0.1:7070 (the control plane's gRPC (ferryctl)) {in_use}: it listens on 127.0.0.1:36867"
            )),
            "{lines}"
        );
        assert!(lines.contains("ferryctl --control-plane https://127.0.0.1:36867"), "{lines}");
        assert!(!lines.contains("curl https://"), "the HTTP port is the usual one: {lines}");
        assert!(port_notes(&[(&http, "127.0.0.1:7071".to_owned())]).is_empty(), "nothing to say when every port is usual");
    }
}
