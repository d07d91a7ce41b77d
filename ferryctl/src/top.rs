//! `ferryctl top`: the live traffic figures of the last minute, per service and per edge, as the
//! control plane merged them from its sidecars' reports (`ferry.v1.Discovery/Traffic`).

use std::{io::IsTerminal, time::Duration};

use ferry_proto::v1::{self, discovery_client::DiscoveryClient};

use super::{Cli, Output, connect, encode, table::Table};
use crate::control_plane::ControlPlane;

/// How often `--watch` reprints.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The figures, as a table or encoded.
pub async fn top(api: &ControlPlane, output: Output) -> anyhow::Result<String> {
    let response = DiscoveryClient::new(connect(api).await?).traffic(v1::TrafficRequest {}).await?.into_inner();
    match output {
        Output::Table => Ok(text(&response)),
        _ => encode(output, &response),
    }
}

/// Reprints the figures every [`WATCH_INTERVAL`] until Ctrl-C, clearing the screen first when
/// standard output is a terminal.
pub async fn watch(cli: &Cli) -> anyhow::Result<()> {
    let api = cli.control_plane()?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let text = loop {
            match top(&api, cli.output).await {
                Ok(text) => break text,
                Err(error) => api.failed(error).await?,
            }
        };
        // Cleared first on a terminal: the screen, then the cursor home. A reader gone away ends
        // the loop with `StdoutClosed`, which `main` turns into a quiet exit.
        let clear = if terminal { "\x1b[2J\x1b[H" } else { "" };
        crate::out::stdout(&format!("{clear}{text}"))?;
        tokio::select! {
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The services' table, then the edges'.
pub fn text(response: &v1::TrafficResponse) -> String {
    if response.services.is_empty() {
        return format!("no traffic reported in the last {}s\n", response.window_seconds);
    }
    let mut services =
        Table::new(&["SERVICE", "IN RPS", "IN SUCCESS", "IN P50", "IN P99", "OUT RPS", "OUT SUCCESS", "OUT P50", "OUT P99"]);
    for (name, traffic) in &response.services {
        let mut row = vec![name.clone()];
        row.extend(rates(traffic.inbound.as_ref()));
        row.extend(rates(traffic.outbound.as_ref()));
        services.row(row);
    }
    let mut edges = Table::new(&["FROM", "TO", "RPS", "SUCCESS", "P50", "P99"]);
    for edge in &response.edges {
        edges.row(vec![
            edge.from.clone(),
            edge.to.clone(),
            format!("{:.1}", edge.rps),
            percent(edge.success_rate),
            millis(edge.p50_ms),
            millis(edge.p99_ms),
        ]);
    }
    format!(
        "last {}s, as this control plane's sidecars reported it\n\n{}\n{}",
        response.window_seconds,
        services.render(),
        edges.render()
    )
}

fn rates(rates: Option<&v1::TrafficRates>) -> [String; 4] {
    match rates {
        Some(r) => [format!("{:.1}", r.rps), percent(r.success_rate), millis(r.p50_ms), millis(r.p99_ms)],
        None => std::array::from_fn(|_| "-".to_owned()),
    }
}

fn percent(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

fn millis(ms: f64) -> String {
    format!("{ms:.1}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_show_both_directions_and_edges_who_calls_whom() {
        let rates = |rps| Some(v1::TrafficRates { rps, success_rate: 0.998, p50_ms: 3.12, p99_ms: 12.0 });
        let mut response = v1::TrafficResponse { window_seconds: 60, ..Default::default() };
        response.services.insert("catalog".into(), v1::ServiceTraffic { inbound: rates(12.5), outbound: None });
        response.services.insert("frontend".into(), v1::ServiceTraffic { inbound: None, outbound: rates(12.5) });
        response.edges.push(v1::TrafficEdge {
            from: "frontend".into(),
            to: "catalog".into(),
            rps: 12.5,
            success_rate: 1.0,
            p50_ms: 3.0,
            p99_ms: 9.5,
        });
        let text = text(&response);
        assert!(text.contains("catalog   12.5    99.80%      3.1ms   12.0ms  -"), "{text}");
        assert!(text.contains("frontend  -       -           -       -       12.5"), "{text}");
        assert!(text.contains("frontend  catalog  12.5  100.00%  3.0ms  9.5ms"), "{text}");
        assert_eq!(
            super::text(&v1::TrafficResponse { window_seconds: 60, ..Default::default() }),
            "no traffic reported in the last 60s\n"
        );
    }
}
