//! Opaque TCP upstreams: each connection to `--upstream NAME=ADDR,protocol=tcp` is relayed byte
//! for byte to an instance of the service, registered with the app's own TCP port; a refused
//! connect moves on to another instance, and open connections spread over the instances.

use std::net::SocketAddr;

use ferry_tests::{
    ControlPlane, Sidecar,
    apps::TcpEchoApp,
    client::{self, text},
    eventually,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn register(control_plane: &ControlPlane, id: &str, port: u16) {
    let json = format!(r#"{{"id": "{id}", "service": "echo", "address": "127.0.0.1", "port": {port}}}"#);
    let answer = control_plane.send_json(http::Method::PUT, "/v1/instances", &json).await.expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
}

async fn deregister(control_plane: &ControlPlane, id: &str) {
    let answer = control_plane.send_json(http::Method::DELETE, &format!("/v1/instances/{id}"), "").await.expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
}

/// Opens a connection through `upstream`, checks that `message` comes back, and keeps it open.
async fn echoed(upstream: SocketAddr, message: &str) -> TcpStream {
    let mut stream = TcpStream::connect(upstream).await.expect("the upstream listener accepts");
    stream.write_all(message.as_bytes()).await.expect("writes");
    let mut echo = vec![0; message.len()];
    stream.read_exact(&mut echo).await.unwrap_or_else(|e| panic!("{message:?} came back: {e}"));
    assert_eq!(String::from_utf8_lossy(&echo), message);
    stream
}

async fn metrics(sidecar: &Sidecar) -> String {
    let (_, _, body) = client::get(&format!("http://{}/metrics", sidecar.admin)).await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn tcp_connections_skip_a_refusing_instance_and_spread_over_working_ones() {
    let control_plane = ControlPlane::start().await;
    let first = TcpEchoApp::start().await;
    // Bound but not listening: refuses connections, and no other test can take the port.
    let refusing = tokio::net::TcpSocket::new_v4().expect("socket");
    refusing.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    register(&control_plane, "echo-1", first.addr.port()).await;
    register(&control_plane, "echo-refusing", refusing.local_addr().expect("addr").port()).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "echo=127.0.0.1:0,protocol=tcp"]).await;
    client.wait_endpoints("echo", 2).await;
    let upstream = client.upstream("echo");

    // Every connection reaches the working instance, half of them after a refused connect.
    for i in 0..20 {
        let mut stream = echoed(upstream, &format!("hello {i}\n")).await;
        stream.shutdown().await.expect("closes");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("the relay closes after the app");
        assert!(rest.is_empty());
    }
    assert_eq!(first.accepted(), 20);
    let text = metrics(&client).await;
    assert!(text.contains(r#"ferry_tcp_connections_total{service="echo",outcome="connected"} 20"#), "{text}");

    // A second working instance in place of the refusing one: open connections are shared.
    let second = TcpEchoApp::start().await;
    register(&control_plane, "echo-2", second.addr.port()).await;
    client.wait_endpoints("echo", 3).await;
    deregister(&control_plane, "echo-refusing").await;
    client.wait_endpoints("echo", 2).await;
    eventually("the short connections to be closed", || async {
        metrics(&client).await.contains(r#"ferry_tcp_connections_open{service="echo"} 0"#).then_some(())
    })
    .await;
    let before = (first.accepted(), second.accepted());
    let mut open = Vec::new();
    for i in 0..10 {
        open.push(echoed(upstream, &format!("long-lived {i}\n")).await);
    }
    assert_eq!((first.accepted() - before.0, second.accepted() - before.1), (5, 5), "fewest open connections first");
    let text = metrics(&client).await;
    assert!(text.contains(r#"ferry_tcp_connections_open{service="echo"} 10"#), "{text}");

    // Every stream still carries its own bytes, both ways.
    for (i, stream) in open.iter_mut().enumerate() {
        let message = format!("again {i}\n");
        stream.write_all(message.as_bytes()).await.expect("writes");
        let mut echo = vec![0; message.len()];
        stream.read_exact(&mut echo).await.expect("echoed");
        assert_eq!(String::from_utf8_lossy(&echo), message);
    }
    drop(open);
    eventually("the relayed connections to close", || async {
        let text = metrics(&client).await;
        let closed = text.contains(r#"ferry_tcp_connections_open{service="echo"} 0"#) && first.open() + second.open() == 0;
        closed.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_tcp_connection_that_cannot_be_placed_is_closed_with_a_warning() {
    let control_plane = ControlPlane::start().await;
    let refusing = tokio::net::TcpSocket::new_v4().expect("socket");
    refusing.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    register(&control_plane, "echo-refusing", refusing.local_addr().expect("addr").port()).await;
    let client = Sidecar::start(
        &control_plane.reach(),
        "frontend",
        None,
        &["--upstream", "echo=127.0.0.1:0,protocol=tcp", "--upstream", "ghost=127.0.0.1:0,protocol=tcp"],
    )
    .await;
    client.wait_endpoints("echo", 1).await;

    for (service, reason) in [("echo", "connect_failed"), ("ghost", "unknown_service")] {
        let mut stream = TcpStream::connect(client.upstream(service)).await.expect("the upstream listener accepts");
        let mut rest = Vec::new();
        // Closed by the sidecar: an end of stream, or a reset if the write below raced it.
        let _ = stream.write_all(b"anyone?").await;
        let _ = stream.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{service}: nothing came back");
        eventually(&format!("a warning about {service}"), || async {
            let log = client.process.log();
            let warned = log.lines().any(|line| {
                line.contains("WARN")
                    && line.contains("closing a TCP connection that could not be placed")
                    && line.contains(&format!("service={service}"))
                    && line.contains(reason)
            });
            warned.then_some(())
        })
        .await;
        let text = metrics(&client).await;
        assert!(text.contains(&format!(r#"ferry_tcp_connections_total{{service="{service}",outcome="{reason}"}} 1"#)), "{text}");
    }
}
